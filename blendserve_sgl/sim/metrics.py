"""What a simulated run achieved: throughput, the share of the optimum, prefix sharing, KV use.

The optimum is the paper's T_o = max((1 - s_o) T_comp, T_mem) (`CostModel.optimal_time`):
T_comp and T_mem summed over every request, s_o the sharing of DFS order with an unbounded
cache (the reference tree's root sharing). The run's time is the sum of its step times in an
execution mode (`timing.py`), so `fraction_of_optimal` = T_o / time.

T_o is the paper's figure, not a strict bound of this engine: its T_comp puts every token
through the LM head and its T_mem counts 2 p d + d^2 KV units per request, while a step puts only
the tokens it samples through the LM head and the d - 1 decode steps read (d - 1) p + d (d - 1) / 2
KV tokens (`timing.operator_seconds`). On long prompts with short outputs (Azure code) a run then
reads above 1 of T_o. T_w is the strict bound under the step model, with the weights charged:
T_w = max(C, M + N_min w), where C = (sum (p + d - 1) - s_o sum (p + d)) x layer-token seconds +
sum (d - 1) x LM-head seconds (every token through the decoder layers but the last output and the
prefixes DFS order shares, the LM head for the tokens decode steps sample), M = the decode steps'
KV reads and N_min = max(longest output, ceil(output tokens / max_running)) (one output token per
running request per step, the first from the prefill step), each step reading the weights once
(a mixture of experts: at least those of one token, `ModelSpec.step_weight_bytes(1)`).
A step takes at least max(comp, w + attn) in both modes, so no schedule beats T_w
(`fraction_of_weight_bound` <= 1); prefill attention, interference and the engine's overhead
only add to a step.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from ..core.cost import CostModel, compute_tokens, memory_units
from .timing import ExecModel, StepSeconds, operator_seconds, split_seconds, step_seconds, step_weight_seconds


def seconds(value: float) -> float:
    """A time for tables and JSON: hundredths of a second, three significant figures below one
    second (a run of a few milliseconds read 0 beside its throughput; a probe)."""
    return round(value, 2) if abs(value) >= 1 else float(f"{value:.3g}")


@dataclass
class SimResult:
    policy: str
    requests: int
    kv_tokens: int
    steps: int
    prompt_tokens: int
    output_tokens: int
    first_hit_tokens: int  # cached prefix tokens at each request's first admission
    prefill_tokens: int  # fill tokens computed, recomputation after retraction included
    retractions: int
    retracted_tokens: int  # output tokens thrown away by retractions (recomputed later)
    admit_rejections: int
    evicted_tokens: int
    optimal_s: float
    weight_bound_s: float  # T_w: the strict bound, the fewest steps' weight reads charged
    wall_s: float
    ops: StepSeconds = field(repr=False)  # per step: GEMM compute, weight read, decode-attention read
    series: dict = field(repr=False, default_factory=dict)  # per step: prefill, decode, kv_read, kv_active, running

    def time(self, model: ExecModel) -> float:
        return float(step_seconds(self.ops, model).sum())

    def fraction_of_weight_bound(self, model: ExecModel) -> float:
        return self.weight_bound_s / self.time(model)

    def retimed(self, cost: CostModel) -> "SimResult":
        """The same schedule timed with another cost model (e.g. prefill attention charged)."""
        s = self.series
        return replace(self, ops=operator_seconds(cost, s["prefill"] + s["decode"], s["kv_read"], s["attn_pairs"],
                                                   s["decode"], s["kv_active"]))

    def time_split(self, model: ExecModel) -> dict:
        return {k: seconds(v) for k, v in split_seconds(self.ops, model).items()}

    def throughput(self, model: ExecModel) -> float:
        """(input + output tokens) per second."""
        return (self.prompt_tokens + self.output_tokens) / self.time(model)

    def fraction_of_optimal(self, model: ExecModel) -> float:
        return self.optimal_s / self.time(model)

    @property
    def sharing(self) -> float:
        """Prompt tokens served from the prefix cache at first admission."""
        return self.first_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def peak_kv(self) -> float:
        """Largest share of the KV pool held by running requests."""
        return float(self.series["kv_active"].max()) / self.kv_tokens if self.steps else 0.0

    @property
    def mean_kv(self) -> float:
        return float(self.series["kv_active"].mean()) / self.kv_tokens if self.steps else 0.0

    def summary(self, model: ExecModel) -> dict:
        return {
            "policy": self.policy,
            "time_s": seconds(self.time(model)),
            "throughput_tok_s": round(self.throughput(model), 1),
            "fraction_of_optimal": round(self.fraction_of_optimal(model), 4),
            "sharing": round(self.sharing, 4),
            "steps": self.steps,
            "comp_s": seconds(float(self.ops.comp.sum())),
            "weights_s": seconds(float(self.ops.weights.sum())),
            "attn_s": seconds(float(self.ops.attn.sum())),
            "peak_kv": round(self.peak_kv, 4),
            "mean_kv": round(self.mean_kv, 4),
            "retractions": self.retractions,
            "recomputed_tokens": self.prefill_tokens - (self.prompt_tokens - self.first_hit_tokens),
            "wall_s": round(self.wall_s, 2),
        }


def optimal_seconds(requests, cost: CostModel, sharing: float) -> float:
    tokens = sum(compute_tokens(r.prompt_len, r.output_len) for r in requests)
    units = sum(memory_units(r.prompt_len, r.output_len) for r in requests)
    return cost.optimal_time(tokens, sharing, units)


def min_steps(requests, max_running: int) -> int:
    """The fewest steps any schedule needs (see the module docstring)."""
    out = [r.output_len for r in requests]
    return max(max(out, default=0), -(-sum(out) // max_running))


def weight_bound_seconds(requests, cost: CostModel, sharing: float, max_running: int) -> float:
    """T_w = max(C, M + N_min w) (see the module docstring): no run of `requests` is shorter."""
    p = np.fromiter((r.prompt_len for r in requests), dtype=np.float64)
    d = np.fromiter((r.output_len for r in requests), dtype=np.float64)
    layer_tokens = max(0.0, float((p + d - 1).sum()) - sharing * float((p + d).sum()))
    comp = layer_tokens * cost.seconds_per_layer_token + float((d - 1).sum()) * cost.seconds_per_sampled_token
    reads = float(((d - 1) * p + d * (d - 1) / 2).sum())  # decode steps: p + g tokens at the g-th, g = 1..d-1
    mem = reads * cost.kv_bytes_per_token / cost.hardware.effective_bandwidth
    return max(comp, mem + min_steps(requests, max_running) * step_weight_seconds(cost, 1))


def result_from_engine(engine, policy: str, optimal_s: float, wall_s: float, weight_bound_s: float) -> SimResult:
    series = {k: np.asarray(v, dtype=np.int64) for k, v in engine.series.items()}
    ops = operator_seconds(engine.cost, series["prefill"] + series["decode"], series["kv_read"], series["attn_pairs"],
                           series["decode"], series["kv_active"])
    c = engine.counters
    return SimResult(policy, len(engine.requests), engine.config.kv_tokens, engine.steps, c.prompt_tokens,
                     c.output_tokens, c.first_hit_tokens, c.prefill_tokens, c.retractions, c.retracted_tokens,
                     c.admit_rejections, c.evicted_tokens, optimal_s, weight_bound_s, wall_s, ops, series)


def binned(result: SimResult, model: ExecModel, bins: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(elapsed seconds, mean compute ms, mean memory-traffic ms (weights + KV)) over `bins`
    equal stretches of time."""
    t = step_seconds(result.ops, model)
    end = np.cumsum(t)
    edges = np.linspace(0.0, end[-1], bins + 1)
    idx = np.minimum(np.searchsorted(edges, end - t / 2, side="right") - 1, bins - 1)
    count = np.bincount(idx, minlength=bins)
    keep = count > 0
    gemm = np.bincount(idx, weights=result.ops.comp, minlength=bins)[keep] / count[keep]
    attn = np.bincount(idx, weights=result.ops.weights + result.ops.attn, minlength=bins)[keep] / count[keep]
    mid = ((edges[:-1] + edges[1:]) / 2)[keep]
    return mid, 1e3 * gemm, 1e3 * attn


