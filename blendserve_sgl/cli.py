"""The `blendserve` command: subcommands of the project, and the argument types they share
(a bad value is a one-line argparse error naming the option, exit 2)."""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys

from . import lifetime

lifetime.watch_if_spawned()  # SGLang's processes of a run import this first: they end with the run

COMMANDS = {
    "plan": ("blendserve_sgl.plan", "plan a real trace with the dual scanner and show what it achieves"),
    "run": ("blendserve_sgl.batch.cli", "run a JSONL batch of OpenAI requests through SGLang with BlendServe scheduling"),
    "simulate": ("blendserve_sgl.sim.cli", "simulate policies over a workload (SGLang-style engine, cost-model time)"),
}


def int_at_least(text: str, low: int, must: str, kind: str = "an integer", beyond: str | None = None) -> int:
    """An argparse value: an integer >= `low` and at most sys.maxsize; else an error saying it is
    not `kind`, or must be `must`, or (above sys.maxsize) `beyond` when given."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {kind}") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{text} must be {must}")
    if v > sys.maxsize:  # counts index and slice: Python takes none beyond this
        raise argparse.ArgumentTypeError(beyond or f"{text} must be at most 2**63 - 1 = {sys.maxsize:,}")
    return v


def positive_int(text: str) -> int:
    return int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return int_at_least(text, 0, "0 or a positive integer")


MAX_ENGINE_SEED = 2**32 - 1  # SGLang seeds NumPy's global generator with its random_seed, which takes no more


def engine_seed(text: str) -> int:
    """An SGLang `random_seed`: 0 to 2**32 - 1 (beyond it the engine fails to start)."""
    seed = non_negative_int(text)
    if seed > MAX_ENGINE_SEED:
        raise argparse.ArgumentTypeError(f"{text} must be at most 2**32 - 1 = {MAX_ENGINE_SEED:,} (SGLang seeds NumPy "
                                         "with it)")
    return seed


def positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number")
    return v


def fraction(text: str) -> float:
    """A number above 0 and at most 1."""
    v = positive_float(text)
    if v > 1:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 and at most 1")
    return v


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: blendserve COMMAND [options]\n\ncommands:")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<10} {text}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nunknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    import importlib

    try:
        return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])
    except KeyboardInterrupt:  # Ctrl-C in a command that has no stop of its own (`run` has): one line
        print(f"blendserve {argv[0]}: interrupted", file=sys.stderr)
        return 130


def entry() -> int:
    """The `blendserve` console script: `main`, then a SIGTERM while the interpreter exits (its
    engine's processes are already stopped) ends the process with the command's own status at
    once instead of the signal's 143: a finished run reads as finished."""
    status = main()
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(status))
    return status


if __name__ == "__main__":
    raise SystemExit(entry())
