"""The interface every cascade attention path implements: plan once per batch, run per layer.

`CpuCascade` (kernels/cascade/cpu.py, torch on CPU) and `FlashInferCascade`
(kernels/cascade/gpu.py, FlashInfer on CUDA) take the same `CascadePlan` and the same tensors;
`make_kernel(device)` picks one. Tests hold both to `cascade_reference`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from .plan import CascadePlan


class CascadeAttention(ABC):
    """Decode attention of a batch through a cascade plan.

    `plan(...)` prepares a batch (no KV is read); `run(q, k_cache, v_cache, out)` computes one
    layer: q [batch, Hq, D] in batch order; k_cache, v_cache token-major [slots, Hkv, D] or
    paged [pages, page_size, Hkv, D]; writes o [batch, Hq, Dv] rows of the plan's requests into
    `out` (allocated when None; other rows are left as they are) and returns it.
    """

    @abstractmethod
    def plan(self, plan: CascadePlan, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, sm_scale: float,
             q_dtype=None, kv_dtype=None) -> None:
        ...

    @abstractmethod
    def run(self, q, k_cache, v_cache, out=None):
        ...


def make_kernel(device) -> CascadeAttention:
    """FlashInfer on a CUDA device, the batched torch path elsewhere."""
    if str(device).startswith("cuda"):
        from .gpu import FlashInferCascade

        return FlashInferCascade(device)
    from .cpu import CpuCascade

    return CpuCascade()
