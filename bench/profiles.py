"""What-if profiles in the simulator: blend's gain over the best other policy per cost profile.

Each of the Trace#1-#4 analogs (mixed to its density and sharing under the base cost model:
Llama-3.1-8B on the A100 preset) is simulated with every policy under every profile of
`blendserve_sgl.core.profiles` (base, atom-w4a4, quest-topk, instinfer, fiddler-moe), under the
equal rules of `paper_traces.py`'s method group: one engine with the same features for every
policy (paced prefill, mixed steps, no KV projection), output lengths estimated (requests stop
at EOS and carry max_tokens; blend samples first). Reported per
trace and profile: the workload's density under the profile (the density shift), and blend's
speedup over the best other policy in both execution modes. These are models of the systems
(docs/design.md, "What-if profiles"), not measurements of them.

    python bench/profiles.py                  # 10,000 requests per trace -> results/profiles.json
    python bench/profiles.py --requests 2000 --traces trace1 --out profiles_quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import peak_rss_mb, table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.profiles import apply_profile, profile_names  # noqa: E402
from blendserve_sgl.sim import POLICIES, EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.workloads import TRACES, trace  # noqa: E402

RULES = {"pace": True, "mixed_chunk": True, "kv_projection": False}  # the same engine features for every policy
MODES = {"overlapped": ExecModel("overlapped", 0.1), "sequential": ExecModel("sequential")}


def profile_params(name: str, records) -> dict:
    if name == "quest-topk":
        return {"k": 2048, "lengths": ([r.prompt_len for r in records], [r.output_len for r in records])}
    return {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--profiles", default=",".join(profile_names()))
    ap.add_argument("--hardware", default="a100")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="profiles")
    args = ap.parse_args()
    base_cost = CostModel.from_names("llama-3.1-8b", args.hardware)
    names = ["base"] + [p for p in args.profiles.split(",") if p != "base"]
    rows, t_all = [], time.perf_counter()
    for tname in args.traces.split(","):
        records, mix = trace(tname, args.requests, base_cost, args.seed)
        for pname in names:
            prof = apply_profile(pname, base_cost, **profile_params(pname, records))
            wl = Workload(records, prof.cost)
            engine = EngineConfig(kv_tokens=prof.kv_tokens, max_running=1024, chunked_prefill=1024, **RULES)
            spec = RunSpec(prof.cost, engine, known_lengths=False, seed=args.seed)
            results = {p: simulate(wl, p, spec) for p in POLICIES}
            row = {"trace": tname, "profile": pname, "density": round(wl.density, 4), "sharing": round(wl.sharing, 4),
                   "kv_tokens": prof.kv_tokens,
                   "params": {k: v for k, v in prof.params.items() if not isinstance(v, (list, tuple))}}
            for label, model in MODES.items():
                times = {p: r.time(model) for p, r in results.items()}
                best = min((p for p in times if p != "blend"), key=times.get)
                row[f"{label}_best_other"] = best
                row[f"{label}_blend_speedup_vs_best_other"] = round(times[best] / times["blend"], 4)
                row[f"{label}_blend_fraction_of_optimal"] = round(results["blend"].fraction_of_optimal(model), 4)
            hits = results["dfs"].first_hit_tokens
            row["blend_sharing_vs_dfs"] = round(results["blend"].first_hit_tokens / hits, 4) if hits else 1.0
            rows.append(row)
            print(f"{tname} {pname:<12} density {row['density']:.3f}  "
                  f"ovl x{row['overlapped_blend_speedup_vs_best_other']:.3f} ({row['overlapped_best_other']})  "
                  f"seq x{row['sequential_blend_speedup_vs_best_other']:.3f}", flush=True)
    base_rows = {r["trace"]: r for r in rows if r["profile"] == "base"}
    for r in rows:
        b = base_rows[r["trace"]]
        r["density_shift"] = round(r["density"] / b["density"], 4)
        r["overlapped_gain_change"] = round(r["overlapped_blend_speedup_vs_best_other"]
                                            / b["overlapped_blend_speedup_vs_best_other"], 4)
    def mean(profile: str, key: str) -> float:
        return round(statistics.mean(r[key] for r in rows if r["profile"] == profile), 4)

    summary = {p: {"mean_density_shift": mean(p, "density_shift"),
                   "mean_overlapped_blend_speedup_vs_best_other": mean(p, "overlapped_blend_speedup_vs_best_other"),
                   "mean_sequential_blend_speedup_vs_best_other": mean(p, "sequential_blend_speedup_vs_best_other")}
               for p in names}
    cols = ("trace", "profile", "density", "density_shift", "overlapped_blend_speedup_vs_best_other",
            "overlapped_best_other", "sequential_blend_speedup_vs_best_other", "blend_sharing_vs_dfs")
    print()
    print(table([tuple(r[c] for c in cols) for r in rows],
                ("trace", "profile", "density", "vs base", "blend/best ovl", "best other ovl", "blend/best seq",
                 "sharing/dfs")))
    path = write(args.out, {
        "kind": "model: simulated what-if cost profiles, not measurements of the systems",
        "requests_per_trace": args.requests,
        "requests_note": "modest trace sizes (a shared 2-core machine); paper_traces.py runs the base profile at scale",
        "model": "llama-3.1-8b (fiddler-moe: mixtral-8x7b)", "hardware": args.hardware,
        "profiles": names,
        "rules": {"engine_features": RULES, "output_lengths": "estimated (known_lengths=False) for every policy"},
        "modes": {k: {"mode": m.mode, "interference": m.interference} for k, m in MODES.items()},
        "summary": summary,
        "table": rows,
        "total_seconds": round(time.perf_counter() - t_all, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
