"""The SGLang engine in-process: start it, run every pending request, hand each result over.

`start_engine` builds `sglang.Engine(model_path=..., schedule_policy=...)`: on a CPU-only
machine with `SGLANG_USE_CPU_ENGINE=1`, the `torch_native` attention backend and a bounded KV
pool (SGLang would size it from host memory); on a GPU with SGLang's defaults. `generate`
submits all requests at once (or keeps `window` in flight, refilled in order), so the
scheduler, and the `blend` policy's tree, see the whole offline queue (or the window), and
calls `on_result(prepared, output)` or `on_error(prepared, exception)` as each one finishes,
in completion order. Nothing is kept
back: the caller writes results as they arrive.

`prepare_environment` must run before sglang (and torch) are imported: SGLang reads
`SGLANG_USE_CPU_ENGINE` at import, OpenMP reads `OMP_WAIT_POLICY` when torch loads.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import itertools
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .prompts import Prepared

RATE_SECONDS = 2.0  # how often the progress bar asks the scheduler for its decode rate
WATCH_SECONDS = 1.0  # how often a run looks for an engine process that has ended
CPU_MAX_TOTAL_TOKENS = 32768  # KV pool on CPU (SmolLM2 in float32: ~1.5 GB)
_CPU_IMPORT_WARNINGS = ("Only CUDA", "Triton is not supported")


def prepare_environment(device: str = "auto") -> str:
    """Resolve `device` (auto: cuda when torch sees a GPU, else cpu) and set the environment the
    engine needs on it; returns "cpu" or "cuda". Variables the user set are left alone."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow CPU decode 50-100x
    if device == "auto":
        try:
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        except ImportError:
            device = "cpu"
    if device == "cpu":
        os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        # SGLang's CUDA-only modules warn at import, in this process and in each engine process
        quiet = [f"ignore:{m}:UserWarning" for m in _CPU_IMPORT_WARNINGS]
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [os.environ.get("PYTHONWARNINGS")] + quiet))
        for m in _CPU_IMPORT_WARNINGS:
            warnings.filterwarnings("ignore", message=m, category=UserWarning)
    return device


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_path: str
    policy: str = "blend"
    device: str = "cpu"  # resolved: "cpu" or "cuda"
    context_length: int | None = None
    max_total_tokens: int | None = None  # None: CPU_MAX_TOTAL_TOKENS on CPU, SGLang's choice on GPU
    attention_backend: str | None = None  # None: torch_native on CPU, SGLang's choice on GPU
    seed: int = 0
    log_level: str = "error"
    extra: dict = field(default_factory=dict)  # further sglang.Engine keyword arguments

    def engine_kwargs(self) -> dict:
        kw = {"model_path": self.model_path, "schedule_policy": self.policy, "random_seed": self.seed,
              "log_level": self.log_level, "context_length": self.context_length}
        if self.device == "cpu":
            kw.update(device="cpu", attention_backend=self.attention_backend or "torch_native",
                      max_total_tokens=self.max_total_tokens or CPU_MAX_TOTAL_TOKENS)
        else:
            if self.attention_backend:
                kw["attention_backend"] = self.attention_backend
            if self.max_total_tokens:
                kw["max_total_tokens"] = self.max_total_tokens
        kw.update(self.extra)
        return {k: v for k, v in kw.items() if v is not None}


def chunk_problem(value, device: str) -> str | None:
    """Why `--engine-arg chunked_prefill_size=VALUE` (VALUE as `cli.engine_args` reads it: JSON)
    cannot run on `device` ("cpu" or "cuda"), or None: a whole number of at least 1, or -1
    (SGLang: no chunked prefill) on a GPU. On the CPU
    SGLang sizes its memory from the chunk and, at -1, stops at start asking for a negative
    --mem-fraction-static (a probe: its traceback was all the user saw)."""
    if isinstance(value, bool) or not isinstance(value, int) or not (value >= 1 or value == -1):  # as JSON reads it
        # ("007" or "--5" is not a number to JSON: SGLang would get the string)
        return (f"--engine-arg chunked_prefill_size={value}: chunked_prefill_size must be a whole number of at "
                "least 1, or -1 for no chunked prefill")
    if value == -1 and device == "cpu":
        return ("--engine-arg chunked_prefill_size=-1: the CPU engine needs chunked prefill (SGLang sizes its memory "
                "from the chunk); give a chunk of at least 1 token, e.g. chunked_prefill_size=1024")
    return None


