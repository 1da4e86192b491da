"""Paced prefill: how many prefill tokens a step should carry.

One rule, shared by the simulator (an engine feature any policy can run with) and the SGLang
plugin (which sets it as the step's prefill-token budget and chunk size). A step's GEMM tokens
(the prefill plus one per decoding request) are sized so their compute time matches the step's
memory time times the target density: the weight read and the engine's per-step overhead
(`HardwareSpec.step_overhead_s`, 0 on the vendor GPU presets) plus the decode's KV read and the
engine's per-request and per-KV-token work where the hardware spec has them. Weights and KV share
one memory bandwidth, and the GEMM overlaps both, so at density 1 such a step keeps compute and
memory equally busy. Never below the ridge: the tokens whose compute time equals the step's fixed
cost (weight read + step overhead), so a paced step is never dominated by what every step pays.
The earlier rule matched the KV side alone, the weight read only as the floor (`MEMORY_SIDES`
"kv", kept for ablations): a small decode batch then got ridge-sized chunks whatever the density,
so compute-dense prompts took many steps each, few requests started and the batch stayed small
(section 5 of docs/design.md, "Real traces"). No pacing while nothing decodes: there is no
memory work to balance, and a small chunk would only pay the fixed cost more often. No pacing
either where prefill and decode do not share a step (SGLang without `--enable-mixed-chunk`): a
prefill step then carries no decode to balance, and a smaller chunk only splits it into more
steps, each paying the fixed cost (`paces`).

The target density is the waiting work's (`WaitingWork`): remaining lengths where known, and one
estimate for every request of unknown length, the mean output of the requests finished so far
(before the first finish, the mean min(max_new_tokens, clip)). Memory is convex in the output
length (2 p d + d^2), so memory from the mean under-counts a spread of outputs; `spread=True`
counts n E[d^2] over the finished outputs instead of n m^2 (an ablation, not shipped: under the
equal rules at 20,000 requests it made fcfs 1.098x as fast on Trace#4 and blend 0.965x;
`bench/pacing_ablation.py`, docs/design.md section 5). The simulator's engine keeps it
for every policy and the plugin keeps it over SGLang's waiting queue, so blend paces the same way
in both. It is policy-neutral on purpose: no scheduler's estimator is needed to run it.
"""

from __future__ import annotations

import math

from .cost import CostModel, memory_units

# The step's memory side pacing matches, the shipped one first: "kv+weights" (the step's whole
# memory time) or "kv" (the KV side alone, the weight read only as the floor: the earlier rule, an
# ablation). One owner: the plugin paces with the first; `EngineConfig.pace_memory` defaults to it.
MEMORY_SIDES = ("kv+weights", "kv")


def weight_read_seconds(cost: CostModel) -> float:
    """Time to read every weight once at the effective bandwidth (a dense model's step floor; what
    pacing charges a step of a mixture of experts too)."""
    return cost.model.weight_read_bytes / cost.hardware.effective_bandwidth


def step_weight_seconds(cost: CostModel, tokens):
    """Time a step of `tokens` GEMM tokens (a number or an array) spends reading weights: every
    weight of a dense model, a mixture of experts' dense part and the experts its tokens route to
    (`ModelSpec.step_weight_bytes`)."""
    return cost.model.step_weight_bytes(tokens) / cost.hardware.effective_bandwidth


def ridge_tokens(cost: CostModel) -> float:
    """GEMM tokens whose compute time equals the step's fixed cost (weight read + engine step
    overhead): below it a step is bound by what every step pays."""
    return (weight_read_seconds(cost) + cost.hardware.step_overhead_s) / cost.seconds_per_compute_token


def paces(enabled: bool, mixed_chunk: bool) -> bool:
    """Whether an engine paces its prefill: asked for, and prefill and decode share a step."""
    return bool(enabled) and bool(mixed_chunk)


def decode_seconds(cost: CostModel, kv_read_tokens: int, decoding: int) -> float:
    """The memory side of a step that decodes `decoding` requests reading `kv_read_tokens` KV
    tokens: the KV read at the effective bandwidth plus the engine's work per decoding request
    and per KV token (`HardwareSpec.request_overhead_s`, `kv_token_overhead_s`: 0 on the vendor
    GPU presets; on a CPU a decode step costs mostly these)."""
    hw = cost.hardware
    return (kv_read_tokens * (cost.kv_bytes_per_token / hw.effective_bandwidth + hw.kv_token_overhead_s)
            + decoding * hw.request_overhead_s)


