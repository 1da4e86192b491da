#!/usr/bin/env python3
"""SGLang's own offline throughput benchmark, with `--schedule-policy blend` available.

`python -m sglang.benchmark.offline_throughput` builds its argument parser before SGLang loads
plugins, so `blend` is not among its `--schedule-policy` choices. This wrapper loads the plugins
first (`sglang.srt.plugins.load_plugins()`, which runs blendserve-sgl's `register()`), then runs
the module as `__main__` with the original arguments, so every flag of the stock benchmark works
unchanged (`--blend-*` knobs included):

    python bench/offline_throughput_blend.py --model-path M --schedule-policy blend \\
        --dataset-name random --random-input-len 256 --random-output-len 32 --num-prompts 200

The stock benchmark needs a local ShareGPT-format JSON even when another dataset is chosen
(its warm-up and the `random` dataset take their text from it; without one it tries to download
ShareGPT from the Hugging Face hub). If `--dataset-path` is not given, this wrapper writes a small
one and passes it on:

  --synthetic-sharegpt PATH     where to write (or reuse, if it exists) the generated file
                                (default: <tmp>/blendserve-sharegpt-azure-conv.json)
  --synthetic-sharegpt-num N    conversations in it (default 1000)

Its conversations have the prompt and answer lengths of the Azure LLM inference conversation
trace (shared/data/traces/AzureLLMInferenceTrace_conv.csv, lengths divided by 4 and capped so
ShareGPT's own filter keeps them), filled with plain English words; set $BLENDSERVE_DATA if the
data folder is not next to the checkout. With `--dataset-name sharegpt` and no `--dataset-path`
the benchmark therefore runs these synthetic conversations.

Extra for this project: `--record NAME` also writes bench/results/NAME.json (the command, the
benchmark's result figures, the server arguments that matter here and, with `blend`, the
policy's planning stats from `BLENDSERVE_STATS_PATH`, which it sets to a temporary file if unset;
the stats cover the warm-up and the timed batch together).

On a CPU machine the wrapper sets SGLANG_USE_CPU_ENGINE=1 and OMP_WAIT_POLICY=PASSIVE when
`--device cpu` is given and they are not set (they must be in the environment before torch loads).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODULE = "sglang.benchmark.offline_throughput"
def _pop_option(argv: list[str], flag: str) -> str | None:
    """Remove `flag VALUE` / `flag=VALUE` from argv; return VALUE (last one wins)."""
    value = None
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == flag:
            if i + 1 >= len(argv):
                sys.exit(f"{flag} needs a value")
            value = argv[i + 1]
            del argv[i:i + 2]
        elif a.startswith(flag + "="):
            value = a.split("=", 1)[1]
            del argv[i]
        else:
            i += 1
    return value


def _has_option(argv: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def _option(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def write_synthetic_sharegpt(path: Path, num: int = 1000, seed: int = 0, scale: float = 4.0) -> Path:
    """A ShareGPT-format JSON whose conversations have the Azure conversation trace's lengths."""
    import json

    sys.path.insert(0, str(ROOT))
    from blendserve_sgl.workloads.engine_batches import sharegpt_rows

    rows = sharegpt_rows(num, seed, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(rows))
    os.replace(tmp, path)
    return path


def main() -> int:
    original = list(sys.argv)
    argv = sys.argv[1:]
    record = _pop_option(argv, "--record")
    synth = _pop_option(argv, "--synthetic-sharegpt")
    synth_num = int(_pop_option(argv, "--synthetic-sharegpt-num") or 1000)
    if _option(argv, "--device") == "cpu":
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    asks_help = any(a in ("-h", "--help") for a in argv)
    if not _has_option(argv, "--dataset-path") and not asks_help:
        import tempfile

        path = Path(synth) if synth else Path(tempfile.gettempdir()) / "blendserve-sharegpt-azure-conv.json"
        if not path.is_file():
            write_synthetic_sharegpt(path, synth_num)
            print(f"wrote a synthetic ShareGPT file ({synth_num} conversations, Azure conv lengths): {path}")
        argv += ["--dataset-path", str(path)]
    result_file = None
    stats_file = None
    if record and not os.environ.get("BLENDSERVE_STATS_PATH"):
        import tempfile

        # The blend policy writes its planning stats here (proof that it ran, and its cost).
        stats_file = os.path.join(tempfile.mkdtemp(prefix="offline-throughput-"), "blend-stats.json")
        os.environ["BLENDSERVE_STATS_PATH"] = stats_file
    if record:
        if _has_option(argv, "--result-filename"):
            result_file = _option(argv, "--result-filename")
        else:
            import tempfile

            fd, result_file = tempfile.mkstemp(prefix="offline-throughput-", suffix=".jsonl")
            os.close(fd)
            argv += ["--result-filename", result_file]

    # The plugins must be in place before the benchmark builds its parser.
    from sglang.srt.plugins import load_plugins

    load_plugins()

    import runpy

    sys.argv = [MODULE] + argv
    runpy.run_module(MODULE, run_name="__main__", alter_sys=True)

    if record:
        import json
        import shlex

        sys.path.insert(0, str(ROOT))
        from bench import _common

        lines = [ln for ln in Path(result_file).read_text().splitlines() if ln.strip()]
        result = json.loads(lines[-1])
        keep = ("--model-path", "--schedule-policy", "--device", "--attention-backend", "--dataset-name",
                "--num-prompts", "--random-input-len", "--random-output-len", "--random-range-ratio",
                "--max-total-tokens", "--chunked-prefill-size", "--enable-mixed-chunk", "--dataset-path")
        args = {f: _option(argv, f) if _option(argv, f) is not None else True for f in keep if _has_option(argv, f)}
        cmd = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__)] + original[1:])
        out = _common.RESULTS / f"{record}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        stats_path = stats_file or os.environ.get("BLENDSERVE_STATS_PATH")
        stats = json.loads(Path(stats_path).read_text()) if stats_path and Path(stats_path).is_file() else None
        out.write_text(json.dumps({"command": cmd, "machine": _common.machine(), "module": MODULE,
                                   "arguments": args, "result": result,
                                   "blend_policy_stats": stats}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
