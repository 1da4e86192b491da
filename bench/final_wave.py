"""The scanner's final wave (longest output first once every waiting request fits in the KV pool)
against the plain dual scan, run to completion in the simulator on mixed workloads.

    python bench/final_wave.py

Each cell runs the same workload (`workloads.three_tier`) twice through `sim.Engine` (final wave
off / on; blend with the engine's fixed chunked prefill, the cost model of Llama-3.1-8B on an
A100, SGLang's radix cache) and reports steps (forward passes until the last request finished),
prefix-hit tokens and the overlapped-mode time. Writes bench/results/final_wave.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import three_tier  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="240,600,2000")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--kv-gb", type=float, default=3.0, help="KV memory (GB) for 240/600 requests; doubled for more")
    args = ap.parse_args(argv)
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    timing = ExecModel("overlapped")
    rows, cells = [], []
    for n in (int(x) for x in args.sizes.split(",")):
        for seed in range(args.seeds):
            workload = Workload(three_tier(n, seed), cost)
            kv = args.kv_gb * (2 if n > 1000 else 1) * 1e9
            engine = EngineConfig(kv_tokens=int(kv // cost.kv_bytes_per_token), max_running=256, chunked_prefill=2048)
            res = {fw: simulate(workload, "blend", RunSpec(cost, engine, preset=PRESET.replace(final_wave=fw)))
                   for fw in (False, True)}
            cell = {"requests": n, "seed": seed, "kv_bytes": kv,
                    "steps_off": res[False].steps, "steps_on": res[True].steps,
                    "steps_ratio": round(res[True].steps / res[False].steps, 4),
                    "prefix_hits_off": res[False].first_hit_tokens, "prefix_hits_on": res[True].first_hit_tokens,
                    "overlapped_s_ratio": round(res[True].time(timing) / res[False].time(timing), 4)}
            cells.append(cell)
            rows.append((n, seed, cell["steps_off"], cell["steps_on"], cell["steps_ratio"],
                         cell["prefix_hits_on"] - cell["prefix_hits_off"], cell["overlapped_s_ratio"]))
    print(table(rows, ("requests", "seed", "steps off", "steps on", "on/off", "hits on-off", "time on/off")))
    ratios = [c["steps_ratio"] for c in cells]
    times = [c["overlapped_s_ratio"] for c in cells]
    summary = {"steps_ratio_min": min(ratios), "steps_ratio_mean": round(statistics.mean(ratios), 4),
               "steps_ratio_max": max(ratios), "overlapped_s_ratio_mean": round(statistics.mean(times), 4),
               "same_prefix_hits": all(c["prefix_hits_on"] == c["prefix_hits_off"] for c in cells)}
    print(summary)
    path = write("final_wave", {"cost_model": "llama-3.1-8b on a100", "engine": "sim.Engine (radix cache, chunk 2048, "
                                "256 running, mixed chunk, no pacing or KV projection); blend: the shipped preset, final wave on/off; estimated lengths",
                                **summary, "cells": cells})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
