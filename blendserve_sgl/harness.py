"""Running a real engine from a benchmark or a test: its own process group, a clean kill of
the whole group (SGLang's scheduler and detokenizer subprocesses included), and the CPU seconds
the engine's processes used. Plain standard library (psutil only for `engine_cpu_seconds`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent


def cpu_engine_env(**extra: str) -> dict:
    """The environment a CPU engine child runs with: this one, SGLang's CPU engine on, OpenMP's
    passive wait (kept if set), the project on `PYTHONPATH`, and `extra`."""
    return {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            "PYTHONPATH": str(ROOT), **extra}


def start(argv: list[str], *, log_path: str | os.PathLike | None = None, env: dict | None = None,
          **popen) -> subprocess.Popen:
    """`argv` in a new session (its own process group), output to `log_path` or discarded."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    try:
        return subprocess.Popen(argv, start_new_session=True, stdout=popen.pop("stdout", log),
                                stderr=popen.pop("stderr", subprocess.STDOUT),
                                env=dict(os.environ) if env is None else env, **popen)
    finally:
        if log_path:
            log.close()  # the child holds its own descriptor


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop `proc` and everything in its process group: `sig` first with `grace` seconds to exit
    (skipped for SIGKILL), then SIGKILL; waits for `proc`."""
    if proc.poll() is None and sig != signal.SIGKILL:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for _ in range(50):  # members of the group that outlive the leader
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def run(argv: list[str], timeout: float, log_path: Path | None = None, env: dict | None = None) -> int:
    """Run `argv` to completion in its own process group and kill the whole group afterwards
    (engine leftovers); -9 on timeout."""
    proc = start(argv, log_path=log_path, env=env)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f}s: killing process group {proc.pid}", file=sys.stderr)
        return -9
    except BaseException:
        print(f"  interrupted: killing process group {proc.pid}", file=sys.stderr)
        raise
    finally:
        kill_group(proc)


def engine_cpu_seconds() -> float:
    """User + system CPU seconds of this process and its children (the engine's scheduler and
    detokenizer) so far: less sensitive than wall time to what else the machine runs."""
    import psutil

    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total
