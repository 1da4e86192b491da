"""The paper's main experiment in the simulator, under equal rules: the four trace analogs x
every policy.

Llama-3.1-8B on the A100 preset (KV pool 0.88 x 80 GB minus the weights), chunked prefill 1024,
1024 running requests, mixed prefill/decode steps. Every figure is for estimated output lengths
(requests stop at EOS and carry max_tokens; blend runs its 1% sample first, as the plugin does)
unless a row says "known lengths". One run gives both execution modes (the schedule does not
depend on the timing): overlapped (bandwidth-consistent, interference 0.1) and sequential;
each is also timed with prefill attention charged (`*_causal_attention`: the cost model's
"causal" option; the paper's formula drops it).

Row groups per trace (`group` in the table):
- `method`: every policy (fcfs, sglang-lpm, sglang-dfs-weight, dfs, balance, blend) on the same
  engine with the same features (`rules`: paced prefill for all, no KV projection); blend runs
  the plugin's preset (`core/preset.py`: scanner, estimator, metering).
- `product`: what a user runs: SGLang's stock policies on the stock engine (fixed chunk, no
  pacing) against blend as the plugin ships it (the preset, with the paced prefill the plugin
  sets in SGLang when the preset says so).
- `known lengths`: the method group with output lengths known (ignore_eos).
- `needs KV projection`: the known-lengths group plus the KV projection (admission counts KV
  that known-length running requests release; with estimated lengths nothing is known to end,
  and the projection changes nothing: a test shows it); SGLang cannot do this.
- `ablation`: blend without metering on the method engine.

    python bench/paper_traces.py                    # 100,000 requests per trace -> results/paper_traces.json + .png
    python bench/paper_traces.py --requests 20000   # smaller, same file
    python bench/paper_traces.py --quick            # 2,000 requests per trace -> results/paper_traces_quick.json
    python bench/paper_traces.py --lean --traces A.csv,B.jsonl --out real_traces   # trace files, same rules
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, peak_rss_mb, table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.core.specs import hardware_names, interference, interference_names  # noqa: E402
from blendserve_sgl.sim import POLICIES, EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.sim.metrics import binned  # noqa: E402
from blendserve_sgl.workloads import TRACES, WORKLOADS  # noqa: E402
from blendserve_sgl.workloads.trace_file import trace_or_file  # noqa: E402

MODES = {"overlapped": ExecModel("overlapped", 0.1), "sequential": ExecModel("sequential")}
COST = CostModel.from_names("llama-3.1-8b", "a100")
CAUSAL = CostModel.from_names("llama-3.1-8b", "a100", prefill_attention="causal")  # each run also timed with it


def use_machine(hardware: str, interference_setting: str) -> None:
    """The hardware preset and the overlapped mode's interference every run of this process uses
    (defaults: the A100 preset and the assumed 0.1)."""
    global COST, CAUSAL, MODES
    COST = CostModel.from_names("llama-3.1-8b", hardware)
    CAUSAL = CostModel.from_names("llama-3.1-8b", hardware, prefill_attention="causal")
    MODES = {"overlapped": ExecModel("overlapped", interference(interference_setting)),
             "sequential": ExecModel("sequential")}
STOCK = ("fcfs", "sglang-lpm", "sglang-dfs-weight")  # what SGLang ships


def timing_rule() -> str:
    return (f"overlapped: max(comp, w + attn) + {MODES['overlapped'].interference:g} x min(comp, w + attn) + over; "
            "sequential: max(comp, w) + attn + over; comp = GEMM tokens x 2P / FLOPS, w = weight bytes / BW (every "
            "step with a GEMM), attn = KV tokens read x KV bytes per token / BW, over = the preset's per-step "
            f"overheads ({COST.hardware.name}: {COST.hardware.step_overhead_s:g} s per step)")


TIMING_RULE = timing_rule()  # the default machine's (what bench/sweep.py and bench/method_ablation.py run)
LENGTH_RULE = ("estimated: requests stop at EOS and carry max_tokens (4 x the longest output); blend samples 1% "
               "first (the plugin's sample phase); engine pacing assumes the mean output of the requests finished "
               "so far for every policy")


def row_of(trace_name: str, group: str, label: str, res, others: dict | None = None) -> dict:
    row = {"trace": trace_name, "group": group, "policy": label}
    for mode, model in MODES.items():
        t = res.time(model)
        row[f"{mode}_time_s"] = round(t, 1)
        row[f"{mode}_fraction_of_optimal"] = round(res.fraction_of_optimal(model), 4)
        row[f"{mode}_fraction_of_weight_bound"] = round(res.fraction_of_weight_bound(model), 4)
    causal = res.retimed(CAUSAL)
    for mode, model in MODES.items():
        row[f"{mode}_time_s_causal_attention"] = round(causal.time(model), 1)
    row.update(sharing=round(res.sharing, 4), first_hit_tokens=res.first_hit_tokens, retractions=res.retractions,
               peak_kv=round(res.peak_kv, 3), mean_kv=round(res.mean_kv, 3), steps=res.steps,
               wall_s=round(res.wall_s, 1), time_split_overlapped_s=res.time_split(MODES["overlapped"]))
    return row


def versus(rows: list[dict], target: str, pool: tuple) -> dict:
    """`target` against the best of `pool` (the other rows of one trace and group)."""
    mine = next(r for r in rows if r["policy"] == target)
    rest = [r for r in rows if r["policy"] in pool and r["policy"] != target]
    out = {}
    for mode in MODES:
        best = min(rest, key=lambda r: r[f"{mode}_time_s"])
        out[f"{mode}_best_other"] = best["policy"]
        out[f"{mode}_speedup_vs_best_other"] = round(best[f"{mode}_time_s"] / mine[f"{mode}_time_s"], 4)
    key = "overlapped_time_s_causal_attention"
    out["overlapped_speedup_vs_best_other_causal_attention"] = round(min(r[key] for r in rest) / mine[key], 4)
    dfs = next((r for r in rows if r["policy"] == "dfs"), None)
    if dfs is not None:
        out["overlapped_speedup_vs_dfs"] = round(dfs["overlapped_time_s"] / mine["overlapped_time_s"], 4)
        out["sharing_vs_dfs"] = (round(mine["first_hit_tokens"] / dfs["first_hit_tokens"], 4)
                                 if dfs["first_hit_tokens"] else None)
    best_hits = max(r["first_hit_tokens"] for r in rest)
    out["sharing_vs_best"] = round(mine["first_hit_tokens"] / best_hits, 4) if best_hits else None  # None: nothing shared
    return out


def summarize(per_trace: list[dict]) -> dict:
    """Figures over the traces from per-trace `versus` results plus the blend row's fractions."""
    mean = lambda k: round(statistics.mean(x[k] for x in per_trace), 4)  # noqa: E731
    out = {"blend_mean_fraction_of_optimal": mean("overlapped_fraction_of_optimal"),
           "blend_mean_fraction_of_weight_bound": mean("overlapped_fraction_of_weight_bound"),
           "blend_speedup_vs_best_other": mean("overlapped_speedup_vs_best_other"),
           "blend_speedup_vs_best_other_min": round(min(x["overlapped_speedup_vs_best_other"] for x in per_trace), 4),
           "blend_speedup_vs_best_other_sequential": mean("sequential_speedup_vs_best_other"),
           "blend_speedup_vs_best_other_causal_attention": mean("overlapped_speedup_vs_best_other_causal_attention"),
           "blend_mean_fraction_of_optimal_sequential": mean("sequential_fraction_of_optimal"),
           "blend_sharing_vs_best": min((x["sharing_vs_best"] for x in per_trace if x["sharing_vs_best"] is not None),
                                        default=None)}
    if all("sharing_vs_dfs" in x for x in per_trace):
        out["blend_speedup_vs_dfs"] = mean("overlapped_speedup_vs_dfs")
        out["blend_sharing_vs_dfs"] = min((x["sharing_vs_dfs"] for x in per_trace if x["sharing_vs_dfs"] is not None),
                                          default=None)
    return out


