"""What-if cost profiles: systems beside BlendServe, expressed as changes to the cost model.

A profile turns a base `CostModel` into the `CostModel` the system would have, plus the KV pool
it would offer, so the tree, the scanner and the simulator run on it unchanged. It changes three
per-token costs and the pool:

    compute   seconds per GEMM token          (HardwareSpec.flops, ModelSpec.gemm_params)
    KV read   seconds per KV token read       (HardwareSpec.mem_bandwidth)
    weights   seconds per step's weight read  (ModelSpec.weight_read_bytes, kept against the new bandwidth)
    pool      KV tokens the pool holds        (`Profiled.kv_tokens`)

Bytes in a profiled model are "base-precision equivalents": a KV read made r times cheaper is a
bandwidth r times higher, and the weight count is rescaled so the weight read keeps its own
factor. Sources and assumptions of every profile: docs/design.md, "What-if profiles". These are
models of the systems, not measurements of them.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import NamedTuple

import numpy as np

from .cost import CostModel, memory_units
from .specs import GB, ModelSpec, model_config

MEM_FRACTION = 0.88  # share of device memory for weights + KV (SGLang's mem_fraction_static, as EngineConfig.for_cost)


class Profiled(NamedTuple):
    name: str
    cost: CostModel  # what planning and step times use
    kv_tokens: int  # KV pool size in tokens
    params: dict  # every figure the profile used, defaults included


def hbm_pool_tokens(cost: CostModel, weight_bytes: float, kv_bytes_per_token: float,
                    mem_fraction: float = MEM_FRACTION) -> int:
    """KV tokens in device memory: mem_fraction x capacity minus the resident weights."""
    free = mem_fraction * cost.hardware.mem_capacity - weight_bytes
    if free <= 0:
        raise ValueError(f"{cost.model.name} weights ({weight_bytes / GB:.1f} GB) leave no KV room on "
                         f"{cost.hardware.name} ({mem_fraction:.0%} of {cost.hardware.mem_capacity / GB:.0f} GB)")
    return int(free // kv_bytes_per_token)


def rescale(cost: CostModel, tag: str, compute: float = 1.0, kv_read: float = 1.0, weight_read: float = 1.0,
            model: ModelSpec | None = None) -> CostModel:
    """`cost` (or `model` on its hardware) with each time multiplied by its factor: seconds per
    GEMM token x compute, per KV token read x kv_read, per weight read x weight_read."""
    for label, f in (("compute", compute), ("kv_read", kv_read), ("weight_read", weight_read)):
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"profile {tag!r}: {label} factor must be positive and finite, got {f!r}")
    base = model or cost.model
    hw = replace(cost.hardware, name=f"{cost.hardware.name}+{tag}", flops=cost.hardware.flops / compute,
                 mem_bandwidth=cost.hardware.mem_bandwidth / kv_read)
    f = weight_read / kv_read
    m = replace(base, name=f"{base.name}+{tag}", num_params=max(1, round(base.num_params * f)),
                weight_bytes=max(1, round(base.weight_bytes * f)) if base.weight_bytes else 0,
                expert_bytes=max(1, round(base.expert_bytes * f)) if base.expert_bytes else 0)
    return CostModel(m, hw)


# --- Atom (W4A4) -------------------------------------------------------------------------------

# Dense tensor-core throughput of 4-bit integer GEMMs over BF16 (NVIDIA datasheets: A100 1,248
# INT4 TOPS vs 312 BF16 TFLOPS; Hopper has no INT4 tensor cores, its 8-bit path is 2x BF16).
_INT4_GEMM_SPEEDUP = {"a100": 4.0, "h100": 2.0, "h200": 2.0}


def quantized_bits(bits: int, group: int, scale_bits: int = 16, zero_bits: int = 0) -> float:
    """Bits per value with one scale (and zero point) per `group` values."""
    return bits + (scale_bits + zero_bits) / group


def atom_w4a4(cost: CostModel, gemm_speedup: float | None = None, weight_bits: int = 4, weight_group: int = 128,
              kv_bits: int = 4, kv_group: int | None = None, mem_fraction: float = MEM_FRACTION) -> Profiled:
    """Atom: 4-bit weights and activations (group 128, FP16 scales) and a 4-bit KV cache
    (asymmetric, one FP16 scale and zero point per head vector)."""
    hw_key = cost.hardware.name.split("+")[0].split("-")[0]  # h200-measured: an h200
    if gemm_speedup is None:
        if hw_key not in _INT4_GEMM_SPEEDUP:
            raise ValueError(f"atom-w4a4: no INT4 GEMM speed-up known for hardware {cost.hardware.name!r}; "
                             f"pass gemm_speedup= (known: {sorted(_INT4_GEMM_SPEEDUP)})")
        gemm_speedup = _INT4_GEMM_SPEEDUP[hw_key]
    base_bits = 8 * cost.model.dtype_bytes
    w = quantized_bits(weight_bits, weight_group) / base_bits
    k = quantized_bits(kv_bits, kv_group or cost.model.head_dim, zero_bits=16) / base_bits
    new = rescale(cost, "atom-w4a4", compute=1 / gemm_speedup, kv_read=k, weight_read=w)
    pool = hbm_pool_tokens(cost, cost.model.weight_read_bytes * w, cost.kv_bytes_per_token * k,
                           mem_fraction)
    return Profiled("atom-w4a4", new, pool, dict(gemm_speedup=gemm_speedup, weight_bytes_factor=w, kv_bytes_factor=k,
                                                 weight_bits=weight_bits, weight_group=weight_group, kv_bits=kv_bits,
                                                 mem_fraction=mem_fraction))


# --- Quest (query-aware top-K pages) -----------------------------------------------------------


def quest_read_tokens(prompt_len, output_len, k: int, page: int = 16):
    """KV token-reads of a request's decode steps under Quest, per sparse layer: step i (context
    c = p + i) reads every page's metadata (min and max key: one token's K+V worth per page,
    c / page) and min(c, k) tokens of the top-K pages. Exact sums, vectorised over requests."""
    p = np.asarray(prompt_len, dtype=np.float64)
    d = np.asarray(output_len, dtype=np.float64)
    dense = memory_units(p, d) / 2  # p d + d^2 / 2: the cost model's continuous count of context reads
    # sum over steps of min(p + i, k): steps with p + i < k read the context, the rest read k.
    short = np.clip(k - p, 0, d)  # steps whose context is below k
    below = short * p + short * short / 2
    top = below + (d - short) * k
    return dense / page + top


def quest_topk(cost: CostModel, k: int = 2048, page: int = 16, dense_layers: int = 2, lengths=None,
               read_fraction: float | None = None) -> Profiled:
    """Quest: decode attention reads the top-`k` tokens' pages plus every page's min/max keys;
    the first `dense_layers` layers stay dense. The pool keeps the whole cache.

    The simulator charges one KV-read factor per workload: `lengths` = (prompts, outputs) gives
    the exact ratio of Quest's reads to dense reads over that workload (`read_fraction` to pass it)."""
    if not (isinstance(k, int) and k >= page):
        raise ValueError(f"quest-topk: k must be an integer of at least one page ({page}), got {k!r}")
    if read_fraction is None:
        if lengths is None:
            raise ValueError("quest-topk needs the workload's lengths=(prompts, outputs) or read_fraction=")
        prompts, outputs = lengths
        dense = float(np.sum(memory_units(np.asarray(prompts, np.float64), np.asarray(outputs, np.float64)) / 2))
        sparse = float(np.sum(quest_read_tokens(prompts, outputs, k, page)))
        layers = cost.model.num_layers
        read_fraction = (dense_layers * dense + (layers - dense_layers) * sparse) / (layers * dense) if dense else 1.0
    new = rescale(cost, f"quest-top{k}", kv_read=read_fraction)
    pool = hbm_pool_tokens(cost, cost.model.weight_read_bytes, cost.kv_bytes_per_token)
    return Profiled("quest-topk", new, pool, dict(k=k, page=page, dense_layers=dense_layers,
                                                  read_fraction=read_fraction))


