"""The real-engine part of `bench/scale_out.py`: two replicas on CPU vs one engine.

The batch is `examples/make_requests.py` (300 requests behind four system prompts and two
few-shot prefixes), tokenized with the tiny random Llama of `scripts/cpu_smoke.py` (greedy, so
it runs to max_tokens, capped at `MAX_TOKENS`). Runs, each engine in its own process:
one engine (`blend`); `--dp 2` routed by the shard plan; `--dp 2` with SGLang's own round-robin;
two Ray replicas fed their shards. Per run: cached-token ratio (cached / prompt tokens), wall
time, and per replica the prompt, cached and output tokens, the computed tokens (prompt - cached
+ output) and the plan's measure of them (`planned_work`).

    python bench/scale_out_engine.py --child NAME MODEL OUT.json    # one run (used by engine_part)
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RUNS = ("one", "dp", "dp-round-robin", "ray")
MAX_TOKENS = 32


def _items(model_path: str, tmp: Path) -> list:
    from transformers import AutoTokenizer

    from blendserve_sgl.batch.prompts import prepare
    from blendserve_sgl.batch.requests import read_requests

    src = tmp / "requests.jsonl"
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_requests.py"), "--out", str(src)], check=True,
                   stdout=subprocess.DEVNULL)
    tok = AutoTokenizer.from_pretrained(model_path)
    items = [prepare(r, tok, 4096, MAX_TOKENS) for r in read_requests(src)]
    return [p for p in items if hasattr(p, "input_ids") and not p.request.sampling.get("seed")]


def _cost(model_path: str):
    from blendserve_sgl.core import CostModel
    from blendserve_sgl.core.specs import ModelSpec, hardware

    return CostModel(ModelSpec.from_hf_config(json.loads((Path(model_path) / "config.json").read_text())),
                     hardware("cpu"))


def child(name: str, model_path: str, out: Path) -> None:
    from dataclasses import replace

    from blendserve_sgl.batch import dispatch, ray_runner, runner

    with tempfile.TemporaryDirectory() as tmp:
        items = _items(model_path, Path(tmp))
    items = [replace(p, max_tokens=min(p.max_tokens, MAX_TOKENS)) for p in items]
    runner.prepare_environment("cpu")
    cfg = runner.EngineConfig(model_path=model_path, policy="blend", device="cpu", max_total_tokens=16384)
    plan = dispatch.plan(items, 1 if name == "one" else 2, _cost(model_path))
    parts = [[items[i] for i in ids] for ids in plan.shards]
    rank_of = {p.request.custom_id: r for r, part in enumerate(parts) for p in part}
    rows: list = []  # (replica, prompt, cached, output, max_tokens, custom_id)

    def keep(p, o):
        m = o["meta_info"]
        replica = m.get("dp_rank") if name.startswith("dp") else rank_of[p.request.custom_id]
        rows.append((replica, m["prompt_tokens"], m.get("cached_tokens", 0) or 0, m["completion_tokens"],
                     p.max_tokens, p.request.custom_id))

    def fail(p, e):
        raise RuntimeError(f"{p.request.custom_id}: {e}")

    t0 = time.perf_counter()
    if name == "ray":
        ray_runner.generate(cfg, parts, keep, fail, chunk=64)
    else:
        if name != "one":
            cfg = replace(cfg, extra=dispatch.dp_engine_kwargs(2, "cpu"))
        engine = runner.start_engine(cfg)
        try:
            if name == "dp":
                dispatch.check_ranks(engine, 2)
            elif name == "dp-round-robin":
                parts = [items]
            t0 = time.perf_counter()

            async def one_rank(rank, part):
                kw = {"routed_dp_rank": rank} if name == "dp" else {}
                outs = await engine.async_generate(input_ids=[p.input_ids for p in part],
                                                   rid=[p.request.custom_id for p in part],
                                                   sampling_params=[p.sampling_params for p in part], **kw)
                for p, o in zip(part, outs):
                    keep(p, o)

            async def run_all():  # every rank's requests submitted at once
                await asyncio.gather(*(one_rank(r, part) for r, part in enumerate(parts)))

            engine.loop.run_until_complete(run_all())
        finally:
            engine.shutdown()
    wall = time.perf_counter() - t0
    per = {}
    for rep in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == rep]
        per[str(rep)] = {"requests": len(mine), "prompt_tokens": sum(r[1] for r in mine),
                         "cached_tokens": sum(r[2] for r in mine), "output_tokens": sum(r[3] for r in mine),
                         "max_tokens": sum(r[4] for r in mine), "work": sum(r[1] - r[2] + r[3] for r in mine),
                         **({"planned_work": plan.compute[rep]} if name != "dp-round-robin" else {})}
    out.write_text(json.dumps({"run": name, "requests": len(rows), "wall_s": round(wall, 1),
                               "prompt_tokens": sum(r[1] for r in rows), "cached_tokens": sum(r[2] for r in rows),
                               "work_per_replica": {k: v["work"] for k, v in per.items()}, "replicas": per,
                               "rows": [[r[0], r[1], r[2], r[3], r[5]] for r in rows]}))


def engine_part(trace_dir: Path | None = None) -> dict:
    """Every run of `RUNS`, each in its own process. `trace_dir`: there each run's per-request rows
    (NAME.rows.json: replica, prompt, cached, output tokens, custom_id) and the blend policy's
    per-step trace (NAME.trace.jsonl, `BLENDSERVE_TRACE_PATH`; request ids are the custom_ids)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from cpu_smoke import write_tiny_llama

    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny"))
        for name in RUNS:
            out = Path(tmp) / f"{name}.json"
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            if trace_dir is not None:
                trace_dir.mkdir(parents=True, exist_ok=True)
                (trace_dir / f"{name}.trace.jsonl").unlink(missing_ok=True)
                env["BLENDSERVE_TRACE_PATH"] = str(trace_dir / f"{name}.trace.jsonl")
            proc = subprocess.run([sys.executable, __file__, "--child", name, model, str(out)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            if proc.returncode != 0:
                print(f"engine run {name} failed:\n{proc.stdout[-3000:]}", flush=True)
                continue
            runs[name] = r = json.loads(out.read_text())
            rows = r.pop("rows")
            if trace_dir is not None:
                (trace_dir / f"{name}.rows.json").write_text(json.dumps(rows))
            r["cached_ratio"] = round(r["cached_tokens"] / r["prompt_tokens"], 4)
            print(f"engine {name:<15} requests {r['requests']} cached {r['cached_ratio']:.4f} wall {r['wall_s']} s "
                  f"work/replica {r['work_per_replica']} planned "
                  f"{ {k: v.get('planned_work') for k, v in r['replicas'].items()} }", flush=True)
    one = runs.get("one", {}).get("cached_ratio")

    def imbalance(r):
        w = list(r["work_per_replica"].values())
        return round((max(w) - min(w)) / max(w), 4) if len(w) == 2 and max(w) else None

    vs_one = {k: round(r["cached_ratio"] / one, 4) for k, r in runs.items() if one and k != "one"}
    planned = [vs_one[k] for k in ("dp", "ray") if k in vs_one]
    imb = [x for x in (imbalance(runs[k]) for k in ("dp", "ray") if k in runs) if x is not None]
    return {"engine_cached_vs_one": min(planned) if planned else None,
            "engine_cached_vs_one_round_robin": vs_one.get("dp-round-robin"),
            "engine_work_imbalance": max(imb) if imb else None,
            "engine_work_imbalance_round_robin": imbalance(runs["dp-round-robin"]) if "dp-round-robin" in runs else None,
            "engine": {"model": "tiny random Llama (scripts/cpu_smoke.py)", "batch": "examples/make_requests.py, "
                       f"max_tokens capped at {MAX_TOKENS}, seeded samples left out", "runs": runs,
                       "cached_vs_one": vs_one,
                       "work": "per replica: prompt - cached + output tokens (SGLang's meta_info); planned_work: the "
                               "shard plan's compute measure (core.shard, the preset's hold) at max_tokens",
                       "note": "2 CPU cores shared by both replicas: wall time shows no speedup"}}


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], Path(sys.argv[4]))
    else:
        print(json.dumps(engine_part(), indent=2))
