"""What-if profiles: each one's arithmetic against a hand count (Llama-3.1-8B on the A100 preset)."""

import math

import pytest

from blendserve_sgl.core import CostModel, HardwareSpec
from blendserve_sgl.core.pacing import weight_read_seconds
from blendserve_sgl.core.profiles import (apply_profile, mixtral_counts, profile_names, quest_read_tokens,
                                          quantized_bits)
from blendserve_sgl.sim import EngineConfig

COST = CostModel.from_names("llama-3.1-8b", "a100")
KV = 131072  # bytes per token: 2 (K, V) x 2 bytes x 8 heads x 128 dims x 32 layers
WEIGHTS = COST.model.num_params * 2
# weight reads are checked to 1e-6: a profile keeps them through an integer parameter count


def _times(cost):
    per_kv_read = cost.kv_bytes_per_token / cost.hardware.effective_bandwidth
    return cost.seconds_per_compute_token, per_kv_read, weight_read_seconds(cost)


def test_names_and_unknown():
    assert profile_names() == ["atom-w4a4", "base", "fiddler-moe", "instinfer", "quest-topk"]
    with pytest.raises(ValueError, match="unknown cost profile 'int3'.*atom-w4a4"):
        apply_profile("int3", COST)
    with pytest.raises(ValueError, match="profile 'instinfer'.*bogus"):
        apply_profile("instinfer", COST, bogus=1)


def test_base_pool_is_the_simulators_pool():
    assert COST.kv_bytes_per_token == KV
    assert apply_profile("base", COST).kv_tokens == EngineConfig.for_cost(COST).kv_tokens


def test_atom_hand_count():
    assert quantized_bits(4, 128) == 4.125  # 4 bits + one 16-bit scale per 128 values
    p = apply_profile("atom-w4a4", COST)
    comp0, kv0, w0 = _times(COST)
    comp, kv, w = _times(p.cost)
    assert comp == pytest.approx(comp0 / 4)  # A100: 1,248 INT4 TOPS / 312 BF16 TFLOPS
    assert kv == pytest.approx(kv0 * 4.25 / 16)  # 4 bits + FP16 scale and zero per 128-value head vector
    assert w == pytest.approx(w0 * 4.125 / 16)
    pool = (0.88 * 80e9 - WEIGHTS * 4.125 / 16) // (KV * 4.25 / 16)
    assert p.kv_tokens == pool
    h100 = apply_profile("atom-w4a4", CostModel.from_names("llama-3.1-8b", "h100"))
    assert h100.params["gemm_speedup"] == 2.0  # Hopper: no INT4 tensor cores
    measured = CostModel(COST.model, HardwareSpec("h200-measured", 700e12, 4e12, 141e9))
    assert apply_profile("atom-w4a4", measured).params["gemm_speedup"] == 2.0
    # density = comp / mem per request moves by speedup^-1 / kv factor
    r0 = COST.request_density(1000, 100)
    assert p.cost.request_density(1000, 100) == pytest.approx(r0 * (1 / 4) / (4.25 / 16))
    with pytest.raises(ValueError, match="gemm_speedup"):
        apply_profile("atom-w4a4", CostModel.from_names("llama-3.1-8b", "cpu"))


def test_quest_reads_hand_count():
    # p=1000, d=2000, k=2048, page 16 (continuous counts as the cost model's p d + d^2 / 2):
    # metadata (1000*2000 + 2000^2/2) / 16 = 250,000; steps below k: 1,048 -> 1,048,000 + 1,048^2/2;
    # the other 952 steps read 2,048 each.
    assert quest_read_tokens(1000, 2000, 2048) == pytest.approx(250_000 + 1_048_000 + 549_152 + 952 * 2048)
    assert quest_read_tokens(3000, 10, 2048) == pytest.approx((30_000 + 50) / 16 + 10 * 2048)  # context above k
    assert quest_read_tokens(100, 10, 2048) == pytest.approx((1000 + 50) / 16 + 1000 + 50)  # never reaches k


def test_quest_profile_fraction():
    lengths = ([1000, 3000], [2000, 10])
    dense = (1000 * 2000 + 2000**2 / 2) + (3000 * 10 + 10**2 / 2)
    sparse = float(quest_read_tokens(1000, 2000, 2048) + quest_read_tokens(3000, 10, 2048))
    frac = (2 * dense + 30 * sparse) / (32 * dense)
    p = apply_profile("quest-topk", COST, k=2048, lengths=lengths)
    assert p.params["read_fraction"] == pytest.approx(frac)
    comp0, kv0, w0 = _times(COST)
    comp, kv, w = _times(p.cost)
    assert (comp, w) == (pytest.approx(comp0), pytest.approx(w0, rel=1e-6))
    assert kv == pytest.approx(kv0 * frac)
    assert p.kv_tokens == apply_profile("base", COST).kv_tokens  # the whole cache stays in HBM
    with pytest.raises(ValueError, match="lengths"):
        apply_profile("quest-topk", COST)
    with pytest.raises(ValueError, match="k must be"):
        apply_profile("quest-topk", COST, k=8, read_fraction=0.5)


def test_instinfer_hand_count():
    p = apply_profile("instinfer", COST, storage_bandwidth=50e9, storage_capacity=10e12)
    comp0, kv0, w0 = _times(COST)
    comp, kv, w = _times(p.cost)
    assert kv == pytest.approx(KV / 50e9)  # attention at the drives' bandwidth
    assert (comp, w) == (pytest.approx(comp0), pytest.approx(w0, rel=1e-6))
    assert p.kv_tokens == 10e12 // KV


def test_fiddler_hand_count():
    n = mixtral_counts()
    assert n["expert"] == 3 * 4096 * 14336
    assert n["experts_total"] == 32 * 8 * 176_160_768
    total = n["dense"] + n["experts_total"]
    assert 46.6e9 < total < 46.8e9  # Mixtral-8x7B: 46.7B parameters
    assert 12.8e9 < n["dense"] + n["active_expert_params"] < 13.0e9  # 12.9B active per token
    p = apply_profile("fiddler-moe", COST, cpu_flops=1e12, resident_fraction=0.25)
    gpu = COST.hardware.effective_flops
    per_token = (2 * (n["gpu_gemm_dense"] + 0.25 * n["active_expert_params"]) / gpu
                 + 2 * 0.75 * n["active_expert_params"] / 1e12)
    assert p.cost.seconds_per_compute_token == pytest.approx(per_token, rel=1e-9)
    resident = n["dense"] + 0.25 * n["experts_total"]
    assert weight_read_seconds(p.cost) == pytest.approx(resident * 2 / COST.hardware.effective_bandwidth, rel=1e-9)
    assert p.kv_tokens == (0.88 * 80e9 - resident * 2) // KV  # Mixtral's KV per token equals Llama-3.1-8B's
    auto = apply_profile("fiddler-moe", COST)  # half of 80 GB for weights
    assert auto.params["resident_fraction"] == pytest.approx((40e9 / 2 - n["dense"]) / n["experts_total"])
    assert 0 < auto.params["resident_fraction"] < 1
    assert math.isfinite(auto.cost.request_density(100, 100))
