"""The paper's main experiment in the simulator: the four trace analogs x every policy.

Llama-3.1-8B on the A100 preset (KV pool 0.88 x 80 GB minus the weights), chunked prefill 1024,
1024 running requests, mixed prefill/decode steps. Each run is timed in both execution modes
(overlapped with interference 0.1, sequential); the same batches, two cost models. Also: blend
with one of its inputs switched off (paced prefill; the KV projection, `Budget.kv_horizons`;
the step count that meters each side's memory work), and the interference factor's effect on
blend and dfs.

    python bench/paper_traces.py            # 100,000 requests per trace -> results/paper_traces.json + .png
    python bench/paper_traces.py --quick    # 10,000 requests per trace -> results/paper_traces_quick.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, peak_rss_mb, table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import POLICIES, EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.sim.metrics import binned, compare  # noqa: E402
from blendserve_sgl.workloads import TRACES, trace  # noqa: E402

MODES = {"overlapped": ExecModel("overlapped", 0.1), "sequential": ExecModel("sequential")}
TARGETS = {"blend_mean_fraction_of_optimal": 0.90, "blend_speedup_vs_dfs": 1.2, "blend_sharing_vs_dfs": 0.97}


def plot(panels: dict, path: Path) -> None:
    """Per-step compute and memory time, dfs next to blend for every trace (the paper's Fig. 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 2.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, policy in enumerate(("dfs", "blend")):
            res = panels[name][policy]
            ax = axes[row, col]
            x, g, a = binned(res, MODES["overlapped"], bins=300)
            ax.plot(x / 3600, g, color="tab:red", lw=1, label="compute (GEMM)")
            ax.plot(x / 3600, a, color="tab:blue", lw=1, label="memory (decode attention)")
            ax.set_title(f"{name} {TRACES[name]}: {policy}, {res.time(MODES['overlapped']) / 3600:.2f} h, "
                         f"{res.fraction_of_optimal(MODES['overlapped']):.1%} of optimal", fontsize=9)
            ax.set_ylabel("ms / step", fontsize=8)
            if row == len(names) - 1:
                ax.set_xlabel("simulated time (h, overlapped)", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Per-step compute and memory time: DFS order vs BlendServe (Llama-3.1-8B, A100, simulated)",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="10,000 requests per trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(TRACES))
    args = ap.parse_args()
    n = 10_000 if args.quick else args.requests
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    engine = EngineConfig.for_cost(cost, max_running=1024, chunked_prefill=1024)
    spec = RunSpec(cost, engine, seed=args.seed)
    ablations = {"blend (fixed chunk, no pacing)": RunSpec(cost, engine, seed=args.seed, preset=PRESET.replace(pacing=False)),
                 "blend (no KV projection: free minus reservations)": RunSpec(cost, engine, seed=args.seed,
                                                                             timeline=False),
                 "blend (unmetered: no step count, bursts)": RunSpec(cost, engine, seed=args.seed, preset=PRESET.replace(metering=False))}
    rows, traces_info, panels, ablation_rows, interference = [], {}, {}, [], []
    t_all = time.perf_counter()
    for name in args.traces.split(","):
        t0 = time.perf_counter()
        records, mix = trace(name, n, cost, args.seed)
        wl = Workload(records, cost)
        traces_info[name] = {"target": TRACES[name], "density": round(wl.density, 4), "sharing": round(wl.sharing, 4),
                             "counts": mix.counts, "optimal_s": round(wl.optimal_s, 1)}
        results = {p: simulate(wl, p, spec) for p in POLICIES}
        for row in compare(results, MODES):
            rows.append({"trace": name, **row})
            print(f"{name} {row['policy']:<18} ovl {row['overlapped_fraction_of_optimal']:.3f} "
                  f"x{row['overlapped_speedup_vs_dfs']:.3f}  seq {row['sequential_fraction_of_optimal']:.3f} "
                  f"x{row['sequential_speedup_vs_dfs']:.3f}  sharing/dfs {row['sharing_vs_dfs']:.4f}  "
                  f"wall {row['wall_s']:.1f} s", flush=True)
        for label, abl in ablations.items():
            res = simulate(wl, "blend", abl)
            row = compare({"dfs": results["dfs"], label: res}, MODES)[1]
            ablation_rows.append({"trace": name, **row})
            print(f"{name} {label:<50} ovl {row['overlapped_fraction_of_optimal']:.3f} "
                  f"x{row['overlapped_speedup_vs_dfs']:.3f}", flush=True)
        for beta in (0.0, 0.05, 0.1, 0.2, 0.3):
            model = ExecModel("overlapped", beta)
            interference.append({"trace": name, "interference": beta,
                                 "blend_fraction_of_optimal": round(results["blend"].fraction_of_optimal(model), 4),
                                 "dfs_fraction_of_optimal": round(results["dfs"].fraction_of_optimal(model), 4),
                                 "blend_speedup_vs_dfs": round(results["dfs"].time(model) / results["blend"].time(model), 4)})
        panels[name] = {"dfs": results["dfs"], "blend": results["blend"]}
        traces_info[name]["seconds"] = round(time.perf_counter() - t0, 1)

    blend = [r for r in rows if r["policy"] == "blend"]
    summary = {
        "blend_mean_fraction_of_optimal": round(statistics.mean(r["overlapped_fraction_of_optimal"] for r in blend), 4),
        "blend_speedup_vs_dfs": round(statistics.mean(r["overlapped_speedup_vs_dfs"] for r in blend), 4),
        "blend_sharing_vs_dfs": round(min(r["sharing_vs_dfs"] for r in blend), 5),
        "dfs_mean_fraction_of_optimal": round(statistics.mean(
            r["overlapped_fraction_of_optimal"] for r in rows if r["policy"] == "dfs"), 4),
        "blend_mean_fraction_of_optimal_sequential": round(statistics.mean(
            r["sequential_fraction_of_optimal"] for r in blend), 4),
        "blend_speedup_vs_dfs_sequential": round(statistics.mean(r["sequential_speedup_vs_dfs"] for r in blend), 4),
    }
    beta0 = [x for x in interference if x["interference"] == 0.0]
    summary["blend_mean_fraction_of_optimal_no_interference"] = round(
        statistics.mean(x["blend_fraction_of_optimal"] for x in beta0), 4)
    cols = ("trace", "policy", "overlapped_fraction_of_optimal", "overlapped_speedup_vs_dfs",
            "sequential_fraction_of_optimal", "sequential_speedup_vs_dfs", "sharing", "sharing_vs_dfs",
            "peak_kv", "mean_kv", "retractions", "wall_s")
    print()
    print(table([tuple(r[c] for c in cols) for r in rows],
                ("trace", "policy", "of optimal", "vs dfs", "of opt seq", "vs dfs seq", "sharing", "sharing/dfs",
                 "peak KV", "mean KV", "retract", "wall s")))
    print()
    print(table([(k, v, TARGETS.get(k, "")) for k, v in summary.items()], ("summary (overlapped unless noted)", "value", "target")))
    stem = "paper_traces_quick" if args.quick else "paper_traces"
    png = RESULTS / f"{stem}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(panels, png)
    path = write(stem, {
        **summary,
        "requests_per_trace": n,
        "model": "llama-3.1-8b", "hardware": "a100",
        "engine": {k: getattr(engine, k) for k in engine.__slots__},
        "modes": {k: {"mode": m.mode, "interference": m.interference} for k, m in MODES.items()},
        "traces": traces_info,
        "table": rows,
        "ablations": ablation_rows,
        "interference_sensitivity": interference,
        "figure": png.name,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "targets": TARGETS,
    })
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
