"""How long the simulator takes for a 400,000-request trace (target: 5 minutes on this machine).

Builds the trace4 analog (density 0.9, sharing 5%: the most decode steps of the four), then
simulates it under the equal rules of `paper_traces.py` (paced engine, estimated lengths) with
fcfs, sglang-dfs-weight (target: within 3x of fcfs), blend (the most work per step: tree,
scanner) and dfs, timing each whole run (requests, picker and tree built, every step, metrics);
then blend with `check=True` on `--check-requests` requests of the same trace (every step's
checks, the full recount every 1,024 steps).

    python bench/sim_scale.py            # 400,000 requests -> results/sim_scale.json
    python bench/sim_scale.py --quick    # 40,000 requests  -> results/sim_scale_quick.json
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import peak_rss_mb, table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.sim import EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import trace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400_000)
    ap.add_argument("--quick", action="store_true", help="40,000 requests")
    ap.add_argument("--trace", default="trace4")
    ap.add_argument("--policies", default="fcfs,sglang-dfs-weight,blend,dfs")
    ap.add_argument("--check-requests", type=int, default=20_000, help="blend with check=True (0: skip)")
    args = ap.parse_args()
    n = 40_000 if args.quick else args.requests
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    records, rep = trace(args.trace, n, cost)
    wl = Workload(records, cost)
    setup = time.perf_counter() - t0
    spec = RunSpec(cost, EngineConfig.trace_engine(cost))
    out = {"requests": n, "trace": args.trace, "density": round(wl.density, 4), "sharing": round(wl.sharing, 4),
           "workload_build_seconds": round(setup, 1)}
    rows = [("workload build (mix + reference tree)", round(setup, 1), "", "")]
    for policy in args.policies.split(","):
        gc.collect()
        res = simulate(wl, policy, spec)
        out[f"{policy}_seconds"] = round(res.wall_s, 1)
        out[f"{policy}_steps"] = res.steps
        out[f"{policy}_us_per_step"] = round(1e6 * res.wall_s / res.steps, 1)
        out[f"{policy}_fraction_of_optimal"] = round(res.fraction_of_optimal(ExecModel("overlapped", 0.1)), 4)
        rows.append((policy, out[f"{policy}_seconds"], res.steps, out[f"{policy}_us_per_step"]))
        del res
    if "fcfs_seconds" in out and "sglang-dfs-weight_seconds" in out:
        out["dfs_weight_over_fcfs_seconds"] = round(out["sglang-dfs-weight_seconds"] / out["fcfs_seconds"], 3)
    if args.check_requests:
        records, _ = trace(args.trace, args.check_requests, cost)
        small = Workload(records, cost)
        gc.collect()
        res = simulate(small, "blend", spec, check=True)
        out["blend_check_requests"] = args.check_requests
        out["blend_check_seconds"] = round(res.wall_s, 1)
        rows.append((f"blend, check=True, {args.check_requests} requests", out["blend_check_seconds"], res.steps,
                     round(1e6 * res.wall_s / res.steps, 1)))
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out["load_average_before"] = round(load_before, 2)
    out["load_average_after"] = round(os.getloadavg()[0], 2)
    out["targets"] = {**{f"{p}_seconds": 300 for p in args.policies.split(",")}, "dfs_weight_over_fcfs_seconds": 3.0,
                      "blend_check_seconds": 300}
    print(table(rows, ("run", "seconds", "steps", "us/step")))
    print(f"peak RSS {out['peak_rss_mb']} MB; load average {load_before:.2f} -> {out['load_average_after']:.2f}")
    path = write("sim_scale_quick" if args.quick else "sim_scale", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
