"""The engine harness: a process group started, killed whole, its exit status, CPU seconds."""

import signal
import sys
import time

import psutil

from blendserve_sgl import harness

PARENT = ("import subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
          "print(c.pid, flush=True); time.sleep(120)")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_kill_group_stops_the_leader_and_its_children(tmp_path):
    log = tmp_path / "log"
    proc = harness.start([sys.executable, "-c", PARENT], log_path=log)
    for _ in range(600):
        if log.read_text().strip():
            break
        time.sleep(0.05)
    child = int(log.read_text())
    assert not _gone(child)
    harness.kill_group(proc, signal.SIGTERM, grace=5)
    assert proc.returncode is not None and _gone(proc.pid)
    for _ in range(100):
        if _gone(child):
            break
        time.sleep(0.05)
    assert _gone(child)


def test_run_returns_the_exit_status_and_kills_on_timeout(tmp_path):
    assert harness.run([sys.executable, "-c", "raise SystemExit(3)"], timeout=60) == 3
    assert harness.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=0.5,
                       log_path=tmp_path / "log") == -9


def test_engine_cpu_seconds_counts_this_process():
    before = harness.engine_cpu_seconds()
    sum(i * i for i in range(2_000_000))
    assert harness.engine_cpu_seconds() > before
