"""`--ray` when a replica's engine dies: the driver finds the request that stopped it (the same
`runner.Hunt` one engine uses), gives a replica that cannot go on to the others, and hands every
request over exactly once. Real Ray actors on a local cluster, each holding a stand-in engine
(no SGLang: a request whose first token is POISON ends the actor's process, as a scheduler fault
ends an engine's). The real engine's drill is `test_scale_out_engine.py`."""

from __future__ import annotations

import os
import sys
import threading

import pytest

ray = pytest.importorskip("ray")
from ray import cloudpickle  # noqa: E402 (what Ray pickles actor classes with)

from blendserve_sgl.batch import ray_runner, runner  # noqa: E402
from blendserve_sgl.batch.prompts import Prepared  # noqa: E402
from blendserve_sgl.batch.requests import BatchRequest  # noqa: E402

POISON = 666
SLOW = 777  # a request that never finishes
AFTER_SLOW = 778  # a request whose chunk returns once a SLOW chunk has finished its other requests
NO_START = "no-start"  # a model path whose engine never starts
NO_START_FIRST = "no-start-first"  # only the first replica's engine fails to start
NO_RESTART = "no-restart"  # a replica's engine starts once; its successors do not (the marker file, per run)

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="two replicas on CPU need two cores")


class StandIn:
    """A Replica's interface (`ray_runner.Replica`) over no engine: each request's answer is its
    custom id; POISON first ends this process."""

    def __init__(self, cfg, env: dict):
        os.environ.update(env)
        self.finished, self.slow_started = {}, threading.Event()
        first = os.environ.get("SGLANG_CPU_OMP_THREADS_BIND", "").split(",")[0] == "0"
        if cfg.model_path == NO_START or (cfg.model_path == NO_START_FIRST and first):
            raise RuntimeError("the stand-in engine does not start")
        if cfg.model_path.startswith(NO_RESTART) and first:  # "no-restart:MARKER"
            marker = cfg.model_path.split(":", 1)[1]
            if os.path.exists(marker):
                raise RuntimeError("the successor's engine does not start (the dead one's memory is not free yet)")
            open(marker, "w").close()

    def capacity(self) -> tuple:
        return 4096, 64

    def run(self, items: list, key: int = 0) -> tuple:
        if any(p.input_ids[0] == POISON for p in items):
            os._exit(1)
        if any(p.input_ids[0] == SLOW for p in items):  # the others finish, the slow one never does
            self.finished[key] = [(i, {"text": p.request.custom_id, "meta_info": {"finish_reason": {"type": "length"}}},
                                   None) for i, p in enumerate(items) if p.input_ids[0] != SLOW]
            self.slow_started.set()
            threading.Event().wait(600)
        if any(p.input_ids[0] == AFTER_SLOW for p in items):
            self.slow_started.wait(600)
        return os.getpid(), [(i, {"text": p.request.custom_id, "meta_info": {"finish_reason": {"type": "length"}}},
                              None) for i, p in enumerate(items)]

    def collect(self) -> dict:
        return dict(self.finished)

    def shutdown(self) -> None:
        pass


cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the actors get StandIn by value


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def items(n: int, poison=()) -> list:
    out = []
    for i in range(n):
        req = BatchRequest(line=i + 1, custom_id=f"r{i}", kind="completion", messages=None, prompt="x", max_tokens=4)
        out.append(Prepared(req, [POISON if i in poison else 1, 2, 3], 4))
    return out


def run(parts: list, model_path: str = "m", monkeypatch=None, in_flight: int = 2, answered=None, **kw) -> tuple:
    monkeypatch.setattr(ray_runner, "Replica", StandIn)
    answered, failed, said = {} if answered is None else answered, {}, []
    cfg = runner.EngineConfig(model_path=model_path, policy="blend", device="cpu")

    def on_result(p, out):
        assert p.request.custom_id not in answered and p.request.custom_id not in failed
        answered[p.request.custom_id] = out["text"]

    def on_error(p, exc):
        assert p.request.custom_id not in answered and p.request.custom_id not in failed
        failed[p.request.custom_id] = exc

    report = ray_runner.generate(cfg, parts, on_result, on_error, chunk=4, in_flight=in_flight, say=said.append, **kw)
    return report, answered, failed, said


