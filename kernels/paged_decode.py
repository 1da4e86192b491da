"""Paged decode attention in Triton, split over the KV length (flash-decoding).

One query per request, grouped-query heads, the KV cache in pages: k_cache, v_cache
[pages, page_size, H_kv, D], `page_table` [B, max_pages] (int32, the request's pages in order),
`seq_lens` [B] (int32). Each program takes one request, one KV head (all of its H / H_kv query
heads) and one stretch of the request's tokens, and writes a partial output with its
log-sum-exp; a second kernel merges the stretches. Splitting the length keeps every
multiprocessor reading when the batch is small, which a kernel that parallelizes over requests
and heads only cannot.

The plain reference is `kernels.cascade.reference.decode_attention_reference` (the tests compare
against it in Triton's interpreter, `TRITON_INTERPRET=1`, on a CPU). `bench/gpu_evidence.py` times
this kernel as the paged layout of an engine's decode attention.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

__all__ = ["paged_decode_attention", "num_splits"]


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, lse_ptr, sm_scale, max_pages, tokens_per_split,
                    stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                    H_KV: tl.constexpr, GROUP: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, seq_len)

    g = tl.arange(0, BLOCK_H)  # the group's query heads, padded to a tensor-core tile
    d = tl.arange(0, D)
    heads = kvh * GROUP + g
    q = tl.load(q_ptr + (b * H_KV * GROUP + heads)[:, None] * D + d[None, :], mask=(g < GROUP)[:, None], other=0.0)
    m_i = tl.full([BLOCK_H], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, D], tl.float32)
    for block in range(start, end, BLOCK_N):
        t = block + tl.arange(0, BLOCK_N)
        valid = t < end
        page = tl.load(table_ptr + b.to(tl.int64) * max_pages + t // PAGE, mask=valid, other=0).to(tl.int64)
        off = (t % PAGE).to(tl.int64)
        k = tl.load(k_ptr + page[:, None] * stride_kp + off[:, None] * stride_kt + kvh * stride_kh + d[None, :],
                    mask=valid[:, None], other=0.0)
        v = tl.load(v_ptr + page[:, None] * stride_vp + off[:, None] * stride_vt + kvh * stride_vh + d[None, :],
                    mask=valid[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale  # [BLOCK_H, BLOCK_N], fp32
        s = tl.where(valid[None, :], s, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    row = (b * H_KV * GROUP + heads) * SPLITS + split
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), -float("inf"))
    tl.store(out_ptr + row[:, None] * D + d[None, :], out, mask=(g < GROUP)[:, None])
    tl.store(lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _merge_kernel(out_ptr, lse_ptr, res_ptr, SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr, D: tl.constexpr):
    """One (request, query head) row: the stretches' outputs weighted by exp(lse - max); an empty
    stretch has lse -inf (weight 0), an empty request gives zeros."""
    row = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    lse = tl.load(lse_ptr + row * SPLITS + sp, mask=sp < SPLITS, other=-float("inf"))
    top = tl.max(lse, axis=0)
    w = tl.exp(lse - tl.where(top == -float("inf"), 0.0, top))
    total = tl.sum(w, axis=0)
    o = tl.load(out_ptr + (row * SPLITS + sp)[:, None] * D + d[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(res_ptr + row * D + d, res.to(res_ptr.dtype.element_ty))


def num_splits(batch: int, kv_heads: int, max_len: int, block_n: int, programs: int) -> int:
    """Stretches per request: enough programs to fill `programs` slots, none shorter than a block."""
    want = max(1, math.ceil(programs / max(1, batch * kv_heads)))
    return max(1, min(want, math.ceil(max(1, max_len) / block_n)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_table: torch.Tensor,
                           seq_lens: torch.Tensor, sm_scale: float, max_len: int | None = None, splits: int | None = None,
                           block_n: int = 64) -> torch.Tensor:
    """q [B, H, D] over the paged caches; returns [B, H, D] in q's dtype. `max_len` (the longest
    request, default read from `seq_lens`: a host sync, so pass it under CUDA graph capture) and
    `splits` (default: about four programs per multiprocessor) set the split; a request with
    length 0 gets zeros."""
    bsz, hq, dim = q.shape
    _, page, hkv, _ = k_cache.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads are not a multiple of {hkv} KV heads")
    if dim & (dim - 1) or page & (page - 1):
        raise ValueError(f"head dim {dim} and page size {page} must be powers of two")
    group = hq // hkv
    max_len = int(seq_lens.max()) if max_len is None else max_len
    block_n = max(page, block_n, 16)  # tensor-core tiles: at least 16 keys
    if splits is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
        splits = num_splits(bsz, hkv, max_len, block_n, 4 * sms)
    per = math.ceil(max(1, max_len) / splits / block_n) * block_n  # whole blocks per stretch
    out = torch.empty(bsz, hq, splits, dim, dtype=torch.float32, device=q.device)
    lse = torch.empty(bsz, hq, splits, dtype=torch.float32, device=q.device)
    _partial_kernel[(bsz, hkv, splits)](
        q.contiguous(), k_cache, v_cache, page_table, seq_lens, out, lse, float(sm_scale), page_table.shape[1], per,
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        H_KV=hkv, GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), D=dim, PAGE=page, BLOCK_N=block_n,
        SPLITS=splits)
    res = torch.empty(bsz, hq, dim, dtype=q.dtype, device=q.device)
    _merge_kernel[(bsz * hq,)](out, lse, res, SPLITS=splits, SPLITS_PAD=max(2, triton.next_power_of_2(splits)), D=dim)
    return res
