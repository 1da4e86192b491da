"""Cascade decode attention on CUDA through `flashinfer.MultiLevelCascadeAttentionWrapper`.

The plan's arrays are FlashInfer's layout as they are (int32, one set per level); the query rows
are put in plan order before the kernel and back after it. Needs flashinfer-python==0.7.2 and a
CUDA device; nothing here runs on CPU (the tests marked `gpu` exercise it against
`cascade_reference`).
"""

from __future__ import annotations

import torch

from .kernel import CascadeAttention
from .plan import CascadePlan

WORKSPACE_BYTES = 128 * 1024 * 1024  # FlashInfer's recommended float workspace


class FlashInferCascade(CascadeAttention):
    def __init__(self, device="cuda", workspace: torch.Tensor | None = None) -> None:
        try:
            import flashinfer
        except ImportError as exc:
            raise RuntimeError("the cascade attention GPU path needs flashinfer: pip install flashinfer-python==0.7.2 "
                               f"(import failed: {exc})") from exc
        self._flashinfer = flashinfer
        self.device = torch.device(device)
        self._workspace = (workspace if workspace is not None
                           else torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=self.device))
        self._wrapper = None
        self._num_levels = 0
        self._order = None
        self._page_size = 1
        self._heads = (0, 0, 0)

    def plan(self, plan: CascadePlan, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, sm_scale: float,
             q_dtype=torch.float16, kv_dtype=None) -> None:
        if self._wrapper is None or self._num_levels != plan.num_levels:
            self._wrapper = self._flashinfer.MultiLevelCascadeAttentionWrapper(plan.num_levels, self._workspace, "NHD")
            self._num_levels = plan.num_levels

        def dev(a):
            return torch.as_tensor(a, dtype=torch.int32).to(self.device, non_blocking=True)

        self._wrapper.plan(
            [dev(lv.qo_indptr) for lv in plan.levels],
            [dev(lv.kv_indptr) for lv in plan.levels],
            [dev(lv.kv_indices) for lv in plan.levels],
            [dev(lv.last_page_len) for lv in plan.levels],
            num_qo_heads, num_kv_heads, head_dim, plan.page_size,
            causal=False, sm_scale=sm_scale, q_data_type=q_dtype, kv_data_type=kv_dtype or q_dtype,
        )
        self._order = torch.as_tensor(plan.order, dtype=torch.long).to(self.device, non_blocking=True)
        self._page_size = plan.page_size
        self._heads = (num_qo_heads, num_kv_heads, head_dim)

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor | None = None):
        if self._wrapper is None:
            raise RuntimeError("FlashInferCascade.run before plan(): plan the batch first")

        def paged(cache):
            if cache.dim() == 3:
                return cache.view(-1, self._page_size, cache.shape[1], cache.shape[2])
            return cache

        o = self._wrapper.run(q[self._order].contiguous(), (paged(k_cache), paged(v_cache)))
        if out is None:
            out = q.new_zeros(q.shape[0], q.shape[1], o.shape[2])
        out[self._order] = o.to(out.dtype)
        return out
