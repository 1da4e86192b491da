"""Blend with estimated output lengths: the estimator's switches against known lengths.

Each Trace analog runs blend as the plugin ships it (`PRESET`) with known lengths, with the
estimated lengths of the plain estimator (the sampled mean, running samples at their output so
far), with each switch of `core/estimate.py` (`censored`, `percentile`, `stratify`), censored with
p90, and the stratified sample with the scanner's guards against long outputs admitted on
estimates (`fill_settled_only`, `reserve_growth`). Ablations
are `PRESET.replace(...)`; every other rule is the simulator's default for every policy.

    python bench/estimator_ablation.py --requests 20000   # -> results/estimator_ablation.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import TRACES, trace  # noqa: E402

OVERLAPPED = ExecModel("overlapped", 0.1)
VARIANTS = {  # name -> (known lengths, preset)
    "known lengths": (True, PRESET),
    "estimated: mean": (False, PRESET),
    "estimated: censored": (False, PRESET.replace(censored=True)),
    "estimated: p90": (False, PRESET.replace(percentile=0.9)),
    "estimated: censored + p90": (False, PRESET.replace(censored=True, percentile=0.9)),
    "estimated: stratified sample": (False, PRESET.replace(stratify=True)),
    "estimated: stratified + settled fill + growth reserve": (False, PRESET.replace(
        stratify=True, fill_settled_only=True, reserve_growth=True)),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(sorted(TRACES)))
    args = ap.parse_args()
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    engine = EngineConfig.trace_engine(cost)  # the method comparison's engine: paced for every policy
    rows, results = [], []
    t0 = time.perf_counter()
    for name in args.traces.split(","):
        records, _ = trace(name, args.requests, cost, args.seed)
        wl = Workload(records, cost)
        known_time = None
        for variant, (known, preset) in VARIANTS.items():
            res = simulate(wl, "blend", RunSpec(cost, engine, known_lengths=known, preset=preset, seed=args.seed))
            t = res.time(OVERLAPPED)
            known_time = t if known else known_time
            entry = {"trace": name, "variant": variant, "seconds": round(t, 3),
                     "fraction_of_optimal": round(res.fraction_of_optimal(OVERLAPPED), 4),
                     "vs_known": round(known_time / t, 4), "retractions": res.retractions}
            results.append(entry)
            rows.append(tuple(entry.values()))
            print(*rows[-1], sep="  ", flush=True)
    print(table(rows, ("trace", "variant", "seconds", "fraction_of_optimal", "vs_known", "retractions")))
    path = write("estimator_ablation", {
        "rules": {"policy": "blend (PRESET, simulator defaults)", "timing": "overlapped, interference 0.1",
                  "model": "llama-3.1-8b", "hardware": "a100", "requests_per_trace": args.requests},
        "results": results, "wall_seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