def test_a_request_that_stops_a_replica_fails_alone_and_the_rest_finish(cluster, monkeypatch):
    """It used to take its replica's whole remaining shard with it: Ray retried the chunk on each
    restart, each retry died, and after three every request left on that replica failed."""
    reqs = items(40, poison={13})
    report, answered, failed, said = run([reqs[:20], reqs[20:]], monkeypatch=monkeypatch)
    assert set(failed) == {"r13"} and isinstance(failed["r13"], runner.StoppedEngine)
    assert set(answered) == {f"r{i}" for i in range(40)} - {"r13"}
    assert report.lost_replicas == [] and 1 <= report.restarts <= 6
    assert any("line 14 ran alone" in m for m in said)


def test_two_poison_requests_in_one_chunk_each_fail_alone(cluster, monkeypatch):
    reqs = items(24, poison={4, 6})
    report, answered, failed, _ = run([reqs[:12], reqs[12:]], monkeypatch=monkeypatch)
    assert set(failed) == {"r4", "r6"} and all(isinstance(e, runner.StoppedEngine) for e in failed.values())
    assert len(answered) == 22 and report.lost_replicas == []
    assert report.window == 2 * 2 * 4 and report.start_seconds >= 0  # two replicas, two chunks of four each


def test_a_replica_killed_from_outside_runs_its_chunks_again_and_loses_nothing(cluster, monkeypatch):
    reqs = items(32)
    killed = []

    def on_chunk(replica, actor, done):
        if replica == 0 and done == 1 and not killed:
            killed.append(True)
            ray.kill(actor, no_restart=True)

    # one chunk in flight: the next is sent after the kill, so it fails whatever the timing (with two,
    # the second could finish before the kill landed and nothing was run again)
    report, answered, failed, _ = run([reqs[:16], reqs[16:]], monkeypatch=monkeypatch, on_chunk=on_chunk, in_flight=1)
    assert killed and not failed and set(answered) == {f"r{i}" for i in range(32)}
    assert report.restarts == 1 and len(report.pids[0]) == 2


def test_a_replica_that_cannot_start_hands_its_shard_to_the_others(cluster, monkeypatch):
    reqs = items(24)
    report, answered, failed, said = run([reqs[:12], reqs[12:]], NO_START_FIRST, monkeypatch=monkeypatch)
    assert not failed and set(answered) == {f"r{i}" for i in range(24)}
    assert report.lost_replicas == [0] and any("go to replicas [1]" in m for m in said)


def test_a_replica_whose_successor_cannot_start_hands_each_request_over_once(cluster, monkeypatch, tmp_path):
    """Replica 0's engine dies mid-chunk and its successor cannot start: the chunk that came back
    failed was also the hunt's first group, so it was handed to replica 1 twice and the run ended
    with "came back twice" (a probe, on the real engine too)."""
    reqs = items(16, poison={2})
    path = f"{NO_RESTART}:{tmp_path / 'started'}"
    report, answered, failed, said = run([reqs[:8], reqs[8:]], path, monkeypatch=monkeypatch)
    assert report.lost_replicas == [0] and set(answered) | set(failed) == {f"r{i}" for i in range(16)}
    assert not set(answered) & set(failed) and set(failed) <= {"r2"}
    moved = [m for m in said if "remaining requests go to replicas [1]" in m]
    assert len(moved) == 1 and int(moved[0].split("its ")[-1].split()[0]) <= 8  # replica 0 had 8 at most


def test_no_replica_that_starts_is_an_error_record_each_never_a_hang(cluster, monkeypatch):
    reqs = items(10)
    report, answered, failed, _ = run([reqs[:5], reqs[5:]], NO_START, monkeypatch=monkeypatch)
    assert not answered and set(failed) == {f"r{i}" for i in range(10)}
    assert sorted(report.lost_replicas) == [0, 1]


