"""Paced prefill (`core/pacing.py`) against hand counts: the ridge (weight read + engine step
overhead over one GEMM token's compute), the density-scaled attention term, and no pacing while
nothing decodes or no memory work waits."""

import math
from dataclasses import replace

import pytest

from blendserve_sgl.core.cost import CostModel
from blendserve_sgl.core.pacing import paced_prefill_tokens, ridge_tokens, weight_read_seconds

COST = CostModel.from_names("llama-3.1-8b", "a100")


def _by_hand(cost: CostModel) -> tuple[float, float, float]:
    """(seconds per GEMM token, seconds per KV token read, weight read) from the specs alone."""
    m, h = cost.model, cost.hardware
    per_token = 2.0 * m.gemm_params / (h.flops * h.flops_efficiency)
    per_kv = m.num_layers * 2 * m.num_kv_heads * m.head_dim * m.dtype_bytes / (h.mem_bandwidth * h.bandwidth_efficiency)
    weights = m.num_params * m.dtype_bytes / (h.mem_bandwidth * h.bandwidth_efficiency)
    return per_token, per_kv, weights


def test_ridge_is_the_fixed_step_cost_in_gemm_tokens():
    per_token, _, weights = _by_hand(COST)
    assert weight_read_seconds(COST) == pytest.approx(weights, rel=1e-12)
    assert ridge_tokens(COST) == pytest.approx(weights / per_token, rel=1e-12)
    slow = replace(COST, hardware=replace(COST.hardware, step_overhead_s=0.004))
    assert ridge_tokens(slow) == pytest.approx((weights + 0.004) / per_token, rel=1e-12)


def test_paced_tokens_follow_the_attention_term_above_the_ridge():
    per_token, per_kv, weights = _by_hand(COST)
    # a small decode batch: the ridge binds (less its decode tokens, which share the GEMM)
    assert paced_prefill_tokens(COST, 1_000, 8, 1.0) == int(weights / per_token) - 8
    # a large one at density 1.3: compute matches 1.3 x the attention time
    kv, dec = 300_000, 64
    want = int(1.3 * kv * per_kv / per_token) - dec
    assert want > ridge_tokens(COST)
    assert paced_prefill_tokens(COST, kv, dec, 1.3) == want
    # a step overhead raises the floor only
    slow = replace(COST, hardware=replace(COST.hardware, step_overhead_s=0.05))
    assert paced_prefill_tokens(slow, 1_000, 8, 1.0) == int((weights + 0.05) / per_token) - 8
    assert paced_prefill_tokens(slow, kv, dec, 1.3) == max(want, int((weights + 0.05) / per_token) - dec)


def test_no_pacing_while_nothing_decodes_or_no_memory_work_waits():
    assert paced_prefill_tokens(COST, 0, 0, 1.0) is None
    assert paced_prefill_tokens(COST, 5_000, 0, 1.0) is None  # prompts held, nothing decoding
    assert paced_prefill_tokens(COST, 5_000, 3, math.inf) is None
    assert paced_prefill_tokens(COST, 5_000, 3, 1.0) >= 1