def paced_prefill_tokens(cost: CostModel, kv_read_tokens: int, decoding: int, density: float,
                         memory_side: str = MEMORY_SIDES[0]) -> int | None:
    """Prefill tokens for a step whose decode attention reads `kv_read_tokens` KV tokens for
    `decoding` running requests, at target `density` (Comp / Mem of the waiting work): compute
    time = density x the step's memory time (`memory_side`: "kv+weights", the shipped rule: the
    decode time of `decode_seconds` plus the weight read and the per-step overhead; "kv": the
    decode time alone). Never below the ridge. None (no pacing) when nothing decodes or the density
    is unbounded (no memory work waits)."""
    if memory_side not in MEMORY_SIDES:
        raise ValueError(f"memory_side must be one of {', '.join(MEMORY_SIDES)}, got {memory_side!r}")
    if decoding <= 0 or not math.isfinite(density):
        return None
    fixed = weight_read_seconds(cost) + cost.hardware.step_overhead_s  # the step's fixed cost, as in ridge_tokens
    memory = decode_seconds(cost, kv_read_tokens, decoding)
    if memory_side == "kv+weights":
        memory += fixed
    gemm_tokens = max(fixed / cost.seconds_per_compute_token, density * memory / cost.seconds_per_compute_token)
    if not math.isfinite(gemm_tokens):  # hardware figures so far apart no step time is a number: no pacing
        return None
    return max(1, int(gemm_tokens) - decoding)


class WaitingWork:
    """The pacing target's inputs, kept incrementally as requests wait (`wait(..., +1)`), leave
    the queue (`wait(..., -1)`: admitted, aborted) and finish (`finished`): exact compute tokens
    and memory units of the waiting requests of known length; count, fill tokens (prompt plus
    output so far) and min(max_new left, clip) of the others; count and output tokens of the
    finished requests."""

    __slots__ = ("clip", "spread", "known_comp", "known_mem", "n", "fill", "cap", "done", "done_out", "done_sq")

    def __init__(self, clip: int, spread: bool = False):
        if not (isinstance(clip, int) and clip >= 1):
            raise ValueError(f"clip must be a positive integer, got {clip!r}")
        self.clip = clip
        self.spread = spread  # memory from the finished outputs' second moment, not their mean alone (ablation)
        self.known_comp = self.known_mem = 0
        self.n = self.fill = self.cap = 0
        self.done = self.done_out = self.done_sq = 0

    def wait(self, fill: int, max_new_left: int | None, known_output: int | None = None, sign: int = 1) -> None:
        """Count a request into (+1) or out of (-1) the waiting work: `fill` tokens to compute,
        `known_output` tokens still to generate when known (else at most `max_new_left`, None: the clip)."""
        if known_output is not None:
            self.known_comp += sign * (fill + known_output)
            self.known_mem += sign * memory_units(fill, known_output)
            return
        self.n += sign
        self.fill += sign * fill
        left = self.clip if max_new_left is None else max_new_left
        self.cap += sign * min(max(left, 1), self.clip)

    def finished(self, output_len: int) -> None:
        self.done += 1
        self.done_out += output_len
        self.done_sq += output_len * output_len

    def output_estimate(self) -> float:
        """The output length assumed for each waiting request of unknown length."""
        if self.done:
            return self.done_out / self.done
        return self.cap / self.n if self.n else 1.0

    def density(self, cost: CostModel) -> float:
        """Comp / Mem of the waiting requests, no sharing term (+inf: no memory work waits)."""
        comp, mem = float(self.known_comp), float(self.known_mem)
        if self.n:
            m = self.output_estimate()
            comp += self.fill + self.n * m
            if self.spread and self.done:  # sum (2 p d + d^2) over outputs like the finished ones: E[d^2], not m^2
                mem += 2 * self.fill * m + self.n * (self.done_sq / self.done)
            else:
                mem += self.n * memory_units(self.fill / self.n, m)  # memory_units is linear in the prompt
        return cost.density(comp, mem)
