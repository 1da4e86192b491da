"""Paced prefill under estimated lengths: what the pacing target's accuracy does, for every policy.

Each Trace analog runs every policy on the method comparison's engine (`EngineConfig.trace_engine`)
in six variants: estimated lengths paced by the policy-neutral estimate (`core.pacing.WaitingWork`:
the engine's rule and what the plugin ships), not paced, paced at the waiting requests' true
density (`pace_density="true"`: an oracle no engine has), paced with the memory of unknown outputs
from the finished outputs' second moment (`pace_density="spread"`), and known lengths paced and not
paced.
The paced variants pace against the step's whole memory side, the weight read and step overhead
added to the decode's KV read (`core.pacing.MEMORY_SIDES[0]`, as the plugin paces); two more pace
against the KV read alone, the weight read only as the floor (`EngineConfig.pace_memory="kv"`: the
earlier rule). Two blend-only rows add `ScanConfig.thin_batch_share` (the compute-dense side starts no prompt the
step has to chunk while the memory-dense side holds under that part of its share; off in the
preset) to the oracle and the known-length paced variants; the other policies' times there are
the same variant's (no preset changes them). Per run: overlapped time, steps, mean KV use,
retractions; per variant: blend over the best other policy; per policy: each variant over its
shipped one.

    python bench/pacing_ablation.py --requests 20000   # -> results/pacing_ablation.json
    python bench/pacing_ablation.py --traces A.csv,B.jsonl --variants shipped,not_paced,kv --out NAME
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
from blendserve_sgl.workloads import TRACES  # noqa: E402
from blendserve_sgl.workloads.trace_file import trace_or_file  # noqa: E402

OVERLAPPED = ExecModel("overlapped", 0.1)
SHIPPED = "estimated, paced"
ORACLE = "estimated, paced at the true density (oracle)"
THIN = 0.25
VARIANTS = {  # name -> (key, known lengths, engine changes, blend preset changes or None, the others' variant)
    SHIPPED: ("shipped", False, {}, None, None),
    "estimated, not paced": ("not_paced", False, {"pace": False}, None, None),
    ORACLE: ("oracle", False, {"pace_density": "true"}, None, None),
    f"{ORACLE}, blend thin_batch_share {THIN}": ("oracle_thin", False, {"pace_density": "true"},
                                                 {"thin_batch_share": THIN}, ORACLE),
    "estimated, paced, memory from the outputs' second moment": ("spread", False, {"pace_density": "spread"}, None, None),
    "known, paced": ("known", True, {}, None, None),
    f"known, paced, blend thin_batch_share {THIN}": ("known_thin", True, {}, {"thin_batch_share": THIN}, "known, paced"),
    "known, not paced": ("known_not_paced", True, {"pace": False}, None, None),
    "estimated, paced against the KV read alone": ("kv", False, {"pace_memory": "kv"}, None, None),
    "known, paced against the KV read alone": ("known_kv", True, {"pace_memory": "kv"}, None, None),
}
POLICIES = ("blend", "balance", "fcfs", "dfs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=5_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(sorted(TRACES)))
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--variants", default=None, help="comma-separated keys (default all): "
                    + ", ".join(key for key, *_rest in VARIANTS.values()))
    ap.add_argument("--out", default="pacing_ablation", help="results file stem")
    args = ap.parse_args()
    keys = {key for key, *_rest in VARIANTS.values()}
    wanted = set(args.variants.split(",")) if args.variants else keys
    if wanted - keys or "shipped" not in wanted:
        ap.error(f"--variants: keys of {', '.join(sorted(keys))}, including shipped")
    variants = {name: v for name, v in VARIANTS.items() if v[0] in wanted and (not v[4] or VARIANTS[v[4]][0] in wanted)}
    policies = args.policies.split(",")
    if "blend" not in policies or len(policies) < 2:
        ap.error("--policies: blend and at least one other")
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    rows, results, summary = [], [], []
    t0 = time.perf_counter()
    for spec in args.traces.split(","):
        name, records, _counts = trace_or_file(spec, args.requests, cost, args.seed)
        wl = Workload(records, cost)
        times: dict = {}
        for variant, (_key, known, changes, blend_changes, others_from) in variants.items():
            engine = EngineConfig.trace_engine(cost, **changes)
            preset = PRESET.replace(**blend_changes) if blend_changes else PRESET
            for policy in policies:
                if others_from and policy != "blend":
                    times[variant, policy] = times[others_from, policy]
                    continue
                res = simulate(wl, policy, RunSpec(cost, engine, known_lengths=known, preset=preset, seed=args.seed))
                t = times[variant, policy] = res.time(OVERLAPPED)
                entry = {"trace": name, "variant": variant, "policy": policy, "seconds": round(t, 1),
                         "vs_shipped_variant": round(times[SHIPPED, policy] / t, 4), "steps": res.steps,
                         "mean_kv": round(res.mean_kv, 3), "retractions": res.retractions}
                results.append(entry)
                rows.append(tuple(entry.values()))
                print(*rows[-1], sep="  ", flush=True)
            best = min((p for p in policies if p != "blend"), key=lambda p: times[variant, p])
            summary.append({"trace": name, "variant": variant, "best_other": best,
                            "blend_vs_best_other": round(times[variant, best] / times[variant, "blend"], 4)})
    print(table(rows, ("trace", "variant", "policy", "seconds", "vs_shipped_variant", "steps", "mean_kv",
                       "retractions")))
    print(table([tuple(s.values()) for s in summary], ("trace", "variant", "best_other", "blend_vs_best_other")))
    by_key = {key: [s["blend_vs_best_other"] for s in summary if s["variant"] == name]
              for name, (key, *_rest) in variants.items()}
    means = {k: round(sum(v) / len(v), 4) for k, v in by_key.items()}
    lows = {k: min(v) for k, v in by_key.items()}
    print("blend over the best other, mean (lowest):", {k: (means[k], lows[k]) for k in means})
    path = write(args.out, {
        "rules": {"engine": "EngineConfig.trace_engine (1,024 running, 1,024-token chunks, mixed steps) with each "
                            "variant's changes, the same for every policy", "timing": "overlapped, interference 0.1",
                  "model": "llama-3.1-8b", "hardware": "a100", "requests_per_trace": args.requests,
                  "blend": f"PRESET (as the plugin ships it); the thin_batch_share rows: PRESET.replace("
                           f"thin_batch_share={THIN})"},
        "traces": args.traces.split(","),
        "variants": {key: name for name, (key, *_rest) in variants.items()},
        "blend_vs_best_other_mean": means, "blend_vs_best_other_min": lows,
        "results": results, "summary": summary, "wall_seconds": round(time.perf_counter() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
