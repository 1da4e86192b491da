"""Scale-out scenarios run in their own process by `test_scale_out_engine.py` (SGLang kills its
parent when a scheduler dies, so tests never start an engine in the pytest process).

    python tests/scale_out_scenarios.py dp SPEC.json OUT.json     # one engine, dp_size=2, routed shards
    python tests/scale_out_scenarios.py ray SPEC.json OUT.json    # two Ray replicas, optional kill drill
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def shared_prefix_requests(path: Path, n: int) -> None:
    """n completion requests behind three long shared prefixes, short and long answers."""
    prefixes = ["You are a careful assistant. Answer briefly and precisely. " * 6,
                "The following are questions about astronomy with answers. Q: What orbits the Earth? A: The Moon. " * 4,
                "Translate the sentence into French, keeping the tone formal and polite. " * 5]
    with open(path, "w") as f:
        for i in range(n):
            body = {"prompt": prefixes[i % 3] + f"Question {i}: what is {i * 7 % 97} plus {i}?",
                    "max_tokens": (2, 8, 24)[i % 3], "temperature": 0.0}
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions", "body": body}) + "\n")


def prepared(spec: dict) -> list:
    from transformers import AutoTokenizer

    from blendserve_sgl.batch.prompts import prepare
    from blendserve_sgl.batch.requests import read_requests

    src = Path(spec["dir"]) / "requests.jsonl"
    shared_prefix_requests(src, spec["n"])
    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    return [prepare(r, tok, 2048, 16) for r in read_requests(src)]


def cost(spec: dict):
    from blendserve_sgl.core import CostModel
    from blendserve_sgl.core.specs import ModelSpec, hardware

    cfg = json.loads((Path(spec["model_path"]) / "config.json").read_text())
    return CostModel(ModelSpec.from_hf_config(cfg), hardware("cpu"))


def dp(spec: dict) -> dict:
    from blendserve_sgl.batch import dispatch, runner

    items = prepared(spec)
    runner.prepare_environment("cpu")
    kw = dispatch.dp_engine_kwargs(2, "cpu")
    cfg = runner.EngineConfig(model_path=spec["model_path"], policy=spec.get("policy", "blend"), device="cpu",
                              max_total_tokens=4096, extra=kw)
    engine = runner.start_engine(cfg)
    try:
        policies = dispatch.rank_policies(engine)
        try:
            dispatch.check_ranks(engine, 2)
            check_error = None
        except dispatch.DispatchError as exc:
            check_error = str(exc)
        parts = dispatch.shards(items, 2, cost(spec))
        got = {}
        for rank, part in enumerate(parts):
            outs = engine.generate(input_ids=[p.input_ids for p in part],
                                   sampling_params=[p.sampling_params for p in part], routed_dp_rank=rank)
            for p, o in zip(part, outs):
                got[p.request.custom_id] = {"planned": rank, "dp_rank": o["meta_info"].get("dp_rank"),
                                            "cached": o["meta_info"].get("cached_tokens", 0)}
    finally:
        engine.shutdown()
    return {"policies": policies, "check_error": check_error, "requests": got}


def ray(spec: dict) -> dict:
    import ray as ray_mod

    from blendserve_sgl.batch import dispatch, ray_runner, runner
    from blendserve_sgl.batch.results import ResultWriter, error_record, ok_record

    items = prepared(spec)
    runner.prepare_environment("cpu")
    cfg = runner.EngineConfig(model_path=spec["model_path"], policy="blend", device="cpu", max_total_tokens=4096)
    out_path = Path(spec["dir"]) / "results.jsonl"
    killed = []

    def on_chunk(replica, actor, done):
        if spec.get("kill") and replica == 0 and done == 1 and not killed:
            killed.append(True)
            ray_mod.kill(actor, no_restart=False)  # the process dies; Ray restarts the actor

    with ResultWriter.open(out_path, Path(spec["dir"]) / "results.errors.jsonl") as writer:
        report = ray_runner.generate(
            cfg, dispatch.shards(items, 2, cost(spec)), lambda p, o: writer.write(ok_record(p, o, "tiny")),
            lambda p, e: writer.write(error_record(p.request.custom_id, str(e), line=p.request.line,
                                                   code="engine_error", status=500)),
            chunk=spec.get("chunk", 4), in_flight=spec.get("in_flight", 2), on_chunk=on_chunk)
    return {"report": report._asdict(), "killed": bool(killed), "output": str(out_path),
            "custom_ids": [p.request.custom_id for p in items]}


def main() -> int:
    scenario, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    result = {"dp": dp, "ray": ray}[scenario](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