def plot(panels: dict, path: Path) -> None:
    """Per-step compute and memory traffic, dfs next to blend for every trace (the paper's Fig. 10)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(panels)
    model = MODES["overlapped"]
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 2.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        for col, policy in enumerate(("dfs", "blend")):
            res = panels[name][policy]
            ax = axes[row, col]
            x, g, a = binned(res, model, bins=300)
            ax.plot(x / 3600, g, color="tab:red", lw=1, label="compute (GEMM)")
            ax.plot(x / 3600, a, color="tab:blue", lw=1, label="memory (weights + KV reads)")
            ax.set_title(f"{name} {TRACES.get(name, 'measured')}: {policy}, {res.time(model) / 3600:.2f} h, "
                         f"{res.fraction_of_optimal(model):.1%} of T_o", fontsize=9)
            ax.set_ylabel("ms / step", fontsize=8)
            if row == len(names) - 1:
                ax.set_xlabel("simulated time (h, overlapped)", fontsize=8)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("Per-step compute and memory traffic: DFS order vs BlendServe, equal rules, estimated lengths "
                 f"(Llama-3.1-8B, {COST.hardware.name}, simulated)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def one_system_prompt(records: list) -> list:
    """The records with every class's system prompt (`system:KIND` groups) one shared group of the
    same length: the tree no longer names the class."""
    return [r._replace(prefix=tuple(("system:shared", t) if str(g).startswith("system:") else (g, t)
                                    for g, t in r.prefix)) for r in records]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true", help="2,000 requests per trace")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(TRACES),
                    help=f"comma-separated, of {', '.join(WORKLOADS)}, or trace files (CSV token counts, Mooncake "
                         "JSONL: workloads.trace_file; the first --requests rows)")
    ap.add_argument("--lean", action="store_true",
                    help="only the runs the summary needs: the method group, the product group, known-length blend")
    ap.add_argument("--one-system-prompt", action="store_true",
                    help="every class behind one system prompt (the analogs give each class its own, so the prefix "
                         "tree names the class: a sample learns each class's lengths, and DFS order groups the "
                         "long outputs); the same tokens otherwise")
    ap.add_argument("--out", default=None, help="results file stem (default paper_traces, or paper_traces_quick)")
    ap.add_argument("--hardware", default="a100", help=f"hardware preset: {', '.join(hardware_names())}")
    ap.add_argument("--interference", default="assumed",
                    help=f"overlapped mode's interference: a number in [0, 1] or one of {interference_names()}")
    args = ap.parse_args()
    use_machine(args.hardware, args.interference)
    n = 2_000 if args.quick else args.requests
    cost = COST
    # SGLang as it ships: no paced prefill, prefill and decode in separate steps (no
    # --enable-mixed-chunk); the plugin paces only with mixed steps (core.pacing.paces)
    stock = EngineConfig.trace_engine(cost, pace=False, mixed_chunk=False)
    stock_mixed = EngineConfig.trace_engine(cost, pace=False)  # the same with --enable-mixed-chunk
    method = EngineConfig.trace_engine(cost)
    shipped = {"product": RunSpec(cost, replace(stock, pace=PRESET.pacing), seed=args.seed),  # blend as shipped
               "product, mixed steps": RunSpec(cost, replace(stock_mixed, pace=PRESET.pacing), seed=args.seed)}
    specs = {  # group -> (the run spec, the policies run with it)
        "method": (RunSpec(cost, method, seed=args.seed), POLICIES),
        "product": (RunSpec(cost, stock, seed=args.seed), (*STOCK, "blend")),
        "product, mixed steps": (RunSpec(cost, stock_mixed, seed=args.seed), (*STOCK, "blend")),
        "known lengths": (RunSpec(cost, method, seed=args.seed, known_lengths=True), POLICIES),
        "needs KV projection": (RunSpec(cost, replace(method, kv_projection=True), seed=args.seed,
                                        known_lengths=True), POLICIES),
        "ablation: blend unmetered": (RunSpec(cost, method, preset=PRESET.replace(metering=False), seed=args.seed),
                                      ("blend",)),
    }
    if args.lean:
        specs = {"method": specs["method"], "product": specs["product"],
                 "product, mixed steps": specs["product, mixed steps"],
                 "known lengths": (specs["known lengths"][0], ("blend",))}
    rows, traces_info, panels, interference = [], {}, {}, []
    vs = {g: [] for g in specs}
    est_vs_known = []
    t_all = time.perf_counter()
    for spec in args.traces.split(","):
        t0 = time.perf_counter()
        name, records, counts = trace_or_file(spec, n, cost, args.seed)  # a trace file: its first n rows
        if args.one_system_prompt:
            records = one_system_prompt(records)
        wl = Workload(records, cost)
        traces_info[name] = {"target": TRACES.get(name), "density": round(wl.density, 4), "sharing": round(wl.sharing, 4),
                             "counts": counts, "optimal_s": round(wl.optimal_s, 1),
                             "weight_bound_s": round(wl.weight_bound_s(cost, method.max_running), 1)}
        results = {}
        for group, (spec, policies) in specs.items():
            group_rows = []
            for p in policies:
                as_shipped = group in shipped and p == "blend"
                res = simulate(wl, p, shipped[group] if as_shipped else spec)
                label = "blend as shipped" if as_shipped else p
                row = row_of(name, group, label, res)
                group_rows.append(row)
                results[(group, p)] = res
                print(f"{name} {group:<26} {label:<18} ovl {row['overlapped_fraction_of_optimal']:.3f} of T_o "
                      f"{row['overlapped_fraction_of_weight_bound']:.3f} of T_w  seq "
                      f"{row['sequential_fraction_of_optimal']:.3f}  sharing {row['sharing']:.4f}  "
                      f"retract {row['retractions']}  wall {row['wall_s']:.1f} s", flush=True)
            if len(policies) > 1:
                target = "blend as shipped" if group in shipped else "blend"
                pool = STOCK if group in shipped else policies
                v = versus(group_rows, target, pool)
                blend_row = next(r for r in group_rows if r["policy"] == target)
                for r in group_rows:
                    if r is blend_row:
                        r.update(v)
                vs[group].append({**v, **{k: blend_row[k] for k in blend_row if "fraction" in k}})
            rows += group_rows
        known, est = results[("known lengths", "blend")], results[("method", "blend")]
        est_vs_known.append(round(known.time(MODES["overlapped"]) / est.time(MODES["overlapped"]), 4))
        for beta in (0.0, 0.05, 0.1, 0.2, 0.3):
            model = ExecModel("overlapped", beta)
            b, d = results[("method", "blend")], results[("method", "dfs")]
            interference.append({"trace": name, "interference": beta,
                                 "blend_fraction_of_optimal": round(b.fraction_of_optimal(model), 4),
                                 "dfs_fraction_of_optimal": round(d.fraction_of_optimal(model), 4),
                                 "blend_speedup_vs_dfs": round(d.time(model) / b.time(model), 4)})
        panels[name] = {"dfs": results[("method", "dfs")], "blend": results[("method", "blend")]}
        traces_info[name]["seconds"] = round(time.perf_counter() - t0, 1)

    summary = summarize(vs["method"])
    summary["estimated_vs_known_min"] = min(est_vs_known)
    summary["estimated_vs_known"] = est_vs_known
    summary["blend_as_shipped"] = summarize(vs["product"])
    summary["blend_as_shipped_mixed_steps"] = summarize(vs["product, mixed steps"])
    if vs.get("needs KV projection"):
        summary["blend_with_kv_projection"] = summarize(vs["needs KV projection"])
    if vs["known lengths"]:
        summary["blend_known_lengths"] = summarize(vs["known lengths"])
    cols = ("trace", "group", "policy", "overlapped_fraction_of_optimal", "overlapped_fraction_of_weight_bound",
            "overlapped_speedup_vs_best_other", "sequential_fraction_of_optimal", "sequential_speedup_vs_best_other",
            "sharing", "retractions", "wall_s")
    print()
    print(table([tuple(r.get(c, "") for c in cols) for r in rows],
                ("trace", "group", "policy", "of T_o", "of T_w", "vs best other", "of T_o seq", "vs best seq",
                 "sharing", "retract", "wall s")))
    print()
    flat = [(k, v) for k, v in summary.items() if not isinstance(v, (dict, list))]
    for key in ("blend_as_shipped", "blend_as_shipped_mixed_steps"):
        flat += [(f"{key}.{k}", v) for k, v in summary[key].items()]
    print(table(flat, ("summary (overlapped unless noted)", "value")))
    stem = args.out or ("paper_traces_quick" if args.quick else "paper_traces")
    png = RESULTS / f"{stem}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(panels, png)
    path = write(stem, {
        **summary,
        "rules": {"engine_features": {"pace": method.pace, "kv_projection": method.kv_projection,
                                      "chunked_prefill": method.chunked_prefill, "max_running": method.max_running,
                                      "mixed_chunk": method.mixed_chunk, "kv_tokens": method.kv_tokens},
                  "timing": timing_rule(), "output_lengths": LENGTH_RULE,
                  "blend_preset": {"scan": {k: getattr(PRESET.scan, k) for k in PRESET.scan.__dataclass_fields__},
                                   "estimator": {k: getattr(PRESET.estimator, k)
                                                 for k in PRESET.estimator.__dataclass_fields__},
                                   "pacing": PRESET.pacing, "metering": PRESET.metering,
                                   "engine_ratio": PRESET.engine_ratio},
                  "blend_as_shipped": "the preset on SGLang's default engine (no --enable-mixed-chunk, so no "
                                      "pacing: core.pacing.paces); stock policies on the same engine",
                  "blend_as_shipped_mixed_steps": "the same with --enable-mixed-chunk for every policy: blend paced "
                                                  "when the preset paces (the plugin sets it in SGLang), the stock "
                                                  "policies unpaced",
                  "optimal": "T_o = max((1 - s_o) T_comp, T_mem) (the paper's)",
                  "weight_bound": "T_w = max(C, M + N_min w), the step model's strict bound: C the decoder "
                                  "layers for every token but the last output and the shared prefixes plus the LM "
                                  "head for the sampled tokens, M the decode steps' KV reads, N_min = max(longest "
                                  "output, ceil(output tokens / max_running)) (sim/metrics.py)"},
        "requests_per_trace": n,
        "model": "llama-3.1-8b", "hardware": COST.hardware.name,
        "modes": {k: {"mode": m.mode, "interference": m.interference} for k, m in MODES.items()},
        "traces": traces_info,
        "table": rows,
        "interference_sensitivity": interference,
        "figure": png.name,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })
    print(f"wrote {path} and {png}")


if __name__ == "__main__":
    main()
