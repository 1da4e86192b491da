"""`blendserve plan`: plan a real trace with the dual scanner and show what the plan achieves.

Builds the resource-aware tree over a mixed workload from shared/data (MMLU 5-shot prefixes,
Azure code/conversation lengths, a long-output class), plans it with BlendServe (sample ->
estimate -> sort -> split -> dual scan) and with pure DFS order, replays both through the
fluid batching model of `core.replay`, and prints per-phase batch densities, the prefix
sharing kept and the time planning took.
"""

from __future__ import annotations

import argparse
import math
import time

from .cli import fraction, positive_float, positive_int
from .core import CostModel, DualScanner, OutputLengthEstimator, ScanConfig
from .core.replay import OrderPicker, ReplayResult, replay
from .core.sharing import dfs_order
from .workloads import build_tree, mixed_workload


def _phases(res: ReplayResult, root_density: float, parts: int = 10) -> list[tuple]:
    rows = []
    n = len(res.steps)
    for q in range(parts):
        seg = res.steps[q * n // parts:(q + 1) * n // parts]
        if not seg:
            continue
        c = sum(s.comp_s for s in seg)
        m = sum(s.mem_s for s in seg)
        dens = [s.batch_density for s in seg if not math.isnan(s.batch_density)]
        bd = sum(dens) / len(dens) if dens else math.nan
        rows.append((f"{10 * q}-{10 * (q + 1)}%", f"{bd:.2f}", f"{c / m if m else math.inf:.2f}",
                     f"{max(c, m) / sum(max(s.comp_s, s.mem_s) for s in seg):.3f}"))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blendserve plan", description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=positive_int, default=20_000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="llama-3.1-8b", help="model preset or path to config.json")
    ap.add_argument("--hardware", default="a100", help="a100, h100, h200 or cpu (measured here)")
    ap.add_argument("--kv-gb", type=positive_float, default=40.0, help="KV-cache memory")
    ap.add_argument("--slots", type=positive_int, default=512, help="max running requests")
    ap.add_argument("--prefill", type=positive_int, default=512, help="prefill tokens per step (chunked-prefill size)")
    ap.add_argument("--sample-fraction", type=fraction, default=0.01)
    ap.add_argument("--keep-sharing", type=fraction, default=0.99)
    ap.add_argument("--unknown-lengths", action="store_true",
                    help="hide output lengths from BlendServe (sample + estimate); the replay has no "
                         "retraction, so underestimates over-commit KV (peak KV is printed)")
    ap.add_argument("--out", help="also write the figures as JSON to this path")
    args = ap.parse_args(argv)

    try:
        cost = CostModel.from_names(args.model, args.hardware)
    except (ValueError, KeyError, OSError) as exc:  # an unknown preset, a config.json that is not a model's
        ap.error(f"--model {args.model} --hardware {args.hardware}: {exc}")  # one line, exit 2
    t0 = time.perf_counter()
    records = mixed_workload(args.requests, seed=args.seed)
    truth = {r.rid: r.output_len for r in records}
    t_load = time.perf_counter() - t0
    estimator = OutputLengthEstimator(sample_fraction=args.sample_fraction, seed=args.seed)

    t0 = time.perf_counter()
    tree = build_tree(records, cost, known_lengths=not args.unknown_lengths, estimator=estimator)
    t_build = time.perf_counter() - t0
    scanner = DualScanner(tree, ScanConfig(keep_sharing=args.keep_sharing))
    reference = build_tree(records, cost)
    root_density = reference.density(reference.root)
    kv = args.kv_gb * 1e9

    t0 = time.perf_counter()
    blend = replay(scanner, reference, truth, cost, kv, args.slots, args.prefill)
    t_blend = time.perf_counter() - t0
    dfs = replay(OrderPicker(build_tree(records, cost), dfs_order(reference)), reference, truth, cost, kv,
                 args.slots, args.prefill)

    print(f"workload: {args.requests} requests (loaded in {t_load:.2f} s), {cost.model.name} on {cost.hardware.name}, "
          f"root density {root_density:.2f}, prefix sharing {reference.root.sharing:.1%}")
    print(f"planning: tree build {t_build:.2f} s; sample {scanner.sample_size} requests; split "
          f"{scanner.split_report.splits} nodes, {scanner.split_report.spent_tokens} of "
          f"{scanner.split_report.budget_tokens} budget tokens; replay with the scanner {t_blend:.1f} s "
          f"({1e3 * t_blend / len(blend.steps):.3f} ms/step incl. the fluid model)")
    print()
    print("batch density per phase (KV-weighted request density of the running batch; root "
          f"= {root_density:.2f}), step compute/memory ratio, and overlap efficiency:")
    hdr = f"{'phase':<8} | {'blend rho':>9} {'comp/mem':>8} {'overlap':>7} | {'dfs rho':>8} {'comp/mem':>8} {'overlap':>7}"
    print(hdr)
    print("-" * len(hdr))
    for b, d in zip(_phases(blend, root_density), _phases(dfs, root_density)):
        print(f"{b[0]:<8} | {b[1]:>9} {b[2]:>8} {b[3]:>7} | {d[1]:>8} {d[2]:>8} {d[3]:>7}")
    print()
    for name, res in (("blend", blend), ("dfs", dfs)):
        print(f"{name:>5}: {len(res.steps)} steps, overlapped time {res.overlapped_s:.1f} s "
              f"(fraction of overlap {res.fraction_of_overlap:.3f}), sequential time {res.sequential_s:.1f} s, "
              f"prefix hits {res.prefix_hit_tokens} tokens, peak KV {res.peak_kv_bytes / 1e9:.1f} GB")
    print(f"blend vs dfs: prefix sharing kept {blend.prefix_hit_tokens / dfs.prefix_hit_tokens:.4f}, "
          f"overlapped speedup {dfs.overlapped_s / blend.overlapped_s:.3f}x, "
          f"sequential speedup {dfs.sequential_s / blend.sequential_s:.3f}x")
    if args.out:
        import json
        import shlex
        import sys

        from .machine import describe

        summary = {
            "command": "blendserve plan " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:])),
            "machine": describe(),
            "requests": args.requests, "known_lengths": not args.unknown_lengths, "model": cost.model.name, "hardware": cost.hardware.name,
            "kv_gb": args.kv_gb, "slots": args.slots, "prefill": args.prefill,
            "root_density": round(root_density, 4), "root_sharing": round(reference.root.sharing, 4),
            "blend_fraction_of_overlap": round(blend.fraction_of_overlap, 4),
            "dfs_fraction_of_overlap": round(dfs.fraction_of_overlap, 4),
            "blend_speedup_overlapped": round(dfs.overlapped_s / blend.overlapped_s, 4),
            "blend_speedup_sequential": round(dfs.sequential_s / blend.sequential_s, 4),
            "sharing_vs_dfs": round(blend.prefix_hit_tokens / dfs.prefix_hit_tokens, 5),
            "blend_peak_kv_gb": round(blend.peak_kv_bytes / 1e9, 2), "dfs_peak_kv_gb": round(dfs.peak_kv_bytes / 1e9, 2),
            "tree_build_seconds": round(t_build, 3),
            "scanner_replay_ms_per_step": round(1e3 * t_blend / len(blend.steps), 4),
            "phases": {"blend": _phases(blend, root_density), "dfs": _phases(dfs, root_density)},
        }
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)
            f.write("\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
