#!/usr/bin/env python3
"""How long a `--ray` run takes to stop when it is interrupted while its replicas' engines still
start: this tree beside earlier commits, side by side.

Two stand-in replicas (no SGLang: `ray_runner.Replica` replaced by one whose start takes
`--start-seconds`, as a real engine's load does) on a local Ray cluster; `ray_runner.generate` is
interrupted (as Ctrl-C does) `--after` seconds in, and the seconds from the interrupt to
`generate` returning are measured. `--in-flight 0`: the window from each replica's capacity (what
`blendserve run --ray` does: the driver waits for each engine before feeding); `N`: N chunks fed at
once (the run stops with chunks out, so it first asks each replica for what they finished).

    python bench/ray_stop.py --baseline 426ce1f~1 [--start-seconds 90] [--after 5]

Writes bench/results/ray_stop.json.
"""

from __future__ import annotations

import _thread
import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class SlowStart:
    """`ray_runner.Replica`'s interface; its engine takes `BLENDSERVE_BENCH_START` seconds to start."""

    def __init__(self, cfg, env: dict):
        time.sleep(float(env["BLENDSERVE_BENCH_START"]))

    def capacity(self) -> tuple:
        return 4096, 64

    def run(self, items: list, key: int = 0) -> tuple:
        return os.getpid(), [(i, {"text": "", "meta_info": {"finish_reason": {"type": "length"}}}, None)
                             for i in range(len(items))]

    def collect(self) -> dict:
        return {}

    def shutdown(self) -> None:
        pass


def worker(start_seconds: float, after: float, in_flight: int) -> dict:
    """In a process whose PYTHONPATH names the code version: seconds from the interrupt to the stop."""
    import ray
    from ray import cloudpickle

    from blendserve_sgl.batch import ray_runner, runner
    from blendserve_sgl.batch.prompts import Prepared
    from blendserve_sgl.batch.requests import BatchRequest

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray_runner.Replica = SlowStart
    os.environ["BLENDSERVE_BENCH_START"] = str(start_seconds)  # the actors get BLENDSERVE_* variables
    items = [Prepared(BatchRequest(line=i + 1, custom_id=f"r{i}", kind="completion", messages=None, prompt="x",
                                   max_tokens=4), [1, 2], 4) for i in range(8)]
    cfg = runner.EngineConfig(model_path="stand-in", policy="blend", device="cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    at: dict = {}

    def interrupt() -> None:
        at["interrupt"] = time.monotonic()
        _thread.interrupt_main()

    signal.signal(signal.SIGINT, signal.default_int_handler)  # started in the background, it ignores Ctrl-C
    threading.Timer(after, interrupt).start()
    try:
        ray_runner.generate(cfg, [items[:4], items[4:]], lambda *a: None, lambda *a: None, chunk=4,
                            in_flight=in_flight or None)
        stopped = None  # the engines started before the interrupt: nothing measured
    except KeyboardInterrupt:
        stopped = round(time.monotonic() - at["interrupt"], 1)
    ray.shutdown()
    return {"stop_seconds": stopped}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start-seconds", type=float, default=90.0, help="each stand-in engine's start")
    ap.add_argument("--after", type=float, default=5.0, help="seconds into the run of the interrupt")
    ap.add_argument("--in-flight", default="0,2", help="comma-separated: 0 = the window from capacity, N chunks")
    ap.add_argument("--baseline", default="", help="comma-separated commits to run beside this tree")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.start_seconds, args.after, int(args.in_flight))))
        return 0
    sys.path.insert(0, str(ROOT))  # not in the worker: it imports the code version its PYTHONPATH names
    from bench._common import codes, table, write

    if args.after >= args.start_seconds:
        ap.error("--after must come before the engines have started (--start-seconds)")
    flights = [int(x) for x in args.in_flight.split(",") if x.strip()]
    results: dict = {}
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blendserve-raystop-")))
        for name, root in codes(stack, args.baseline, tmp).items():
            env = {**os.environ, "PYTHONPATH": str(root)}
            for k in flights:
                out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", "--start-seconds",
                                      str(args.start_seconds), "--after", str(args.after), "--in-flight", str(k)],
                                     env=env, cwd=tmp, capture_output=True, text=True, check=True)
                results.setdefault(name, {})[f"in_flight_{k}"] = json.loads(out.stdout.strip().splitlines()[-1])
                print(f"{name} in_flight {k}: done", flush=True)
    print(table([(name, run, r["stop_seconds"]) for name, runs in results.items() for run, r in runs.items()],
                ("code", "feed", "stop s after the interrupt")))
    ratios = {name: {run: round(r["stop_seconds"] / results["this"][run]["stop_seconds"], 2)
                     for run, r in runs.items()} for name, runs in results.items() if name != "this"}
    print(json.dumps({"baseline_over_this": ratios}))
    path = write("ray_stop", {"start_seconds": args.start_seconds, "interrupt_after_seconds": args.after,
                              "replicas": 2, "results": results, "baseline_over_this": ratios,
                              "note": "stand-in replicas on a local Ray cluster; feed in_flight_0: the window from "
                                      "each replica's capacity (blendserve run --ray), in_flight_N: N chunks fed"})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
