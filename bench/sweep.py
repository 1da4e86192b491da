"""Where BlendServe helps: a density x sharing sweep (the paper's Figure 11) and sensitivities.

Each cell mixes a workload to the target compute density and prefix-sharing ratio
(`workloads.mix`) and runs every policy under the equal rules of `paper_traces.py` (same
engine features, estimated output lengths, bandwidth-consistent timing); the heatmap shows
blend's overlapped-mode speedup over the best other policy of the cell. Sensitivity on the
trace1 and trace3 analogs: the split budget (keep_sharing), the fraction sampled first, and
known lengths; the conversation class also with every policy told the true lengths
(`conversation_known_lengths`, not counted in the min/max/mean).

    python bench/sweep.py            # 20,000 requests per cell -> results/sweep.json + sweep.png
    python bench/sweep.py --quick    # 4,000 requests per cell, coarser grid -> results/sweep_quick.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace  # noqa: E402

from bench._common import RESULTS, table, write  # noqa: E402
from bench.paper_traces import LENGTH_RULE, MODES, TIMING_RULE  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import POLICIES, EngineConfig, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import TRACES, mix, trace  # noqa: E402

OVERLAPPED, SEQUENTIAL = MODES["overlapped"], MODES["sequential"]


def heatmap(densities, sharings, grid, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    im = ax.imshow(grid, origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sharings)), [f"{s:.0%}" for s in sharings])
    ax.set_yticks(range(len(densities)), [f"{d:.1f}" for d in densities])
    ax.set_xlabel("prefix-sharing ratio")
    ax.set_ylabel("compute density")
    for i in range(len(densities)):
        for j in range(len(sharings)):
            ax.text(j, i, f"{grid[i][j]:.2f}x", ha="center", va="center", color="w", fontsize=9)
    fig.colorbar(im, label="blend speedup over the best other policy (overlapped)")
    ax.set_title("BlendServe over the best other policy, equal rules (Llama-3.1-8B, A100, simulated)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(wl: Workload, base: RunSpec) -> dict:
    """Every policy on `wl` under `base`: blend against the best other policy, dfs and the bounds."""
    res = {p: simulate(wl, p, base) for p in POLICIES}
    blend, dfs = res["blend"], res["dfs"]
    others = [p for p in POLICIES if p != "blend"]
    best = min(others, key=lambda p: res[p].time(OVERLAPPED))
    best_seq = min(others, key=lambda p: res[p].time(SEQUENTIAL))
    return {"measured_density": round(wl.density, 4), "measured_sharing": round(wl.sharing, 4), "best_other": best,
            "speedup_vs_best_other": round(res[best].time(OVERLAPPED) / blend.time(OVERLAPPED), 4),
            "speedup_vs_best_other_sequential": round(res[best_seq].time(SEQUENTIAL) / blend.time(SEQUENTIAL), 4),
            "speedup_vs_dfs": round(dfs.time(OVERLAPPED) / blend.time(OVERLAPPED), 4),
            "blend_fraction_of_optimal": round(blend.fraction_of_optimal(OVERLAPPED), 4),
            "blend_fraction_of_weight_bound": round(blend.fraction_of_weight_bound(OVERLAPPED), 4),
            "best_other_fraction_of_optimal": round(res[best].fraction_of_optimal(OVERLAPPED), 4),
            "sharing_vs_dfs": round(blend.first_hit_tokens / max(1, dfs.first_hit_tokens), 4),
            "sharing_vs_best": round(blend.first_hit_tokens / max(1, max(res[p].first_hit_tokens for p in others)), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = 4_000 if args.quick else args.requests
    densities = [0.8, 1.4] if args.quick else [0.8, 1.0, 1.2, 1.4]
    sharings = [0.05, 0.45] if args.quick else [0.05, 0.15, 0.25, 0.35, 0.45]
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    engine = EngineConfig.trace_engine(cost)
    base = RunSpec(cost, engine, seed=args.seed)
    t_all = time.perf_counter()

    cells, grid = [], []
    for d in densities:
        line = []
        for s in sharings:
            records, _ = mix(n, d, s, cost, args.seed)
            cell = {"density": d, "sharing": s, **compare(Workload(records, cost), base)}
            cells.append(cell)
            line.append(cell["speedup_vs_best_other"])
            print(f"density {d} sharing {s}: blend {cell['speedup_vs_best_other']:.3f}x {cell['best_other']} "
                  f"(seq {cell['speedup_vs_best_other_sequential']:.3f}x), {cell['speedup_vs_dfs']:.3f}x dfs, "
                  f"{cell['blend_fraction_of_optimal']:.3f} of T_o, sharing/dfs {cell['sharing_vs_dfs']:.4f}",
                  flush=True)
        grid.append(line)

    conv_records, _ = trace("conversation", n, cost, args.seed)
    conv_wl = Workload(conv_records, cost)
    conversation = compare(conv_wl, base)
    # the same class with every policy told the true lengths: what the estimate costs blend there
    conversation_known = compare(conv_wl, replace(base, known_lengths=True))
    print(f"conversation: blend {conversation['speedup_vs_best_other']:.3f}x {conversation['best_other']}, "
          f"sharing/best {conversation['sharing_vs_best']:.4f}; known lengths "
          f"{conversation_known['speedup_vs_best_other']:.3f}x {conversation_known['best_other']}", flush=True)

    sensitivity = []
    for name in ("trace1", "trace3"):
        records, _ = trace(name, n, cost, args.seed)
        wl = Workload(records, cost)
        dfs = simulate(wl, "dfs", base)
        runs = [("keep_sharing", k, replace(base, preset=PRESET.replace(keep_sharing=k)))
                for k in (1.0, 0.999, 0.99, 0.95, 0.9)]
        runs.append(("sample_fraction", "known lengths", replace(base, known_lengths=True)))
        runs += [("sample_fraction", f, replace(base, preset=PRESET.replace(sample_fraction=f)))
                 for f in (0.005, 0.01, 0.02, 0.05)]
        for knob, value, spec in runs:
            res = simulate(wl, "blend", spec)
            row = {"trace": name, "knob": knob, "value": value,
                   "fraction_of_optimal": round(res.fraction_of_optimal(OVERLAPPED), 4),
                   "speedup_vs_dfs": round(dfs.time(OVERLAPPED) / res.time(OVERLAPPED), 4),
                   "sharing_vs_dfs": round(res.first_hit_tokens / max(1, dfs.first_hit_tokens), 4),
                   "retractions": res.retractions}
            sensitivity.append(row)
            print(f"{name} {knob}={value}: {row['fraction_of_optimal']:.3f} of optimal, x{row['speedup_vs_dfs']:.3f}, "
                  f"sharing/dfs {row['sharing_vs_dfs']:.4f}, retractions {row['retractions']}", flush=True)

    print()
    print(table([(f"{d:.1f}", *(f"{v:.2f}x" for v in line)) for d, line in zip(densities, grid)],
                ("density \\ sharing", *(f"{s:.0%}" for s in sharings))))
    print()
    print(table([(r["trace"], r["knob"], r["value"], r["fraction_of_optimal"], r["speedup_vs_dfs"], r["sharing_vs_dfs"],
                  r["retractions"]) for r in sensitivity],
                ("trace", "knob", "value", "of optimal", "vs dfs", "sharing/dfs", "retract")))
    stem = "sweep_quick" if args.quick else "sweep"
    png = RESULTS / f"{stem}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    heatmap(densities, sharings, grid, png)
    speedups = [c["speedup_vs_best_other"] for c in cells] + [conversation["speedup_vs_best_other"]]
    path = write(stem, {
        "requests_per_cell": n, "densities": densities, "sharings": sharings,
        "rules": {"engine_features": {"pace": engine.pace, "kv_projection": engine.kv_projection,
                                      "chunked_prefill": engine.chunked_prefill, "max_running": engine.max_running,
                                      "mixed_chunk": engine.mixed_chunk},
                  "timing": TIMING_RULE, "output_lengths": LENGTH_RULE, "policies": list(POLICIES)},
        "conversation": conversation,  # the multi-turn conversation class, counted in the min/max/mean
        "conversation_known_lengths": conversation_known,  # the same, every policy told the true lengths (not counted)
        "min_speedup_vs_best_other": min(speedups), "max_speedup_vs_best_other": max(speedups),
        "mean_speedup_vs_best_other": round(sum(speedups) / len(speedups), 4),
        "min_sharing_vs_dfs": min(c["sharing_vs_dfs"] for c in cells),
        "min_sharing_vs_best": min(c["sharing_vs_best"] for c in cells),
        "cells": cells, "sensitivity": sensitivity, "figure": png.name,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "engine": {k: getattr(engine, k) for k in engine.__slots__}, "interference": OVERLAPPED.interference,
        "traces": {k: TRACES[k] for k in ("trace1", "trace3")},
    })
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
