"""`--attention-backend cascade` in the real SGLang 0.5.23 engine on CPU against `torch_native`.

Each engine runs in its own process group (tests/engine_scenarios.py), killed when the test
ends, also when it fails. BLENDSERVE_SKIP_ENGINE=1 skips this module.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from blendserve_sgl.harness import cpu_engine_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine

if os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1":
    pytest.skip("BLENDSERVE_SKIP_ENGINE=1", allow_module_level=True)

ENV = cpu_engine_env()
NEAR_TIE = 0.05  # nats between the best and second-best token, as in test_engine_e2e.py


def _generate(tmp_path: Path, name: str, env: dict, **spec) -> dict:
    spec_path, out_path = tmp_path / f"{name}.spec.json", tmp_path / f"{name}.out.json"
    spec_path.write_text(json.dumps(spec))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "engine_scenarios.py"), "generate", str(spec_path),
                             str(out_path)], env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"engine scenario {name} failed:\n{output[-4000:]}"
    return json.loads(out_path.read_text())


def test_cascade_backend_generates_what_torch_native_generates(tiny_llama, tmp_path):
    """24 requests behind three shared prefixes, 2-48 greedy tokens each (fcfs). The cascade ran
    (its counters: decode steps with shared groups, fewer KV tokens read than per-request
    attention). Outputs equal torch_native's request by request, except where a different float
    summation order flips a near-tie: at the first differing token both runs must show a top-2
    log-probability gap below NEAR_TIE (the random-weight model has flat logits; measured here: 2
    of 24 requests, at gaps <= 0.001)."""
    n = 24
    stats = tmp_path / "cascade_stats.json"
    cascade = _generate(tmp_path, "cascade", {**ENV, "BLENDSERVE_CASCADE_STATS_PATH": str(stats)},
                        model_path=tiny_llama, policy="fcfs", n=n, backend="cascade")
    native = _generate(tmp_path, "native", ENV, model_path=tiny_llama, policy="fcfs", n=n, backend="torch_native")
    st = json.loads(stats.read_text())
    assert st["cascade_steps"] >= 1 and st["shared_requests"] >= 2, st
    assert st["tokens_read"] < st["tokens_per_request"], st
    for res in (cascade, native):
        assert all(1 <= t <= m for t, m in zip(res["completion_tokens"], res["max_new_tokens"])), res["completion_tokens"]
    differ = [i for i in range(n) if cascade["token_ids"][i] != native["token_ids"][i]]
    assert len(differ) <= n // 4, f"{len(differ)} of {n} requests differ from torch_native: {differ}"
    for i in differ:
        a, b = cascade["token_ids"][i], native["token_ids"][i]
        k = next(j for j in range(min(len(a), len(b)) + 1) if j == min(len(a), len(b)) or a[j] != b[j])
        if k == min(len(a), len(b)):
            continue  # one stopped earlier: a stop token at a near-tie, the same rule applies before it
        gaps = (cascade["top2_gap"][i][k], native["top2_gap"][i][k])
        assert max(gaps) < NEAR_TIE, f"request {i} diverges at token {k} without a near-tie (gaps {gaps})"
