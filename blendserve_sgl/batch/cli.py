"""`blendserve run requests.jsonl -o results.jsonl`: the offline batch job.

Steps, in order; the first three fail at once (exit 2, one message naming the input and the
fix) before any engine starts:
1. the input must be readable (a file, or a pipe read once as a stream) and hold requests; the
   model must exist with weights (`--model DIR`) or be obtainable (the embedded
   SmolLM2-135M-Instruct, converted once into the model cache);
2. the results file (never the input) is opened and locked; what it already holds is skipped
   (resume) and a partial last line left by a crash is cut; its custom_ids must all belong to
   this input; records of lines edited since are reported (`request_digest`), and with
   `--retry-failed` they and the error records are dropped to run again. A results stream
   (pipe, /dev/stdout) is only written;
3. every input line is validated and tokenized (chat template, context length) in a streaming
   pass over every core into compact storage (`reader.py`, `store.py`); bad lines become error
   records; the one global plan orders the whole input (`order.py`);
4. the engine runs the rest with the chosen policy, fed in plan order through a window sized
   from its capacity (`feed.py`); each result is written when it finishes;
5. the summary: requests, input/output tokens, wall time, throughput, prefix-cache hit ratio.
Exit status: 0 when every request has a record (failed requests are records too), 1 when the
engine did not start or one of its processes died while requests ran, 2 for bad arguments or
files, 130 when interrupted by Ctrl-C or SIGTERM (in each case the results so far are kept;
rerun to finish).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..cli import engine_seed, int_at_least, non_negative_int, positive_int
from ..models import ModelError, check_model_dir, default_model
from . import dispatch
from .feed import engine_capacity, mean_request_tokens, pending, window_size
from .order import cost_for, plan
from ..sglang_plugin.settings import rank_path, read_policy_stats, replace_whole
from .progress import Progress, RunStats, combine_policy_stats, count, phase_line, summary_lines
from .prompts import Prepared, context_length
from .reader import LineKey, ReadResult, read_store
from .requests import InputError, check_readable, is_result_record, iter_lines, read_requests
from .results import (ResultsError, ResultWriter, error_record, errors_path_for, fingerprint, is_regular_or_new,
                      ok_record, reconcile, request_key, same_file)

# SGLang 0.5.23's --schedule-policy choices that make sense offline, plus the plugin's `blend`
POLICIES = ("blend", "fcfs", "lpm", "dfs-weight", "lof", "random", "hrrn", "shortest-prefill-first")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="blendserve run", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run an OpenAI Batch API file (JSONL) through SGLang with BlendServe scheduling.",
        epilog="Input lines: {\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" | "
               "\"/v1/completions\", \"body\": {\"messages\" | \"prompt\", \"max_tokens\", \"temperature\", "
               "\"top_p\", \"stop\", \"seed\", ...}}.\nRerunning the same command after a crash finishes the "
               "requests not yet in the results file.")
    ap.add_argument("input", help="requests, one JSON object per line (OpenAI Batch API format); - for standard input")
    ap.add_argument("-o", "--output", help="results file (JSONL), appended to when it exists; - for standard "
                                           "output (required unless --plan-only)")
    ap.add_argument("--errors", help="file of the failed requests' records (default: next to -o, *.errors.jsonl; "
                                     "none when -o is a pipe or a device such as /dev/stdout)")
    ap.add_argument("--model", help="local Hugging Face model directory (default: the embedded "
                                    "SmolLM2-135M-Instruct, converted once into the model cache)")
    ap.add_argument("--model-cache", help="cache of the embedded model (default: $BLENDSERVE_MODEL_CACHE or "
                                          "~/.cache/blendserve-sgl)")
    ap.add_argument("--policy", default="blend", choices=POLICIES,
                    help="scheduling policy: blend (BlendServe) or a stock SGLang policy for comparison")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto: the GPU when torch sees one, else the CPU")
    ap.add_argument("--default-max-tokens", type=positive_int, default=256,
                    help="max_tokens of requests that give none (capped to the context); default 256")
    ap.add_argument("--context-length", type=positive_int, help="override the model's context length")
    ap.add_argument("--max-total-tokens", type=positive_int,
                    help="KV-cache size in tokens (default on CPU: 32768; on GPU: SGLang's choice)")
    ap.add_argument("--attention-backend", help="SGLang attention backend (default on CPU: torch_native)")
    ap.add_argument("--window", type=_window, default=-1,
                    help="at most this many requests in the engine at once, refilled in plan order (default "
                         "auto: a few times what fits in the engine's running slots and KV pool; 0: all at once)")
    ap.add_argument("--workers", type=non_negative_int, default=None,
                    help="processes that read and tokenize the input (default: every core; 0: in this process)")
    ap.add_argument("--seed", type=engine_seed, default=0, help="engine random seed (sampling), 0 to 2**32 - 1")
    ap.add_argument("--dp", type=positive_int, default=1,
                    help="data-parallel ranks of one engine (one per GPU; on CPU one per core group): each rank "
                         "runs its shard of the one plan (default 1)")
    ap.add_argument("--ray", action="store_true", help="one engine per Ray actor (--replicas), each fed its shard; "
                                                       "pip install -e '.[ray]'")
    ap.add_argument("--ray-address", help="--ray: the cluster to join (HEAD_IP:6379, after `ray start --head`); "
                                          "default: a local cluster on this machine")
    ap.add_argument("--replicas", type=positive_int, help="--ray: engines (default 2)")
    ap.add_argument("--gpus-per-replica", type=float, default=None,
                    help="--ray: GPUs each replica's engine uses (default: 1 on GPU, 0 on CPU)")
    ap.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="further sglang.Engine argument, VALUE as JSON or a string (repeatable), "
                         "e.g. --engine-arg enable_mixed_chunk=true --engine-arg tp_size=2")
    ap.add_argument("--overwrite", action="store_true", help="start over: empty the results file first")
    ap.add_argument("--retry-failed", action="store_true",
                    help="run again the requests whose records are errors, and lines edited since their record "
                         "was written; their records are replaced, the others kept")
    ap.add_argument("--include-token-ids", action="store_true",
                    help="add token_ids and prompt_token_ids to every choice (an extension of the format)")
    ap.add_argument("--summary-json", help="also write the summary figures as JSON to this file")
    ap.add_argument("--log-level", default="error", type=str.lower,
                    choices=("debug", "info", "warning", "error", "critical"),
                    help="SGLang's log level (default: error)")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--plan-only", nargs="?", const="auto", metavar="HARDWARE",
                    help="print `blendserve plan` for this file and these arguments on HARDWARE (default: the cpu "
                         "preset when running on the CPU) and exit without running")
    ap.add_argument("--generate-sample", type=positive_int, metavar="N",
                    help="with --plan-only: run N requests of the file here first and plan with their generated "
                         "lengths (`blendserve plan --generate-sample`)")
    return ap


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.generate_sample and not args.plan_only:
        parser.error("--generate-sample only shapes a plan: add --plan-only, or drop it to run the whole file")
    if args.plan_only:
        from ..plan import plan_for_run

        return plan_for_run(args)
    if args.output is None:
        parser.error("the following arguments are required: -o/--output")
    for flag, value in (("the input file", args.input), ("-o/--output", args.output), ("--errors", args.errors),
                        ("--summary-json", args.summary_json)):
        if value is not None and not value.strip():
            parser.error(f"{flag} is an empty name; pass a file path")
    if args.output == "-":
        args.output = "/dev/stdout"
    _COMPLETE[0] = _STOPPING[0] = False
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops like Ctrl-C, also while reading
    try:
        return _main(args)
    except KeyboardInterrupt:  # before the engine runs (loading the model, reading lines)
        print("blendserve run: interrupted; nothing was lost: run the same command again", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args) -> int:
    started = time.perf_counter()
    from . import runner

    global _MESSAGES
    _MESSAGES = "stderr" if same_file(args.output, "/dev/stdout") else "stdout"  # -o /dev/stdout | jq
    try:
        extra = engine_args(args.engine_arg)
        check_scale_out(args)
        _check_workers(args.workers)
        _check_attention_backend(args.attention_backend)
        from ..sglang_plugin.settings import check_launch

        check_launch(args.policy, [args.attention_backend])  # the BLENDSERVE_* variables this run reads
        check_output("--summary-json", args.summary_json)
        _check_summary_apart(args)
        _check_summary_file(args.summary_json)
        source = check_readable(args.input)
        args.input = str(source)  # `-` is /dev/stdin
        _refuse_trace(source)
        if args.retry_failed and args.overwrite:
            raise ValueError("--retry-failed keeps the results that succeeded, --overwrite discards them all: "
                             "give one of them")
        if args.retry_failed and not is_regular_or_new(args.output):
            raise ResultsError(f"--retry-failed replaces records in the results file, so -o {args.output} must be "
                               "a regular file")
        model_dir = check_model_dir(args.model) if args.model else default_model(args.model_cache, log=_say)
        if args.model:
            _say(f"model: {model_dir}")
        device = runner.prepare_environment(args.device)  # before torch loads (with the tokenizer)
        runner.check_engine_args(extra, device)
        if args.dp > 1:
            extra = {**extra, **dispatch.dp_engine_kwargs(args.dp, device)}
        if args.ray and device == "cpu" and not args.ray_address:
            _check_local_gpus(args.gpus_per_replica)
            dispatch.cpu_bind(args.replicas, flag="--replicas")  # a core per replica, said before Ray starts
        ctx = _context(args.context_length, model_dir)
        tokenizer = _load_tokenizer(model_dir)
        writer = ResultWriter.open(args.output, args.errors, overwrite=args.overwrite, input_path=source)
    except (InputError, ModelError, ResultsError, ValueError, dispatch.DispatchError) as exc:
        print(f"blendserve run: error: {exc}", file=sys.stderr)
        return 2
    with writer:
        try:
            status = _run(args, source, model_dir, device, tokenizer, ctx, writer, extra, started)
            if writer.unnamed():  # removed while the run wrote: "done" would name a file that is gone
                print(f"blendserve run: error: -o {writer.path} was removed or replaced while this run wrote to it: "
                      "the records written since are lost; run the same command again to write them",
                      file=sys.stderr)
                return 1
            return status
        except (InputError, ResultsError, EngineError, dispatch.DispatchError) as exc:
            print(f"blendserve run: error: {exc}", file=sys.stderr)
            return 1 if isinstance(exc, EngineError) else 2


def _refuse_trace(source: Path) -> None:
    """A trace of token counts (Azure, Mooncake, ...) holds no prompts: every line would become an
    error record and the run would end 0. Said at once instead, with what takes such a file."""
    from ..workloads.trace_file import looks_like_trace

    if source.is_file() and looks_like_trace(source):
        raise InputError(f"{source} reads as a trace of token counts, not requests (OpenAI Batch API lines with "
                         f"custom_id, url and body): plan or simulate it with `blendserve plan --workload {source}` "
                         f"or `blendserve simulate --workload {source}`")
    if source.is_file() and _first_is_a_record(source):  # each line would be an error record, exit 0 (a probe)
        raise InputError(f"{source} holds result or error records (its first line has \"response\" and no "
                         "\"body\"), the output of a run, not requests: pass the requests file as the input")


def _first_is_a_record(source: Path) -> bool:
    """Whether the file's first non-blank line (within its first MiB) is a result record
    (`requests.is_result_record`, the reader's rule)."""
    try:
        with open(source, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    first = next((ln for ln in head.lstrip(b"\xef\xbb\xbf").split(b"\n") if ln.strip()), b"")
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return is_result_record(obj)


class EngineError(RuntimeError):
    """The engine did not start; the message says what to check."""


def _run(args, source: Path, model_dir: Path, device: str, tokenizer, ctx: int, writer: ResultWriter, extra: dict,
         started: float) -> int:
    stats = RunStats(policy=args.policy, model=model_dir.name, device=device)
    t0 = time.perf_counter()
    tell = _phase_printer(args.quiet)
    index = _finished_index(args, source, writer)
    if index is not None:  # a rerun of a finished job: nothing to tokenize, plan or run
        stats.read_seconds = time.perf_counter() - t0
        _resume(args, source, writer, index)
        _other_models(writer, model_dir)
        stats.requests = stats.skipped = len(index)
        stats.kept_errors = len(writer.done.failed_keys)
        return _finish(args, source, writer, stats, started)
    read = read_store(source, tokenizer, ctx, args.default_max_tokens, model_dir=model_dir, workers=args.workers,
                      tick=lambda n: tell(phase_line("reading", n, "lines", time.perf_counter() - t0)))
    stats.read_seconds = time.perf_counter() - t0
    if not read.lines:
        writer.discard_created()  # refused: the results and errors files this run made go again
        raise InputError(f"{args.input} holds no requests (it is empty or has only blank lines); pass the JSONL file "
                         "of requests, one JSON object per line")
    _resume(args, source, writer, read.index)
    _other_models(writer, model_dir)
    done_before = writer.done
    stats.kept_errors = len(done_before.failed_keys)
    read.mark_done(done_before.keys)
    stats.requests, stats.skipped = read.lines, read.skipped
    for item in read.errors:  # written once the results file is known to belong to this input
        if request_key(item) in done_before.keys:
            continue
        writer.write(error_record(item.custom_id, item.message, line=item.line, code=item.code, digest=item.digest))
        stats.failed += 1
        stats.invalid += 1
    if stats.invalid:
        _say(f"{stats.invalid:,} invalid lines written as error records (see {writer.errors_path or writer.path})")

    defaulted = int(read.defaulted[~read.done].sum())
    if defaulted:  # OpenAI's own default is the context's room: answers cut at 256 would surprise (a probe)
        _say(f"{defaulted:,} requests give no max_tokens: each writes at most --default-max-tokens "
             f"{args.default_max_tokens:,} tokens (or what the context leaves)")
    _named_models(read, model_dir)
    t1 = time.perf_counter()
    order = plan(read.store, cost_for(model_dir))
    stats.plan_seconds = time.perf_counter() - t1
    todo = int((~read.done).sum())
    tell(phase_line("planning", len(read.store), "requests planned", stats.plan_seconds), force=True)
    stats.sample_rss()

    if todo:
        _execute(args, model_dir, device, ctx, extra, read, order, todo, writer, stats)
    return _finish(args, source, writer, stats, started)


def _finished_index(args, source: Path, writer: ResultWriter) -> list | None:
    """Every input line's `LineKey` when the results file already holds a record of each line and
    resuming would run none of them again (a rerun of a finished job, or of one whose errors are
    kept); None otherwise, and for a stream (read once). Parsing alone decides it: no line is
    tokenized (200,000 lines: 14 s where a whole read took 174 s). A results file with fewer
    records than the input has lines is answered at once."""
    done = writer.done
    if not done.keys or not source.is_file():
        return None
    with open(source, "rb") as f:
        if len(done.keys) < sum(1 for _ in iter_lines(f)):
            return None
    index = [LineKey(item.line, item.custom_id, item.digest) for item in read_requests(source)]
    res = reconcile(done, index, retry_failed=args.retry_failed)
    if res.foreign or res.drop or any(request_key(k) not in done.keys for k in index):
        return None
    return index


def _named_models(read: ReadResult, model_dir: Path) -> None:
    """Say so when requests name another model in their "model" field: every request runs on the
    one model loaded (its records echo the name asked for, as OpenAI's batch records do, and
    `system_fingerprint` names the model that answered); a file written for a hosted model is
    still run, not refused (a probe)."""
    import numpy as np

    def same(name: str) -> bool:  # "org/Name" names the folder Name, also one converted as Name-f32
        last = name.strip().rstrip("/").rsplit("/", 1)[-1].casefold()
        return bool(last) and (last in ours or ours in last)

    store = read.store
    counts = np.bincount(store.model.view[~read.done], minlength=len(store.model_table))
    ours = model_dir.name.casefold()
    others = {m: int(counts[k]) for k, m in enumerate(store.model_table) if m and counts[k] and not same(m)}
    if others:
        names = ", ".join(f'"{m}"' for m in sorted(others, key=lambda m: (-others[m], m))[:3])
        more = f" and {len(others) - 3:,} more" if len(others) > 3 else ""
        _say(f"note: {sum(others.values()):,} requests name another model ({names}{more}); every request runs on "
             f"{model_dir.name} (--model), and each record echoes the model its request named")


def _other_models(writer: ResultWriter, model_dir: Path) -> None:
    """Warn when results of another model are kept: the file would mix two models' answers."""
    others = {k: n for k, n in writer.done.fingerprints.items() if k != fingerprint(model_dir.name)}
    if others:
        _say(f"warning: {sum(others.values()):,} results in {writer.path} came from another model "
             f"({', '.join(sorted(k.removeprefix('blendserve-sgl:') for k in others))}); this run uses "
             f"{model_dir.name}: pass --overwrite to run them all with it")


def _finish(args, source: Path, writer: ResultWriter, stats: RunStats, started: float) -> int:
    """The summary (and `--summary-json`) of a run; its exit status."""
    stats.wall_seconds = time.perf_counter() - started
    stats.sample_rss()
    for line in summary_lines(stats, str(writer.path), str(writer.errors_path) if writer.errors_path else None):
        _say(line)
    if args.summary_json:
        try:
            summary = {"input": str(source), "output": str(writer.path), **stats.to_json()}
            replace_whole(args.summary_json, json.dumps(summary, indent=2) + "\n", open)  # a pipe: waits for its reader
        except OSError as exc:
            raise ResultsError(f"cannot write --summary-json {args.summary_json}: {exc.strerror}; the records are in "
                               f"{writer.path}") from None
    return 130 if stats.interrupted else 0


def _resume(args, source: Path, writer: ResultWriter, items) -> None:
    """Match the results file to the input (see `results.reconcile`), say what is kept and what
    runs again, and drop the records to run again."""
    done = writer.done
    if not done.keys:
        return
    res = reconcile(done, items, retry_failed=args.retry_failed)
    if res.foreign:
        matched = len(done.keys) - len(res.foreign)
        if not matched:
            raise ResultsError(f"{writer.path} holds {len(res.foreign):,} results that are not requests of {args.input} "
                               f"(e.g. {res.foreign[0]!r}); it is the output of another input: choose another -o, "
                               "or pass --overwrite to start over")
        raise ResultsError(f"{writer.path} holds {len(res.foreign):,} results of custom_ids that are no longer in "
                           f"{args.input} (e.g. {res.foreign[0]!r}), beside {matched:,} that are: lines removed, or "
                           "their custom_id edited, since those results were written. Put those lines back as they "
                           "were (edit a request's body, not its custom_id, to run it again with --retry-failed), "
                           "write the results of this input to another -o, or pass --overwrite to run it all again")
    partial = " (a partial last line from a crash was removed)" if done.cut_partial_line else ""
    _say(f"resuming: {done.records:,} requests already in {writer.path}{partial}")
    if res.changed and not args.retry_failed:
        key, line = res.changed[0]
        _say(f"warning: {len(res.changed):,} requests changed since their records were written (e.g. line {line}, "
             f"{key!r}); their old records are kept: rerun with --retry-failed to run them again")
    if res.taken:
        key, line = res.taken[0]
        _say(f"{len(res.taken):,} custom_ids now belong to lines refused before as their duplicates (e.g. line {line}, "
             f"{key!r}): the records of the earlier lines that held them are dropped and these lines run")
    writer.drop(res.drop)
    if res.stale:
        _say(f"{len(res.stale):,} error records of lines without a usable custom_id that changed or moved were "
             "dropped; those lines are checked again")
    retried = res.retry - {key for key, _ in res.taken}
    if retried:
        _say(f"--retry-failed: {len(retried):,} requests run again (error records and lines changed since)")
    if writer.done.failed:
        _say(f"kept {writer.done.failed:,} error records from earlier runs (see {writer.errors_path or writer.path}); "
             "fix their cause, then rerun with --retry-failed to run them again")


def _execute(args, model_dir: Path, device: str, ctx: int, extra: dict, read: ReadResult, order, todo: int,
             writer: ResultWriter, stats: RunStats) -> None:
    from . import runner

    stats_file, own_stats = os.environ.get("BLENDSERVE_STATS_PATH"), False
    if args.policy == "blend" and not stats_file:
        fd, stats_file = tempfile.mkstemp(prefix="blendserve-policy-", suffix=".json")
        os.close(fd)
        os.environ["BLENDSERVE_STATS_PATH"], own_stats = stats_file, True
    extra = sampling_engine_args(read.store, read.done, extra)
    cfg = runner.EngineConfig(model_path=str(model_dir), policy=args.policy, device=device, context_length=ctx,
                              max_total_tokens=args.max_total_tokens, attention_backend=args.attention_backend,
                              seed=args.seed, log_level=args.log_level, extra=extra)
    replicas = args.replicas if args.ray else args.dp
    if replicas > 1:
        parts = dispatch.store_shards(read.store, read.done, replicas, cost_for(model_dir))
    else:  # one Ray replica runs the whole plan; one engine reads it from `pending`
        parts = [order[~read.done[order]].tolist()] if args.ray else None
    progress = Progress(todo, stream=io.StringIO() if args.quiet else sys.stderr)
    model_name = model_dir.name
    source = Path(args.input).name

    written: set[str] = set()  # custom ids with a record from this run's engines
    hunt: runner.Hunt | None = None  # set once an engine process has died

    def on_result(p: Prepared, out: dict) -> None:  # aborted outputs reach on_error (runner.deliver)
        writer.write(ok_record(p, out, model_name, include_token_ids=args.include_token_ids))
        written.add(p.request.custom_id)
        if hunt is not None:
            hunt.answered()
        if stats.first_result_seconds is None:
            stats.first_result_seconds = progress.clock() - progress.start
        meta = out["meta_info"]
        stats.completed += 1
        stats.input_tokens += meta["prompt_tokens"]
        stats.cached_tokens += meta.get("cached_tokens", 0) or 0
        stats.output_tokens += meta["completion_tokens"]
        progress.add(completed=1, output_tokens=meta["completion_tokens"])

    def on_error(p: Prepared, exc: BaseException) -> None:
        if isinstance(exc, runner.StoppedEngine):  # a hunt's culprit: the engine did not answer it
            status, code, msg = 500, "engine_crash", f"{source} line {p.request.line}: {exc}"
        else:
            status = 400 if isinstance(exc, ValueError) else 500
            code = "invalid_request" if status == 400 else "engine_error"
            msg = (f"{source} line {p.request.line}: the engine {'rejected' if status == 400 else 'failed'} this "
                   f"request: {exc}")
            if "exceeds the maximum allowed length" in str(exc) and args.max_total_tokens:  # SGLang's fix: truncate
                msg += (f" (the limit comes from the KV pool, --max-total-tokens {args.max_total_tokens:,}: raise it; "
                        "--allow-auto-truncate would cut the prompt)")
            if hunt is not None:
                hunt.answered()  # the engine answered, with an error of this request's own
        writer.write(error_record(p.request.custom_id, msg, line=p.request.line, code=code, status=status,
                                  digest=p.request.digest))
        written.add(p.request.custom_id)
        stats.failed += 1
        progress.add(failed=1)

    previous = signal.signal(signal.SIGTERM, _interrupt)
    quit_handler = signal.getsignal(signal.SIGQUIT)  # put back at the end: SGLang's would kill this process
    engine, ray_stats, first = None, [], True  # first: no engine has started yet
    try:
        if args.ray:
            from . import ray_runner

            busy = [part for part in parts if len(part)]  # fewer requests than replicas: no idle engine started
            idle = f" ({replicas - len(busy)} of --replicas {replicas} would have nothing to run)" \
                if len(busy) < replicas else ""
            _say(f"starting {count(len(busy), 'Ray replica')} ({args.policy} policy, {device}) "
                 f"for {count(todo, 'request')}{idle} ...")

            def started(seconds: float) -> None:  # every replica's engine is up: generation starts
                nonlocal first
                stats.engine_start_seconds = seconds
                progress.start, first = progress.clock(), False

            gpus = args.gpus_per_replica if args.gpus_per_replica is not None else (1.0 if device == "cuda" else 0.0)
            report = ray_runner.generate(
                cfg, [[read.store.prepared(i) for i in part] for part in busy], on_result, on_error,
                address=args.ray_address, gpus=gpus, say=_say, on_chunk=lambda *_: stats.sample_rss(),
                on_started=started, on_done=lambda: _COMPLETE.__setitem__(0, True))
            stats.generate_seconds, stats.engine_restarts = report.seconds, report.restarts
            stats.window = report.window
            ray_stats = report.policy_stats
            _COMPLETE[0] = True
            return
        _say(f"starting SGLang ({args.policy} policy, {device}{f', {args.dp} DP ranks' if args.dp > 1 else ''}) "
             f"for {count(todo, 'request')} ...")
        route, flight = None, {}
        if parts is not None:
            cids = {read.store.custom_id(int(i)): r for r, part in enumerate(parts) for i in part}
            route = lambda p: cids[p.request.custom_id]  # noqa: E731
        while True:  # one engine; again after one of its processes dies, to find the request that stopped it
            engine = _start(cfg, args, stats, writer, again=hunt is not None)
            stats.sample_rss()  # the engine's processes hold their memory from here (a short run has no tick)
            if first:
                stats.window = args.window if args.window >= 0 else window_size(
                    *engine_capacity(engine), mean_request_tokens(read.store, read.done))
                progress.start, first = progress.clock(), False
            group = False
            try:
                while hunt and hunt.groups:
                    group = True
                    flight.clear()
                    runner.generate(engine, hunt.groups[0], on_result, on_error, route=route, in_flight=flight)
                    hunt.groups.popleft()
                group = False
                flight.clear()
                items = pending(read.store, order, read.done) if parts is None else \
                    (read.store.prepared(i) for i in dispatch.interleave(parts))
                if hunt:
                    items = (p for p in items if p.request.custom_id not in written)
                runner.generate(engine, items, on_result, on_error, window=stats.window, route=route,
                                tick=lambda rate: (progress.set_rate(rate), progress.render(), stats.sample_rss()),
                                in_flight=flight)
                stats.generate_seconds = progress.clock() - progress.start
                _COMPLETE[0] = True
                break
            except runner.EngineFailed:
                if threading.current_thread() is threading.main_thread():
                    # another of its processes may still report (a second rank): SGLang's handler,
                    # back in place after the run, would kill this process; none counts until the next start
                    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
                with contextlib.suppress(Exception):  # its processes are gone or going: the hunt goes on
                    engine.shutdown()
                engine = None
                hunt = hunt or runner.Hunt(stats.window or todo)
                caught = [p for p in flight.values() if p.request.custom_id not in written]
                culprit = hunt.crashed(caught, group)
                stats.engine_restarts += 1
                if culprit is not None:
                    on_error(culprit, runner.StoppedEngine("above"))
                if not hunt.groups and len(written) >= todo:  # the last of them failed alone: nothing is left
                    stats.generate_seconds = progress.clock() - progress.start
                    _COMPLETE[0] = True
                    break
                if hunt.exhausted:
                    raise EngineError(f"an SGLang process failed while requests ran (its error is above), "
                                      f"{stats.engine_restarts} times, also with the requests it had in flight run "
                                      f"apart; the {stats.completed + stats.failed:,} records written in this run are "
                                      f"kept in {writer.path}: once the cause is fixed, rerun the same command to "
                                      "finish") from None
                hunt.check_integrity(written)
                many = "" if len(caught) == 1 else "s"
                _say(f"an SGLang process failed with {len(caught):,} request{many} in flight; "
                     + (f"line {culprit.request.line} ran alone when it failed: written as an error record; "
                        if culprit is not None else "")
                     + "starting the engine again"
                     + (f"; {sum(map(len, hunt.groups)):,} suspect requests run first, in smaller groups"
                        if hunt.groups else ""))
    except KeyboardInterrupt:
        stats.interrupted = True
        stats.generate_seconds = 0.0 if first else progress.clock() - progress.start  # stopped while it started
    finally:
        progress.close()
        signal.signal(signal.SIGTERM, previous)
        on_main = threading.current_thread() is threading.main_thread()
        if engine is not None:
            stats.sample_rss()
            if on_main:  # the engine is being stopped: a SIGQUIT now (a process reporting its end) changes
                signal.signal(signal.SIGQUIT, signal.SIG_IGN)  # nothing, and SGLang's handler would kill a finished run
            engine.shutdown()
        if on_main:
            signal.signal(signal.SIGQUIT, quit_handler if quit_handler is not None else signal.SIG_DFL)
        ranks = [rank_path(stats_file, r) for r in range(replicas)] if replicas > 1 else [stats_file]  # one a replica
        if stats_file and args.policy == "blend":  # --ray: what the replicas returned (their nodes' files)
            stats.policy_stats = combine_policy_stats(ray_stats if args.ray else [read_policy_stats(f) for f in ranks])
        if own_stats:
            for name in {stats_file, *ranks}:
                Path(name).unlink(missing_ok=True)
            del os.environ["BLENDSERVE_STATS_PATH"]


def _start(cfg, args, stats: RunStats, writer: ResultWriter, again: bool = False):
    """A running engine for `cfg` (EngineError when it does not start; `again`: after one of the
    run's engines failed); with --dp and blend, every rank checked to run blend. Its start time is
    counted once."""
    from . import runner

    t0 = time.perf_counter()
    try:
        engine = runner.start_engine(cfg)
    except (Exception, runner.EngineFailed) as exc:  # noqa: BLE001 (SGLang raises many kinds)
        why = "one of its processes failed: its error is above" if isinstance(exc, runner.EngineFailed) else \
            f"{type(exc).__name__}: {exc}"
        if again:
            raise EngineError(f"SGLang did not start again after one of its processes failed ({why}); the "
                              f"{stats.completed + stats.failed:,} records written in this run are kept in "
                              f"{writer.path}: rerun the same command to finish") from None
        raise EngineError(f"SGLang did not start ({why}); check --model, --policy and --engine-arg; "
                          f"{stats.invalid:,} error records were written to {writer.path}, rerun the same "
                          "command once fixed") from None
    if not stats.engine_start_seconds:
        stats.engine_start_seconds = time.perf_counter() - t0
    if args.dp > 1 and args.policy == "blend":
        try:
            dispatch.check_ranks(engine, args.dp)
        except dispatch.DispatchError as exc:
            engine.shutdown()
            raise EngineError(str(exc)) from None
    return engine


def _context(asked: int | None, model_dir: Path) -> int:
    """--context-length, or the model's (`prompts.context_length`). SGLang refuses a context
    longer than the model's unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN is set: said here,
    before the input is read, rather than when the engine starts."""
    if asked is None:
        return context_length(model_dir)
    allowed = os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "").lower() in ("1", "true", "yes", "on")
    try:
        own = context_length(model_dir)
    except ValueError:  # a config.json without a usable context: --context-length stands in for it
        return asked
    if asked > own and not allowed:
        raise ValueError(f"--context-length {asked} is longer than the model's context of {own} tokens, which SGLang "
                         "refuses; pass at most that, or set SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1 if the "
                         "model really takes more")
    return asked


def _check_summary_apart(args) -> None:
    """--summary-json is written over at the end: it may be none of the run's other files."""
    check_apart("--summary-json", args.summary_json, (("the input", args.input), ("the results file -o", args.output),
                                                      ("the errors file", args.errors or errors_path_for(args.output))))


def check_apart(flag: str, path: str | None, others) -> None:
    """ValueError when the file `path` (written over) is one of `others` ((what, path) pairs)
    under any name."""
    for what, other in others:
        if path and other and (same_file(path, other) or os.path.realpath(path) == os.path.realpath(other)):
            raise ValueError(f"{flag} {path} is {what}, which it would overwrite; choose another {flag}")


def _check_summary_file(path: str | None) -> None:
    """An existing regular --summary-json file must hold a summary (or nothing): it is replaced at
    the end, and another run's results (locked, but not against this path) were destroyed so."""
    from ..sglang_plugin.settings import json_object

    check_replaceable("--summary-json", path, json_object(lambda d: "input" in d and "output" in d),
                      "a summary of `blendserve run`")


def check_replaceable(flag: str, path: str | None, ours, what: str, name: str | None = None) -> None:
    """ValueError when the existing file `path`, which a command replaces, holds something other
    than `what` (`ours(its bytes)` false: `settings.foreign`); the message names it `name`
    (default: the flag and the path)."""
    if path is None:
        return
    from ..sglang_plugin.settings import foreign

    problem = foreign(Path(path), ours, what)
    if problem:
        raise ValueError(f"{name or f'{flag} {path}'} {problem}")


def made_by(command: str):
    """`ours` for `check_replaceable`: the JSON a `blendserve` command writes (its "command" says it)."""
    from ..sglang_plugin.settings import json_object

    return json_object(lambda d: isinstance(d.get("command"), str) and d["command"].startswith(f"blendserve {command} "))


def is_png(data: bytes) -> bool:
    return data.startswith(b"\x89PNG\r\n\x1a\n")


def plot_beside(out: str) -> str | None:
    """The plot's path next to the JSON `out` (its suffix .png), or None when `out` is a device or
    a pipe (`--out /dev/null`: its plot would be a new file in /dev)."""
    path = Path(out)
    if path.exists() and not path.is_file():
        return None
    return str(path.with_suffix(".png"))


def check_output(flag: str, path: str | None) -> None:
    """ValueError unless `path` (when given) can be written: no folder, in a folder that exists
    and takes a new file, or an existing writable file (`settings.unwritable`)."""
    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"{flag} is an empty name; pass a file path")
    from ..sglang_plugin.settings import unwritable

    problem = unwritable(Path(path))
    if problem:
        sep = " " if problem.startswith("is ") else ": "
        raise ValueError(f"{flag} {path}{sep}{problem}")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def _load_tokenizer(model_dir: Path):
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"loading the tokenizer needs transformers ({exc}); install the environment with "
                         "`make venv`") from None
    if Path(model_dir).is_dir() and not any((Path(model_dir) / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(f"{model_dir}: holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy the "
                         "model's tokenizer files into it")  # transformers' own text asked for sentencepiece (a probe)
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as exc:  # noqa: BLE001 (transformers raises OSError, ValueError, KeyError, ...)
        raise ModelError(f"{model_dir}: cannot load its tokenizer ({type(exc).__name__}: {exc}); the model "
                         "directory needs tokenizer files (tokenizer.json or tokenizer_config.json)") from None


def _check_attention_backend(name: str | None) -> None:
    """An --attention-backend SGLang does not know fails here, before the input is read and planned,
    not at the engine's start (SGLang's own choices, with the plugin's `cascade`)."""
    if name is None:
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES

    from ..sglang_plugin.cascade_backend import BACKEND_NAME

    known = list(dict.fromkeys([*ATTENTION_BACKEND_CHOICES, BACKEND_NAME]))
    if name not in known:
        raise ValueError(f"--attention-backend {name!r} is not an SGLang attention backend; choose one of "
                         f"{', '.join(known)} (or leave it out: torch_native on CPU)")


def _check_workers(workers: int | None) -> None:
    """More reader processes than cores only adds tokenizer copies (each loads its own, and the
    pool starts one per batch in flight up to --workers): refused before the input is read."""
    cores = os.cpu_count() or 1
    if workers is not None and workers > cores:
        raise ValueError(f"--workers {workers} is more than the {cores} cores of this machine; pass at most {cores} "
                         "(leave it out to use them all)")


def check_scale_out(args) -> None:
    """--dp, --ray and their options together (`--plan-only` checks them too); sets --replicas'
    default."""
    if args.ray and args.dp > 1:
        raise ValueError("--dp and --ray are two ways to run replicas: give one (--ray --replicas N, or --dp N)")
    if not args.ray and (args.ray_address or args.gpus_per_replica is not None or args.replicas is not None):
        raise ValueError("--replicas, --ray-address and --gpus-per-replica apply to --ray runs: add --ray "
                         "(one machine's GPUs: --dp N)")
    if args.ray and args.replicas is None:
        args.replicas = 2
    if args.ray_address:
        _check_reachable(args.ray_address)
    if args.gpus_per_replica is not None and not (0 <= args.gpus_per_replica < float("inf")):
        raise ValueError(f"--gpus-per-replica must be 0 or more, got {args.gpus_per_replica}")
    if args.ray:
        try:
            import ray  # noqa: F401
        except ImportError:
            raise ValueError("--ray needs Ray: pip install -e '.[ray]' (ray==2.60.0)") from None


def _check_local_gpus(gpus: float | None) -> None:
    """`--ray --gpus-per-replica N` (N > 0) where the engines run on the CPU and the replicas on a
    local cluster: the cluster has no GPU to give them (or they would not use it), which Ray's
    own placement check found only after reading, planning and starting Ray (a probe)."""
    if gpus:
        raise ValueError(f"--gpus-per-replica {gpus:g}: this run's engines run on the CPU (no GPU is visible here, "
                         "or --device cpu), so a replica on the local Ray cluster has no GPU to use; pass "
                         "--gpus-per-replica 0 (or leave it out), or give --ray-address of a cluster with GPUs")


def _check_reachable(address: str) -> None:
    """--ray-address HOST:PORT (or ray://HOST:PORT): something must answer there within 5 s; Ray
    itself retries an unreachable head for minutes with only its own log lines."""
    import socket

    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if address in ("auto", "local") or not sep or not (port.isascii() and port.isdigit()):
        return  # Ray's own forms: it says what is wrong with them
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except OSError as exc:
        raise ValueError(f"--ray-address {address}: nothing answers at {host}:{port} ({exc.strerror or exc}); "
                         "start the head there (`ray start --head`) or give its address") from None


# sglang.Engine arguments this command sets from its own flags (the checks before the engine use them)
OWN_ENGINE_ARGS = {"model_path": "--model", "schedule_policy": "--policy", "context_length": "--context-length",
                   "max_total_tokens": "--max-total-tokens", "attention_backend": "--attention-backend",
                   "random_seed": "--seed", "log_level": "--log-level", "device": "--device", "dp_size": "--dp"}


PENALTIES = {"frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0}  # name: no penalty


def sampling_engine_args(store, done, extra: dict) -> dict:
    """The engine arguments the sampling of the requests left to run needs, said with the run's messages:
    - a frequency, presence or repetition penalty: SGLang 0.5.23's overlap scheduler applies
      them a token late (a probe: against a reference that penalizes the tokens generated so
      far, the default engine matched the late penalty on 66 of 70 requests, and blend and fcfs
      disagreed on 40 of 240; with the overlap off both matched), so it is turned off unless
      `--engine-arg disable_overlap_schedule=...` chose;
    - a seed: SGLang applies a request's seed only with `enable_deterministic_inference` (its
      GPU attention backends), so without it the run warns that seeded samples will differ."""
    import numpy as np

    counts = np.bincount(store.sampling.view[~done], minlength=len(store.sampling_table))
    penalized = seeded = 0
    for k, text in enumerate(store.sampling_table):
        if counts[k]:
            sampling = json.loads(text)
            penalized += int(counts[k]) * any(sampling.get(name, none) != none for name, none in PENALTIES.items())
            seeded += int(counts[k]) * (sampling.get("sampling_seed") is not None)
    if penalized and "disable_overlap_schedule" not in extra:
        _say(f"{penalized:,} requests use a frequency, presence or repetition penalty, which SGLang's overlap "
             "scheduler applies a token late: it is off for this run (--engine-arg disable_overlap_schedule=false "
             "keeps it)")
        extra = {**extra, "disable_overlap_schedule": True}
    if seeded and extra.get("enable_deterministic_inference") is not True:
        _say(f"warning: {seeded:,} requests set \"seed\", which SGLang applies only with --engine-arg "
             "enable_deterministic_inference=true (its GPU attention backends; not on CPU): their samples will "
             "differ from run to run")
    return extra


def engine_args(pairs: list[str]) -> dict:
    """--engine-arg KEY=VALUE pairs as keyword arguments (values read as JSON where they parse);
    ValueError for a pair without KEY= or a key a flag of this command sets (`--plan-only` checks
    them too)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--engine-arg {pair!r}: expected KEY=VALUE, e.g. enable_mixed_chunk=true")
        if key.replace("-", "_") in OWN_ENGINE_ARGS:
            raise ValueError(f"--engine-arg {pair!r}: use {OWN_ENGINE_ARGS[key.replace('-', '_')]} instead "
                             "(this command checks the requests against it)")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def _window(text: str) -> int:
    if text == "auto":
        return -1
    return int_at_least(text, 0, "auto, 0 (all at once) or a positive integer", "auto or an integer",
                        f"{text} is more requests than any batch holds; pass 0 for all at once")


def _phase_printer(quiet: bool, every: float = 10.0):
    """Prints a phase line at most every `every` seconds (or when forced)."""
    last = [time.perf_counter()]

    def tell(text: str, force: bool = False) -> None:
        now = time.perf_counter()
        if not quiet and (force or now - last[0] >= every):
            last[0] = now
            print(text, file=sys.stderr, flush=True)

    return tell


_COMPLETE = [False]  # every request has its record: from then on a SIGTERM no longer interrupts the run
_STOPPING = [False]  # a SIGTERM has interrupted the run: the later ones no longer do


def _interrupt(signum, frame):
    if _COMPLETE[0] or _STOPPING[0]:
        return  # the engine is shutting down (after the last record, or the first interruption): the run ends
        # with its own status; a second SIGTERM (`kill` twice, a supervisor) ended it with 143 mid-teardown
    _STOPPING[0] = True
    raise KeyboardInterrupt



_MESSAGES = "stdout"  # "stderr" when the results go to stdout


def _say(text: str) -> None:
    stream = sys.stderr if _MESSAGES == "stderr" else sys.stdout
    try:
        print(text, file=stream, flush=True)
    except BrokenPipeError:  # whoever read the messages went away (`| head`): the run goes on without them
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())
