#!/usr/bin/env python3
"""What long, distinct prompts cost the reader and `blendserve plan`: peak RSS and wall time, this
tree against earlier commits, side by side.

The input is `--requests` completion lines (default 30,000), each one of 57 few-shot headers of
1,000-3,000 words plus its own 20-120-word question (every prompt distinct, about 11 KB a line;
the shape of `bench/store_heads.py`). Per code version, each its own process:
- `plan`: `blendserve plan FILE --model llama-3.1-8b --hardware h100 --no-plot --json` (token
  counts approximated, read in the planning process); its peak RSS, wall time, and the predicted
  wall time of blend and of fcfs with outputs at max_tokens (the simulated sample is chosen from
  the file's prefix tree, so a change of that tree's view moves these a little);
- `read`: `batch.reader.read_store` with two tokenizer workers and the tiny model's tokenizer (what
  `blendserve run` does before it plans): the driver's peak RSS and the largest worker's.

    python bench/long_prompts_memory.py --baseline 82c321b [--requests 30000] [--parts plan] [--out NAME]

Writes bench/results/long_prompts_memory.json (or NAME.json).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench._common import codes, head_commit, table, write  # noqa: E402

WORDS = ("alpha", "beta", "gamma", "delta", "omega", "theta", "kappa", "sigma", "rho", "tau")

READ = """
import json, os, resource, sys, time
from transformers import AutoTokenizer
from blendserve_sgl.batch.reader import read_store
tok = AutoTokenizer.from_pretrained(sys.argv[2])
t0 = time.perf_counter()
res = read_store(sys.argv[1], tok, 131072, 256, model_dir=sys.argv[2], workers=2)
wall = time.perf_counter() - t0
mb = lambda who: resource.getrusage(who).ru_maxrss / 1024
print(json.dumps({"wall_seconds": round(wall, 1), "driver_peak_rss_mb": round(mb(resource.RUSAGE_SELF)),
                  "largest_worker_peak_rss_mb": round(mb(resource.RUSAGE_CHILDREN)),
                  "requests": len(res.store), "bad_lines": len(res.errors)}))
"""


def write_input(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    heads = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1000, 3000))) for _ in range(57)]
    with path.open("w") as f:
        for i in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            f.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                "body": {"model": "m", "prompt": heads[rng.randrange(57)] + "\nQ: " + q,
                                         "max_tokens": rng.randint(16, 512)}}) + "\n")


def measured(cmd: list[str], code: Path) -> tuple[subprocess.CompletedProcess, float]:
    """(the finished process, its wall seconds), run with `code` on the path."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=code, env={**os.environ, "PYTHONPATH": str(code)}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} in {code} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc, wall


def plan_run(code: Path, requests: Path) -> dict:
    cmd = [sys.executable, "-c",
           "import resource, runpy, sys; sys.argv = sys.argv[1:]; "
           "exec('try:\\n runpy.run_module(\"blendserve_sgl.cli\", run_name=\"__main__\")\\n'"
           "'finally:\\n print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)')",
           "blendserve", "plan", str(requests), "--model", "llama-3.1-8b", "--hardware", "h100", "--no-plot", "--json"]
    proc, wall = measured(cmd, code)
    peak = int(proc.stderr.strip().splitlines()[-1]) / 1024
    out = json.loads(proc.stdout)
    wall_s = {p["policy"]: p["wall_s"]["max_tokens"] for p in out["policies"]}
    return {"wall_seconds": round(wall, 1), "peak_rss_mb": round(peak), "simulated_requests": out["simulated_requests"],
            "predicted_wall_s_max_tokens": {p: wall_s[p] for p in ("blend", "fcfs") if p in wall_s}}


def read_run(code: Path, requests: Path, model: str) -> dict:
    proc, _ = measured([sys.executable, "-c", READ, str(requests), model], code)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=30_000)
    ap.add_argument("--parts", default="plan,read", help="which to measure: plan, read or both")
    ap.add_argument("--out", default="long_prompts_memory", help="results file name under bench/results")
    ap.add_argument("--baseline", default="",
                    help="earlier commits to run side by side, comma-separated (each a git worktree)")
    args = ap.parse_args(argv)
    from cpu_smoke import write_tiny_llama

    figures: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="long-prompts-") as tmp:
        tmp = Path(tmp)
        model = str(write_tiny_llama(tmp / "tiny"))
        requests = tmp / "in.jsonl"
        write_input(requests, args.requests)
        input_mb = round(requests.stat().st_size / 2**20, 1)
        with contextlib.ExitStack() as stack:
            for version, code in codes(stack, args.baseline, tmp).items():
                figures[version] = {}
                if "plan" in args.parts:
                    figures[version]["plan"] = plan_run(code, requests)
                if "read" in args.parts:
                    figures[version]["read"] = read_run(code, requests, model)
                print(f"{version}: {figures[version]}", flush=True)
    payload = {"git_commit": head_commit(), "baseline_commits": [v for v in figures if v != "this"],
               "requests": args.requests, "input_mb": input_mb,
               "input": "completion lines, each one of 57 headers of 1,000-3,000 words plus a distinct 20-120-word "
                        "question; max_tokens 16-512",
               "runs": figures}
    for rev in payload["baseline_commits"]:
        this, then = figures["this"], figures[rev]
        ratios = {}
        if "plan" in this:
            ratios["plan_peak_rss"] = round(this["plan"]["peak_rss_mb"] / then["plan"]["peak_rss_mb"], 3)
            ratios["plan_wall"] = round(this["plan"]["wall_seconds"] / then["plan"]["wall_seconds"], 3)
        if "read" in this:
            ratios["read_driver_peak_rss"] = round(this["read"]["driver_peak_rss_mb"]
                                                   / then["read"]["driver_peak_rss_mb"], 3)
            ratios["read_worker_peak_rss"] = round(this["read"]["largest_worker_peak_rss_mb"]
                                                   / then["read"]["largest_worker_peak_rss_mb"], 3)
            ratios["read_wall"] = round(this["read"]["wall_seconds"] / then["read"]["wall_seconds"], 3)
        payload.setdefault("this_over", {})[rev] = ratios
    path = write(args.out, payload)
    blank = {"peak_rss_mb": "", "wall_seconds": "", "driver_peak_rss_mb": "", "largest_worker_peak_rss_mb": ""}
    print(table([(v, r.get("plan", blank)["peak_rss_mb"], r.get("plan", blank)["wall_seconds"],
                  r.get("read", blank)["driver_peak_rss_mb"], r.get("read", blank)["largest_worker_peak_rss_mb"],
                  r.get("read", blank)["wall_seconds"]) for v, r in figures.items()],
                ("code", "plan peak MB", "plan s", "read driver MB", "read worker MB", "read s")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
