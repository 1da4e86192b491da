"""Step time from the cost model, in the two execution modes: the one step-time function.

Per step the engine records the tokens that pass through the GEMMs (prefill + one per decoding
request) and the KV tokens decode attention reads. With the cost model (`core/cost.py`):

    comp  = 2 (P_layers tokens + P_head sampled) / FLOPS
                                             GEMM compute: every token through the decoder
                                             layers, the LM head only for sampled tokens (one
                                             per decoding request), + prefill attention with the
                                             cost model's prefill_attention="causal"
    w     = weight bytes / BW                every step that runs a GEMM reads the weights once
    attn  = KV bytes read / BW               decode attention, memory-bound
    mem   = w + attn                         all of the step's HBM traffic
    over  = step_overhead_s + request_overhead_s x decoding requests
            + prefill_token_overhead_s x prompt tokens
            + kv_token_overhead_s x KV tokens held (decode steps)
                                             the engine's work no operator term covers
                                             (hardware spec; 0 on the vendor GPU presets), added in
                                             both modes

- `sequential` (SGLang today): the GEMMs at their roofline, then attention:
  max(comp, w) + attn + over.
- `overlapped` (NanoFlow-style): compute-bound and memory-bound operators share the GPU, but
  weight reads and KV reads share one HBM, so a step takes at least max(comp, mem):
  max(comp, mem) + interference x min(comp, mem) + over. interference = 0 is perfect overlap,
  1 is none (comp + mem); the concurrent kernels slow each other down by that share of the
  overlapped part (contention for SMs, L2 and HBM). Prefill attention is left out, as in the
  paper's model.

The schedule does not depend on the mode, so one run's per-step series gives both times.
`split_seconds` cuts an overlapped run's time into causes: the overlapped part, compute-only,
memory-only (of which weights), interference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.cost import CostModel
from ..core.pacing import step_weight_seconds

MODES = ("sequential", "overlapped")


@dataclass(frozen=True, slots=True)
class ExecModel:
    mode: str = "overlapped"
    interference: float = 0.1  # overlapped only: share of the overlapped time lost to contention

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown execution mode {self.mode!r}; choose one of {list(MODES)}")
        if not (0.0 <= self.interference <= 1.0):
            raise ValueError(f"interference must be in [0, 1], got {self.interference!r}")


class StepSeconds(tuple):
    """(comp, weights, attn, overhead) per step, as NumPy arrays (overhead may be the scalar 0)."""

    __slots__ = ()

    def __new__(cls, comp, weights, attn, overhead=0.0):
        return super().__new__(cls, (comp, weights, attn, overhead))

    def __getnewargs__(self):  # pickles (results of the planner's worker processes)
        return tuple(self)

    comp = property(lambda self: self[0])
    weights = property(lambda self: self[1])
    attn = property(lambda self: self[2])
    overhead = property(lambda self: self[3])


def operator_seconds(cost: CostModel, gemm_tokens, kv_read_tokens, attention_pairs=None,
                     decode_requests=None, kv_held_tokens=None) -> StepSeconds:
    """(compute, weight read, decode-attention read, engine overhead) seconds per step; compute is
    the GEMM tokens through the decoder layers, the LM head for the sampled tokens (one per
    decoding request; `decode_requests`, by default the GEMM tokens, exact for steps that only
    decode) plus, with `cost.prefill_attention == "causal"`, the prefill attention's query-key
    pairs; the overhead is `overhead_seconds`. A prefill step's one sampled token per finished
    prompt is not charged the LM head (at most 1/p of the prompt's GEMM tokens)."""
    gemm = np.asarray(gemm_tokens, dtype=np.float64)
    sampled = gemm if decode_requests is None else np.asarray(decode_requests, dtype=np.float64)
    comp = gemm * cost.seconds_per_layer_token + sampled * cost.seconds_per_sampled_token
    if attention_pairs is not None and cost.seconds_per_attention_pair:
        comp = comp + np.asarray(attention_pairs, dtype=np.float64) * cost.seconds_per_attention_pair
    weights = np.where(comp > 0, step_weight_seconds(cost, gemm), 0.0)  # a mixture of experts: the routed ones
    attn = np.asarray(kv_read_tokens, dtype=np.float64) * (cost.kv_bytes_per_token / cost.hardware.effective_bandwidth)
    return StepSeconds(comp, weights, attn, overhead_seconds(cost, gemm, sampled, kv_held_tokens))


def overhead_seconds(cost: CostModel, gemm_tokens, decode_requests=None, kv_held_tokens=None) -> np.ndarray:
    """The engine's work per step that no operator term covers: `step_overhead_s` for each step
    that runs a GEMM, `request_overhead_s` per decoding request, `prefill_token_overhead_s` per
    prompt token (the GEMM tokens beyond the decoding requests), `kv_token_overhead_s` per KV
    token the running requests hold in a step that decodes (`kv_held_tokens`: the pool in use,
    as SGLang logs it; shared prefixes once). The same term for every policy."""
    hw = cost.hardware
    gemm = np.asarray(gemm_tokens, dtype=np.float64)
    dec = gemm if decode_requests is None else np.asarray(decode_requests, dtype=np.float64)
    over = (np.where(gemm > 0, hw.step_overhead_s, 0.0) + hw.request_overhead_s * dec
            + hw.prefill_token_overhead_s * (gemm - dec))
    if kv_held_tokens is not None and hw.kv_token_overhead_s:
        over = over + hw.kv_token_overhead_s * np.where(dec > 0, np.asarray(kv_held_tokens, dtype=np.float64), 0.0)
    return over


def step_seconds(ops: StepSeconds, model: ExecModel) -> np.ndarray:
    comp, w, attn, over = ops
    if model.mode == "sequential":
        return np.maximum(comp, w) + attn + over
    mem = w + attn
    return np.maximum(comp, mem) + model.interference * np.minimum(comp, mem) + over


def split_seconds(ops: StepSeconds, model: ExecModel) -> dict:
    """An overlapped run's time by cause (seconds; the first five add up to the total):
    `overlapped` (compute and memory traffic running together), `compute_only`, `memory_only`
    (memory traffic beyond the compute), `interference`, `overhead` (the engine's host work);
    plus `weights` and `kv_read`, the two parts of the memory traffic."""
    if model.mode != "overlapped":
        raise ValueError("split_seconds describes the overlapped mode")
    comp, w, attn, over = ops
    mem = w + attn
    both = np.minimum(comp, mem)
    return {"overlapped": float(both.sum()), "compute_only": float(np.maximum(comp - mem, 0).sum()),
            "memory_only": float(np.maximum(mem - comp, 0).sum()),
            "interference": float(model.interference * both.sum()),
            "overhead": float(np.sum(np.broadcast_to(over, np.shape(comp)))),
            "weights": float(w.sum()), "kv_read": float(attn.sum())}