def check_engine_args(extra: dict, device: str | None = None) -> None:
    """Raise ValueError for a key of `extra` that `sglang.Engine` does not take (before the
    input is read: a typo in --engine-arg should not cost the reading of a large file), and, for
    a known `device`, a chunk size it cannot run (`chunk_problem`)."""
    if not extra:
        return
    if device is not None and "chunked_prefill_size" in extra:
        problem = chunk_problem(extra["chunked_prefill_size"], device)
        if problem:
            raise ValueError(problem)
    import inspect

    from sglang.srt.server_args import ServerArgs

    try:
        ServerArgs(**{"model_path": "-", **extra})  # construction only checks the names (resolution checks values)
    except TypeError as exc:
        bad = next((key for key in extra if repr(key) in str(exc)), None)
        if bad is None:
            raise ValueError(f"--engine-arg: sglang.Engine refuses these arguments ({exc})") from None
        near = difflib.get_close_matches(bad, list(inspect.signature(ServerArgs).parameters), n=1)
        hint = f"; did you mean {near[0]}?" if near else "; see `python -m sglang.launch_server --help`"
        raise ValueError(f"--engine-arg {bad}: not an argument of sglang.Engine{hint}") from None


def start_engine(cfg: EngineConfig):
    """A running `sglang.Engine` for `cfg` (call `prepare_environment` first). Its processes
    ignore SIGINT: Ctrl-C in a terminal signals the whole process group, and this process
    stops them itself (`engine.shutdown()`), so they print no tracebacks of their own. When one
    of them fails while the engine starts (it sends SIGQUIT, whose SGLang handler would kill this
    process), `EngineFailed` is raised here instead, once the others are stopped; also when one
    of them ends without a word (`EngineWatch`: killed from outside; a DP rank's scheduler, which
    SGLang's DP controller waits for for ever)."""
    import sglang

    on_main = threading.current_thread() is threading.main_thread()
    _EARLIER.clear()
    _EARLIER.update(proc.pid for proc in engine_processes())  # an earlier engine's, maybe still ending
    try:
        with _children_ignore_sigint(), _sigquit_raises(), (EngineWatch() if on_main else contextlib.nullcontext()):
            return sglang.Engine(**cfg.engine_kwargs())
    except EngineFailed:
        from sglang.srt.utils import kill_process_tree

        kill_process_tree(os.getpid(), include_parent=False)
        raise


@contextlib.contextmanager
def _sigquit_raises():
    """While the engine starts, the SIGQUIT handler SGLang installs is replaced by one that
    raises `EngineFailed`; SGLang's is put back once the engine runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    install, theirs = signal.signal, []

    def redirect(sig, handler):
        if sig == signal.SIGQUIT:
            theirs.append(handler)
            handler = _engine_failed
        return install(sig, handler)

    previous = install(signal.SIGQUIT, _engine_failed)
    signal.signal = redirect
    try:
        yield
    finally:
        signal.signal = install
        install(signal.SIGQUIT, theirs[-1] if theirs else previous)


@contextlib.contextmanager
def _children_ignore_sigint():
    """Processes started by `multiprocessing` inside inherit SIGINT ignored (an ignored signal
    survives exec, and Python then leaves it ignored); this process keeps its own handler
    except for the moment of each start."""
    from multiprocessing.process import BaseProcess

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    original = BaseProcess.start

    def start(self):
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            original(self)
        finally:
            signal.signal(signal.SIGINT, previous)

    BaseProcess.start = start
    try:
        yield
    finally:
        BaseProcess.start = original


def deliver(p: Prepared, out: dict, on_result: Callable[[Prepared, dict], None],
            on_error: Callable[[Prepared, BaseException], None]) -> None:
    """Hand one engine output on: an output SGLang aborted (finish_reason type "abort") is the
    request's error, anything else its result."""
    reason = out["meta_info"].get("finish_reason") or {}
    if isinstance(reason, dict) and reason.get("type") == "abort":
        on_error(p, RuntimeError(reason.get("message") or "aborted by the engine"))
    else:
        on_result(p, out)


