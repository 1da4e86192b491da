"""Paced prefill: how many prefill tokens a step should carry.

One rule, shared by the simulator (an engine feature any policy can run with) and the SGLang
plugin (which sets it as the step's prefill-token budget and chunk size). A step's GEMM tokens
(the prefill plus one per decoding request) are sized so their compute time matches the step's
decode-attention time times the target density: the step then holds that density's balance
of compute and memory work. Never below the GEMM roofline's ridge (the tokens the step's
weight read makes free).
"""

from __future__ import annotations

import math

from .cost import CostModel


def weight_read_seconds(cost: CostModel) -> float:
    """Time to read every weight once at the effective bandwidth (a step's floor)."""
    return cost.model.num_params * cost.model.dtype_bytes / cost.hardware.effective_bandwidth


def ridge_tokens(cost: CostModel) -> float:
    """GEMM tokens whose compute time equals the weight read: below it a step is weight-bound."""
    return weight_read_seconds(cost) / cost.seconds_per_compute_token


def paced_prefill_tokens(cost: CostModel, kv_read_tokens: int, decoding: int, density: float) -> int | None:
    """Prefill tokens for a step whose decode attention reads `kv_read_tokens` KV tokens for
    `decoding` running requests, at target `density` (Comp / Mem of the waiting work).
    None when the density is unbounded (no memory work waits): no pacing."""
    if not math.isfinite(density):
        return None
    attn = kv_read_tokens * cost.kv_bytes_per_token / cost.hardware.effective_bandwidth
    gemm_tokens = max(ridge_tokens(cost), density * attn / cost.seconds_per_compute_token)
    return max(1, int(gemm_tokens) - decoding)
