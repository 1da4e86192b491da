#!/usr/bin/env python3
"""The plugin's memory on a server that receives batch after batch: `BlendPolicy` with its tree,
scanner and sampler, driven through `--batches` batches of `--size` requests each (three system
prompts of 40 tokens, then 50-400 distinct random tokens, 4-19 output tokens; every batch runs
to the end before the next arrives, as an engine between a user's jobs; or, `stream`, arriving
two per step (about 450 prompt tokens: the stand-in prefills 512 a step) while the earlier ones run, so the engine never empties), for each of `--seeds`
(the requests, their ids and so the 1% sample each batch draws), this tree beside earlier
commits, side by side. The scheduler is the tests' stand-in (`tests/test_plugin.py`:
what the policy reads of SGLang's), so only the policy's own Python objects are counted
(tracemalloc, after a collection). A policy whose memory grows with the batches it has seen
ends a long-running server.

    python bench/server_batches_memory.py --baseline 8ac3be1 [--batches 200] [--size 200] [--seeds 0,1,2] [--modes drain,stream]

Writes bench/results/server_batches_memory.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def checkpoints(batches: int) -> list[int]:
    marks = {max(1, batches // 8), batches // 4, batches // 2, batches}
    return sorted(m for m in marks if m > 0)


def worker(batches: int, size: int, seed: int, mode: str) -> dict:
    """Run in a process whose PYTHONPATH names the code version: the figures at each checkpoint.
    `drain`: each batch runs to the end before the next arrives; `stream`: a batch's requests
    arrive two per engine step while the earlier ones run, so the engine never empties."""
    import gc
    import random
    import tracemalloc
    from types import SimpleNamespace

    import blendserve_sgl
    from test_plugin import FakeReq, FakeScheduler, _make_policy

    assert Path(blendserve_sgl.__file__).resolve().parent.parent == Path.cwd().resolve(), "not the code version asked"

    rng = random.Random(seed)
    sched = FakeScheduler(capacity=400_000, slots=64)
    pol = _make_policy(sched)
    running: list = []

    def step() -> None:
        nonlocal running
        pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=running))
        take = sched.waiting_queue[:sched.slots_total - len(running)]
        running, sched.waiting_queue = running + take, sched.waiting_queue[len(take):]
        pol.after_step()
        for r in running:
            r.output_ids.append(7)
            r.done = len(r.output_ids) >= r.sampling_params.max_new_tokens
        running = [r for r in running if not r.done]

    marks, rows, t0 = set(checkpoints(batches)), [], time.perf_counter()
    tracemalloc.start()
    for b in range(1, batches + 1):
        batch = [FakeReq(f"s{seed}-b{b}-{i}", [1 + i % 3] * 40 + [rng.randrange(3, 500) for _ in range(rng.randrange(50, 400))],
                         rng.randrange(4, 20)) for i in range(size)]
        for i, req in enumerate(batch):
            sched.waiting_queue.append(req)
            pol.on_arrival(req)
            if mode == "stream" and i % 2 == 1:
                step()
        while mode == "drain" and (running or sched.waiting_queue):
            step()
        if b in marks:
            batch = None  # the requests are the engine's: only what the policy keeps is counted
            gc.collect()
            tree = pol.scanner.tree
            rows.append({"batches": b, "traced_mb": round(tracemalloc.get_traced_memory()[0] / 1e6, 3),
                         "pruned_nodes_kept": len(tree._pruned), "in_engine": len(running) + len(sched.waiting_queue),
                         "seconds": round(time.perf_counter() - t0, 1)})
    tracemalloc.stop()
    return {"checkpoints": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--size", type=int, default=200, help="requests per batch")
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated; one run per seed and code version")
    ap.add_argument("--mode", choices=("drain", "stream"), default="drain",
                    help="drain: each batch ends before the next arrives; stream: arrivals never stop (worker)")
    ap.add_argument("--modes", default="drain,stream", help="comma-separated, each run per seed and code version")
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--baseline", default="", help="comma-separated commits to run beside this tree")
    ap.add_argument("--out", default="server_batches_memory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.batches, args.size, args.seed, args.mode)))
        return 0
    sys.path.insert(0, str(ROOT))  # not in the worker: it imports the code version its PYTHONPATH names
    from bench._common import codes, head_commit, table, write

    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    modes = [m for m in args.modes.split(",") if m]
    results: dict = {}  # code -> "mode/seed" -> the worker's figures
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blendserve-batches-")))
        for name, root in codes(stack, args.baseline, tmp).items():
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
            for mode in modes:
                for seed in seeds:
                    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--batches",
                                          str(args.batches), "--size", str(args.size), "--seed", str(seed),
                                          "--mode", mode], env=env, cwd=root, capture_output=True, text=True,
                                         check=True)
                    results.setdefault(name, {})[f"{mode}/{seed}"] = json.loads(out.stdout.strip().splitlines()[-1])
                    print(f"{name} {mode} seed {seed}: done", flush=True)
    rows = []
    for name, runs in results.items():
        for run, res in runs.items():
            cps = res["checkpoints"]
            half, last = cps[-2], cps[-1]
            res["growth_kb_per_batch"] = round((last["traced_mb"] - half["traced_mb"]) * 1e3
                                               / (last["batches"] - half["batches"]), 2)
            for cp in cps:
                rows.append((name, run, cp["batches"], cp["traced_mb"], cp["pruned_nodes_kept"], cp["seconds"],
                             res["growth_kb_per_batch"] if cp is last else ""))
    print(table(rows, ("code", "mode/seed", "batches", "traced MB", "pruned nodes kept", "s",
                       "KB/batch (2nd half)")))
    ratios = {name: {run: round(res["checkpoints"][-1]["traced_mb"]
                                / results["this"][run]["checkpoints"][-1]["traced_mb"], 2)
                     for run, res in runs.items()} for name, runs in results.items() if name != "this"}
    for name, by_run in ratios.items():
        print(f"after {args.batches} batches, memory of {name} over this tree's: {by_run}")
    path = write(args.out, {"code": head_commit(), "batches": args.batches, "requests_per_batch": args.size,
                            "seeds": seeds, "modes": modes, "results": results, "memory_vs_this": ratios})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
