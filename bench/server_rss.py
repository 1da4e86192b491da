#!/usr/bin/env python3
"""The real scheduler's memory on a server that serves batch after batch, blend beside SGLang's
stock policies.

For each policy of `--policies`, `sglang.launch_server` on the tiny random Llama (CPU, a KV pool
of `--pool` tokens) serves a warm-up batch, then `--batches` batches of `--size` requests sent
together through /generate (token ids: one of `--systems` shared system prompts of 40-200
tokens, then 50-200 random tokens; 4-16 output tokens, greedy, EOS allowed so blend samples
output lengths); each batch ends before the next is sent, as between a user's jobs, and the
cache is never flushed. After the warm-up and every `--every` batches it reads the RSS and USS
of SGLang's scheduler process (where the policy lives). Printed and written to
`bench/results/server_rss.json`: per policy the scheduler's memory at the start, the middle and
the end, and its least-squares slope per batch over the later half (the first batches fill the
prefix cache and settle the allocator); blend's slope beside the stock policies'. A policy that
keeps something per request or per batch shows as a slope that stock SGLang does not have.

    python bench/server_rss.py [--policies blend,lpm,fcfs] [--batches 60] [--size 100] [--every 5]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench._common import post_json, table, wait_up, write  # noqa: E402
from blendserve_sgl.harness import cpu_engine_env, kill_group, start  # noqa: E402

VOCAB = (3, 500)  # token ids drawn (the tiny Llama's vocabulary is 512)


def batches(seed: int, systems: int, n: int, size: int) -> list[list[dict]]:
    """The warm-up batch and `n` more: the same requests for every policy."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(*VOCAB) for _ in range(rng.randint(40, 200))] for _ in range(systems)]
    out = []
    for _ in range(n + 1):
        out.append([{"input_ids": rng.choice(prompts) + [rng.randrange(*VOCAB) for _ in range(rng.randint(50, 200))],
                     "sampling_params": {"max_new_tokens": rng.randint(4, 16), "temperature": 0}}
                    for _ in range(size)])
    return out


def scheduler_process(server: psutil.Process) -> psutil.Process:
    for p in server.children(recursive=True):
        try:
            if "scheduler" in (p.name() + " " + " ".join(p.cmdline())).lower():
                return p
        except psutil.Error:
            continue
    raise RuntimeError(f"no scheduler process under the server (pid {server.pid})")


def run_policy(policy: str, model: str, args, work: list[list[dict]], log: Path) -> dict:
    proc = start([sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
                  "--attention-backend", "torch_native", "--schedule-policy", policy, "--port", str(args.port),
                  "--host", "127.0.0.1", "--max-total-tokens", str(args.pool), "--random-seed", "0",
                  "--log-level", "warning"], log_path=log, env=cpu_engine_env())
    url = f"http://127.0.0.1:{args.port}"
    try:
        wait_up(url, proc)
        sched = scheduler_process(psutil.Process(proc.pid))
        samples, tokens = [], 0
        with ThreadPoolExecutor(max_workers=len(work[0])) as pool:
            for b, batch in enumerate(work):
                answers = list(pool.map(lambda body: post_json(url + "/generate", body), batch))
                tokens += sum(a["meta_info"]["completion_tokens"] for a in answers)
                if b % args.every == 0 or b == len(work) - 1:  # b = 0: after the warm-up
                    m = sched.memory_full_info()
                    samples.append((b, round(m.rss / 2**20, 2), round(m.uss / 2**20, 2)))
        return {"samples": samples, "output_tokens": tokens, **summary(samples)}
    finally:
        kill_group(proc)


def summary(samples: list[tuple]) -> dict:
    mid = min(samples, key=lambda s: abs(s[0] - samples[-1][0] / 2))
    late = [s for s in samples if s[0] >= samples[-1][0] / 2]
    x = np.array([s[0] for s in late], float)
    return {"rss_mb": {"start": samples[0][1], "middle": mid[1], "end": samples[-1][1]},
            "uss_mb": {"start": samples[0][2], "middle": mid[2], "end": samples[-1][2]},
            "rss_slope_mb_per_batch": round(float(np.polyfit(x, [s[1] for s in late], 1)[0]), 3),
            "uss_slope_mb_per_batch": round(float(np.polyfit(x, [s[2] for s in late], 1)[0]), 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", default="blend,lpm,fcfs")
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--size", type=int, default=100)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--systems", type=int, default=4)
    ap.add_argument("--pool", type=int, default=65536)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--port", type=int, default=30181)
    args = ap.parse_args()
    if args.batches < 2 * args.every:
        ap.error(f"--batches {args.batches} gives fewer than three samples at --every {args.every}")
    from cpu_smoke import write_tiny_llama

    policies = [p for p in args.policies.split(",") if p]
    work = batches(args.seed, args.systems, args.batches, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny", max_position_embeddings=4096))
        res = {}
        for p in policies:
            res[p] = run_policy(p, model, args, work, Path(tmp) / f"{p}.log")
            print(f"{p}: done", file=sys.stderr, flush=True)
    print(table([(p, r["rss_mb"]["start"], r["rss_mb"]["middle"], r["rss_mb"]["end"], r["rss_slope_mb_per_batch"],
                  r["uss_slope_mb_per_batch"], r["output_tokens"]) for p, r in res.items()],
                ("policy", "RSS start MB", "middle", "end", "RSS slope MB/batch", "USS slope", "output tokens")))
    stock = [p for p in res if p != "blend"]
    compare = {}
    if "blend" in res and stock:
        compare = {"blend_rss_slope_minus_highest_stock": round(
            res["blend"]["rss_slope_mb_per_batch"] - max(res[p]["rss_slope_mb_per_batch"] for p in stock), 3),
            "blend_rss_growth_minus_highest_stock_mb": round(
            (res["blend"]["rss_mb"]["end"] - res["blend"]["rss_mb"]["start"])
            - max(res[p]["rss_mb"]["end"] - res[p]["rss_mb"]["start"] for p in stock), 2)}
        print(compare)
    path = write("server_rss", {"model": "tiny random Llama (scripts/cpu_smoke.py), CPU, torch_native",
                                "batches": args.batches, "size": args.size, "systems": args.systems,
                                "pool_tokens": args.pool, "seed": args.seed, "every": args.every,
                                "note": "batch 0 is after the warm-up batch; slopes over the later half of the samples",
                                "policies": res, **compare})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
