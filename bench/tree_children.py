"""Finding a child among a node's many children: the final wave and arrivals that cut edges.

Two shapes where one node holds tens of thousands of children, timed in a child process per
code version (this tree and `--baseline` commits side by side):
- `final_wave`: N requests under one 50-token prompt with known outputs of 1-1,000 tokens and a
  pool that holds them all, scheduled to the end (the final wave takes longest output first,
  ties in DFS order) and each finished at once: seconds of `schedule` + `finished`;
- `adjacent_cuts`: N arrivals under one 100-token prefix, each pair sharing its next token (the
  second cuts the first one's edge): seconds of `ResourceTree.add`;
- `far_cuts`: the same with the pairs N / 2 arrivals apart (the cut child far back).

    python bench/tree_children.py --baseline b2d5ae4   # -> results/tree_children.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES = ("final_wave", "adjacent_cuts", "far_cuts")


def measure(shape: str, n: int) -> float:
    """Seconds of the timed part of `shape` at `n` requests (module doc), with the code on sys.path."""
    import random
    import time

    from blendserve_sgl.core import Budget, CostModel, DualScanner, OutputLengthEstimator, ResourceTree
    from blendserve_sgl.core.preset import PRESET

    cost = CostModel.from_names("llama-3.1-8b", "a100")
    if shape == "final_wave":
        tree = ResourceTree(cost, PRESET.estimator)
        scanner = DualScanner(tree, PRESET.scan)
        rng = random.Random(0)
        for i in range(n):
            scanner.add(i, tokens=list(range(1, 51)), output_len=rng.randint(1, 1000), max_tokens=1000)
        pool, kv = 10 ** 9, cost.kv_bytes_per_token
        t0 = time.perf_counter()
        while len(tree):
            budget = Budget(pool * kv, 1024, 1 << 20, output_ratio=0.5, steps=1, kv_pool=pool * kv,
                            admit_room=pool, admit_clip=4096)
            for a in scanner.schedule(budget):
                scanner.finished(a.rid, 1)
        return time.perf_counter() - t0
    tree = ResourceTree(cost, OutputLengthEstimator())
    prefix = list(range(1, 101))
    t0 = time.perf_counter()
    for i in range(n):
        nxt = 1000 + (i // 2 if shape == "adjacent_cuts" else i % (n // 2))
        tree.add(i, tokens=prefix + [nxt, i], max_tokens=256)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,20000,40000")
    ap.add_argument("--baseline", default="", help="commits to run side by side (comma-separated)")
    ap.add_argument("--one", nargs=2, metavar=("SHAPE", "N"), help=argparse.SUPPRESS)  # the child's part
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # not in the child: it imports its version
    from bench._common import codes, head_commit, table, write

    sizes = [int(x) for x in args.sizes.split(",")]
    rows, figures = [], {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for version, code in codes(stack, args.baseline, tmp).items():
            for shape in SHAPES:
                for n in sizes:
                    out = subprocess.run([sys.executable, __file__, "--one", shape, str(n)], check=True, text=True,
                                         capture_output=True, env={**os.environ, "PYTHONPATH": str(code)})
                    seconds = round(json.loads(out.stdout.strip().splitlines()[-1]), 3)
                    figures.setdefault(version, {}).setdefault(shape, {})[str(n)] = seconds
                    rows.append((version, shape, n, seconds))
                    print(f"{version} {shape} {n}: {seconds} s", flush=True)
    ratios = {rev: {shape: {n: round(figures[rev][shape][n] / figures["this"][shape][n], 2) for n in figures["this"][shape]}
                    for shape in SHAPES} for rev in figures if rev != "this"}
    print(table(rows, ("code", "shape", "requests", "seconds")))
    path = write("tree_children", {"commit": head_commit(), "seconds": figures, "baseline_over_this": ratios})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
