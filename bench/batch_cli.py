#!/usr/bin/env python3
"""The batch job as a user runs it: `blendserve run examples/requests.jsonl` with `blend` and `fcfs`.

Each policy is one `blendserve run ... --policy P --overwrite --summary-json S` process (its own
process group, killed at the end), one after the other; with `--repeats 2` the order is
A B B A so slow drift on a shared machine hits both alike. Figures come from the command's
own summary: requests, wall seconds (the whole command: model check, tokenization, engine
start, generation), generation seconds, output and total tokens/s over generation, prefix-cache
hit ratio (cached prompt tokens / prompt tokens, from SGLang's `cached_tokens`), engine start.
Greedy requests should produce the same text under both policies; `same_text_fraction` says how
many did (batch composition can flip near-ties in float rounding).

    python bench/batch_cli.py                           # examples/requests.jsonl, default model
    python bench/batch_cli.py --requests big.jsonl --model DIR --repeats 2

Needs the CPU SGLang environment (`make venv`); the default model is the embedded SmolLM2.
Writes bench/results/batch_cli.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import table, write  # noqa: E402

FIELDS = ("requests", "completed", "failed", "wall_seconds", "generate_seconds", "engine_start_seconds",
          "input_tokens", "output_tokens", "output_tokens_per_s", "total_tokens_per_s", "cache_hit_ratio")


def run_policy(policy: str, args, work: Path, index: int, extra: tuple = (),
               code: Path = ROOT) -> tuple[dict, str, dict]:
    """One `blendserve run` of `args.requests` (`extra`: more of its arguments) with the package
    of the tree at `code` (an earlier commit's worktree: `_common.code_at`)."""
    out, summary = work / f"results-{policy}-{index}.jsonl", work / f"summary-{policy}-{index}.json"
    cmd = ["blendserve", "run", os.path.relpath(args.requests, code), "-o", str(out), "--policy", policy,
           "--overwrite", "--summary-json", str(summary), "--quiet", *extra]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    if code != ROOT:
        env["PYTHONPATH"] = str(code)
    proc = subprocess.Popen([sys.executable, "-m", "blendserve_sgl.cli", *cmd[1:]], cwd=code, env=env,
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{log[-3000:]}")
    texts = {}
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec["error"] is None:
            choice = rec["response"]["body"]["choices"][0]
            texts[rec["custom_id"]] = choice.get("text", (choice.get("message") or {}).get("content"))
    data = json.loads(summary.read_text())
    kept = {k: data[k] for k in FIELDS}
    kept["command"] = shlex.join(cmd[:3] + ["-o", "results.jsonl", "--policy", policy, *extra])
    if data.get("policy_stats"):
        kept["planning_ms_per_step"] = data["policy_stats"].get("planning_ms_per_step")
    return kept, log, texts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", default=str(ROOT / "examples" / "requests.jsonl"))
    ap.add_argument("--model", help="model directory (default: the embedded SmolLM2)")
    ap.add_argument("--policies", default="blend,fcfs")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--name", default="batch_cli", help="result file name")
    args = ap.parse_args(argv)
    policies = args.policies.split(",")
    order = []
    for r in range(args.repeats):
        order += policies if r % 2 == 0 else policies[::-1]

    load_before = os.getloadavg()[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    runs: dict[str, list[dict]] = {p: [] for p in policies}
    texts: dict[str, dict] = {}
    logs: dict[str, list] = {}
    with tempfile.TemporaryDirectory(prefix="batch-cli-") as tmp:
        for i, policy in enumerate(order):
            t0 = time.perf_counter()
            kept, log, out = run_policy(policy, args, Path(tmp), i)
            runs[policy].append(kept)
            texts.setdefault(policy, out)
            print(f"[{i + 1}/{len(order)}] {policy}: {kept['wall_seconds']:.1f} s wall, "
                  f"{kept['output_tokens_per_s']:.1f} output tok/s, cache hit {kept['cache_hit_ratio']:.1%} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
            if i == 0:
                print("\n".join(log.strip().splitlines()[-9:]), flush=True)
            if policy == policies[0] and policy not in logs:
                logs[policy] = log.strip().splitlines()[-12:]

    per_policy = {}
    for p, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in FIELDS if isinstance(rs[0][k], (int, float))}
        per_policy[p] = {**med, "command": rs[0]["command"], "runs": rs}
        if "planning_ms_per_step" in rs[0]:
            per_policy[p]["planning_ms_per_step"] = statistics.median(r["planning_ms_per_step"] or 0 for r in rs)
    payload: dict = {"git_commit": commit or None, "requests_file": os.path.relpath(args.requests, ROOT),
                     "repeats": args.repeats,
                     "requests": per_policy[policies[0]]["requests"], "model": args.model or "SmolLM2-135M-Instruct"}
    for p in policies:
        for k in ("wall_seconds", "generate_seconds", "output_tokens_per_s", "total_tokens_per_s", "cache_hit_ratio"):
            payload[f"{p}_{k}"] = round(per_policy[p][k], 4)
    if "blend" in texts and "fcfs" in texts:
        common = set(texts["blend"]) & set(texts["fcfs"])
        payload["same_text_fraction"] = round(sum(texts["blend"][c] == texts["fcfs"][c] for c in common)
                                              / max(1, len(common)), 4)
        payload["blend_generation_speedup_vs_fcfs"] = round(per_policy["fcfs"]["generate_seconds"]
                                                            / per_policy["blend"]["generate_seconds"], 4)
    payload["load_average_before"] = round(load_before, 2)
    payload["load_average_after"] = round(os.getloadavg()[0], 2)
    payload["policies"] = per_policy
    first = policies[0]
    payload["first_policy_summary_lines"] = logs.get(first, [])  # what `blendserve run` printed at the end
    payload["sample_answers"] = {c: texts[first][c] for c in sorted(texts.get(first, {}))[:4]}
    path = write(args.name, payload)
    rows = [(p, per_policy[p]["requests"], f"{per_policy[p]['wall_seconds']:.1f}",
             f"{per_policy[p]['generate_seconds']:.1f}", f"{per_policy[p]['output_tokens_per_s']:.1f}",
             f"{per_policy[p]['total_tokens_per_s']:.1f}", f"{per_policy[p]['cache_hit_ratio']:.3f}") for p in policies]
    print(table(rows, ("policy", "requests", "wall s", "generation s", "output tok/s", "total tok/s", "cache hit")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
