"""The scanner's final wave (longest output first once every waiting request fits in the KV pool)
against the plain dual scan, replayed to completion on mixed workloads.

    python bench/final_wave.py

Each cell replays the same workload twice (final wave off / on) with `core.replay` (chunked
prefill, continuous batching, the cost model of Llama-3.1-8B on an A100) and reports steps
(forward passes until the last request finished), prefix-hit tokens and the overlapped time.
Writes bench/results/final_wave.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.core import CostModel, DualScanner, ResourceTree, ScanConfig  # noqa: E402
from blendserve_sgl.core.replay import replay  # noqa: E402


def workload(n: int, seed: int) -> list[tuple]:
    """(rid, prefix, prompt_len, output_len): a third compute-dense (long prompts, short outputs),
    a third memory-dense (short prompts, long outputs), a third in between, each behind one of
    eight shared prefixes of 64-512 tokens."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        g = rnd.randrange(8)
        prefix = [(f"g{g}", (64, 256, 512)[g % 3])]
        if kind == 0:
            p, d = rnd.randint(200, 800), rnd.randint(2, 40)
        elif kind == 1:
            p, d = rnd.randint(20, 120), rnd.randint(100, 400)
        else:
            p, d = rnd.randint(100, 400), rnd.randint(20, 150)
        out.append((f"r{i}", prefix, prefix[0][1] + p, d))
    return out


def build(cost: CostModel, records) -> ResourceTree:
    tree = ResourceTree(cost)
    for rid, prefix, p, d in records:
        tree.add(rid, prompt_len=p, prefix=prefix, output_len=d)
    return tree


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="240,600,2000")
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--kv-gb", type=float, default=3.0, help="KV memory (GB) for 240/600 requests; doubled for more")
    args = ap.parse_args(argv)
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    rows, cells = [], []
    for n in (int(x) for x in args.sizes.split(",")):
        for seed in range(args.seeds):
            records = workload(n, seed)
            true = {rid: d for rid, _, _, d in records}
            kv = args.kv_gb * (2 if n > 1000 else 1) * 1e9
            res = {}
            for fw in (False, True):
                sc = DualScanner(build(cost, records), ScanConfig(final_wave=fw))
                res[fw] = replay(sc, build(cost, records), true, cost, kv_bytes=kv, max_running=256,
                                 prefill_tokens=2048)
            cell = {"requests": n, "seed": seed, "kv_bytes": kv,
                    "steps_off": len(res[False].steps), "steps_on": len(res[True].steps),
                    "steps_ratio": round(len(res[True].steps) / len(res[False].steps), 4),
                    "prefix_hits_off": res[False].prefix_hit_tokens, "prefix_hits_on": res[True].prefix_hit_tokens,
                    "overlapped_s_ratio": round(res[True].overlapped_s / res[False].overlapped_s, 4)}
            cells.append(cell)
            rows.append((n, seed, cell["steps_off"], cell["steps_on"], cell["steps_ratio"],
                         cell["prefix_hits_on"] - cell["prefix_hits_off"], cell["overlapped_s_ratio"]))
    print(table(rows, ("requests", "seed", "steps off", "steps on", "on/off", "hits on-off", "time on/off")))
    ratios = [c["steps_ratio"] for c in cells]
    summary = {"steps_ratio_min": min(ratios), "steps_ratio_mean": round(statistics.mean(ratios), 4),
               "steps_ratio_max": max(ratios),
               "same_prefix_hits": all(c["prefix_hits_on"] == c["prefix_hits_off"] for c in cells)}
    print(summary)
    path = write("final_wave", {"cost_model": "llama-3.1-8b on a100", **summary, "cells": cells})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
