"""Import hook behind :func:`install`: serves ``sgl_kernel`` and patches torchvision on import.

Nothing here imports torch; the hook only acts when the two modules it
watches are imported:

* ``sgl_kernel`` -- if no other finder on ``sys.meta_path`` can find a real
  ``sgl_kernel``, a module built from :mod:`.ops` is returned.  If a real one
  is found but raises while importing (e.g. a CUDA build on a machine without
  CUDA libraries), the same module object is filled with the fallback instead.
* ``torchvision.extension`` -- after it ran, the missing ``torchvision::nms`` /
  ``qnms`` schemas are defined if the C extension failed to load
  (:mod:`.torchvision_fix`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

SHIM_ORIGIN = "blendserve-sgl pure-torch CPU fallback"
MARKER = "_blendserve_cpu_fallback"

# Filled by the finder: "shim", "shim-after-error" or "real" once sgl_kernel was imported.
STATE: dict[str, str] = {}


def _fill_shim_module(module) -> None:
    """Give ``module`` the fallback functions and a helpful ``__getattr__``."""
    from . import ops

    for name in ops.PROVIDED_NAMES:
        setattr(module, name, getattr(ops, name))
    module.__doc__ = (
        "Pure-torch stand-in for sgl_kernel (blendserve-sgl kernels/cpu_fallback). "
        f"Provides: {', '.join(ops.PROVIDED_NAMES)}."
    )
    module.__blendserve_cpu_fallback__ = True
    module.__all__ = list(ops.PROVIDED_NAMES)

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(
            f"sgl_kernel.{name} is not provided by the blendserve-sgl pure-torch CPU fallback "
            f"(it provides {', '.join(ops.PROVIDED_NAMES)})"
        )

    module.__getattr__ = __getattr__


class _ShimLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # default module creation

    def exec_module(self, module) -> None:
        _fill_shim_module(module)
        STATE["sgl_kernel"] = "shim"


class _DelegatingLoader(importlib.abc.Loader):
    """Wraps a real loader; runs ``after(module)`` or ``on_error(module, exc)`` around it."""

    def __init__(self, real, after=None, on_error=None):
        self._real = real
        self._after = after
        self._on_error = on_error

    def create_module(self, spec):
        return self._real.create_module(spec)

    def exec_module(self, module) -> None:
        try:
            self._real.exec_module(module)
        except Exception as exc:
            if self._on_error is None:
                raise
            self._on_error(module, exc)
            return
        if self._after is not None:
            self._after(module)

    def __getattr__(self, name):  # get_source, get_filename, is_package, ...
        return getattr(self._real, name)


def _real_sgl_kernel_ok(module) -> None:
    STATE["sgl_kernel"] = "real"


def _real_sgl_kernel_failed(module, exc: Exception) -> None:
    logger.warning(
        "real sgl_kernel failed to import (%s: %s); using the pure-torch CPU fallback",
        type(exc).__name__,
        exc,
    )
    module.__path__ = []  # keep submodule imports away from the broken package
    _fill_shim_module(module)
    STATE["sgl_kernel"] = "shim-after-error"


def _after_torchvision_extension(module) -> None:
    from . import torchvision_fix

    torchvision_fix.after_torchvision_extension(module)


class CpuFallbackFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder installed at the front of ``sys.meta_path`` by ``install()``."""

    _blendserve_cpu_fallback = True  # recognised across copies of this module

    def _find_elsewhere(self, fullname, path, target):
        for finder in list(sys.meta_path):
            if getattr(finder, MARKER, False):
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "sgl_kernel":
            real = self._find_elsewhere(fullname, path, target)
            if real is None or real.loader is None:
                return importlib.util.spec_from_loader(fullname, _ShimLoader(), origin=SHIM_ORIGIN)
            real.loader = _DelegatingLoader(
                real.loader, after=_real_sgl_kernel_ok, on_error=_real_sgl_kernel_failed
            )
            return real
        if fullname == "torchvision.extension":
            real = self._find_elsewhere(fullname, path, target)
            if real is None or real.loader is None:
                return None
            real.loader = _DelegatingLoader(real.loader, after=_after_torchvision_extension)
            return real
        return None


def installed_finder():
    """The fallback finder on ``sys.meta_path`` (from any copy of this package), or None."""
    for finder in sys.meta_path:
        if getattr(finder, MARKER, False):
            return finder
    return None
