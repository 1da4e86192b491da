"""Blend's scheduler switches under the equal rules: one ablation row each, against the best other policy.

Each Trace analog runs every policy of `paper_traces.py`'s method group (same engine features,
estimated lengths), blend with known lengths, the preset (`core/preset.py`) and each variant
`PRESET.replace(...)` below. Per row: overlapped and sequential time, speedup over the best other
policy, the share of known-length blend's speed (`vs_known`), retractions, sharing over the
best-sharing policy, and the overlapped time split (overlapped work, compute-only, memory-only,
weights, interference).

    python bench/method_ablation.py --requests 20000   # -> results/method_ablation.json
    python bench/method_ablation.py --requests 100000 --variants "blend,- lend idle share" --out method_ablation_100k
    python bench/method_ablation.py --requests 100000 --variants "blend,+ refresh the fill on sample growth" \
        --out method_ablation_fill_refresh_100k
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from bench.paper_traces import COST, MODES, TIMING_RULE, row_of, versus  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import POLICIES, EngineConfig, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import TRACES, trace  # noqa: E402

VARIANTS = {  # label -> preset
    "blend": PRESET,
    "- free pool credit (memory work only at the share's rate)": PRESET.replace(free_pool_credit=0.0),
    "- engine check (SGLang's check cuts the plan)": PRESET.replace(engine_check=False),
    "- lend idle share": PRESET.replace(lend_idle_share=False),
    "- fill while sampling": PRESET.replace(fill_while_sampling=False),
    "- whole sample (plan at half of it)": PRESET.replace(sample_quorum=0.5),
    "- whole sample + re-plan on sample growth": PRESET.replace(sample_quorum=0.5, replan_growth=2.0),
    "- engine ratio (whole estimates reserved)": PRESET.replace(engine_ratio=False),
    "- engine ratio - whole sample": PRESET.replace(engine_ratio=False, sample_quorum=0.5),
    "+ reserve overruns": PRESET.replace(reserve_overruns=True),
    "+ p90": PRESET.replace(percentile=0.9),
    "+ fill settled only": PRESET.replace(fill_settled_only=True),
    "+ reserve growth": PRESET.replace(reserve_growth=True),
    "+ refresh the fill on sample growth": PRESET.replace(fill_refresh_growth=2.0),
    "+ fill settled only + reserve growth": PRESET.replace(fill_settled_only=True, reserve_growth=True),
}
OTHERS = tuple(p for p in POLICIES if p != "blend")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated labels of VARIANTS")
    ap.add_argument("--out", default="method_ablation", help="results file stem")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",")]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    engine = EngineConfig.trace_engine(COST)
    spec = RunSpec(COST, engine, seed=args.seed)
    rows, summary = [], {}
    t0 = time.perf_counter()
    for name in args.traces.split(","):
        records, mix = trace(name, args.requests, COST, args.seed)
        wl = Workload(records, COST)
        others = [row_of(name, "method", p, simulate(wl, p, spec)) for p in OTHERS]
        known = row_of(name, "known lengths", "blend", simulate(wl, "blend", replace(spec, known_lengths=True)))
        for label in variants:
            res = simulate(wl, "blend", replace(spec, preset=VARIANTS[label]))
            row = row_of(name, "ablation", label, res)
            row.update(versus([*others, {**row, "policy": "blend"}], "blend", OTHERS))
            row["vs_known"] = round(known["overlapped_time_s"] / row["overlapped_time_s"], 4)
            row["retraction_share"] = round(res.retractions / len(records), 5)
            rows.append(row)
            summary.setdefault(label, []).append(row)
            print(f"{name} {label:<36} vs best {row['overlapped_speedup_vs_best_other']:.3f} "
                  f"({row['overlapped_best_other']})  vs known {row['vs_known']:.3f}  "
                  f"of T_o {row['overlapped_fraction_of_optimal']:.3f}  retract {res.retractions}  "
                  f"wall {row['wall_s']:.1f} s", flush=True)
        rows += [*others, known]
    means = {label: {"speedup_vs_best_other_mean": round(sum(r["overlapped_speedup_vs_best_other"] for r in rs) / len(rs), 4),
                     "speedup_vs_best_other_min": min(r["overlapped_speedup_vs_best_other"] for r in rs),
                     "speedup_vs_best_other_sequential_mean":
                         round(sum(r["sequential_speedup_vs_best_other"] for r in rs) / len(rs), 4),
                     "estimated_vs_known_min": min(r["vs_known"] for r in rs),
                     "fraction_of_optimal_mean": round(sum(r["overlapped_fraction_of_optimal"] for r in rs) / len(rs), 4),
                     "sharing_vs_best_min": min(r["sharing_vs_best"] for r in rs),
                     "retraction_share_max": max(r["retraction_share"] for r in rs)}
             for label, rs in summary.items()}
    cols = ("trace", "policy", "overlapped_speedup_vs_best_other", "overlapped_best_other", "vs_known",
            "overlapped_fraction_of_optimal", "sequential_speedup_vs_best_other", "sharing_vs_best", "retractions")
    print(table([tuple(r.get(c, "") for c in cols) for r in rows if r["group"] == "ablation"],
                ("trace", "variant", "vs best other", "best other", "vs known", "of T_o", "vs best seq",
                 "sharing vs best", "retract")))
    print(table([(k, *v.values()) for k, v in means.items()], ("variant", *next(iter(means.values())))))
    path = write(args.out, {
        "rules": {"engine_features": {"pace": engine.pace, "kv_projection": engine.kv_projection,
                                      "chunked_prefill": engine.chunked_prefill, "max_running": engine.max_running},
                  "timing": TIMING_RULE, "output_lengths": "estimated (known: the `known lengths` row only)",
                  "model": "llama-3.1-8b", "hardware": "a100", "modes": {k: m.mode for k, m in MODES.items()}},
        "requests_per_trace": args.requests,
        "variants": {k: {"replace": {f: VARIANTS[k].leaf(f) for f in ("censored", "censored_growth", "replan_growth",
                                                                      "percentile", "sample_quorum", "reserve_overruns",
                                                                      "engine_ratio", "lend_idle_share",
                                                                      "fill_while_sampling", "fill_settled_only",
                                                                      "reserve_growth", "fill_refresh_growth")}}
                     for k in variants},
        "summary": means, "table": rows, "wall_seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
