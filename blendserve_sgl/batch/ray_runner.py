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

A replica that dies (process killed, node lost) is restarted by Ray (`max_restarts`) and the
chunks it had not returned are run again by Ray's actor-task retries (`max_task_retries`): a
chunk's results come back whole or not at all, so nothing is lost, and the driver checks that
no request is handed over twice. When the restarts are spent, the replica's remaining requests
become error records (rerun with --retry-failed to try them again).

Without `address` a local Ray cluster starts on this machine; with one (`ray start --head` on
the head node, `ray start --address HEAD:6379` on each worker) the replicas spread over the
cluster, `gpus` GPUs each.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Callable, NamedTuple, Sequence

from . import runner
from .dispatch import cpu_bind
from .feed import engine_capacity, window_size
from .prompts import Prepared

MAX_IN_FLIGHT = 64  # chunks one replica may hold at once (its actor's threads)
ENV_PASSED = ("PYTHONPATH", "SGLANG_USE_CPU_ENGINE", "OMP_WAIT_POLICY", "PYTHONWARNINGS", "BLENDSERVE_MODEL_CACHE")


class RayReport(NamedTuple):
    seconds: float  # first submission to last result
    shard_sizes: list  # requests per replica
    pids: list  # per replica: the actor process ids that returned chunks (more than one: it was restarted)
    lost_replicas: list  # replicas whose restarts were spent (their remaining requests became error records)
    in_flight: list  # per replica: chunks it held at once


class Replica:
    """A Ray actor body: one engine, its event loop on a thread of its own, chunks run on it
    concurrently (each `run` call from one of the actor's threads)."""

    def __init__(self, cfg: runner.EngineConfig, env: dict):
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

    def capacity(self) -> tuple:
        """(KV pool tokens, max running requests) as the engine reported them (None: unknown)."""
        return self.kv_tokens, self.running

    def run(self, items: list) -> tuple[int, list]:
        """(pid, [(index in items, output or None, exception or None)]), every item once."""
        return os.getpid(), asyncio.run_coroutine_threadsafe(_chunk(self.engine, items), self.engine.loop).result()

    def shutdown(self) -> None:
        self.engine.loop.call_soon_threadsafe(self.engine.loop.stop)
        self.loop_thread.join(timeout=30)
        self.engine.shutdown()


async def _chunk(engine, items: list) -> list:
    """Every item of a chunk on the engine at once (a module function: an `async def` method would
    make Ray run the actor on an event loop of its own, which the engine would then take)."""
    async def one(i: int, p: Prepared) -> tuple:
        try:
            return i, await engine.async_generate(input_ids=p.input_ids, sampling_params=p.sampling_params), None
        except Exception as exc:  # noqa: BLE001 (one request's failure is its own record)
            return i, None, exc

    return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(items))))


