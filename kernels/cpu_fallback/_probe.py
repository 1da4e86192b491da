"""Import probe used by ``python -m kernels.cpu_fallback check`` (lives outside ``__main__`` so a
multiprocessing *spawn* child can unpickle ``probe_child``)."""

from __future__ import annotations

import os

from . import status

# Modules of sglang 0.5.23 that import sgl_kernel names at module level when
# SGLANG_USE_CPU_ENGINE=1 (see ops.py for the list of names).
SGLANG_MODULES = (
    "sglang.srt.mem_cache.allocation",
    "sglang.kernels.ops.kvcache.cache_move",
    "sglang.kernels.ops.speculative.eagle",
    "sglang.kernels.ops.speculative.multi_layer_eagle",
    "sglang.kernels.ops.speculative.spec_tree",
    "sglang.kernels.ops.speculative.cache_locs",
)


def probe() -> dict:
    """Import what the CPU engine needs; report which sgl_kernel was used."""
    import importlib

    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    result = {"pid": os.getpid(), "hook_before_imports": bool(status()["hook_installed"])}
    import torchvision

    result["torchvision"] = torchvision.__version__
    for name in SGLANG_MODULES:
        importlib.import_module(name)
    import sgl_kernel

    result["sgl_kernel_fallback"] = bool(getattr(sgl_kernel, "__blendserve_cpu_fallback__", False))
    result.update(status())
    return result


def probe_child(queue) -> None:
    try:
        queue.put(probe())
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put({"error": f"{type(exc).__name__}: {exc}"})
