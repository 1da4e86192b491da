"""`blendserve simulate`: run policies over a workload in the simulator and compare them.

    blendserve simulate --workload trace1 --policy blend,dfs,fcfs --hardware a100 --model llama-3.1-8b
    blendserve simulate --quick        # 2,000 requests
    blendserve simulate --workload my_trace.csv   # a trace file's token counts (workloads.trace_file)

Prints one row per policy (both execution modes), writes the figures as JSON and the per-step
compute/memory plot (the paper's Figure 10) as PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from ..core import CostModel
from ..core.preset import PRESET
from ..core.specs import hardware_names, interference, interference_names, model_names
from .engine import EngineConfig
from .metrics import compare, format_table, plot_steps
from .policies import POLICIES
from .run import RunSpec, Workload, simulate
from .timing import ExecModel
from ..workloads import WORKLOADS as BUILT_IN, mix, mixed_workload, trace
from ..workloads.trace_file import MOONCAKE_BLOCK, is_trace_file, load_trace_file, within_context
from ..cli import non_negative_int, positive_float, positive_int

WORKLOADS = (*BUILT_IN, "mixed", "mix:DENSITY,SHARING", "PATH.csv|PATH.jsonl")
DEFAULT_REQUESTS = 20_000  # a built-in workload's size when --requests is not given (a trace file: all its rows)
PROGRESS_EVERY_S = 30.0  # a run longer than this prints where it is to stderr, at most this often


def progress(policy: str, total: int, every_s: float | None = None):
    """An `on_step` callback that tells stderr, at most every `every_s` seconds of wall time, how far
    the run of `policy` is (a million requests take many minutes per policy)."""
    every = PROGRESS_EVERY_S if every_s is None else every_s
    last = time.perf_counter()

    def on_step(engine) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last >= every:
            last = now
            print(f"  {policy}: {engine.finished:,} of {total:,} requests finished, step {engine.steps:,}",
                  file=sys.stderr, flush=True)
    return on_step
MAX_BUILT_IN_REQUESTS = 2_000_000  # a built-in workload is built in memory: about 1.2 KB and 60 us a request


def load_workload(spec: str, n: int | None, cost: CostModel, seed: int = 0,
                  block_size: int | None = None) -> list:
    """Records for a workload name: a trace analog or the multi-turn `conversation` class
    (`workloads.trace`), `mixed` (workloads.mixed_workload),
    `mix:DENSITY,SHARING` (the mixing recipe with those targets), or a trace file
    (`workloads.trace_file`: CSV token counts or Mooncake-style JSONL; its first `n` rows).
    `n` None: `DEFAULT_REQUESTS` for a built-in workload, every row of a file; a built-in workload
    of more than `MAX_BUILT_IN_REQUESTS` is refused before anything is built."""
    if not spec.strip():
        raise ValueError(f"--workload is an empty name; pass one of {', '.join(WORKLOADS)}")
    from_file = is_trace_file(spec)
    if n is not None and n > MAX_BUILT_IN_REQUESTS and not from_file:
        raise ValueError(f"--requests {n:,}: a built-in workload ({spec}) is built in memory, about 1.2 KB a request; "
                         f"give at most {MAX_BUILT_IN_REQUESTS:,}, or a trace file with --workload PATH")
    size = n or DEFAULT_REQUESTS  # a built-in workload's
    if block_size is not None and not from_file:
        raise ValueError(f"--block-size {block_size} is the hash-id block of a Mooncake-format JSONL trace; the "
                         f"built-in workload {spec} has none: drop --block-size")
    if (spec in BUILT_IN or spec == "mixed") and Path(spec).exists():  # which one was meant would be a guess
        raise ValueError(f"--workload {spec} names a built-in workload and the file ./{spec} here: pass ./{spec} "
                         f"for the file, or run from another folder for the built-in {spec}")
    if spec in BUILT_IN:
        return trace(spec, size, cost, seed)[0]
    if spec == "mixed":
        return mixed_workload(size, seed=seed)
    if spec.startswith("mix:"):
        try:
            density, sharing = (float(x) for x in spec[4:].split(","))
        except ValueError:
            raise ValueError(f"workload {spec!r}: write mix:DENSITY,SHARING, e.g. mix:1.2,0.25") from None
        return mix(size, density, sharing, cost, seed)[0]
    if from_file:
        return load_trace_file(spec, n, block_size)  # block_size: None for the default, else checked there
    raise ValueError(f"unknown workload {spec!r}; choose one of {', '.join(WORKLOADS)}")


# SGLang's own names for the policies the simulator models as `sglang-*`: what `blendserve run
# --policy` takes, so that one name works for both commands.
POLICY_ALIASES = {"lpm": "sglang-lpm", "dfs-weight": "sglang-dfs-weight"}


def parse_policies(text: str, flag: str = "--policy") -> list[str]:
    """The simulator's policy names in a comma-separated list, each once in the order given;
    SGLang's names (`POLICY_ALIASES`) become the simulator's. ValueError naming `flag`'s empty
    entry (a doubled or trailing comma, which used to be skipped while an empty list was refused)
    or its unknown names, with the choices."""
    entries = [p.strip() for p in text.split(",")]
    choices = f"choose from {', '.join(POLICIES)} (SGLang's names {' and '.join(POLICY_ALIASES)} are taken too)"
    if not any(entries):
        raise ValueError(f"{flag} {text!r} names no policy; {choices}")
    if not all(entries):
        at = entries.index("") + 1
        raise ValueError(f"{flag} {text!r}: entry {at} of {len(entries)} is empty; separate the names with single "
                         f"commas, e.g. {flag} blend,fcfs")
    bad = [p for p in entries if POLICY_ALIASES.get(p, p) not in POLICIES]
    if bad:
        raise ValueError(f"unknown policy {', '.join(map(repr, bad))}; {choices}")
    return list(dict.fromkeys(POLICY_ALIASES.get(p, p) for p in entries))


COLUMNS = [("policy", "policy"), ("overlapped_time_s", "time ovl s"), ("overlapped_throughput_tok_s", "tok/s ovl"),
           ("overlapped_fraction_of_optimal", "of optimal"), ("overlapped_fraction_of_weight_bound", "of bound"),
           ("overlapped_speedup_vs_dfs", "vs dfs"),
           ("sequential_time_s", "time seq s"), ("sequential_fraction_of_optimal", "of opt seq"),
           ("sequential_speedup_vs_dfs", "vs dfs seq"), ("sharing", "sharing"), ("sharing_vs_dfs", "sharing/dfs"),
           ("peak_kv", "peak KV"), ("mean_kv", "mean KV"), ("retractions", "retract"), ("wall_s", "wall s")]


def best_other(results: dict, models: dict) -> dict:
    """Per execution mode: (the fastest policy other than blend, its time over blend's), when blend
    and another policy ran (the "vs dfs" columns compare with one fixed, often weak, baseline)."""
    if "blend" not in results or len(results) < 2:
        return {}
    out = {}
    for label, model in models.items():
        name = min((p for p in results if p != "blend"), key=lambda p: results[p].time(model))
        out[label] = (name, results[name].time(model) / results["blend"].time(model))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="blendserve simulate", description=__doc__.split("\n")[0])
    ap.add_argument("--workload", default="trace1",
                    help=f"one of {', '.join(WORKLOADS)} (a trace file: CSV token counts or Mooncake JSONL)")
    ap.add_argument("--requests", type=positive_int, default=None,
                    help=f"requests in the workload (default {DEFAULT_REQUESTS:,}; a trace file: all its rows, else its first N)")
    ap.add_argument("--quick", action="store_true", help="2,000 requests")
    ap.add_argument("--policy", default=",".join(POLICIES),
                    help=f"comma-separated: {', '.join(POLICIES)} (or SGLang's names {', '.join(POLICY_ALIASES)})")
    ap.add_argument("--model", default="llama-3.1-8b", help=f"{', '.join(model_names())} or a config.json path")
    ap.add_argument("--hardware", default="a100",
                    help=", ".join(hardware_names()) + "; NxNAME: N of them as one tensor-parallel engine; or an "
                    "accelerator's figures, flops=F,bandwidth=B,memory=M (dense BF16 FLOP/s, bytes/s, bytes)")
    ap.add_argument("--kv-gb", type=positive_float, help="KV pool (default: 88%% of device memory minus the weights)")
    ap.add_argument("--max-running", type=positive_int, default=1024, help="most requests running at once (default 1024)")
    ap.add_argument("--chunk", type=positive_int, default=1024, help="chunked-prefill size (tokens per step)")
    ap.add_argument("--no-mixed-chunk", action="store_true", help="prefill and decode steps alternate (SGLang default)")
    ap.add_argument("--interference", default="assumed",
                    help=f"overlapped mode: contention share, a number in [0, 1] or one of {interference_names()} "
                         "(default assumed, 0.1)")
    ap.add_argument("--known-lengths", action="store_true",
                    help="output lengths known (ignore_eos); default: requests stop at EOS, blend samples and estimates")
    ap.add_argument("--sample-fraction", type=float, default=PRESET.leaf("sample_fraction"))
    ap.add_argument("--keep-sharing", type=float, default=PRESET.leaf("keep_sharing"), help="blend: split budget")
    ap.add_argument("--pace", action="store_true", help="engine, every policy: paced chunk size per step")
    ap.add_argument("--kv-projection", action="store_true",
                    help="engine, every policy: admission counts KV that known-length running requests release")
    ap.add_argument("--no-meter", action="store_true", help="blend: no step count (memory work not metered)")
    ap.add_argument("--seed", type=non_negative_int, default=0, help="workload and sampling seed")
    ap.add_argument("--block-size", type=positive_int, default=None,
                    help=f"tokens per hash id of a Mooncake-format JSONL trace (default {MOONCAKE_BLOCK}, the "
                         "published traces')")
    ap.add_argument("--check", action="store_true", help="check every invariant after every step (slow)")
    ap.add_argument("--out", default="simulate.json", help="JSON path; the PNG goes next to it")
    args = ap.parse_args(argv)
    try:
        policies = parse_policies(args.policy)
        cost = CostModel.from_names(args.model, args.hardware)
        n = 2000 if args.quick else args.requests  # --requests is a positive_int
        from ..batch.cli import check_apart, check_output, check_replaceable, is_png, made_by, plot_beside

        check_output("--out", args.out)  # before naming the plot: `.` or `/` has no name to give a suffix
        png = plot_beside(args.out)  # None for a device or pipe: no plot
        if Path(args.out).suffix.lower() == ".png":
            raise ValueError(f"--out {args.out}: the plot goes next to the JSON with the suffix .png, so both would "
                             "be one file; give --out a name ending in .json")
        check_apart("--out", args.out, [("the --workload file", args.workload)])
        check_replaceable("--out", args.out, made_by("simulate"), "the results of `blendserve simulate`")
        if png is not None:
            check_output("--out", png)
            try:
                check_apart("--out", png, [("the --workload file", args.workload)])
            except ValueError:
                raise ValueError(f"--out {args.out}: its plot {png} is the --workload file, which it would overwrite; "
                                 "choose another --out") from None
            check_replaceable("--out", png, is_png, "a PNG image", name=f"--out {args.out}: its plot {png}")
        t0 = time.perf_counter()
        engine = EngineConfig.for_cost(cost, kv_gb=args.kv_gb, max_running=args.max_running,  # the model fits first
                                       chunked_prefill=args.chunk, mixed_chunk=not args.no_mixed_chunk,
                                       pace=args.pace, kv_projection=args.kv_projection)
        records, beyond = within_context(load_workload(args.workload, n, cost, args.seed, args.block_size),
                                         cost.model.max_context, args.workload, cost.model.name, "simulated")
        workload = Workload(records, cost)
        engine.check_fits(records, known=args.known_lengths)
        preset = PRESET.replace(keep_sharing=args.keep_sharing, sample_fraction=args.sample_fraction,
                                seed=args.seed, metering=not args.no_meter)
        spec = RunSpec(cost, engine, known_lengths=args.known_lengths, preset=preset, seed=args.seed)
        args.interference = interference(args.interference)
        models = {"overlapped": ExecModel("overlapped", args.interference), "sequential": ExecModel("sequential")}
    except (ValueError, FileNotFoundError) as e:
        print(f"blendserve simulate: error: {e}", file=sys.stderr)
        return 2
    setup_s = time.perf_counter() - t0
    if beyond:
        print(f"{args.workload}: {len(beyond):,} request{'s' if len(beyond) != 1 else ''} not simulated (they do not fit {cost.model.name}'s "
              f"context of {cost.model.max_context:,} tokens), e.g. {beyond[0].message}", file=sys.stderr)
    print(f"workload {args.workload}: {len(records)} requests, density {workload.density:.3f}, prefix sharing "
          f"{workload.sharing:.3f}, optimum {workload.optimal_s:.1f} s; {cost.model.name} on {cost.hardware.name}, "
          f"KV {engine.kv_tokens} tokens, chunk {engine.chunked_prefill}, interference {args.interference}")
    results = {}
    for p in policies:
        started = time.perf_counter()
        results[p] = simulate(workload, p, spec, check=args.check, on_step=progress(p, len(records)))
        if time.perf_counter() - started >= PROGRESS_EVERY_S:
            print(f"  {p}: done in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    rows = compare(results, models)
    print(format_table(rows, [c for c in COLUMNS if c[0] in rows[0]]))
    best = best_other(results, models)
    for label, (name, ratio) in best.items():
        print(f"blend vs the best other policy ({label}): {ratio:.3f}x ({name})")
    out = Path(args.out)
    try:
        if png is not None:
            plot_steps(list(results.values()), png, models["overlapped"],
                       title=f"{args.workload}, {len(records)} requests: per-step compute and memory time")
    except OSError as exc:
        print(f"blendserve simulate: error: cannot write the plot {png} ({exc.strerror}); the table above is the "
              "result", file=sys.stderr)
        return 1
    from ..machine import describe

    payload = {
        "command": "blendserve simulate " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:])),
        "machine": describe(),
        "workload": {"name": args.workload, "requests": len(records), "density": round(workload.density, 4),
                     "sharing": round(workload.sharing, 4), "optimal_s": round(workload.optimal_s, 2),
                     "setup_s": round(setup_s, 2), "not_simulated_beyond_context": len(beyond)},
        "model": cost.model.name, "hardware": cost.hardware.name,
        "engine": {k: getattr(engine, k) for k in engine.__slots__},
        "interference": args.interference, "known_lengths": args.known_lengths,
        "results": rows,
        "blend_vs_best_other": {label: {"policy": name, "speedup": round(ratio, 4)} for label, (name, ratio) in best.items()},
    }
    try:
        out.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as exc:
        print(f"blendserve simulate: error: cannot write {out} ({exc.strerror}); the table above is the result",
              file=sys.stderr)
        return 1
    print(f"wrote {out} and {png}" if png is not None else f"wrote {out} (no plot: --out is not a file)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
