#!/usr/bin/env python3
"""Shared prefixes inside completion prompts: the same text as chats and as completions.

`PAIRS` distinct prefixes of about 250 words, each used by two requests `PAIRS` lines apart in the
file (request k and k + PAIRS), so the two users of a prefix are further apart than the engine's
window: only the global plan can bring them together. The chat twin puts the prefix in a system
message (a piece the reader stores once and the plan groups by); the completion twin has the same
text as one prompt, where the plan finds the shared part among the tails (`batch.order.tail_segments`).
Each file runs through `blendserve run` (blend, `--window 256 --max-total-tokens 8192`, the tiny
random Llama of scripts/cpu_smoke.py, max_tokens 2); figures from each run's `--summary-json`.

    python bench/completion_prefixes.py [--pairs 1000] [--baseline REV]

`--baseline REV` runs the completion file with the code of commit REV too (a git worktree): the
plan before it saw shared prefixes in tails.

Writes bench/results/completion_prefixes.json.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench._common import code_at, table, write  # noqa: E402
from bench.batch_cli import run_policy  # noqa: E402

EXTRA = ("--window", "256", "--max-total-tokens", "8192")
WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega river stone cloud field light north south paper glass metal").split()


def write_twins(folder: Path, pairs: int, seed: int = 0) -> tuple[Path, Path]:
    """The chat and the completion file of the same texts (module doc)."""
    rng = random.Random(seed)
    prefixes = [" ".join(rng.choice(WORDS) for _ in range(250)) for _ in range(pairs)]
    chat, comp = folder / "pairs_chat.jsonl", folder / "pairs_completion.jsonl"
    with chat.open("w") as fc, comp.open("w") as fp:
        for k in range(2 * pairs):
            prefix, tail = prefixes[k % pairs], f"Question {k}: " + " ".join(rng.choice(WORDS) for _ in range(8))
            fc.write(json.dumps({"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "system", "content": prefix},
                                                       {"role": "user", "content": tail}], "max_tokens": 2}}) + "\n")
            fp.write(json.dumps({"custom_id": f"q{k}", "method": "POST", "url": "/v1/completions",
                                 "body": {"prompt": prefix + "\n" + tail, "max_tokens": 2}}) + "\n")
    return chat, comp


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    ap.add_argument("--baseline", help="an earlier commit whose `blendserve run` takes the completion file too")
    args = ap.parse_args(argv)
    from cpu_smoke import write_tiny_llama

    runs = {}
    with tempfile.TemporaryDirectory(prefix="completion-prefixes-") as tmp:
        tmp = Path(tmp)
        model = str(write_tiny_llama(tmp / "tiny"))
        chat, completion = write_twins(tmp, args.pairs)
        todo = [("chat", chat, ROOT), ("completion", completion, ROOT)]
        with contextlib.ExitStack() as stack:
            if args.baseline:
                todo.append(("completion_baseline", completion, stack.enter_context(code_at(args.baseline,
                                                                                             tmp / "baseline"))))
            for name, path, code in todo:
                ns = argparse.Namespace(requests=str(path), model=model, timeout=args.timeout)
                kept, _, _ = run_policy("blend", ns, tmp, len(runs), EXTRA, code)
                kept["command"] = kept["command"].replace(os.path.relpath(path, code), path.name).replace(model, "TINY")
                runs[name] = kept
                print(f"{name}: cache hit {kept['cache_hit_ratio']:.1%}, generation {kept['generate_seconds']:.1f} s",
                      flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    payload = {"git_commit": commit or None, "pairs": args.pairs, "requests": 2 * args.pairs,
               "model": "tiny random Llama (scripts/cpu_smoke.py)",
               "chat_cache_hit_ratio": runs["chat"]["cache_hit_ratio"],
               "completion_cache_hit_ratio": runs["completion"]["cache_hit_ratio"],
               "completion_over_chat_cache_hits": round(runs["completion"]["cache_hit_ratio"]
                                                        / runs["chat"]["cache_hit_ratio"], 4),
               "completion_over_chat_generation_seconds": round(runs["completion"]["generate_seconds"]
                                                                / runs["chat"]["generate_seconds"], 4),
               "runs": runs}
    if "completion_baseline" in runs:
        payload["baseline_commit"] = args.baseline
        payload["completion_over_baseline_cache_hits"] = round(runs["completion"]["cache_hit_ratio"]
                                                              / runs["completion_baseline"]["cache_hit_ratio"], 4)
        payload["completion_over_baseline_generation_seconds"] = round(
            runs["completion"]["generate_seconds"] / runs["completion_baseline"]["generate_seconds"], 4)
    path = write("completion_prefixes", payload)
    print(table([(k, r["requests"], r["input_tokens"], f"{r['cache_hit_ratio']:.3f}", f"{r['generate_seconds']:.1f}")
                 for k, r in runs.items()], ("file", "requests", "input tokens", "cache hit", "generation s")))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