# --- InstInfer (KV cache and decode attention in computational storage) ------------------------


def instinfer(cost: CostModel, storage_bandwidth: float = 64 * GB, storage_capacity: float = 30_000 * GB,
              mem_fraction: float = MEM_FRACTION) -> Profiled:
    """InstInfer: the KV cache lives on computational storage drives and decode attention runs
    there at the drives' internal flash bandwidth; HBM holds the weights only. Defaults are
    assumptions (docs/design.md): 64 GB/s and 30 TB aggregated over the drives."""
    if not (storage_bandwidth > 0 and storage_capacity > 0):
        raise ValueError("instinfer: storage_bandwidth and storage_capacity must be positive (bytes/s, bytes)")
    weights = cost.model.weight_read_bytes
    hbm_pool_tokens(cost, weights, cost.kv_bytes_per_token, mem_fraction)  # the weights must still fit
    new = rescale(cost, "instinfer", kv_read=cost.hardware.effective_bandwidth / storage_bandwidth)
    return Profiled("instinfer", new, int(storage_capacity // cost.kv_bytes_per_token),
                    dict(storage_bandwidth=storage_bandwidth, storage_capacity=storage_capacity))


# --- Fiddler (MoE experts on the CPU when not resident) ---------------------------------------

_MX = model_config("mixtral-8x7b")  # mistralai/Mixtral-8x7B-v0.1 config.json
MIXTRAL_8X7B = dict(hidden=_MX["hidden_size"], intermediate=_MX["intermediate_size"], layers=_MX["num_hidden_layers"],
                    heads=_MX["num_attention_heads"], kv_heads=_MX["num_key_value_heads"],
                    head_dim=_MX["hidden_size"] // _MX["num_attention_heads"], vocab=_MX["vocab_size"],
                    experts=_MX["num_local_experts"], active=_MX["num_experts_per_tok"])


def mixtral_counts(c: dict = MIXTRAL_8X7B) -> dict:
    """Parameter counts of a Mixtral-style MoE decoder (norms and router included in `dense`)."""
    h, L = c["hidden"], c["layers"]
    attn = h * c["heads"] * c["head_dim"] * 2 + h * c["kv_heads"] * c["head_dim"] * 2  # q, o + k, v
    expert = 3 * h * c["intermediate"]  # gate, up, down
    dense = L * (attn + h * c["experts"] + 2 * h) + 2 * c["vocab"] * h + h  # + router, norms; embed, LM head, norm
    return dict(attn_per_layer=attn, expert=expert, dense=dense, experts_total=L * c["experts"] * expert,
                active_expert_params=L * c["active"] * expert, gpu_gemm_dense=L * attn + c["vocab"] * h)


def fiddler_moe(cost: CostModel, cpu_flops: float = 2e12, weight_budget: float = 0.5,
                resident_fraction: float | None = None, mem_fraction: float = MEM_FRACTION) -> Profiled:
    """Fiddler: Mixtral-8x7B on the base hardware; the experts that do not fit in the
    `weight_budget` share of device memory stay in CPU memory and run there (activations move,
    weights do not). Per token: dense GEMMs and resident experts at the GPU's rate, the other
    active experts at `cpu_flops` (an assumption: docs/design.md)."""
    if not (cpu_flops > 0 and 0 < weight_budget < 1):
        raise ValueError("fiddler-moe: cpu_flops must be positive and weight_budget in (0, 1)")
    n = mixtral_counts()
    b = cost.model.dtype_bytes
    if resident_fraction is None:
        room = weight_budget * cost.hardware.mem_capacity / b - n["dense"]
        resident_fraction = min(1.0, max(0.0, room / n["experts_total"]))
    if not (0 <= resident_fraction <= 1):
        raise ValueError(f"fiddler-moe: resident_fraction must be in [0, 1], got {resident_fraction!r}")
    c = MIXTRAL_8X7B
    resident = n["dense"] + resident_fraction * n["experts_total"]
    gpu_rate = cost.hardware.effective_flops
    gemm_equiv = (n["gpu_gemm_dense"] + resident_fraction * n["active_expert_params"]
                  + (1 - resident_fraction) * n["active_expert_params"] * gpu_rate / cpu_flops)
    model = ModelSpec(name="mixtral-8x7b", num_params=round(resident), gemm_params=round(gemm_equiv),
                      num_layers=c["layers"], num_kv_heads=c["kv_heads"], head_dim=c["head_dim"], dtype_bytes=b,
                      max_context=32768)
    new = rescale(CostModel(model, cost.hardware), "fiddler-moe")
    pool = hbm_pool_tokens(new, resident * b, new.kv_bytes_per_token, mem_fraction)
    return Profiled("fiddler-moe", new, pool, dict(cpu_flops=cpu_flops, weight_budget=weight_budget,
                                                   resident_fraction=resident_fraction, **n))


def base(cost: CostModel, mem_fraction: float = MEM_FRACTION) -> Profiled:
    """The cost model as it is (the row every profile is compared with)."""
    return Profiled("base", cost, hbm_pool_tokens(cost, cost.model.weight_read_bytes,
                                                  cost.kv_bytes_per_token, mem_fraction), {})


_PROFILES = {"base": base, "atom-w4a4": atom_w4a4, "quest-topk": quest_topk, "instinfer": instinfer,
             "fiddler-moe": fiddler_moe}


def profile_names() -> list[str]:
    return sorted(_PROFILES)


def apply_profile(name: str, cost: CostModel, **params) -> Profiled:
    """The named profile applied to `cost`; `params` are the profile's own (see each function)."""
    if name not in _PROFILES:
        raise ValueError(f"unknown cost profile {name!r}; choose one of {profile_names()}")
    try:
        return _PROFILES[name](cost, **params)
    except TypeError as e:
        raise ValueError(f"profile {name!r}: {e}") from None
