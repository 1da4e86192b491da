"""`blendserve run --ray --replicas N`: one SGLang engine per Ray actor, each fed its shard.

The caller plans the shards (`dispatch.shards`); the driver feeds each replica its shard in chunks of
`chunk` requests in the plan's order, at most `in_flight` chunks per replica outstanding (the
bounded feed), and hands every result to `on_result` / `on_error` as its chunk comes back, so
the caller writes the one output file exactly as with one engine. An actor holds one
`sglang.Engine` (`runner.start_engine`) whose event loop runs on its own thread; the actor runs
its outstanding chunks at once (a threaded actor, `max_concurrency` = in_flight), so the engine
holds every outstanding chunk's requests together and the next chunk's requests join the batch
while the previous chunk's longest ones finish (no drain at chunk ends). By default `in_flight`
is the engine's window (`feed.window_size`: from the capacity the replica reports and its
shard's mean request size) in chunks, at least 2.

A replica whose actor dies (a request that stops its engine, a process killed, a node lost) is
started again by the driver, not by Ray: the chunks it had not returned (a chunk's results come
back whole or not at all) go to the replica's `runner.Hunt`, which runs them first on the new
actor, one group alone at a time and halving after each failure, until a request that stops the
engine runs alone and gets its error (`runner.StoppedEngine`). A replica that cannot start, or
that fails whatever it runs (the hunt exhausted), is given up: the requests it had left go to the
other replicas, and become error records only when none is left. The driver checks that no
request is handed over twice. A run that stops (Ctrl-C, SIGTERM, an error) first collects from each
live replica the requests of its unreturned chunks that have finished (`Replica.collect`, on a
control thread of its own), so their answers are written, not run again.

Without `address` a local Ray cluster starts on this machine; with one (`ray start --head` on
the head node, `ray start --address HEAD:6379` on each worker) the replicas spread over the
cluster, `gpus` GPUs each.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import threading
import time
from typing import Callable, NamedTuple, Sequence

from . import runner
from ..sglang_plugin.settings import rank_path, read_policy_stats
from .dispatch import DispatchError, cpu_bind
from .feed import engine_capacity, window_size
from .prompts import Prepared

MAX_IN_FLIGHT = 64  # chunks one replica may hold at once (its actor's threads)
CONTROL = {"control": 2}  # the actor's threads for `collect` and `shutdown`, free while chunks hold the others
COLLECT_SECONDS = 30  # how long a stopping run waits for a replica's finished requests
WAIT_SECONDS = 1.0  # the driver's longest blocking wait on Ray: a stop asked for is taken between waits
SHUTDOWN_SECONDS = (60, 10)  # how long the replicas' engines may take to stop: a finished run, a stopped one
RAY_LOGS = "Ray's worker logs (/tmp/ray/session_latest/logs on the replica's node)"
ENV_PASSED = ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE", "OMP_WAIT_POLICY", "PYTHONWARNINGS", "BLENDSERVE_MODEL_CACHE")


class RayReport(NamedTuple):
    seconds: float  # first submission to last result
    start_seconds: float  # until every replica's engine had started (the first submission)
    window: int  # requests the replicas held at once at most (chunks in flight x chunk size)
    shard_sizes: list  # requests per replica
    pids: list  # per replica: the actor process ids that returned chunks (more than one: it was restarted)
    lost_replicas: list  # replicas given up (`generate`'s lose: what they had left went to the others)
    in_flight: list  # per replica: chunks it held at once
    restarts: int  # replicas started again after their actor died (their hunts, `runner.Hunt`)
    policy_stats: list  # per replica: its blend policy's counters at the end (`Replica.shutdown`), {} if none


class Replica:
    """A Ray actor body: one engine, its event loop on a thread of its own, chunks run on it
    concurrently (each `run` call from one of the actor's threads)."""

    def __init__(self, cfg: runner.EngineConfig, env: dict):
        parent = os.getppid()  # before the engine starts: the Ray process may end meanwhile
        os.environ.update(env)
        runner.prepare_environment(cfg.device)
        try:
            self.engine = runner.start_engine(cfg)
        except runner.EngineFailed:  # a SystemExit: Ray would take it for the actor's own exit
            raise RuntimeError("an SGLang process failed while the engine started (its error is in this "
                               "replica's log)") from None
        self.kv_tokens, self.running = engine_capacity(self.engine)
        self.loop_thread = threading.Thread(target=self.engine.loop.run_forever, name="engine-loop", daemon=True)
        self.loop_thread.start()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.finished: dict[int, dict] = {}  # chunk key -> {index: (output, exception)} while it runs
        threading.Thread(target=_exit_with_the_engine, args=(self.stopping, parent), name="engine-watch",
                         daemon=True).start()

    def capacity(self) -> tuple:
        """(KV pool tokens, max running requests) as the engine reported them (None: unknown)."""
        return self.kv_tokens, self.running

    def run(self, items: list, key: int = 0) -> tuple[int, list]:
        """(pid, [(index in items, output or None, exception or None)]), every item once; each
        finished item is kept under `key` until the chunk returns (`collect`)."""
        with self.lock:
            self.finished[key] = {}

        def record(i, out, exc) -> None:
            with self.lock:
                self.finished[key][i] = (out, exc)
        try:
            return os.getpid(), asyncio.run_coroutine_threadsafe(_chunk(self.engine, items, record),
                                                                 self.engine.loop).result()
        finally:
            with self.lock:
                self.finished.pop(key, None)

    def collect(self) -> dict:
        """{chunk key: [(index, output, exception)]}: the finished items of the chunks not returned yet."""
        with self.lock:
            return {k: [(i, *v) for i, v in d.items()] for k, d in self.finished.items()}

    def shutdown(self) -> dict:
        """Stops the engine; returns its blend policy's counters (read here: the replica's node
        may be another machine), {} when it wrote none."""
        self.stopping.set()
        self.engine.loop.call_soon_threadsafe(self.engine.loop.stop)
        self.loop_thread.join(timeout=30)
        self.engine.shutdown()
        return read_policy_stats(os.environ.get("BLENDSERVE_STATS_PATH"))


def _exit_with_the_engine(stopping: threading.Event, parent: int, seconds: float = 1.0) -> None:
    """Ends this actor's process when one of its engine's processes has ended. An actor is not on
    the main thread, so SGLang installs no SIGQUIT handler there: a scheduler that died (a request
    that stops it) left the actor alive and its requests waiting for ever. The actor's death is what
    the driver sees (`RayActorError`), and its hunt starts a successor. Also when the Ray process
    that started this one (`parent`, its pid read when the actor began, before its engine's start)
    has ended (the driver's local cluster killed with it): the actor and its engine would otherwise
    live on, holding their memory and cores."""
    procs = runner.engine_processes()
    while not stopping.wait(seconds):
        if os.getppid() != parent and not stopping.is_set():
            print("the Ray process that started this replica ended: its actor exits", flush=True)
            os._exit(1)
        ended = runner.first_ended(procs)
        if ended is not None and not stopping.is_set():
            print(f"engine process {ended.pid} ended: this replica's actor exits (the driver starts it again)",
                  flush=True)
            os._exit(1)


async def _chunk(engine, items: list, record: Callable | None = None) -> list:
    """Every item of a chunk on the engine at once (a module function: an `async def` method would
    make Ray run the actor on an event loop of its own, which the engine would then take);
    `record(index, output, exception)` as each finishes."""
    room = runner.engine_room(engine)

    async def one(i: int, p: Prepared) -> tuple:
        p = runner.within_room(room, p)  # more than the engine would generate: an error, never sent
        if isinstance(p, ValueError):
            out = i, None, p
        else:
            try:
                out = i, await engine.async_generate(input_ids=p.input_ids, sampling_params=p.sampling_params), None
            except Exception as exc:  # noqa: BLE001 (one request's failure is its own record)
                out = i, None, exc
        if record is not None:
            record(*out)
        return out

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(items))))