def engine_room(engine) -> Callable[[int], tuple[int, str]] | None:
    """For a prompt of n tokens, (the most tokens the running engine lets it generate, why).
    SGLang 0.5.23's scheduler cuts max_new_tokens, silently, to max_req_len - n - 1
    (max_req_len = min(context - 1, KV pool - 1)) and to what the pool holds beside the prompt
    (pool - the prompt's pages - a page - 1): a request asking more would end early with finish
    reason "length", as if it had reached its max_tokens. The reader checks the context
    (`prompts.output_room`); only the engine knows its pool. None when the engine does not say
    (a stand-in)."""
    try:
        info = engine._scheduler_init_result.scheduler_infos[0]
        max_req_len = int(info["max_req_input_len"]) + 5  # 0.5.23: max_req_input_len = max_req_len - 5
        pool = int(info["max_total_num_tokens"])
    except (AttributeError, TypeError, LookupError, ValueError):
        return None
    page = max(1, int(getattr(getattr(engine, "server_args", None), "page_size", 1) or 1))

    def room(n: int) -> tuple[int, str]:
        by_context = max_req_len - n - 1
        by_pool = pool - -(-n // page) * page - page - 1
        if by_pool <= by_context or max_req_len >= pool - 1:
            return min(by_pool, by_context), (f"its KV pool holds {pool:,} tokens: lower max_tokens, or give the engine "
                                              "a larger pool (--max-total-tokens)")
        return by_context, f"SGLang keeps 2 of the {max_req_len + 1:,}-token context: lower max_tokens"
    return room


def within_room(room, p: Prepared) -> Prepared | ValueError:
    """`p`, or the error of a request asking more tokens than `room` (`engine_room`) lets it
    generate (a request without max_tokens asks the run's default, capped to the context as the
    file was read: the store keeps no mark of which requests those were)."""
    if room is None:
        return p
    most, why = room(len(p.input_ids))
    if p.max_tokens <= most:
        return p
    if most < 1:  # no max_tokens would do: the prompt alone fills what the engine has
        return ValueError(f"the {len(p.input_ids):,}-token prompt leaves this engine no room to generate "
                          f"({why.split(':')[0]}): shorten the prompt" + (", or give the engine a larger pool "
                          "(--max-total-tokens)" if "KV pool" in why else ""))
    return ValueError(f'"max_tokens" is {p.max_tokens:,}, but this engine generates at most {max(most, 0):,} tokens '
                      f"after a {len(p.input_ids):,}-token prompt ({why}; for requests without max_tokens, "
                      "--default-max-tokens)")


def generate(engine, items: Iterable[Prepared], on_result: Callable[[Prepared, dict], None],
             on_error: Callable[[Prepared, BaseException], None], *, window: int = 0,
             tick: Callable[[float | None], None] | None = None, tick_seconds: float = 0.5,
             route: Callable[[Prepared], int] | None = None, in_flight: dict | None = None) -> float:
    """Run `items` on `engine`; each finishes through `on_result` or `on_error` (`deliver`). At most `window`
    requests are in the engine at once (0: all), taken from `items` in order as others finish
    (`items` may be lazy: only the requests in flight are held). `tick(rate)` is called every
    `tick_seconds` (the progress bar) with the engine's current decode tokens/s (`live_rate`),
    or None. `route(p)`: the DP rank to send `p` to (`routed_dp_rank`). `in_flight` (a dict the
    caller owns) holds the requests submitted and not yet answered, also after an interruption:
    those an `EngineFailed` caught. Returns the seconds from first submission to last result.
    KeyboardInterrupt cancels what is in flight
    and propagates; so does SIGTERM while requests run (SGLang's own SIGTERM handler, which
    would drain the whole queue, is replaced for that time), and `EngineFailed` when an engine
    process dies (SGLang's SIGQUIT handler, which would kill this process, is replaced too)."""
    loop = engine.loop
    t0 = time.perf_counter()
    ours: set[asyncio.Task] = set()  # the requests in flight and the ticker, to cancel on interrupt
    flight = {} if in_flight is None else in_flight
    watches: list[EngineWatch] = []  # stopped here: a coroutine cut short twice stays pending (below)
    main = loop.create_task(_generate(engine, items, on_result, on_error, window, tick, tick_seconds, ours, route,
                                      flight, watches))
    try:
        loop.run_until_complete(main)
    except BaseException:
        left = [t for t in [main, *ours] if not t.done()]
        for t in left:
            t.cancel()
        try:
            loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
        except BaseException:  # noqa: BLE001 (interrupted again while cancelling)
            pass
        for t in [main, *ours]:
            if t.done() and not t.cancelled():
                t.exception()  # retrieved: asyncio would log each as never retrieved
        raise
    finally:
        for watch in watches:
            watch.__exit__()
    return time.perf_counter() - t0


_LATEST = [0]  # the newest `_generate`: only it puts signal handlers back


async def _generate(engine, items, on_result, on_error, window, tick, tick_seconds, ours: set, route=None,
                    flight: dict | None = None, watches: list | None = None) -> None:
    # `watches`: where the engine watch goes, for `generate` to stop it too (this coroutine, cut
    # short twice, may never reach its finally); it is stopped here first, before the handlers go back
    loop = asyncio.get_running_loop()
    _LATEST[0] += 1
    mine = _LATEST[0]
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGQUIT)}
    start_loop = getattr(getattr(engine, "tokenizer_manager", None), "auto_create_handle_loop", None)
    if start_loop is not None:
        start_loop()  # installs SGLang's SIGTERM (drain, then exit) and SIGQUIT handlers: replaced just below
    on_main = threading.current_thread() is threading.main_thread()
    if on_main:
        loop.add_signal_handler(signal.SIGTERM, _terminated)
        loop.add_signal_handler(signal.SIGQUIT, _engine_failed)

    flight = {} if flight is None else flight
    room = engine_room(engine)

    async def one(p: Prepared) -> None:
        fit = within_room(room, p)
        if isinstance(fit, ValueError):  # the engine would cut it short without a word: its own error instead
            on_error(p, fit)
            return
        p = fit
        flight[id(p)] = p  # until answered: a cancelled request stays, for the caller to see
        try:
            kw = {"routed_dp_rank": route(p)} if route is not None else {}
            out = await engine.async_generate(input_ids=p.input_ids, sampling_params=p.sampling_params, **kw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 (one request's failure is its own record)
            flight.pop(id(p), None)
            on_error(p, exc)
            return
        flight.pop(id(p), None)
        deliver(p, out, on_result, on_error)

    async def ticker() -> None:
        rate, probe, asked = None, None, 0.0  # one state request in flight at a time, never cancelled early
        try:
            while True:
                await asyncio.sleep(tick_seconds)
                now = time.monotonic()
                if probe is not None and probe.done():
                    rate, probe = probe.result(), None
                elif probe is not None and now - asked > 2 * RATE_SECONDS:
                    rate = None  # the scheduler is busy (a long prefill): no current figure
                if probe is None and now - asked >= RATE_SECONDS:
                    probe, asked = asyncio.ensure_future(live_rate(engine)), now
                tick(rate)
        finally:
            if probe is not None:
                probe.cancel()

    if tick is not None:
        ours.add(asyncio.ensure_future(ticker()))
    watch = EngineWatch().__enter__() if on_main else None  # it signals SIGQUIT: the handler above
    if watch is not None and watches is not None:
        watches.append(watch)
    try:
        if window <= 0:
            tasks = [asyncio.ensure_future(one(p)) for p in items]
            ours.update(tasks)
            await asyncio.gather(*tasks)
            return
        source, in_flight = iter(items), set()
        while True:  # `window` requests in the engine, refilled in order as each finishes
            for p in itertools.islice(source, window - len(in_flight)):
                t = asyncio.ensure_future(one(p))
                in_flight.add(t)
                ours.add(t)
            if not in_flight:
                break
            finished, in_flight = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            ours.difference_update(finished)
            failures = [t.exception() for t in finished if not t.cancelled()]  # each retrieved, so asyncio logs none
            for exc in failures:
                if exc is not None:
                    raise exc
    finally:
        if watch is not None:
            watch.__exit__()
        for t in ours:
            t.cancel()
        # a run cut short twice (a second engine process reporting while the first failure cancels
        # what was in flight) leaves this coroutine pending; the garbage collector closes it later,
        # maybe during another run, whose handlers it must not replace with these stale ones
        if on_main and mine == _LATEST[0]:
            for sig, handler in before.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


class Hunt:
    """Finds a request that stops the engine. When an engine process dies, the requests it had
    in flight (`crashed(caught)`) are the suspects: the engine starts again and runs them as a
    group, halves of it after each further failure, until a group of one fails (that request
    stopped the engine: the caller writes its error record) or every group finishes. A failure
    that needs two requests in one batch ends with both finishing apart. The hunt gives up
    (`exhausted`) after `per_culprit` failures, or `LONE_STREAK` requests failing alone, with no
    request answered in between (`answered`): an engine that fails whatever it runs is not a
    request's fault."""

    LONE_STREAK = 3

    def __init__(self, window: int):
        import collections
        import math

        self.groups: collections.deque[list[Prepared]] = collections.deque()
        self.per_culprit = 2 * math.ceil(math.log2(max(2, window))) + 2
        self.crashes = self.culprits = 0  # in all
        self.fruitless = self.lone = 0  # since a request was last answered

    @property
    def exhausted(self) -> bool:
        return self.fruitless > self.per_culprit or self.lone >= self.LONE_STREAK

    def answered(self) -> None:
        """A request got its answer: the engine runs."""
        self.fruitless = self.lone = 0

    def crashed(self, caught: list[Prepared], group: bool) -> Prepared | None:
        """Record an engine failure with `caught` in flight and not answered; `group`: it struck
        while the first of `groups` ran (that group is done with). Returns the culprit, if one
        request alone was in flight."""
        self.crashes += 1
        self.fruitless += 1
        if group:
            self.groups.popleft()
        if len(caught) == 1:
            self.culprits += 1
            self.lone += 1
            return caught[0]
        if caught:
            half = len(caught) // 2
            self.groups.extendleft([caught[half:], caught[:half]])  # the first half runs next
        return None

    def check_integrity(self, written: set) -> None:
        """No suspect is queued twice nor already written."""
        ids = [p.request.custom_id for g in self.groups for p in g]
        assert len(ids) == len(set(ids)) and not written.intersection(ids), "a suspect is queued twice or done"


class StoppedEngine(RuntimeError):
    """The error of the request a `Hunt` found: it ran alone when an engine process failed."""

    def __init__(self, where: str):
        super().__init__(f"this request stopped the engine (an SGLang process failed while it ran alone; its error "
                         f"is {where}); fix it, then rerun with --retry-failed")


def _terminated() -> None:
    raise KeyboardInterrupt  # out of run_until_complete: `generate` cancels what is in flight


class EngineFailed(SystemExit):
    """An engine process died while the engine started or requests ran: SGLang's processes send
    SIGQUIT to this one, whose own handler would kill this process at once. A SystemExit, so
    that asyncio lets it out of run_until_complete; `generate` cancels what is in flight and
    raises it."""


def _engine_failed(*_signal) -> None:
    """SIGQUIT's handler while the engine starts (signal.signal) or runs (loop.add_signal_handler)."""
    raise EngineFailed(1)


_EARLIER: set = set()  # SGLang processes there when the latest engine started: not its own


def engine_processes() -> list:
    """The engine's processes: this process's descendants SGLang named (`sglang::...`), its
    schedulers under a DP controller included. SGLang's own watch (`SubprocessWatchdog`) covers
    only the processes the engine started itself: with `--dp N` the ranks' schedulers are the DP
    controller's children, which joins them only once its own loop ends, so a rank that died
    left the run waiting for ever."""
    import psutil

    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.name().startswith("sglang::") or " ".join(proc.cmdline()).startswith("sglang::"):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def first_ended(procs: list):
    """The first of `procs` that has ended (gone, or a zombie its parent has not reaped), else None."""
    import psutil

    for proc in procs:
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                return proc
        except psutil.NoSuchProcess:
            return proc
    return None


def _signal_failed() -> None:
    """What SGLang's processes do when one of them fails: SIGQUIT to this process (taken by
    `_engine_failed` while the engine starts or runs)."""
    os.kill(os.getpid(), signal.SIGQUIT)


class EngineWatch:
    """A thread that calls `on_end()` once, when one of the engine's processes
    (`engine_processes`, looked for again every `seconds`: they appear while the engine starts;
    not those of an earlier engine, which may still be ending: `_EARLIER`) has ended; a context
    manager, stopped on exit. A process killed from outside (the OOM killer) reports nothing, and
    SGLang watches only the processes the engine started itself."""

    def __init__(self, on_end: Callable = _signal_failed, seconds: float = WATCH_SECONDS):
        self.on_end, self.seconds = on_end, seconds
        self.procs: dict = {}  # pid -> (process, its name while it ran)
        self.stopping = threading.Event()
        self.lock = threading.Lock()  # a watch stopped never signals after `__exit__` returned
        self.thread = threading.Thread(target=self._watch, name="engine-watch", daemon=True)

    def __enter__(self) -> "EngineWatch":
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        with self.lock:
            self.stopping.set()
        self.thread.join(timeout=10 * self.seconds)

    def _watch(self) -> None:
        import psutil

        while True:
            for proc in engine_processes():
                if proc.pid not in self.procs and proc.pid not in _EARLIER:
                    with contextlib.suppress(psutil.Error):
                        self.procs[proc.pid] = proc, proc.name()
            ended = first_ended([proc for proc, _ in self.procs.values()])
            if ended is not None:
                with self.lock:
                    if self.stopping.is_set():
                        return
                    print(f"engine process {ended.pid} ({self.procs[ended.pid][1]}) ended", file=sys.stderr,
                          flush=True)
                    self.on_end()
                return
            if self.stopping.wait(self.seconds):
                return


async def live_rate(engine) -> float | None:
    """The scheduler's decode tokens/s over its last logging window (`last_gen_throughput` of
    SGLang's internal state, summed over ranks), or None when the engine cannot tell. Finished
    requests alone understate progress while long answers are still decoding."""
    get = getattr(getattr(engine, "tokenizer_manager", None), "get_internal_state", None)
    if get is None:
        return None
    try:
        states = await get()
    except Exception:  # noqa: BLE001 (a progress figure never fails the run)
        return None
    rates = [s.get("last_gen_throughput") for s in states if isinstance(s, dict)]
    rates = [r for r in rates if isinstance(r, (int, float))]
    return float(sum(rates)) if rates else None
