"""The cost model: every formula of the method lives here; other modules ask it.

Per request with prompt length p and output length d (BlendServe, arXiv 2411.16102):

    Comp(r) = 2 (p + d) P / FLOPS                       compute_tokens(p, d) = p + d
    Mem(r)  = (p d + d^2 / 2) * kv_bytes_per_token / BW  memory_units(p, d)  = 2 p d + d^2
    rho(r)  = Comp(r) / Mem(r)

and per prefix-tree node holding the requests R of its subtree with sharing ratio s:

    rho(R) = (1 - s) Comp(R) / Mem(R)

Aggregates are kept as integers (`compute_tokens`, `memory_units` = twice the token-reads of
decode attention) so that adding and removing requests is exact; `CostModel` turns them into
seconds. P is the number of parameters that enter a GEMM per token (decoder layers + LM head):
the paper's density, kept for the tree and the scanner. Step time (`sim/timing.py`) is exact
about the LM head: SGLang computes logits only for the tokens it samples (the last token of a
finished prompt, one per decoding request), so a step's GEMM tokens pay the decoder layers
(`seconds_per_layer_token`) and only its sampled tokens pay the LM head
(`seconds_per_sampled_token`).

Prefill attention: the paper's Comp drops it (`prefill_attention="paper"`). With "causal" the
cost model also charges it: a chunk of c new prompt tokens after k tokens already in the KV
cache (a cached prefix or earlier chunks) scores c k + c (c + 1) / 2 query-key pairs
(`prefill_attention_pairs`: each new token attends to the cached prefix and, causally, to the
new tokens up to itself), each 4 x layers x query heads x head_dim FLOPs (QK^T and PV, a
multiply-add each). Llama-3.1-8B: a whole 8,192-token prompt's attention is 14% of its linear
layers' FLOPs; at about 57,000 tokens it equals them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .specs import HardwareSpec, ModelSpec, hardware, model


def compute_tokens(prompt_len: int, output_len: int) -> int:
    """Tokens that pass through every GEMM: the prompt once, each output token once."""
    return prompt_len + output_len


def memory_units(prompt_len: int, output_len: int) -> int:
    """2 x (KV token reads of all decode steps) = 2 p d + d^2 (step i reads p + i tokens)."""
    return 2 * prompt_len * output_len + output_len * output_len


def prefill_attention_pairs(cached: int, new: int) -> int:
    """Query-key pairs of causal attention for `new` prompt tokens after `cached` tokens."""
    return new * cached + new * (new + 1) // 2


PREFILL_ATTENTION = ("paper", "causal")


def mean_kv_tokens(prompt_len: int, output_len: int) -> float:
    """KV tokens a decoding request holds on average over its life: p + d / 2."""
    return prompt_len + output_len / 2


@dataclass(frozen=True, slots=True)
class CostModel:
    """Model x hardware, with the conversion constants precomputed."""

    model: ModelSpec
    hardware: HardwareSpec
    prefill_attention: str = "paper"  # "paper": dropped, as the paper does; "causal": charged (module docstring)

    def __post_init__(self) -> None:
        if self.prefill_attention not in PREFILL_ATTENTION:
            raise ValueError(f"prefill_attention must be one of {list(PREFILL_ATTENTION)}, got {self.prefill_attention!r}")
        if self.prefill_attention == "causal" and not self.model.num_heads:
            raise ValueError(f"prefill_attention='causal' needs the query head count of {self.model.name!r} "
                             f"(ModelSpec.num_heads); build the spec from its config.json")

    @classmethod
    def from_names(cls, model_name: str, hardware_name: str, prefill_attention: str = "paper") -> "CostModel":
        return cls(model(model_name), hardware(hardware_name), prefill_attention)

    @property
    def seconds_per_attention_pair(self) -> float:
        """Compute time of one prefill query-key pair across the model (0 with the paper's formula)."""
        if self.prefill_attention == "paper":
            return 0.0
        m = self.model
        return 4.0 * m.num_layers * m.num_heads * m.head_dim / self.hardware.effective_flops

    @property
    def seconds_per_compute_token(self) -> float:
        return 2.0 * self.model.gemm_params / self.hardware.effective_flops

    @property
    def seconds_per_layer_token(self) -> float:
        """GEMM time of one token through the decoder layers (the LM head excluded)."""
        return 2.0 * (self.model.gemm_params - self.model.lm_head_params) / self.hardware.effective_flops

    @property
    def seconds_per_sampled_token(self) -> float:
        """GEMM time of the LM head for one sampled token (0 when the spec does not separate it:
        then `seconds_per_layer_token` carries it for every token)."""
        return 2.0 * self.model.lm_head_params / self.hardware.effective_flops

    @property
    def seconds_per_memory_unit(self) -> float:
        return self.model.kv_bytes_per_token / (2.0 * self.hardware.effective_bandwidth)

    @property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    def comp_time(self, tokens: float) -> float:
        return tokens * self.seconds_per_compute_token

    def mem_time(self, units: float) -> float:
        return units * self.seconds_per_memory_unit

    def request_comp_time(self, prompt_len: int, output_len: int) -> float:
        return self.comp_time(compute_tokens(prompt_len, output_len))

    def request_mem_time(self, prompt_len: int, output_len: int) -> float:
        return self.mem_time(memory_units(prompt_len, output_len))

    def density(self, computed_tokens: float, mem_units: float) -> float:
        """Comp / Mem of a set of requests whose de-duplicated compute is `computed_tokens`.

        For a node, computed_tokens = (1 - s) * sum(p + d). Returns +inf when nothing is read
        (prefill-only requests).
        """
        if mem_units <= 0:
            return math.inf
        return self.comp_time(computed_tokens) / self.mem_time(mem_units)

    def request_density(self, prompt_len: int, output_len: int) -> float:
        return self.density(compute_tokens(prompt_len, output_len), memory_units(prompt_len, output_len))

    def optimal_time(self, total_compute_tokens: float, sharing: float, total_mem_units: float) -> float:
        """T_o = max((1 - s_o) T_comp, T_mem): the workload's lower bound under perfect overlap."""
        return max((1.0 - sharing) * self.comp_time(total_compute_tokens), self.mem_time(total_mem_units))


def split_memory(total: float, rho_left: float, rho_right: float, rho_root: float) -> float:
    """Left share M_L of memory M so that M_L rho_L + (M - M_L) rho_R = M rho_root.

    Clamped to [0, M]; an even split when the two sides have the same density.
    """
    if not (total > 0):
        return 0.0
    finite = [x for x in (rho_left, rho_right, rho_root) if math.isfinite(x)]
    cap = max(finite) * 1e3 if finite else 1.0
    rl, rr, r0 = (min(x, cap) for x in (rho_left, rho_right, rho_root))
    span = rl - rr
    if abs(span) <= 1e-12 * max(abs(rl), abs(rr), 1e-30):
        return total / 2
    frac = (r0 - rr) / span
    return total * min(1.0, max(0.0, frac))
