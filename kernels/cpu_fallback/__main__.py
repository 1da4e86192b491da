"""Command line: ``python -m kernels.cpu_fallback {install-pth,remove-pth,status,check}``.

* ``install-pth [--site-packages DIR]`` -- write the activation ``.pth`` file
  into the current interpreter's site-packages (or DIR).
* ``remove-pth [--site-packages DIR]`` -- delete it.
* ``status`` -- show whether the hook is active in a fresh interpreter
  (i.e. whether the ``.pth`` file works) and where the file lives.
* ``check`` -- import torchvision and the sglang modules that need
  ``sgl_kernel`` on CPU, in this process and in a multiprocessing *spawn*
  child (the way SGLang starts its scheduler); exit 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import queue as queue_module
import subprocess
import sys

if __package__ in (None, ""):
    sys.exit("run as: python -m kernels.cpu_fallback ...")

from . import PTH_NAME, _default_site_packages, install, remove_pth, write_pth
from ._probe import probe, probe_child


def _cmd_status(args) -> int:
    site = args.site_packages or str(_default_site_packages())
    pth = os.path.join(site, PTH_NAME)
    code = (
        "import json, sys; m = sys.modules.get('_blendserve_cpu_fallback');"
        "print(json.dumps({'pth_loaded': m is not None, 'hook_installed': bool(m and m.is_installed())}))"
    )
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    print(json.dumps({"pth_file": pth, "pth_exists": os.path.exists(pth)}))
    print(fresh.stdout.strip() or fresh.stderr.strip())
    return 0


def _cmd_check(args) -> int:
    install()  # harmless if the .pth already did it
    parent = probe()
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=probe_child, args=(queue,))
    child.start()
    child_result = None
    while child_result is None:
        try:
            child_result = queue.get(timeout=1.0)
        except queue_module.Empty:
            if not child.is_alive():
                child_result = {"error": f"spawned child exited with code {child.exitcode} before reporting"}
    child.join()
    print(json.dumps({"parent": parent, "spawned_child": child_result}, indent=2))
    ok = parent.get("sgl_kernel_fallback") is not None and "error" not in child_result
    if ok and not child_result.get("hook_before_imports"):
        print(
            "NOTE: the spawned child imported sglang through __main__'s hook only; "
            "SGLang's own children need the .pth file (install-pth).",
            file=sys.stderr,
        )
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kernels.cpu_fallback", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("install-pth", "remove-pth", "status"):
        p = sub.add_parser(name)
        p.add_argument("--site-packages", default=None, help="target directory (default: this interpreter's)")
    sub.add_parser("check")
    args = parser.parse_args(argv)
    if args.cmd == "install-pth":
        print(write_pth(args.site_packages))
        return 0
    if args.cmd == "remove-pth":
        print("removed" if remove_pth(args.site_packages) else "no .pth file found")
        return 0
    if args.cmd == "status":
        return _cmd_status(args)
    return _cmd_check(args)


if __name__ == "__main__":
    sys.exit(main())
