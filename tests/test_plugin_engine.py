"""The blend plugin's per-step behaviour in the real SGLang 0.5.23 engine on CPU: paced prefill
budgets, bad output-length hints, bad `--blend-*` flags.

Engines run in their own process group (this file is also the scenario script:
`python tests/test_plugin_engine.py SPEC.json OUT.json`), killed when the test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scenario(spec: dict) -> dict:
    """A batch with shared prefixes and long outputs (so steps decode while others prefill);
    some requests carry bad `blendserve_output_len` hints."""
    import random

    import sglang

    rng = random.Random(0)
    prompts, params = [], []
    bad_hints = ["abc", [3, 4], float("inf"), -7, True]
    for i in range(spec["n"]):
        prompts.append(("A shared system prompt that repeats itself. " * 6) + f"Item {i}: " + "word " * rng.randint(5, 60))
        p = {"temperature": 0.0, "max_new_tokens": rng.choice([4, 16, 64]), "ignore_eos": i % 2 == 0}
        if i < len(bad_hints):
            p["custom_params"] = {"blendserve_output_len": bad_hints[i]}
        params.append(p)
    engine = sglang.Engine(model_path=spec["model_path"], device="cpu", attention_backend="torch_native",
                           schedule_policy="blend", max_total_tokens=16384, chunked_prefill_size=2048,
                           max_prefill_tokens=2048, enable_mixed_chunk=True,  # pacing needs mixed steps
                           random_seed=0, log_level="error", **{f"blend_{k}": v for k, v in spec.get("blend", {}).items()})
    try:
        outs = engine.generate(prompt=prompts, sampling_params=params)
    finally:
        engine.shutdown()
    return {"completion_tokens": [o["meta_info"]["completion_tokens"] for o in outs],
            "max_new_tokens": [p["max_new_tokens"] for p in params], "ignore_eos": [p["ignore_eos"] for p in params]}


if __name__ == "__main__":
    spec_path, out_path = sys.argv[1:3]
    Path(out_path).write_text(json.dumps(_scenario(json.loads(Path(spec_path).read_text()))))
    raise SystemExit(0)


import pytest  # noqa: E402

from blendserve_sgl.harness import cpu_engine_env, kill_group  # noqa: E402

pytestmark = pytest.mark.engine
if os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1":
    pytest.skip("BLENDSERVE_SKIP_ENGINE=1", allow_module_level=True)

ENV = cpu_engine_env()


def test_paced_budgets_and_bad_hints_in_the_engine(tiny_llama, tmp_path):
    """With --enable-mixed-chunk, every prefill step SGLang runs under blend stays within the paced
    budget the plugin set (core/pacing.py for the running batch), the budget follows the decode batch (it is below the
    configured 2,048 tokens on some steps and changes between steps), and requests with bad
    output-length hints ("abc", a list, inf, negative, bool) finish like the others. The settings
    reach the scheduler as `sglang.Engine` keywords (`blend_trace_path`, `blend_hardware`): the
    trace is written, and the budget binds only under the a100 preset."""
    trace = tmp_path / "trace.jsonl"
    spec, out = tmp_path / "spec.json", tmp_path / "out.json"
    n = 40
    # the a100 cost model: on the `cpu` preset a step's fixed cost (weight read + per-step overhead)
    # sizes every paced chunk above the configured 2,048 tokens, so the budget would never bind
    spec.write_text(json.dumps({"model_path": tiny_llama, "n": n, "blend": {"trace_path": str(trace),
                                                                              "hardware": "a100"}}))
    env = {k: v for k, v in ENV.items() if k not in ("BLENDSERVE_TRACE_PATH", "BLENDSERVE_HARDWARE")}
    proc = subprocess.Popen([sys.executable, __file__, str(spec), str(out)], env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"engine run failed:\n{output[-4000:]}"
    res = json.loads(out.read_text())
    for i, (tokens, limit, fixed) in enumerate(zip(res["completion_tokens"], res["max_new_tokens"], res["ignore_eos"])):
        assert 1 <= tokens <= limit and (tokens == limit or not fixed), (i, tokens, limit)
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    paced = [s for s in steps if s.get("paced")]
    assert paced, "no paced step recorded"
    for s in paced:
        assert s["paced"]["stock"] == 2048
        assert (s["prefill_tokens"] or 0) <= s["paced"]["budget"], s
    budgets = {s["paced"]["budget"] for s in paced}
    assert min(budgets) < 2048 and len(budgets) > 1, budgets
    assert any((s["prefill_tokens"] or 0) > 0 and s["paced"]["budget"] < 2048 for s in paced)


@pytest.mark.parametrize("var, value, backend", [("BLENDSERVE_KEEP_SHARING", "abc", "torch_native"),
                                                 ("BLENDSERVE_CASCADE_LEVELS", "65", "cascade")])
def test_bad_variables_stop_the_launch_before_any_model_loads(tmp_path, var, value, backend):
    """`sglang.Engine(schedule_policy="blend")` with a bad variable loaded the weights, then the
    scheduler raised and SGLang killed the calling process (the check hooked `ServerArgs.__post_init__`,
    which msgspec never calls through the hook); `launch_server` printed a traceback (exit 1).
    Now the Engine raises ValueError in the caller before any scheduler starts, and the server's
    command line ends in one line naming the variable, exit 2."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from cpu_smoke import write_tiny_llama

    model = write_tiny_llama(tmp_path / "tiny")
    env = {**ENV, var: value}
    code = (f"import sglang\ntry:\n    sglang.Engine(model_path={str(model)!r}, device='cpu', schedule_policy='blend', "
            f"attention_backend={backend!r}, log_level='error')\nexcept ValueError as exc:\n    print('REFUSED', exc)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600,
                         start_new_session=True)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and f"REFUSED {var}={value!r}" in out.stdout, text[-3000:]
    assert "Scheduler hit an exception" not in text and "Traceback" not in text, text[-3000:]
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(model), "--device", "cpu",
                          "--schedule-policy", "blend", "--attention-backend", backend],
                         env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    text = out.stdout + out.stderr
    assert out.returncode == 2 and f"error: {var}={value!r}" in text and "Traceback" not in text, text[-3000:]


def test_bad_flag_stops_launch_server_before_the_model_loads(tmp_path):
    """A bad `--blend-*` value stops `launch_server` while the command line is parsed: the
    message names the flag as typed, and the model path (which does not exist) is never read."""
    missing = tmp_path / "no-model-here"
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", str(missing),
                          "--schedule-policy", "blend", "--blend-keep-sharing", "1.5", "--device", "cpu"],
                         env=ENV, capture_output=True, text=True, timeout=600, start_new_session=True)
    text = out.stdout + out.stderr
    assert out.returncode == 2, text[-3000:]  # argparse's usage error
    assert "--blend-keep-sharing" in text and "must be in [0, 1]" in text, text[-3000:]
    assert "Traceback" not in text and str(missing) not in text.replace(f"--model-path {missing}", ""), text[-3000:]