def chunks_in_flight(kv_tokens: int | None, running: int | None, part: Sequence[Prepared], chunk: int) -> int:
    """Chunks a replica holds at once: its engine's window (`feed.window_size` over the shard's
    mean prompt + max_tokens) in chunks, at least 2 (one runs on while the next starts)."""
    mean = sum(len(p.input_ids) + p.max_tokens for p in part) / len(part) if part else 1.0
    return max(2, -(-window_size(kv_tokens, running, mean) // chunk))


class _Slot:
    """The driver's view of one replica: its current actor (None between one that died and its successor), the
    chunks still to feed it, the hunt once one of its actors died (`runner.Hunt`), and what a dead
    actor's chunks held (`caught`) until every one of them has come back."""

    def __init__(self, chunks: list):
        self.actor = None
        self.started = False  # an actor was started for it before (the next is a restart)
        self.queue = chunks
        self.limit = 0  # chunks in flight at once
        self.hunt: runner.Hunt | None = None
        self.caught: list = []
        self.dying = False  # an actor task failed: its other chunks are awaited, nothing is fed
        self.group_died = False  # the actor died while it ran the hunt's first group
        self.init_failed = False
        self.lost = False


def generate(cfg: runner.EngineConfig, parts: Sequence[Sequence[Prepared]],
             on_result: Callable[[Prepared, dict], None], on_error: Callable[[Prepared, BaseException], None], *,
             address: str | None = None, gpus: float = 0.0, chunk: int = 256, in_flight: int | None = None,
             on_chunk: Callable | None = None, say: Callable[[str], None] | None = None,
             on_started: Callable[[float], None] | None = None,
             on_done: Callable[[], None] | None = None) -> RayReport:
    """Run each shard of `parts` (`dispatch.shards`) on its own Ray actor (module docstring).
    `in_flight`: chunks outstanding per replica (None: `chunks_in_flight` from the engine's
    capacity). `on_chunk(replica, actor, chunks_done)` is called after each returned chunk (tests
    use it to kill a replica); `say(message)` reports replicas started again and lost;
    `on_started(seconds)` once every replica's engine has started (an interrupted run returns no
    report); `on_done()` once every request has been handed over, before the replicas and Ray
    stop (tens of seconds: a stop asked for then interrupts nothing)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    replicas = len(parts)
    if replicas < 1 or chunk < 1 or (in_flight is not None and in_flight < 1):
        raise ValueError(f"replicas, chunk and in_flight must be >= 1, got {replicas}, {chunk}, {in_flight}")
    say = say or (lambda _message: None)
    started_here = not ray.is_initialized()
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("BLENDSERVE_")})
    if started_here:
        ours = signal.getsignal(signal.SIGTERM)
        if not address and os.environ.get("RAY_ADDRESS"):
            say(f"RAY_ADDRESS is {os.environ['RAY_ADDRESS']}, but without --ray-address the replicas run on a local "
                "cluster started here; pass --ray-address to use that cluster")
        # "local": a cluster of this machine, which Ray would otherwise look for in RAY_ADDRESS and in
        # the cluster `ray start` left on this machine (then refusing num_cpus: a traceback, a probe)
        ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else max(replicas, os.cpu_count() or 1),
                 runtime_env={"env_vars": env})
        if ours is not None and threading.current_thread() is threading.main_thread():
            # Ray's core worker takes SIGTERM over with a handler that dumps and aborts (exit 134),
            # skipping the shutdown below that stops the local cluster: the caller's handler again
            signal.signal(signal.SIGTERM, ours)
    if gpus > 0:  # an actor asking for GPUs the cluster lacks waits for ever to be placed
        have = ray.cluster_resources().get("GPU", 0.0)
        if have < gpus:
            if started_here:
                ray.shutdown()
            raise DispatchError(f"--gpus-per-replica {gpus:g}: the Ray cluster has {have:g} GPUs, so no replica could "
                              "start; pass --gpus-per-replica 0 on CPU, or join machines with GPUs (--ray-address)")
    binds = cpu_bind(replicas, flag="--replicas").split("|") if cfg.device == "cpu" and not address else None
    actor_cls = ray.remote(concurrency_groups=CONTROL)(Replica)
    slots = [_Slot([part[i:i + chunk] for i in range(0, len(part), chunk)]) for part in parts]
    pending: dict = {}  # ref -> (replica, chunk items, the hunt's group?, its key)
    keys = itertools.count()
    done_chunks = [0] * replicas
    pids: list = [set() for _ in range(replicas)]
    lost: list = []
    seen: set = set()
    restarts = 0

    def start(r: int) -> None:
        # Ray does not restart it (max_restarts 0): a dead actor's chunks fail at once, and the
        # hunt decides what its successor runs first
        nonlocal restarts
        restarts += slots[r].started
        slots[r].started = True
        own = dict(env, **({"SGLANG_CPU_OMP_THREADS_BIND": binds[r]} if binds else {}))
        for name in ("BLENDSERVE_STATS_PATH", "BLENDSERVE_TRACE_PATH", "BLENDSERVE_CASCADE_STATS_PATH"):  # a file a replica
            if env.get(name):
                own[name] = rank_path(env[name], r)
        slots[r].actor = actor_cls.options(num_cpus=1, num_gpus=gpus, max_restarts=0, max_task_retries=0,
                                           max_concurrency=in_flight or MAX_IN_FLIGHT).remote(cfg, own)

    def submit(r: int, items: list, group: bool) -> None:
        key = next(keys)
        pending[slots[r].actor.run.remote(items, key)] = (r, items, group, key)

    def salvage() -> None:
        """The run stops with chunks out: what their requests finished is handed over now."""
        asked = [s.actor.collect.options(concurrency_group="control").remote()
                 for s in slots if s.actor is not None and not s.lost and not s.dying]
        held = {key: items for _, items, _, key in pending.values()}
        # one deadline for all: a replica whose engine still starts answers only once it has started
        answered, _ = ray.wait(asked, num_returns=len(asked), timeout=COLLECT_SECONDS) if asked else ([], [])
        for ref in answered:
            try:
                got = ray.get(ref)
            except Exception:  # noqa: BLE001 (a replica gone: its chunks run again next time)
                continue
            for key, finished in got.items():
                if key in held:
                    for i, result, exc in finished:
                        p = held[key][i]
                        _once(seen, p)
                        if exc is None:
                            runner.deliver(p, result, on_result, on_error)
                        else:
                            on_error(p, exc)

    def feed(r: int) -> None:
        s = slots[r]
        if s.lost or s.dying or not (s.queue or (s.hunt and s.hunt.groups)):
            return
        if s.actor is None:  # its last actor died: a successor for what is left
            start(r)
        held = sum(1 for v in pending.values() if v[0] == r)
        if s.hunt is not None and s.hunt.groups:  # suspects first, one group alone on the engine
            if not held:
                submit(r, s.hunt.groups[0], True)
            return
        while s.queue and held < s.limit:
            submit(r, s.queue.pop(0), False)
            held += 1

    def lose(r: int, why: str, caught: list) -> None:
        """Replica r is given up: what it had left (`caught` by its last actor, the hunt's suspects,
        its queue) goes to the others, an error record each when none is left."""
        s = slots[r]
        s.lost = True
        lost.append(r)
        left, have = [], set()  # once each: the chunk that came back failed may be the hunt's first group
        for p in [*caught, *(p for g in (s.hunt.groups if s.hunt else ()) for p in g), *(p for q in s.queue for p in q)]:
            if id(p) not in have:
                have.add(id(p))
                left.append(p)
        s.queue = []
        if s.hunt:
            s.hunt.groups.clear()
        alive = [o for o in range(replicas) if not slots[o].lost]
        with contextlib.suppress(Exception):
            ray.kill(s.actor, no_restart=True)
        if not alive:
            say(f"replica {r} {why}; no replica is left: its {len(left):,} remaining requests get error records")
            for p in left:
                _once(seen, p)
                on_error(p, RuntimeError(f"replica {r} {why}, and no replica was left to run this request"))
            return
        say(f"replica {r} {why}; its {len(left):,} remaining requests go to replicas {alive}")
        for i in range(0, len(left), chunk):  # to the replica with the least left to run
            o = min(alive, key=lambda o: sum(map(len, slots[o].queue)))
            slots[o].queue.append(left[i:i + chunk])
        for o in alive:
            feed(o)

    def died(r: int) -> None:
        """Every chunk replica r's actor held has come back failed: hunt the request that stopped it
        (runner.Hunt, as one engine does); `feed` starts a successor for what is left."""
        s = slots[r]
        caught, s.caught, s.dying = s.caught, [], False
        if s.init_failed:
            return lose(r, f"could not start its engine (its error is in {RAY_LOGS})", caught)
        s.hunt = s.hunt or runner.Hunt(s.limit * chunk)
        culprit = s.hunt.crashed(caught, s.group_died)
        s.group_died = False
        if culprit is not None:
            _once(seen, culprit)
            on_error(culprit, runner.StoppedEngine(f"in {RAY_LOGS}"))
        if s.hunt.exhausted:
            return lose(r, f"failed {s.hunt.crashes} times, also with its requests run apart (its errors are in "
                           f"{RAY_LOGS})", [])
        s.hunt.check_integrity(seen)
        with contextlib.suppress(Exception):  # gone already, unless Ray only lost sight of it
            ray.kill(s.actor, no_restart=True)
        s.actor = None
        say(f"replica {r} failed with {len(caught):,} request{'' if len(caught) == 1 else 's'} in flight"
            + (f"; line {culprit.request.line} ran alone when it failed: written as an error record" if culprit else "")
            + ("; starting it again" if s.hunt.groups or s.queue else "")
            + (f", {sum(map(len, s.hunt.groups)):,} suspect requests first, in smaller groups" if s.hunt.groups else ""))
        feed(r)

    def capacity(actor) -> tuple:
        ref = actor.capacity.remote()  # answered once the engine has started: minutes
        while True:
            try:
                return ray.get(ref, timeout=WAIT_SECONDS)
            except GetTimeoutError:  # a stop asked for while the engines start is taken between waits,
                continue  # whatever Ray's own wait does with signals
            except RayActorError:  # it never started: its chunks fail below, as a dead replica's do
                return None, None

    t0 = time.perf_counter()
    finished = False
    try:
        for r in range(replicas):
            start(r)
        for s, part in zip(slots, parts):
            s.limit = in_flight or min(MAX_IN_FLIGHT, chunks_in_flight(*capacity(s.actor), part, chunk))
        t1 = time.perf_counter()
        if on_started is not None:
            on_started(t1 - t0)
        for r in range(replicas):
            feed(r)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SECONDS)  # a stop is taken between waits
            if not ready:
                continue
            ref = ready[0]
            r, part, group, _ = pending.pop(ref)
            s = slots[r]
            try:
                pid, results = ray.get(ref)
            except RayActorError as exc:
                s.dying = True
                s.caught += [p for p in part if p.request.custom_id not in seen]
                s.group_died |= group
                s.init_failed |= exc.actor_init_failed
                if not any(v[0] == r for v in pending.values()):
                    died(r)
                continue
            pids[r].add(pid)
            for i, out, exc in results:
                p = part[i]
                _once(seen, p)
                if exc is None:
                    runner.deliver(p, out, on_result, on_error)
                else:
                    on_error(p, exc)
            if s.hunt is not None:
                s.hunt.answered()
                if group:
                    s.hunt.groups.popleft()
            done_chunks[r] += 1
            if on_chunk is not None:
                on_chunk(r, s.actor, done_chunks[r])
            feed(r)
        seconds = time.perf_counter() - t1
        finished = True
        if on_done is not None:
            on_done()
    except BaseException:
        if pending:
            with contextlib.suppress(Exception):
                salvage()
        raise
    finally:
        live = [(r, s.actor) for r, s in enumerate(slots) if s.actor is not None and not s.lost]
        policy_stats = [{} for _ in slots]
        # one deadline for all (they stop together); a stopped run does not wait for an engine still
        # starting (its shutdown call runs only once the start is over: a minute a replica, a probe)
        deadline = time.monotonic() + SHUTDOWN_SECONDS[0 if finished else 1]
        for (r, _), ref in zip(live, [a.shutdown.options(concurrency_group="control").remote() for _, a in live]):
            with contextlib.suppress(Exception):  # a replica already gone has nothing to shut down
                policy_stats[r] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic())) or {}
        for s in slots:
            if s.actor is not None:
                with contextlib.suppress(Exception):
                    ray.kill(s.actor, no_restart=True)
        if started_here:
            ray.shutdown()
    return RayReport(seconds, t1 - t0, sum(s.limit for s in slots) * chunk, [len(p) for p in parts],
                     [sorted(x) for x in pids], lost, [s.limit for s in slots], restarts, policy_stats)


def _once(seen: set, p: Prepared) -> None:
    """Each request is handed over once (custom ids are unique within a run)."""
    if p.request.custom_id in seen:
        raise AssertionError(f"request {p.request.custom_id!r} came back twice")
    seen.add(p.request.custom_id)