def test_an_actor_exits_when_its_engine_process_ends(tmp_path):
    """An actor runs off the main thread, where SGLang installs no SIGQUIT handler: a scheduler
    that died left the actor alive and its requests waiting for ever (the real engine's hunt under
    --ray hung so). The watch ends the process once an engine process it started has ended."""
    import subprocess

    script = ("import os, subprocess, sys, threading\n"
              "from blendserve_sgl.batch.ray_runner import _exit_with_the_engine\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import setproctitle; setproctitle.setproctitle("
              "\"sglang::scheduler\"); print(1, flush=True)'], stdout=subprocess.PIPE)\n"
              "child.stdout.readline()  # named as SGLang names its processes\n"
              "_exit_with_the_engine(threading.Event(), os.getppid(), 0.05)\n"
              "sys.exit(0)  # never reached: the watch only returns once stopping is set\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "ended: this replica's actor exits" in done.stdout


def test_an_actor_exits_when_the_process_that_started_it_ends(tmp_path):
    """A `kill -9` of `blendserve run --ray` ends its local cluster's processes, but not the actors
    (each in a session of its own), which held their engines for ever. The actor reads its parent
    when it begins (as `Replica` does, before its engine starts), so a parent that ends before the
    watch's first look is seen too."""
    import subprocess

    import psutil

    pid_file = tmp_path / "actor.pid"
    script = ("import os, sys, threading, time\n"
              "from blendserve_sgl.batch.ray_runner import _exit_with_the_engine\n"
              "if os.fork() == 0:  # the child stands for the actor, this process for Ray's\n"
              "    parent = os.getppid()\n"
              "    os.setsid()\n"
              "    threading.Thread(target=_exit_with_the_engine, args=(threading.Event(), parent, 0.05)).start()\n"
              f"    open({str(pid_file)!r} + '.tmp', 'w').write(str(os.getpid()))\n"
              f"    os.rename({str(pid_file)!r} + '.tmp', {str(pid_file)!r})\n"
              "    time.sleep(600)\n"
              f"while not os.path.exists({str(pid_file)!r}):\n"
              "    time.sleep(0.05)\n")
    subprocess.run([sys.executable, "-c", script], timeout=120)
    actor = psutil.Process(int(pid_file.read_text()))
    try:
        actor.wait(timeout=60)
    except psutil.TimeoutExpired:
        actor.kill()
        pytest.fail("the actor outlived the process that started it")


def test_gpus_the_cluster_lacks_are_refused_not_waited_for(cluster, monkeypatch):
    """--gpus-per-replica 1 on a cluster without GPUs: the actors waited for ever to be placed and
    the run hung without a word (a probe). Now it stops before any replica starts, naming the fix."""
    from blendserve_sgl.batch.dispatch import DispatchError

    assert ray.cluster_resources().get("GPU", 0) == 0
    with pytest.raises(DispatchError, match=r"--gpus-per-replica 1: the Ray cluster has 0 GPUs.*--gpus-per-replica 0"):
        run([items(2)[:1], items(2)[1:]], monkeypatch=monkeypatch, gpus=1.0)


def test_a_stopped_run_writes_what_its_unreturned_chunks_finished(cluster, monkeypatch):
    """Ctrl-C while a chunk waits for its slowest request: the chunk's finished requests are
    collected from the replica and handed over before the run stops (they were run again by the
    next run); the unfinished one is not, and nothing comes twice."""
    reqs = items(8)
    reqs[1] = Prepared(reqs[1].request, [SLOW, 2, 3], 4)  # chunk 0 of replica 0: r1 never finishes, r0, r2, r3 do
    reqs[4] = Prepared(reqs[4].request, [AFTER_SLOW, 2, 3], 4)  # chunk 1 returns once chunk 0's others are done

    def stop(replica, actor, done):
        if replica == 0:
            raise KeyboardInterrupt

    answered: dict = {}
    started: list = []  # the report never comes back: the engines' start time is told on its own
    with pytest.raises(KeyboardInterrupt):
        run([reqs], monkeypatch=monkeypatch, on_chunk=stop, answered=answered, on_started=started.append)
    assert sorted(answered) == ["r0", "r2", "r3", "r4", "r5", "r6", "r7"]
    assert len(started) == 1 and started[0] > 0


def test_a_run_says_it_is_done_before_its_replicas_stop(cluster, monkeypatch):
    """`on_done` comes once every request is handed over and while the replicas still answer: the
    run marks itself complete there, so a SIGTERM during the tens of seconds Ray takes to stop
    no longer turned a finished run into an interrupted one (exit 130, a probe)."""
    actors, seen = {}, []

    def done() -> None:
        seen.append(len(answered))
        for actor in actors.values():  # not stopped yet: each still answers
            assert ray.get(actor.capacity.remote(), timeout=60) == (4096, 64)

    answered: dict = {}
    reqs = items(12)
    run([reqs[:6], reqs[6:]], monkeypatch=monkeypatch, answered=answered,
        on_chunk=lambda r, actor, _: actors.setdefault(r, actor), on_done=done)
    assert seen == [12] and len(actors) == 2
