"""Shared helpers for benchmarks: machine description and result files."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shlex
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from blendserve_sgl.machine import describe

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    return describe()


def command() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"command": command(), "machine": machine(), **payload}, indent=2) + "\n")
    return path


def table(rows: list[tuple], header: tuple) -> str:
    cols = list(zip(*([header] + [tuple(str(c) for c in r) for r in rows])))
    widths = [max(len(c) for c in col) for col in cols]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*(str(c) for c in r)) for r in rows]
    return "\n".join(lines)


def post_json(url: str, body: dict, timeout: float = 600) -> dict:
    """POST `body` as JSON to a server under test; its JSON answer."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_up(url: str, proc, limit: float = 300) -> None:
    """Until the server at `url` (process `proc`) answers /health; RuntimeError if it exits or never does."""
    end = time.time() + limit
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError("the server did not come up")


def head_commit() -> str | None:
    """This tree's commit, short (None outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=RESULTS.parent.parent, capture_output=True,
                          text=True).stdout.strip() or None


def codes(stack: contextlib.ExitStack, baseline: str, tmp: Path) -> dict[str, Path]:
    """{"this": this tree, REV: a worktree of REV} for each commit of `baseline` (comma-separated),
    each worktree removed when `stack` closes: the code versions a benchmark runs side by side."""
    out = {"this": RESULTS.parent.parent}
    for rev in filter(None, baseline.split(",")):
        out[rev] = stack.enter_context(code_at(rev, tmp / f"at-{rev}"))
    return out


@contextlib.contextmanager
def code_at(rev: str, folder: Path):
    """A git worktree of commit `rev` at `folder`, removed afterwards: an earlier version of the
    code to run side by side with this one."""
    root = RESULTS.parent.parent
    subprocess.run(["git", "worktree", "add", "-q", "--detach", str(folder), rev], cwd=root, check=True)
    try:
        yield folder
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(folder)], cwd=root)
