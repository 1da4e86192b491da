"""Cascade decode attention on CPU: one batched matrix product per shared group.

A group of m requests sharing t prefix tokens attends to them in one product: its m x r query
rows per KV head (r = Hq / Hkv) against the t keys, [Hkv, m r, D] x [Hkv, D, t], so the prefix's
K and V are gathered and read once per group instead of once per request. Groups of one request
(the suffixes) are batched too: bucketed by length, padded, masked, one product per bucket.
Every part returns (output, natural LSE) in float32 into its level's buffers; the levels are
merged by log-sum-exp at the end (weights exp(lse_l - max_l lse_l)); the result is cast to q's
dtype.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kernel import CascadeAttention
from .plan import CascadePlan
from .reference import token_major

# a bucket of single-request groups is padded to its longest member: start a new bucket when a
# member is longer than twice the bucket's shortest plus this many tokens
BUCKET_SLACK_TOKENS = 32
# at most this many (padded) tokens are gathered per bucket product
BUCKET_MAX_TOKENS = 1 << 16
# a shared group's queries are split so one score matrix holds at most this many floats (128 MiB)
SCORES_MAX_FLOATS = 1 << 25


class CpuCascade(CascadeAttention):
    def __init__(self) -> None:
        self._groups: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (level, batch rows [m >= 2], slots [t])
        self._buckets: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # level, rows, slots, valid
        self._rows = torch.zeros(0, dtype=torch.long)
        self._levels = 0
        self._scale = 1.0
        self._space: dict[str, torch.Tensor] = {}  # reused buffers: fresh large tensors cost page faults

    def _buffer(self, name: str, shape: tuple, dtype=torch.float32) -> torch.Tensor:
        size = math.prod(shape)
        buf = self._space.get(name)
        if buf is None or buf.numel() < size or buf.dtype != dtype:
            buf = self._space[name] = torch.empty(size, dtype=dtype)
        return buf[:size].view(shape)

    def _gather(self, name: str, cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """cache[slots] as float32 [len(slots), H, D], in a reused buffer."""
        shape = (len(slots), cache.shape[1], cache.shape[2])
        if cache.dtype == torch.float32:
            return torch.index_select(cache, 0, slots, out=self._buffer(name, shape))
        raw = torch.index_select(cache, 0, slots, out=self._buffer(name + "-raw", shape, cache.dtype))
        return self._buffer(name, shape).copy_(raw)

    def plan(self, plan: CascadePlan, *, num_qo_heads: int, num_kv_heads: int, head_dim: int, sm_scale: float,
             q_dtype=None, kv_dtype=None) -> None:
        if num_kv_heads < 1 or num_qo_heads % num_kv_heads:
            raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
        self._scale = float(sm_scale)
        order = plan.order.astype(np.int64)
        groups, buckets = [], []
        for i, lv in enumerate(plan.levels):
            qo, kv = lv.qo_indptr, lv.kv_indptr
            solos = []  # (batch row, slots)
            for g in np.flatnonzero((np.diff(kv) > 0) & (np.diff(qo) > 0)):
                slots = lv.group_slots(int(g), plan.page_size)
                rows = order[qo[g]:qo[g + 1]]
                if len(rows) == 1:
                    solos.append((int(rows[0]), slots))
                else:
                    groups.append((i, torch.from_numpy(rows.copy()), torch.from_numpy(slots)))
            buckets += [(i, *b) for b in _buckets(solos)]
        self._groups, self._buckets = groups, buckets
        self._rows = torch.from_numpy(order.copy())
        self._levels = plan.num_levels

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor | None = None):
        k, v = token_major(k_cache), token_major(v_cache)
        n, hq, d = q.shape
        hkv, dv = k.shape[1], v.shape[2]
        r = hq // hkv
        if out is None:
            out = q.new_zeros(n, hq, dv)
        # each level's (output, LSE) per batch row; a request has at most one part per level
        o_lv = self._buffer("o", (self._levels, n, hq, dv)).zero_()
        lse_lv = self._buffer("lse", (self._levels, n, hq)).fill_(-math.inf)
        qs = q.float() * self._scale
        for level, rows, slots in self._groups:
            kg = self._gather("k", k, slots).permute(1, 2, 0)  # [Hkv, D, t] (a view of [t, Hkv, D])
            vg = self._gather("v", v, slots).permute(1, 0, 2)  # [Hkv, t, Dv]
            step = max(1, SCORES_MAX_FLOATS // (hq * len(slots)))
            for c in range(0, len(rows), step):
                part = rows[c:c + step]
                m = len(part)
                qg = qs[part].view(m, hkv, r, d).transpose(0, 1).reshape(hkv, m * r, d)
                scores = torch.bmm(qg, kg, out=self._buffer("scores", (hkv, m * r, len(slots))))
                og, g_lse = _softmax_times_v(scores, vg)
                o_lv[level].index_copy_(0, part, og.view(hkv, m, r, dv).transpose(0, 1).reshape(m, hq, dv))
                lse_lv[level].index_copy_(0, part, g_lse.view(hkv, m, r).transpose(0, 1).reshape(m, hq))
        for level, rows, slots, valid in self._buckets:
            b, t = slots.shape
            kb = self._gather("k", k, slots.view(-1)).view(b, t, hkv, d)
            vb = self._gather("v", v, slots.view(-1)).view(b, t, hkv, dv)
            qb = qs.index_select(0, rows).view(b, hkv, r, d)
            mask = (~valid)[:, None, :]
            ob = torch.empty(b, hkv, r, dv)
            b_lse = torch.empty(b, hkv, r)
            for h in range(hkv):  # per KV head: [b, r, D] x [b, D, T]; no copy of the gathered KV
                scores = torch.bmm(qb[:, h], kb[:, :, h].transpose(1, 2), out=self._buffer("scores", (b, r, t)))
                scores.masked_fill_(mask, -math.inf)
                ob[:, h], b_lse[:, h] = _softmax_times_v(scores, vb[:, :, h])
            o_lv[level].index_copy_(0, rows, ob.view(b, hq, dv))
            lse_lv[level].index_copy_(0, rows, b_lse.view(b, hq))
        top = lse_lv.amax(dim=0)
        weights = torch.exp(lse_lv - torch.where(torch.isinf(top), 0.0, top))  # [levels, n, Hq]; 0 for empty
        total = weights.sum(dim=0)
        merged = o_lv.mul_(weights[..., None]).sum(dim=0).div_(torch.where(total > 0, total, 1.0)[..., None])
        out[self._rows] = merged[self._rows].to(out.dtype)
        return out


def _softmax_times_v(scores: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v and logsumexp(scores) over the last axis; scores [B, m, t] is overwritten.
    Rows must have at least one finite score."""
    top = scores.amax(dim=-1, keepdim=True)
    weights = scores.sub_(top).exp_()
    total = weights.sum(dim=-1, keepdim=True)
    return torch.bmm(weights, v).div_(total), (top + total.log()).squeeze(-1)


def _buckets(solos: list[tuple[int, np.ndarray]]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One level's single-request parts grouped by length: (rows [b], slots [b, T] padded with
    slot 0, valid [b, T])."""
    solos = sorted(solos, key=lambda s: len(s[1]))
    buckets, current = [], []

    def flush():
        if current:
            t = len(current[-1][1])
            slots = np.zeros((len(current), t), dtype=np.int64)
            valid = np.zeros((len(current), t), dtype=bool)
            for i, (_, sl) in enumerate(current):
                slots[i, :len(sl)] = sl
                valid[i, :len(sl)] = True
            rows = torch.tensor([row for row, _ in current], dtype=torch.long)
            buckets.append((rows, torch.from_numpy(slots), torch.from_numpy(valid)))

    for row, slots in solos:
        if current and (len(slots) > 2 * len(current[0][1]) + BUCKET_SLACK_TOKENS
                        or (len(current) + 1) * len(slots) > BUCKET_MAX_TOKENS):
            flush()
            current = []
        current.append((row, slots))
    flush()
    return buckets
