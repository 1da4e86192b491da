"""Build, sort, split and fully scan a BlendServe tree at the paper's scale (400,000 requests).

Workload: MMLU 5-shot prefixes (one per subject, behind a system prompt) + Azure code and
conversation trace lengths + a long-output class, from shared/data. Times: build (insert every
request), sort + split (the sort -> split -> sort loop), and a full scan (DualScanner.schedule
until the tree is empty, each admission finished at once, so only planning is timed). Prefix
sharing is measured by the simulator only (`bench/paper_traces.py`, `blendserve plan`).

    python bench/tree_scale.py            # 400,000 requests -> bench/results/tree_scale.json
    python bench/tree_scale.py --quick    # 20,000 requests  -> bench/results/tree_scale_quick.json
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
from blendserve_sgl.core import Budget, CostModel, DualScanner, ScanConfig  # noqa: E402
from blendserve_sgl.workloads import build_tree, mixed_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=400_000)
    ap.add_argument("--quick", action="store_true", help="20,000 requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-gb", type=float, default=60.0, help="KV memory of the scan budget")
    ap.add_argument("--slots", type=int, default=256)
    ap.add_argument("--prefill", type=int, default=8192)
    args = ap.parse_args()
    n = 20_000 if args.quick else args.requests

    load_before = os.getloadavg()
    records = mixed_workload(n, seed=args.seed)
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    gc.collect()

    t0 = time.perf_counter()
    tree = build_tree(records, cost)
    t1 = time.perf_counter()
    scanner = DualScanner(tree, ScanConfig())
    scanner.prepare()  # known lengths: sort -> split -> sort now
    t2 = time.perf_counter()
    report = scanner.split_report
    root_density = tree.density(tree.root)
    root_sharing = tree.root.sharing

    order = []
    steps = 0
    budget = Budget(args.kv_gb * 1e9, args.slots, args.prefill)
    t3 = time.perf_counter()
    while len(tree):
        adm = scanner.schedule(budget)
        if not adm:
            raise RuntimeError("scan stalled with requests left")
        for a in adm:
            order.append(a.rid)
            scanner.finished(a.rid, a.output_len)
        steps += 1
    t4 = time.perf_counter()

    assert sorted(map(str, order)) == sorted(r.rid for r in records), "not every request handed out exactly once"

    out = {
        "requests": n,
        "build_seconds": round(t1 - t0, 3),
        "sort_split_seconds": round(t2 - t1, 3),
        "build_sort_split_seconds": round(t2 - t0, 3),
        "scan_seconds": round(t4 - t3, 3),
        "scan_steps": steps,
        "planning_ms_per_step": round(1e3 * (t4 - t3) / steps, 3),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "root_density": round(root_density, 4),
        "root_sharing": round(root_sharing, 4),
        "splits": report.splits,
        "split_moves": report.moved_requests,
        "split_spent_tokens": report.spent_tokens,
        "split_budget_tokens": report.budget_tokens,
        "split_stop": report.stop,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "workload": "mixed_workload(mmlu 0.3, azure-code 0.25, azure-conv 0.35, long-output 0.1)",
        "cost_model": "llama-3.1-8b on a100",
        "targets": {"build_sort_split_seconds": 10, "scan_seconds": 5, "peak_rss_mb": 2048},
    }
    rows = [(k, out[k], out["targets"].get(k, "")) for k in
            ("requests", "build_seconds", "sort_split_seconds", "build_sort_split_seconds", "scan_seconds",
             "planning_ms_per_step", "peak_rss_mb", "splits", "split_spent_tokens",
             "split_budget_tokens")]
    print(table(rows, ("metric", "value", "target")))
    path = write("tree_scale_quick" if args.quick else "tree_scale", out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
