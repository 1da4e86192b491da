#!/usr/bin/env python3
"""The token store with and without shared heads: completion prompts behind few-shot headers.

`--requests` completion prompts (default 200,000), each one of `--headers` few-shot headers (its
token count drawn from 1,000-3,000) followed by a question of 20-120 tokens, in a seeded random
order: the shape of an evaluation sent as `/v1/completions`, where the reader has no pieces to
store the header once (a chat's system message is a piece). The same token ids go into a
`TokenStore` that shares the whole blocks tails start with (`store.Heads`, what `blendserve run`
and `plan` use) and one that keeps every tail whole (the reference), in the reader's batches of
1,000; then the global plan's tail segments (`batch.order.tail_segments`) over each. Per store:
bytes in use (`nbytes`), the traced peak of Python allocations while filling it, seconds to fill,
seconds for the tail segments; the two stores' prompts and segments are checked equal on a sample
of requests (all of them with `--check-all`).

    python bench/store_heads.py [--requests 200000] [--headers 57]

Writes bench/results/store_heads.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.batch.order import tail_segments  # noqa: E402
from blendserve_sgl.batch.store import KINDS, TokenStore  # noqa: E402

BATCH = 1_000  # requests per add_many, as the reader hands them over


def prompts(n: int, headers: int, seed: int):
    """(the headers, per request its header and question tokens)."""
    rng = np.random.default_rng(seed)
    heads = [rng.integers(3, 49_000, int(rng.integers(1_000, 3_001)), dtype=np.int32) for _ in range(headers)]
    which = rng.integers(0, headers, n)
    qlen = rng.integers(20, 121, n)
    return heads, which, qlen, rng


def fill(store: TokenStore, heads, which, qlen, seed: int) -> float:
    rng = np.random.default_rng(seed + 1)  # the same questions for both stores
    t0 = time.perf_counter()
    n = len(which)
    for start in range(0, n, BATCH):
        stop = min(n, start + BATCH)
        tails = [np.concatenate((heads[which[i]], rng.integers(3, 49_000, int(qlen[i]), dtype=np.int32)))
                 for i in range(start, stop)]
        m = stop - start
        store.add_many(line=np.arange(start, stop) + 1, custom_ids=[f"q{i}" for i in range(start, stop)],
                       kind=[KINDS.index("completion")] * m, models=[None] * m, samplings=["{}"] * m,
                       max_tokens=[8] * m, ref_digests=[], ref_counts=[0] * m, tails=np.concatenate(tails),
                       tail_lens=[len(t) for t in tails], digests=bytes(16 * m))
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--headers", type=int, default=57)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-all", action="store_true")
    args = ap.parse_args()
    heads, which, qlen, _ = prompts(args.requests, args.headers, args.seed)
    figures, stores, segments = {}, {}, {}
    for label, share in (("shared heads", True), ("whole tails", False)):
        store = TokenStore(share_heads=share)
        tracemalloc.start()
        fill_s = fill(store, heads, which, qlen, args.seed)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        store.check_integrity()
        t0 = time.perf_counter()
        segments[label] = tail_segments(store)
        seg_s = time.perf_counter() - t0
        figures[label] = {"store_mb": round(store.nbytes() / 2**20, 1), "fill_peak_mb": round(peak / 2**20, 1),
                          "fill_seconds": round(fill_s, 2), "tail_segments_seconds": round(seg_s, 2),
                          "tail_tokens": int(store.tail_tokens.n), "pieces": int(store.pieces),
                          "head_blocks_referenced": int(store.head_counts().sum())}
        stores[label] = store
        print(label, figures[label], flush=True)
    a, b = stores["shared heads"], stores["whole tails"]
    n = len(which)
    sample = range(n) if args.check_all else np.random.default_rng(args.seed).choice(n, min(n, 2_000), replace=False)
    same = all(a.input_ids(int(i)) == b.input_ids(int(i)) for i in sample)
    same_segments = segments["shared heads"] == segments["whole tails"]
    if not (same and same_segments):
        raise SystemExit(f"the stores differ: prompts equal {same}, tail segments equal {same_segments}")
    tokens = int(b.prompt_lengths().sum())
    payload = {"requests": n, "headers": args.headers, "prompt_tokens": tokens,
               "prompts_checked_equal": len(sample), "tail_segments_equal": same_segments, "stores": figures,
               "store_shared_over_whole": round(figures["shared heads"]["store_mb"] / figures["whole tails"]["store_mb"], 4),
               "fill_seconds_shared_over_whole": round(figures["shared heads"]["fill_seconds"]
                                                       / figures["whole tails"]["fill_seconds"], 3),
               "tail_segments_seconds_shared_over_whole": round(figures["shared heads"]["tail_segments_seconds"]
                                                                / figures["whole tails"]["tail_segments_seconds"], 3)}
    path = write("store_heads", payload)
    print(table([(k, f["store_mb"], f["fill_peak_mb"], f["fill_seconds"], f["tail_segments_seconds"], f["pieces"])
                 for k, f in figures.items()],
                ("store", "MB in use", "fill peak MB (traced)", "fill s", "tail segments s", "pieces")))
    print(f"{n:,} requests, {tokens:,} prompt tokens; shared / whole: {payload['store_shared_over_whole']}x the "
          f"bytes; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
