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
    """The earlier rule (`memory_side="kv"`): compute matches density x the KV read, the weight
    read only as the floor."""
    per_token, per_kv, weights = _by_hand(COST)
    # a small decode batch: the ridge binds (less its decode tokens, which share the GEMM)
    assert paced_prefill_tokens(COST, 1_000, 8, 1.0, "kv") == int(weights / per_token) - 8
    # a large one at density 1.3: compute matches 1.3 x the attention time
    kv, dec = 300_000, 64
    want = int(1.3 * kv * per_kv / per_token) - dec
    assert want > ridge_tokens(COST)
    assert paced_prefill_tokens(COST, kv, dec, 1.3, "kv") == want
    # a step overhead raises the floor only
    slow = replace(COST, hardware=replace(COST.hardware, step_overhead_s=0.05))
    assert paced_prefill_tokens(slow, 1_000, 8, 1.0, "kv") == int((weights + 0.05) / per_token) - 8
    assert paced_prefill_tokens(slow, kv, dec, 1.3, "kv") == max(want, int((weights + 0.05) / per_token) - dec)
    with pytest.raises(ValueError, match="memory_side must be one of kv\\+weights, kv"):
        paced_prefill_tokens(COST, kv, dec, 1.3, "weights")


def test_shipped_pacing_matches_the_steps_whole_memory_side():
    """The shipped rule (`MEMORY_SIDES[0]`, the default): compute matches density x (KV read +
    weight read + step overhead), so a small decode batch of compute-dense waiting work gets
    density x that, not the ridge; at density 1 or below the ridge binds."""
    from blendserve_sgl.core.pacing import MEMORY_SIDES

    assert MEMORY_SIDES[0] == "kv+weights"
    per_token, per_kv, weights = _by_hand(COST)
    kv, dec = 40_000, 16
    by_hand = int(3.0 * (kv * per_kv + weights) / per_token) - dec
    assert paced_prefill_tokens(COST, kv, dec, 3.0) == by_hand
    assert by_hand > 2 * paced_prefill_tokens(COST, kv, dec, 3.0, "kv")  # the earlier rule: the ridge binds here
    assert paced_prefill_tokens(COST, kv, dec, 0.5) == int(weights / per_token) - dec
    assert paced_prefill_tokens(COST, kv, 0, 3.0) is None
    slow = replace(COST, hardware=replace(COST.hardware, step_overhead_s=0.05))
    assert paced_prefill_tokens(slow, kv, dec, 3.0) == int(3.0 * (kv * per_kv + weights + 0.05) / per_token) - dec


def test_no_pacing_while_nothing_decodes_or_no_memory_work_waits():
    assert paced_prefill_tokens(COST, 0, 0, 1.0) is None
    assert paced_prefill_tokens(COST, 5_000, 0, 1.0) is None  # prompts held, nothing decoding
    assert paced_prefill_tokens(COST, 5_000, 3, math.inf) is None
    assert paced_prefill_tokens(COST, 5_000, 3, 1.0) >= 1


def test_decode_time_counts_the_engines_per_request_and_per_token_work():
    """On hardware whose decode step costs per request and per KV token (the `cpu` preset), the
    paced prefill matches density x that whole decode time, not the KV read alone."""
    from blendserve_sgl.core.pacing import decode_seconds

    per_token, per_kv, weights = _by_hand(COST)
    assert decode_seconds(COST, 10_000, 40) == pytest.approx(10_000 * per_kv, rel=1e-12)  # vendor preset: the read
    busy = replace(COST, hardware=replace(COST.hardware, request_overhead_s=4e-4, kv_token_overhead_s=1e-8))
    kv, dec = 10_000, 40
    by_hand = kv * per_kv + kv * 1e-8 + dec * 4e-4
    assert decode_seconds(busy, kv, dec) == pytest.approx(by_hand, rel=1e-12)
    assert paced_prefill_tokens(busy, kv, dec, 2.0, "kv") == max(int(weights / per_token), int(2.0 * by_hand / per_token)) - dec
    assert paced_prefill_tokens(busy, kv, dec, 2.0) == int(2.0 * (by_hand + weights) / per_token) - dec
    assert paced_prefill_tokens(busy, kv, dec, 2.0) > paced_prefill_tokens(COST, kv, dec, 2.0)


def test_the_engines_pace_memory_setting_reaches_the_chunk_size():
    from blendserve_sgl.sim import EngineConfig

    with pytest.raises(ValueError, match="pace_memory must be one of kv\\+weights, kv"):
        EngineConfig.trace_engine(COST, pace_memory="weights")
    assert EngineConfig.trace_engine(COST).pace_memory == "kv+weights"  # as the plugin paces
    from blendserve_sgl.sim import RunSpec, Workload, simulate
    from blendserve_sgl.workloads import Record

    records = [Record(f"r{i}", 2_000 + 37 * (i % 17), (), 40 + 13 * (i % 11)) for i in range(400)]  # compute-dense
    wl = Workload(records, COST)
    steps = {m: simulate(wl, "fcfs", RunSpec(COST, EngineConfig.trace_engine(COST, pace_memory=m))).steps
             for m in ("kv", "kv+weights")}
    assert steps["kv+weights"] < steps["kv"], steps  # larger paced chunks: the prompts take fewer steps


def test_hardware_figures_too_far_apart_for_a_step_time_pace_nothing():
    """flops=1e308,bandwidth=1e-308 passed the launch check and the first paced step raised
    OverflowError (infinity to int) in the scheduler; such a step is not paced. (The launch check
    now refuses such figures; a HardwareSpec built in code still gets them.)"""
    from blendserve_sgl.core.cost import CostModel
    from blendserve_sgl.core.specs import HardwareSpec, custom_hardware

    with pytest.raises(ValueError, match="flops=1e.308 is outside 1e.09 to 1e.17 FLOP/s"):
        custom_hardware("flops=1e308,bandwidth=1e-308,memory=1")
    cost = CostModel(COST.model, HardwareSpec("far", flops=1e308, mem_bandwidth=1e-308, mem_capacity=1))
    assert paced_prefill_tokens(cost, 1_000, 8, 1.0) is None
