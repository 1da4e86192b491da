"""Plain torch references: attention with its log-sum-exp, the LSE merge, multi-level cascade
attention on a paged KV cache, and per-request decode attention (what the cascade must equal).

Shapes: q [n, Hq, D]; KV caches token-major [slots, Hkv, D] (slot = page * page_size + offset)
or paged [pages, page_size, Hkv, D]; query head h reads KV head h // (Hq / Hkv) (GQA).
The log-sum-exp is natural (FlashInfer returns base 2: lse_2 = lse / ln 2). An empty KV segment
gives output 0 and LSE -inf, the neutral element of the merge.

    >>> import torch
    >>> q, k, v = torch.randn(1, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    >>> o_a, s_a = attention_with_lse(q, k[:6], v[:6], 8 ** -0.5)
    >>> o_b, s_b = attention_with_lse(q, k[6:], v[6:], 8 ** -0.5)
    >>> o, s = merge_state(o_a, s_a, o_b, s_b)
    >>> torch.allclose(o, attention_with_lse(q, k, v, 8 ** -0.5)[0], atol=1e-6)
    True
"""

from __future__ import annotations

import math

import torch

from .plan import CascadePlan

__all__ = ["attention_with_lse", "cascade_reference", "decode_attention_reference", "merge_state", "token_major"]


def token_major(cache: torch.Tensor) -> torch.Tensor:
    """[pages, page_size, H, D] or [slots, H, D] -> [slots, H, D] (a view)."""
    if cache.dim() == 4:
        return cache.reshape(-1, cache.shape[2], cache.shape[3])
    if cache.dim() != 3:
        raise ValueError(f"KV cache of shape {tuple(cache.shape)}: expected [slots, heads, head_dim] or "
                         "[pages, page_size, heads, head_dim]")
    return cache


def _gqa_ratio(num_qo_heads: int, num_kv_heads: int) -> int:
    if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
        raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return num_qo_heads // num_kv_heads


def attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sm_scale: float):
    """Every query of q [m, Hq, D] attends to all of k, v [t, Hkv, D] (no mask).
    Returns (o [m, Hq, Dv], lse [m, Hq]) in q's dtype; t = 0 gives (0, -inf)."""
    m, hq, _ = q.shape
    r = _gqa_ratio(hq, k.shape[1])
    if k.shape[0] == 0:
        return q.new_zeros(m, hq, v.shape[2]), q.new_full((m, hq), -math.inf)
    kh = k.repeat_interleave(r, dim=1)  # [t, Hq, D]
    vh = v.repeat_interleave(r, dim=1)
    scores = torch.einsum("mhd,thd->hmt", q, kh) * sm_scale  # [Hq, m, t]
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, m]
    o = torch.einsum("hmt,thd->mhd", torch.exp(scores - lse[..., None]), vh)
    return o, lse.transpose(0, 1)


def merge_state(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Attention over segments A and B from each one's (output, LSE): the weights are
    exp(lse_a - lse) and exp(lse_b - lse), lse = log(exp(lse_a) + exp(lse_b)). Two empty
    segments (both -inf) give (0, -inf)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    w_a = torch.exp(lse_a - safe)[..., None]
    w_b = torch.exp(lse_b - safe)[..., None]
    return o_a * w_a + o_b * w_b, lse


def cascade_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: CascadePlan,
                      sm_scale: float) -> torch.Tensor:
    """Multi-level cascade attention, group by group: q [n, Hq, D] in batch order -> o [n, Hq, Dv]
    (rows the plan does not hold stay 0)."""
    plan.check()
    k, v = token_major(k_cache), token_major(v_cache)
    n, hq, _ = q.shape
    if plan.num_requests and n <= plan.order.max():
        raise ValueError(f"q has {n} rows; the plan reads row {plan.order.max()}")
    o = q.new_zeros(n, hq, v.shape[2])
    lse = q.new_full((n, hq), -math.inf)
    order = torch.as_tensor(plan.order)
    for lv in plan.levels:
        for g in range(lv.num_groups):
            rows = order[lv.qo_indptr[g]:lv.qo_indptr[g + 1]]
            slots = torch.as_tensor(lv.group_slots(g, plan.page_size))
            o_g, lse_g = attention_with_lse(q[rows], k[slots], v[slots], sm_scale)
            o[rows], lse[rows] = merge_state(o[rows], lse[rows], o_g, lse_g)
    return o


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               request_slots: list, sm_scale: float) -> torch.Tensor:
    """Plain decode attention, request by request: query i attends to the tokens in slots
    `request_slots[i]` with one softmax (no LSE, no merge)."""
    k, v = token_major(k_cache), token_major(v_cache)
    n, hq, _ = q.shape
    r = _gqa_ratio(hq, k.shape[1])
    out = q.new_zeros(n, hq, v.shape[2])
    for i, slots in enumerate(request_slots):
        slots = torch.as_tensor(slots, dtype=torch.long)
        if len(slots) == 0:
            continue
        ki = k[slots].repeat_interleave(r, dim=1)  # [t, Hq, D]
        vi = v[slots].repeat_interleave(r, dim=1)
        p = torch.softmax(torch.einsum("hd,thd->ht", q[i], ki) * sm_scale, dim=-1)
        out[i] = torch.einsum("ht,thd->hd", p, vi)
    return out