def chunks_in_flight(kv_tokens: int | None, running: int | None, part: Sequence[Prepared], chunk: int) -> int:
    """Chunks a replica holds at once: its engine's window (`feed.window_size` over the shard's
    mean prompt + max_tokens) in chunks, at least 2 (one runs on while the next starts)."""
    mean = sum(len(p.input_ids) + p.max_tokens for p in part) / len(part) if part else 1.0
    return max(2, -(-window_size(kv_tokens, running, mean) // chunk))


def generate(cfg: runner.EngineConfig, parts: Sequence[Sequence[Prepared]],
             on_result: Callable[[Prepared, dict], None], on_error: Callable[[Prepared, BaseException], None], *,
             address: str | None = None, gpus: float = 0.0, chunk: int = 256, in_flight: int | None = None,
             max_restarts: int = 3, on_chunk: Callable | None = None) -> RayReport:
    """Run each shard of `parts` (`dispatch.shards`) on its own Ray actor (module docstring).
    `in_flight`: chunks outstanding per replica (None: `chunks_in_flight` from the engine's
    capacity). `on_chunk(replica, actor, chunks_done)` is called after each returned chunk (tests
    use it to kill a replica)."""
    import ray
    from ray.exceptions import RayActorError

    replicas = len(parts)
    if replicas < 1 or chunk < 1 or (in_flight is not None and in_flight < 1):
        raise ValueError(f"replicas, chunk and in_flight must be >= 1, got {replicas}, {chunk}, {in_flight}")
    started_here = not ray.is_initialized()
    env = {k: os.environ[k] for k in ENV_PASSED if k in os.environ}
    env.update({k: v for k, v in os.environ.items() if k.startswith("BLENDSERVE_")})
    if started_here:
        ours = signal.getsignal(signal.SIGTERM)
        ray.init(address=address, include_dashboard=False, log_to_driver=False,
                 num_cpus=None if address else max(replicas, os.cpu_count() or 1),
                 runtime_env={"env_vars": env})
        if ours is not None and threading.current_thread() is threading.main_thread():
            # Ray's core worker takes SIGTERM over with a handler that dumps and aborts (exit 134),
            # skipping the shutdown below that stops the local cluster: the caller's handler again
            signal.signal(signal.SIGTERM, ours)
    binds = cpu_bind(replicas, flag="--replicas").split("|") if cfg.device == "cpu" and not address else None
    actor_cls = ray.remote(Replica)
    actors = []
    for r in range(replicas):
        own = dict(env, **({"SGLANG_CPU_OMP_THREADS_BIND": binds[r]} if binds else {}))
        actors.append(actor_cls.options(num_cpus=1, num_gpus=gpus, max_restarts=max_restarts,
                                        max_task_retries=max_restarts,
                                        max_concurrency=in_flight or MAX_IN_FLIGHT).remote(cfg, own))
    limit: list = []  # chunks in flight per replica
    queues = [[part[i:i + chunk] for i in range(0, len(part), chunk)] for part in parts]
    pending: dict = {}  # ref -> (replica, chunk items)
    done_chunks = [0] * replicas
    pids: list = [set() for _ in range(replicas)]
    lost: list = []
    seen: set = set()

    def feed(r: int) -> None:
        while queues[r] and sum(1 for rr, _ in pending.values() if rr == r) < limit[r]:
            part = queues[r].pop(0)
            pending[actors[r].run.remote(part)] = (r, part)

    def capacity(actor) -> tuple:
        try:
            return ray.get(actor.capacity.remote())
        except RayActorError:  # it never started: its chunks fail below, as a dead replica's do
            return None, None

    t0 = time.perf_counter()
    try:
        limit += [in_flight or min(MAX_IN_FLIGHT, chunks_in_flight(*capacity(a), part, chunk))
                  for a, part in zip(actors, parts)]
        for r in range(replicas):
            feed(r)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            ref = ready[0]
            r, part = pending.pop(ref)
            try:
                pid, results = ray.get(ref)
            except RayActorError as exc:
                if r not in lost:
                    lost.append(r)
                for p in part + [p for q in queues[r] for p in q]:
                    _once(seen, p)
                    on_error(p, RuntimeError(f"replica {r} died and its {max_restarts} restarts are spent: {exc}"))
                queues[r] = []
                continue
            pids[r].add(pid)
            for i, out, exc in results:
                p = part[i]
                _once(seen, p)
                if exc is None:
                    runner.deliver(p, out, on_result, on_error)
                else:
                    on_error(p, exc)
            done_chunks[r] += 1
            if on_chunk is not None:
                on_chunk(r, actors[r], done_chunks[r])
            feed(r)
        seconds = time.perf_counter() - t0
    finally:
        try:
            ray.get([a.shutdown.remote() for a in actors], timeout=60)
        except Exception:  # noqa: BLE001 (a replica already gone has nothing to shut down)
            pass
        for a in actors:
            ray.kill(a, no_restart=True)
        if started_here:
            ray.shutdown()
    return RayReport(seconds, [len(p) for p in parts], [sorted(x) for x in pids], lost, limit)


def _once(seen: set, p: Prepared) -> None:
    key = id(p)
    if key in seen:
        raise AssertionError(f"request {p.request.custom_id!r} came back twice")
    seen.add(key)
