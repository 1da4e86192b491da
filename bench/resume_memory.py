#!/usr/bin/env python3
"""What a rerun costs at a million records: the driver's peak RSS and wall time of `blendserve run`
on a results file it already holds, this tree against an earlier commit, side by side.

The input is `--requests` lines (default 1,000,000), each refused at validation (`max_tokens`
-1), so every run writes one error record per line and no engine starts: the figures are the
reading, the resume scan, the error file's check and rebuild, and `drop`. Three runs per code
version, each its own process: `first` (empty results), `rerun` (the same command: everything is
done), `retry` (`--retry-failed`: every record dropped and written again). Peak RSS is the
driver's from `--summary-json`.

With `--valid`, every line is a request the engine runs (chats behind three system prompts, a
distinct question each), answered by a stand-in engine (`bench/_standin.py`: one token at once),
with the default model's tokenizer: `rerun` is then a finished job run again, and `missing` the
same with its last record removed (one request to run again).

    python bench/resume_memory.py --baseline 3756e70,f997c7e [--requests 1000000]
    python bench/resume_memory.py --valid --requests 100000 --baseline 668adad --out rerun_finished

Writes bench/results/resume_memory.json.
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench._common import codes, head_commit, table, write  # noqa: E402

RUNS = (("first", ()), ("rerun", ()), ("retry", ("--retry-failed",)))
VALID_RUNS = (("first", ()), ("rerun", ()), ("missing", ()))
SYSTEMS = ("You are a careful assistant who answers in one sentence.",
           "You are a math tutor. Show the key step, then the answer.",
           "You label customer messages as positive, negative or neutral.")


def write_input(path: Path, n: int, valid: bool = False) -> None:
    with path.open("w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"question {i}"}]
            if valid:
                msgs = [{"role": "system", "content": SYSTEMS[i % 3]},
                        {"role": "user", "content": f"Question {i}: what is {i} times {i % 97 + 3}, and why?"}]
            f.write(json.dumps({"custom_id": f"req-{i:07d}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"messages": msgs, "max_tokens": 8 if valid else -1}}) + "\n")


def run(code: Path, requests: Path, out: Path, model: str | None, extra: tuple, valid: bool = False) -> dict:
    summary = out.with_suffix(".summary.json")
    summary.unlink(missing_ok=True)
    launcher = [str(ROOT / "bench" / "_standin.py")] if valid else ["-m", "blendserve_sgl.cli"]
    cmd = [sys.executable, *launcher, "run", str(requests), "-o", str(out), *(["--model", model] if model else []),
           "--quiet", "--summary-json", str(summary), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 1):  # 1: the run finished with failed requests
        raise SystemExit(f"{' '.join(cmd)} in {code} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    return {"wall_seconds": round(wall, 1), "driver_peak_rss_mb": s["driver_peak_rss_mb"],
            "results_mb": round(out.stat().st_size / 2**20, 1), "failed": s["failed"], "completed": s["completed"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--baseline", default="",
                    help="earlier commits to run side by side, comma-separated (each a git worktree)")
    ap.add_argument("--valid", action="store_true",
                    help="requests the engine runs (a stand-in engine), the default model's tokenizer")
    ap.add_argument("--out", default="resume_memory", help="result file name under bench/results")
    args = ap.parse_args(argv)
    runs = VALID_RUNS if args.valid else RUNS
    from cpu_smoke import write_tiny_llama

    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="resume-memory-") as tmp:
        tmp = Path(tmp)
        model = None if args.valid else str(write_tiny_llama(tmp / "tiny"))
        requests = tmp / "in.jsonl"
        write_input(requests, args.requests, args.valid)
        with contextlib.ExitStack() as stack:
            for version, code in codes(stack, args.baseline, tmp).items():
                out = tmp / f"{version}.jsonl"
                for name, extra in runs:
                    if name == "missing":  # the last record lost: one request to run again
                        kept = out.read_bytes().rstrip(b"\n").rsplit(b"\n", 1)[0] + b"\n"
                        out.write_bytes(kept)
                    figures.setdefault(version, {})[name] = r = run(code, requests, out, model, extra, args.valid)
                    print(f"{version} {name}: {r}", flush=True)
    payload = {"git_commit": head_commit(), "baseline_commits": [v for v in figures if v != "this"],
               "requests": args.requests,
               "input": ("chat requests behind three system prompts, answered by a stand-in engine (one token each), "
                         "the default model's tokenizer" if args.valid else
                         "one chat line per request, each refused (max_tokens -1): one error record each, no engine"),
               "runs": figures}
    for rev in payload["baseline_commits"]:
        payload.setdefault("rss_this_over", {})[rev] = {
            k: round(figures["this"][k]["driver_peak_rss_mb"] / figures[rev][k]["driver_peak_rss_mb"], 3) for k, _ in runs}
        payload.setdefault("wall_this_over", {})[rev] = {
            k: round(figures["this"][k]["wall_seconds"] / figures[rev][k]["wall_seconds"], 3) for k, _ in runs}
    path = write(args.out, payload)
    print(table([(v, k, r["results_mb"], r["driver_peak_rss_mb"], r["wall_seconds"])
                 for v, rs in figures.items() for k, r in rs.items()],
                ("code", "run", "results MB", "driver peak RSS MB", "wall s")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
