"""Run the real SGLang 0.5.23 engine on a CPU-only machine without a CPU build of sgl_kernel.

Two gaps separate a plain ``pip install`` of sglang 0.5.23 from a working CPU
engine (``SGLANG_USE_CPU_ENGINE=1``):

1. there is no CPU ``sgl_kernel`` on PyPI -- :mod:`.ops` implements, in plain
   torch, the few functions a dense model needs (see ``ops.PROVIDED_NAMES``);
2. the PyPI torchvision wheel (CUDA-built) fails to import on CPU torch --
   :mod:`.torchvision_fix` defines the two op schemas it trips over.

:func:`install` activates both through an import hook, so it costs nothing
until ``sgl_kernel`` or ``torchvision`` is actually imported, and only steps
in where no real ``sgl_kernel`` imports / torchvision's C extension does not
load.  SGLang starts its scheduler and detokenizer with multiprocessing
*spawn*, and those children import ``sgl_kernel`` while unpickling their
entry function -- before SGLang's plugin loader runs -- so the hook must be
installed at interpreter start in *every* process.  :func:`write_pth` drops a
``.pth`` file into the environment's site-packages that does exactly that::

    python -m kernels.cpu_fallback install-pth     # from the repository root
    python -m kernels.cpu_fallback status

This package imports only the standard library at import time (no torch), so
the ``.pth`` line adds a few milliseconds to interpreter start.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path

from . import _hook

__all__ = [
    "DISABLE_ENV",
    "PTH_NAME",
    "install",
    "is_installed",
    "pth_line",
    "remove_pth",
    "status",
    "uninstall",
    "write_pth",
]

#: File name of the activation file written into site-packages.
PTH_NAME = "blendserve_cpu_fallback.pth"
#: Set this environment variable to ``0`` to make :func:`install` a no-op.
DISABLE_ENV = "BLENDSERVE_CPU_FALLBACK"
#: Module name the ``.pth`` line loads this package under (independent of sys.path).
BOOT_MODULE_NAME = "_blendserve_cpu_fallback"


def _disabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off")


#: Device files of a GPU driver (NVIDIA, AMD ROCm): where one exists, SGLang runs on the GPU.
GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/proc/driver/nvidia/version", "/dev/kfd")


def _gpu_present() -> bool:
    return any(os.path.exists(p) for p in GPU_DEVICE_FILES)


def cpu_engine() -> bool:
    """True where SGLang runs its CPU engine: ``SGLANG_USE_CPU_ENGINE`` is set, or no GPU driver
    is present. Checked without importing torch (this runs at every interpreter start)."""
    flag = os.environ.get("SGLANG_USE_CPU_ENGINE", "").strip().lower()
    if flag in ("1", "true", "yes", "on"):
        return True
    return not _gpu_present()


def is_installed() -> bool:
    """True when the fallback import hook (from any copy of this package) is active."""
    return _hook.installed_finder() is not None


def install() -> bool:
    """Activate the sgl_kernel fallback and the torchvision fix in this process.

    Idempotent (also across several copies of this package, e.g. one loaded by
    the ``.pth`` file and one imported as ``kernels.cpu_fallback``).  Returns
    True if the hook is active afterwards.  The hook only serves the fallback
    ``sgl_kernel`` when no real one can be imported, and only patches
    torchvision when its C extension failed to load.  If a real ``sgl_kernel``
    is already imported, nothing is done.  Only for the CPU engine
    (:func:`cpu_engine`): on a machine with a GPU and without
    ``SGLANG_USE_CPU_ENGINE`` it does nothing.  ``BLENDSERVE_CPU_FALLBACK=0``
    disables it.
    """
    if _disabled_by_env() or not cpu_engine():
        return False  # never on a GPU: a real sgl_kernel serves it
    if is_installed():
        return True
    existing = sys.modules.get("sgl_kernel")
    if existing is not None and not getattr(existing, "__blendserve_cpu_fallback__", False):
        return False  # a real sgl_kernel is already in use
    sys.meta_path.insert(0, _hook.CpuFallbackFinder())
    return True


def uninstall() -> None:
    """Remove the import hook (already-imported modules are left as they are)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, _hook.MARKER, False)]


def status() -> dict:
    """Where this process stands: hook active, which sgl_kernel, torchvision schemas defined."""
    import importlib

    # The active hook may come from another copy of this package (the one the
    # .pth file loads as ``_blendserve_cpu_fallback``): ask that copy.
    finder = _hook.installed_finder()
    package = type(finder).__module__.rpartition(".")[0] if finder is not None else __name__
    torchvision_fix = importlib.import_module(package + ".torchvision_fix")

    module = sys.modules.get("sgl_kernel")
    if module is None:
        sgl_kernel = "not imported"
    elif getattr(module, "__blendserve_cpu_fallback__", False):
        sgl_kernel = "fallback"
    else:
        sgl_kernel = "real"
    return {
        "hook_installed": is_installed(),
        "sgl_kernel": sgl_kernel,
        "torchvision_schemas_defined": torchvision_fix.applied(),
        "disabled_by_env": _disabled_by_env(),
        "cpu_engine": cpu_engine(),
        "hook_package": package if finder is not None else None,
    }


def _package_dir() -> Path:
    return Path(__file__).resolve().parent


def pth_line(package_dir: os.PathLike[str] | str | None = None) -> str:
    """The single ``import`` line the ``.pth`` file holds.

    It loads this package from its absolute path under the private name
    ``_blendserve_cpu_fallback`` (so it neither needs the repository on
    ``sys.path`` nor collides with the unrelated PyPI package ``kernels``) and
    calls :func:`install`.  A missing directory is skipped silently.
    """
    pkg = Path(package_dir) if package_dir is not None else _package_dir()
    pkg_str = str(pkg.resolve())
    code = (
        "import os, sys, importlib.util as u\n"
        f"p = {pkg_str!r}\n"
        f"if {BOOT_MODULE_NAME!r} not in sys.modules and os.path.isfile(os.path.join(p, '__init__.py')):\n"
        f"    s = u.spec_from_file_location({BOOT_MODULE_NAME!r}, os.path.join(p, '__init__.py'),"
        " submodule_search_locations=[p])\n"
        "    m = u.module_from_spec(s)\n"
        "    sys.modules[s.name] = m\n"
        "    s.loader.exec_module(m)\n"
        "    m.install()\n"
    )
    return f"import sys; exec({code!r}, {{'__name__': {BOOT_MODULE_NAME + '_boot'!r}}})"


def _default_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def write_pth(site_packages: os.PathLike[str] | str | None = None) -> Path:
    """Write ``blendserve_cpu_fallback.pth`` into ``site_packages`` (default: this interpreter's).

    Every Python process started from that environment -- including SGLang's
    spawned scheduler and detokenizer -- then runs :func:`install` at startup.
    Returns the path written.
    """
    target_dir = Path(site_packages) if site_packages is not None else _default_site_packages()
    target = target_dir / PTH_NAME
    target.write_text(
        "# blendserve-sgl: pure-torch sgl_kernel fallback + torchvision fix for CPU-only SGLang.\n"
        "# Written by `python -m kernels.cpu_fallback install-pth`; delete to deactivate.\n"
        + pth_line()
        + "\n"
    )
    return target


def remove_pth(site_packages: os.PathLike[str] | str | None = None) -> bool:
    """Delete the ``.pth`` file written by :func:`write_pth`; True if one was removed."""
    target_dir = Path(site_packages) if site_packages is not None else _default_site_packages()
    target = target_dir / PTH_NAME
    if target.exists():
        target.unlink()
        return True
    return False
