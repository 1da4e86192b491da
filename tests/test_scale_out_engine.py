"""Scale-out on the real SGLang engine on CPU (tiny random Llama), each scenario in its own
process (`scale_out_scenarios.py`): `--dp 2` routing, and two Ray replicas with one killed
mid-run. Set BLENDSERVE_SKIP_ENGINE=1 to skip them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blendserve_sgl.harness import cpu_engine_env, kill_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine

if os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1":
    pytest.skip("BLENDSERVE_SKIP_ENGINE=1", allow_module_level=True)

ENV = cpu_engine_env()


def scenario(name: str, spec: dict, tmp_path: Path, timeout: float = 1500) -> dict:
    spec_path, out_path, log = tmp_path / "spec.json", tmp_path / "out.json", tmp_path / f"{name}.log"
    spec_path.write_text(json.dumps({"dir": str(tmp_path), **spec}))
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "scale_out_scenarios.py"), name, str(spec_path),
                             str(out_path)], env=ENV, start_new_session=True, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, f"scenario {name} failed ({proc.returncode}):\n{log.read_text()[-4000:]}"
    return json.loads(out_path.read_text())


def test_dp2_every_rank_runs_blend_and_each_request_reaches_its_shards_rank(tiny_llama, tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--dp 2 on CPU needs two cores")
    got = scenario("dp", {"n": 24, "model_path": tiny_llama}, tmp_path)
    assert got["policies"] == ["BlendPolicy", "BlendPolicy"] and got["check_error"] is None
    reqs = got["requests"]
    assert len(reqs) == 24
    assert {v["planned"] for v in reqs.values()} == {0, 1}
    assert all(v["dp_rank"] == v["planned"] for v in reqs.values()), reqs
    assert sum(v["cached"] for v in reqs.values()) > 0  # each rank reuses its shard's prefixes


def test_ray_replica_killed_mid_run_every_custom_id_once(tiny_llama, tmp_path):
    """Replica 0 is killed after its first chunk comes back (it has more chunks left: 4 requests a
    chunk, one chunk in flight); Ray restarts it and re-runs its unfinished chunks."""
    pytest.importorskip("ray")
    got = scenario("ray", {"n": 24, "model_path": tiny_llama, "kill": True, "chunk": 4}, tmp_path)
    report = got["report"]
    assert got["killed"] and report["lost_replicas"] == []
    assert report["shard_sizes"][0] > 2 * 4  # replica 0 had chunks left when it was killed
    assert len(report["pids"][0]) == 2  # its chunks came back from the first and the restarted process
    recs = [json.loads(x) for x in Path(got["output"]).read_text().splitlines()]
    ids = [r["custom_id"] for r in recs]
    assert sorted(ids) == sorted(got["custom_ids"]) and len(ids) == len(set(ids))
    assert all(r["error"] is None for r in recs)


@pytest.mark.parametrize("flags", [["--ray", "--replicas", "2"], ["--dp", "2"]])
def test_blendserve_run_two_replicas_writes_every_custom_id_once(tiny_llama, tmp_path, flags):
    """The command end to end with two replicas (a local Ray cluster, or SGLang's DP ranks): one
    output file, every custom_id once. With --ray, RAY_ADDRESS names a cluster nobody runs: without
    --ray-address the replicas still run on a local cluster (Ray would connect there, and refuse)."""
    if "--ray" in flags:
        pytest.importorskip("ray")
    elif len(os.sched_getaffinity(0)) < 2:
        pytest.skip("--dp 2 on CPU needs two cores")
    sys.path.insert(0, str(ROOT / "tests"))
    from scale_out_scenarios import shared_prefix_requests

    src, out, log = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "run.log"
    summary = tmp_path / "summary.json"
    shared_prefix_requests(src, 16)
    proc = subprocess.Popen([sys.executable, "-m", "blendserve_sgl.cli", "run", str(src), "-o", str(out), "--model",
                             tiny_llama, *flags, "--max-total-tokens", "4096", "--quiet", "--workers", "0",
                             "--summary-json", str(summary)],
                            env={**ENV, "RAY_ADDRESS": "127.0.0.1:1"} if "--ray" in flags else ENV,
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=1500)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, log.read_text()[-4000:]
    ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert sorted(ids) == sorted(f"r{i}" for i in range(16))
    # each replica's policy counted apart and summed (one file for all held whichever wrote last)
    ps = json.loads(summary.read_text())["policy_stats"]
    assert ps["replicas"] == 2 and all(part.get("steps") for part in ps["per_replica"])
    assert ps["steps"] == sum(part["steps"] for part in ps["per_replica"])
    if "--dp" in flags:
        assert [part["dp_rank"] for part in ps["per_replica"]] == [0, 1]
    else:
        assert "RAY_ADDRESS is 127.0.0.1:1, but without --ray-address" in log.read_text()
