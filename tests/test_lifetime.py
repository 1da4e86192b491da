"""Processes a run spawns end with it (`blendserve_sgl.lifetime`): a driver killed while SGLang's
children were still importing left a detokenizer running for ever (a probe)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PARENT = """
import multiprocessing as mp, pathlib, sys, time
import blendserve_sgl.cli  # what a `blendserve` driver's spawned children import first
def child(flag):
    pathlib.Path(flag).write_text("armed")  # the watch started when this module was imported
    time.sleep(600)
if __name__ == "__main__":
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=child, args=(sys.argv[1],))
    p.start()
    print(p.pid, flush=True)
    time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has ended; only its parent's reaping is left


@pytest.mark.parametrize("when", ["at once", "once armed"])
def test_a_spawned_child_ends_once_its_parent_is_killed(tmp_path, when):
    """Killed at once, the parent is usually gone before the child imported anything (the child
    then finds itself handed to init); once armed, the child's watch sees it go. Either way the
    child ends."""
    script, flag = tmp_path / "parent.py", tmp_path / "armed"
    script.write_text(PARENT)
    parent = subprocess.Popen([sys.executable, str(script), str(flag)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        armed_by = time.monotonic() + 300
        while when == "once armed" and not flag.exists() and time.monotonic() < armed_by:
            time.sleep(0.1)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 300  # a liveness bound, not a speed check: the watch polls every second
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(child), "the spawned child outlived its killed parent"
    finally:
        with_group = parent.pid
        try:
            os.killpg(with_group, signal.SIGKILL)
        except OSError:
            pass


def test_the_watch_starts_only_in_a_spawned_process():
    from blendserve_sgl import lifetime

    assert lifetime.watch_if_spawned() is False  # pytest itself is no spawned child
    out = subprocess.run([sys.executable, "-c", "import sys; sys.orig_argv.append('--multiprocessing-fork'); "
                          "from blendserve_sgl import lifetime; import threading; "
                          "print(lifetime.watch_if_spawned(), [t.name for t in threading.enumerate()])"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert out.stdout.strip() == "True ['MainThread', 'parent-watch']"
