"""The `blend` policy in the real SGLang 0.5.23 engine on CPU: Engine.generate, launch_server.

Every engine runs in its own process group (tests/engine_scenarios.py or launch_server), which
is killed when the test ends, also when it fails. Set BLENDSERVE_SKIP_ENGINE=1 to skip these
on a machine without the SGLang environment (`make test` builds it; CI never skips).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from blendserve_sgl.harness import cpu_engine_env, kill_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine

if os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1":
    pytest.skip("BLENDSERVE_SKIP_ENGINE=1", allow_module_level=True)

ENV = cpu_engine_env()


@pytest.fixture(scope="session", autouse=True)
def sglang_installed():
    try:
        import sglang  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"SGLang is not importable here ({exc}); run `make test`, which installs it, "
                    "or set BLENDSERVE_SKIP_ENGINE=1 to skip the engine tests")


@pytest.fixture(scope="session")
def smollm2() -> str:
    sys.path.insert(0, str(ROOT / "scripts"))
    from convert_smollm2 import convert_smollm2

    cache = os.environ.get("BLENDSERVE_MODEL_CACHE", "~/.cache/blendserve-sgl")
    return str(convert_smollm2(cache))


def run_generate(tmp_path: Path, name: str, **spec) -> dict:
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "engine_scenarios.py"), "generate",
                             str(spec_path), str(out_path)], env=ENV, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"engine scenario {name} failed:\n{output[-4000:]}"
    return json.loads(out_path.read_text())


def _check_complete(res: dict, n: int) -> None:
    assert len(res["texts"]) == n
    for i, (tokens, limit, fixed) in enumerate(zip(res["completion_tokens"], res["max_new_tokens"], res["ignore_eos"])):
        assert 1 <= tokens <= limit, f"request {i}: {tokens} tokens, limit {limit}"
        if fixed:
            assert tokens == limit, f"request {i} has ignore_eos but produced {tokens} of {limit} tokens"


@pytest.mark.parametrize("model", ["tiny", "smollm2"])
def test_blend_completes_and_changes_only_when_requests_run(model, tmp_path, request):
    """A shared-prefix batch with mixed output lengths completes under `blend`, and the policy
    ran (its stats come from inside the scheduler). The policy changes when requests run, not
    what they generate: greedy outputs equal `fcfs`'s request by request, except where a
    different batch composition changes float rounding at a near-tie: at the first differing
    token both runs must show a top-2 log-probability gap below 0.05 nats (random-weight models
    have flat logits, so such ties happen). Shared prefixes hit the radix cache (how often,
    against other policies, is measured by the benchmarks, not asserted here)."""
    path = request.getfixturevalue("tiny_llama" if model == "tiny" else "smollm2")
    n = 60 if model == "tiny" else 24
    stats = tmp_path / "stats.json"
    blend = run_generate(tmp_path, "blend", model_path=path, policy="blend", n=n, stats_path=str(stats))
    fcfs = run_generate(tmp_path, "fcfs", model_path=path, policy="fcfs", n=n)
    _check_complete(blend, n)
    _check_complete(fcfs, n)
    st = blend["policy_stats"]
    assert st["policy"] == "blend" and st["handed_out"] >= n and st["waiting"] == 0, st
    differ = [i for i in range(n) if blend["token_ids"][i] != fcfs["token_ids"][i]]
    # paced prefill gives blend other batches than fcfs; each fork must sit at a near-tie (below)
    assert len(differ) <= n // 4, f"greedy outputs differ from fcfs for {len(differ)} of {n} requests: {differ}"
    for i in differ:
        a, b = blend["token_ids"][i], fcfs["token_ids"][i]
        k = next(j for j in range(min(len(a), len(b)) + 1) if j == min(len(a), len(b)) or a[j] != b[j])
        if k == min(len(a), len(b)):
            continue  # one is a prefix of the other: a stop token at a near-tie, checked below
        gaps = (blend["top2_gap"][i][k], fcfs["top2_gap"][i][k])
        assert max(gaps) < 0.05, f"request {i} diverges at token {k} without a near-tie (gaps {gaps})"
    assert sum(blend["cached_tokens"]) > 0  # the shared prefixes are served from the radix cache under blend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launch_server_serves_openai_completions_with_blend(tiny_llama, tmp_path):
    """`python -m sglang.launch_server --schedule-policy blend` on 127.0.0.1 answers
    /v1/completions (its knobs given as --blend-* flags), then shuts down cleanly."""
    port = _free_port()
    log = open(tmp_path / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_llama,
                             "--schedule-policy", "blend", "--blend-hardware", "cpu", "--blend-sample-fraction", "0.05",
                             "--device", "cpu", "--attention-backend", "torch_native", "--host", "127.0.0.1",
                             "--port", str(port), "--max-total-tokens", "8192", "--log-level", "warning"],
                            env={**ENV, "BLENDSERVE_STATS_PATH": str(tmp_path / "stats.json")},
                            start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 300
        while True:
            assert proc.poll() is None, "server exited:\n" + (log.seek(0) or log.read()[-4000:])
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "server did not come up in 300 s"
                time.sleep(2)
        body = json.dumps({"model": "tiny", "prompt": ["Hello there, how are", "Hello there, what is"],
                           "max_tokens": 8, "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        reply = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert len(reply["choices"]) == 2 and all(c["text"] for c in reply["choices"])
        assert reply["usage"]["completion_tokens"] >= 2
        stats = json.loads((tmp_path / "stats.json").read_text())
        assert stats["policy"] == "blend" and stats["hardware"] == "cpu"
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        kill_group(proc)
        log.close()
    assert proc.returncode is not None


def test_help_lists_blend_and_its_flags():
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"], env=ENV, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "blend" in out.stdout and "--blend-hardware" in out.stdout and "--blend-keep-sharing" in out.stdout


def test_bad_knob_fails_before_the_engine_starts(tiny_llama):
    """A bad `--blend-*` value stops `launch_server` at argument parsing, naming the flag."""
    out = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--model-path", tiny_llama,
                          "--schedule-policy", "blend", "--blend-sample-fraction", "2", "--device", "cpu"],
                         env=ENV, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert out.returncode == 2
    assert "--blend-sample-fraction" in out.stdout + out.stderr