def plot_steps(results: list[SimResult], path, model: ExecModel, title: str = "") -> None:
    """Per-step compute (GEMM) and memory (decode attention) time over the run, one panel per
    policy: the paper's Figure 10."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(9, 2.4 * len(results)), sharex=True, squeeze=False)
    for ax, res in zip(axes[:, 0], results):
        x, g, a = binned(res, model)
        ax.plot(x / 60, g, label="compute (GEMM)", color="tab:red", lw=1)
        ax.plot(x / 60, a, label="memory (weights + KV reads)", color="tab:blue", lw=1)
        ax.set_ylabel("ms / step")
        ax.set_title(f"{res.policy}: {res.time(model) / 60:.1f} min, {res.fraction_of_optimal(model):.1%} of optimal",
                     fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    axes[-1, 0].set_xlabel(f"simulated time (min, {model.mode})")
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(results: dict, models: dict, baseline: str = "dfs") -> list[dict]:
    """One row per policy: time, throughput and share of the optimum per execution mode, the
    speedup and prefix sharing relative to `baseline` (when it ran), KV use, retractions."""
    base = results.get(baseline)
    rows = []
    for name, res in results.items():
        row = {"policy": name}
        for label, model in models.items():
            t = res.time(model)
            row[f"{label}_time_s"] = seconds(t)
            row[f"{label}_throughput_tok_s"] = round(res.throughput(model), 1)
            row[f"{label}_fraction_of_optimal"] = round(res.fraction_of_optimal(model), 4)
            row[f"{label}_fraction_of_weight_bound"] = round(res.fraction_of_weight_bound(model), 4)
            if base is not None:
                row[f"{label}_speedup_vs_{baseline}"] = round(base.time(model) / t, 4)
        row["sharing"] = round(res.sharing, 4)
        if base is not None:
            row[f"sharing_vs_{baseline}"] = round(res.first_hit_tokens / base.first_hit_tokens, 4) \
                if base.first_hit_tokens else 1.0
        row.update(peak_kv=round(res.peak_kv, 3), mean_kv=round(res.mean_kv, 3), retractions=res.retractions,
                   recomputed_tokens=res.prefill_tokens - (res.prompt_tokens - res.first_hit_tokens),
                   steps=res.steps, wall_s=round(res.wall_s, 2))
        rows.append(row)
    return rows


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Plain-text table of `rows` with (key, header) columns; missing cells stay empty."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(k, "")) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
