"""Nothing a run starts outlives it: the processes multiprocessing starts for `blendserve run`
(SGLang's scheduler and detokenizer, the reader's tokenizer workers) end once their parent has.

SGLang arms `PR_SET_PDEATHSIG` in its children only after their imports (30-60 s on a CPU), so a
driver killed while the engine started left a detokenizer of about 660 MB waiting on its socket
for ever (a probe). A spawned child imports the parent's main module before anything else (it
is `blendserve_sgl.cli`, or the `blendserve` script that imports it), and that import calls
`watch_if_spawned`: from then on a daemon thread ends the child once its parent is gone, and a
child whose parent died before it got there ends at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time

SPAWNED = "--multiprocessing-fork"  # in the command line of every process multiprocessing spawns
SPAWNER = "BLENDSERVE_SPAWNER_PID"  # the pid of the last process on the way here that imported this


def exit_with_the_parent(parent: int, seconds: float = 1.0) -> None:
    """Return never: end this process (exit status 1) once `parent` is no longer its parent."""
    while os.getppid() == parent:
        time.sleep(seconds)
    os._exit(1)


def watch() -> None:
    """Start the daemon thread of `exit_with_the_parent` for the current parent (once a process)."""
    if not any(t.name == "parent-watch" for t in threading.enumerate()):
        threading.Thread(target=exit_with_the_parent, args=(os.getppid(),), name="parent-watch", daemon=True).start()


def watch_if_spawned() -> bool:
    """In a process multiprocessing spawned, start the watch; says whether it is one. Every process
    that imports this (the driver too) names itself in `SPAWNER` for the processes it spawns: a
    child whose spawner died before it got here (SGLang's children take seconds to get here)
    has been handed to init, and ends at once instead of watching init."""
    spawned = SPAWNED in getattr(sys, "orig_argv", ())
    if spawned:
        spawner, parent = int(os.environ.get(SPAWNER) or 0), os.getppid()
        if spawner and parent == 1 and spawner != 1 and not _alive(spawner):
            os._exit(1)  # nothing will ever talk to this child again
        watch()
    os.environ[SPAWNER] = str(os.getpid())
    return spawned


def _alive(pid: int) -> bool:
    """The process exists and has not ended (a zombie, ended but not reaped, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not os.path.isdir("/proc")  # with /proc, a pid it does not list is gone
