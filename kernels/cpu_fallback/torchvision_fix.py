"""Let the CUDA-built PyPI torchvision import on a CPU-only torch.

``torchvision==0.28.0`` from PyPI is built against CUDA torch.  On the CPU
torch wheel its C extension (``torchvision/_C.so``) fails to load, so
``torchvision.extension._has_ops()`` is False and no ``torchvision::*``
operator is registered.  Most of ``torchvision/_meta_registrations.py`` is
guarded by ``_has_ops()``, but its ``torch.library.register_fake`` calls for
``torchvision::nms`` and ``torchvision::qnms`` are not, and they raise
``RuntimeError: operator torchvision::nms does not exist`` -- which breaks
``import torchvision`` and with it ``transformers`` and ``sglang``.

The fix: when (and only when) the C extension did not load, define the two
operator *schemas* (no kernels) in a ``torchvision`` library fragment before
``_meta_registrations`` runs.  The fake/meta registrations then attach to
them; calling the ops still fails, exactly as it would with ``_has_ops()``
False (``torchvision.ops.nms`` checks ``_assert_has_ops()`` first).
"""

from __future__ import annotations

# Schemas of the ops whose fake registrations are unguarded in torchvision 0.28.
_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}

# The torch.library.Library object must stay alive for its definitions to persist.
_LIBRARY = None
_APPLIED: list[str] = []


def _op_exists(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
    except RuntimeError:
        return False
    return True


def define_torchvision_schemas() -> list[str]:
    """Define the missing ``torchvision::nms``/``qnms`` schemas; return the names defined.

    Only call this when torchvision's C extension cannot load: if it loads
    afterwards, its own definitions would clash with these.  Ops that already
    exist are left alone, so repeated calls are harmless.
    """
    global _LIBRARY
    import torch

    defined = []
    for name, schema in _SCHEMAS.items():
        if _op_exists(name):
            continue
        if _LIBRARY is None:
            _LIBRARY = torch.library.Library("torchvision", "FRAGMENT")
        _LIBRARY.define(schema)
        defined.append(name)
        _APPLIED.append(name)
    return defined


def after_torchvision_extension(extension_module) -> None:
    """Run right after ``torchvision.extension`` executed (before ``_meta_registrations``).

    Defines the schemas only if the C extension failed to load.
    """
    has_ops = getattr(extension_module, "_has_ops", None)
    if has_ops is not None and has_ops():
        return
    define_torchvision_schemas()


def applied() -> list[str]:
    """Names of the schemas this process defined (empty when the fix was not needed)."""
    return list(_APPLIED)
