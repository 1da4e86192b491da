#!/usr/bin/env python3
"""A request of nearly the whole KV pool on a server under continuous arrivals, blend beside fcfs.

`sglang.launch_server` on the tiny random Llama (CPU), a KV pool of `--pool` tokens; `--clients`
threads send 20-token prompts (8, 64 or 128 output tokens, ignore_eos) for `--seconds`; at 2 s
one request of 30 + 1,500 tokens (nearly the whole pool) and two small ones arrive. Printed and
written to `bench/results/server_starvation.json`: each policy's latency of the big request and
the stream requests completed, and their ratios. Before the scanner let the larger of two ends
that cannot share the pool go first, blend served the big request only when the arrivals stopped
(docs/design.md, section 5).

    python bench/server_starvation.py [--pool 1536] [--clients 48] [--seconds 20] [--out NAME --code TEXT]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from bench._common import post_json, table, wait_up, write  # noqa: E402
from blendserve_sgl.harness import cpu_engine_env, kill_group, start  # noqa: E402

BIG = {"input_ids": [11] * 30, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True, "temperature": 0}}


def run_policy(policy: str, model: str, port: int, pool: int, clients: int, seconds: float, log: Path) -> dict:
    proc = start([sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--device", "cpu",
                  "--attention-backend", "torch_native", "--schedule-policy", policy, "--port", str(port),
                  "--host", "127.0.0.1", "--max-total-tokens", str(pool), "--random-seed", "0"],
                 log_path=log, env=cpu_engine_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_up(url, proc)
        stop, done, lock = time.time() + seconds, [0], threading.Lock()

        def client(k: int) -> None:
            rng = random.Random(k)
            while time.time() < stop:
                post_json(url + "/generate", {"input_ids": [rng.randrange(3, 500) for _ in range(20)],
                                          "sampling_params": {"max_new_tokens": rng.choice([8, 64, 128]),
                                                              "ignore_eos": True, "temperature": 0}})
                with lock:
                    done[0] += 1

        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        time.sleep(2)
        t0 = time.time()
        out = post_json(url + "/generate", BIG)
        big_latency = time.time() - t0
        for t in threads:
            t.join()
        return {"big_latency_s": round(big_latency, 2), "big_tokens": out["meta_info"]["completion_tokens"],
                "stream_requests": done[0]}
    finally:
        kill_group(proc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pool", type=int, default=1536)
    ap.add_argument("--clients", type=int, default=48)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--port", type=int, default=30171)
    ap.add_argument("--out", default="server_starvation", help="results file name under bench/results")
    ap.add_argument("--code", default="this checkout", help="which code ran (recorded): e.g. the scanner of a commit")
    args = ap.parse_args()
    from cpu_smoke import write_tiny_llama

    with tempfile.TemporaryDirectory() as tmp:
        model = str(write_tiny_llama(Path(tmp) / "tiny"))
        res = {p: run_policy(p, model, args.port, args.pool, args.clients, args.seconds, Path(tmp) / f"{p}.log")
               for p in ("fcfs", "blend")}
    ratios = {"big_latency_blend_over_fcfs": round(res["blend"]["big_latency_s"] / res["fcfs"]["big_latency_s"], 3),
              "stream_requests_blend_over_fcfs": round(res["blend"]["stream_requests"] / res["fcfs"]["stream_requests"],
                                                       3)}
    print(table([(p, r["big_latency_s"], r["big_tokens"], r["stream_requests"]) for p, r in res.items()],
                ("policy", "big request s", "its tokens", "stream requests")))
    print(json.dumps(ratios))
    path = write(args.out, {"code": args.code, "pool_tokens": args.pool, "clients": args.clients,
                            "seconds": args.seconds,
                                       "model": "tiny random Llama (scripts/cpu_smoke.py), CPU", "policies": res,
                                       **ratios})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
