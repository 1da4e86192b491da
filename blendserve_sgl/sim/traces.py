"""Trace analogs of the paper's Trace#1-#4 and the mixing recipe that builds them.

The paper mixes BurstGPT, MMLU and a video-generation trace to a target compute density
(1.4 or 0.9) and prefix-sharing ratio (35% or 5%). Here the classes come from `shared/data`
(`workloads.py` loaders), each behind its own system prompt:

- `mmlu`: 5-shot prompt per subject (shared prefix) + question, 1-2 output tokens
  (token counts: `workloads.approx_tokens`, UTF-8 bytes / 4; no tokenizer needed);
- `azure-conv`, `azure-code`: the Azure conversation and code traces' lengths (the stand-in
  for BurstGPT, half each);
- `video`: the long-output class (the video-generation analog): short prompts, log-normal
  outputs around 10,000 tokens within [2,048, 16,384] (synthetic; the paper's video trace
  has ~16K-token outputs).

`mix(n, density, sharing)` solves for the class fractions that reach the targets (density
rho = (1 - s) Comp / Mem and sharing s are ratios of sums over requests, so they are linear
in the fractions), generates the records, measures the real prefix tree and corrects the
targets until both are within `tol`. Arrival order is a seeded shuffle.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..core.cost import CostModel, memory_units
from ..workloads import SYSTEM_PROMPT_TOKENS, Record, load_azure, load_mmlu

TRACES = {  # name: (compute density, prefix-sharing ratio), the paper's Trace#1-#4
    "trace1": (1.4, 0.35),
    "trace2": (1.4, 0.05),
    "trace3": (0.9, 0.35),
    "trace4": (0.9, 0.05),
}
CLASSES = ("mmlu", "base", "video")  # base: azure-conv and azure-code, half each


def _sys(kind: str) -> tuple:
    return (f"system:{kind}", SYSTEM_PROMPT_TOKENS)


def mmlu_records(n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    mmlu = load_mmlu()
    subjects = sorted(mmlu)
    out = []
    for i in range(n):
        s = subjects[int(rng.integers(0, len(subjects)))]
        prefix_len, questions = mmlu[s]
        q = questions[int(rng.integers(0, len(questions)))]
        out.append(Record(f"mmlu-{start + i}", SYSTEM_PROMPT_TOKENS + prefix_len + q,
                          (_sys("mmlu"), (f"mmlu:{s}", prefix_len)), int(rng.integers(1, 3)), "mmlu"))
    return out


def azure_records(kind: str, n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    prompts, outputs = load_azure(kind)
    idx = rng.integers(0, len(prompts), n)
    return [Record(f"azure-{kind}-{start + i}", SYSTEM_PROMPT_TOKENS + int(prompts[j]), (_sys(f"azure-{kind}"),),
                   max(1, int(outputs[j])), f"azure-{kind}") for i, j in enumerate(idx)]


def video_records(n: int, rng: np.random.Generator, start: int = 0, median: int = 10_000,
                  sigma: float = 0.3, bounds: tuple[int, int] = (2048, 16_384)) -> list[Record]:
    tails = np.clip(rng.lognormal(math.log(100), 0.4, n), 20, 400).astype(np.int64)
    outs = np.clip(rng.lognormal(math.log(median), sigma, n), *bounds).astype(np.int64)
    return [Record(f"video-{start + i}", SYSTEM_PROMPT_TOKENS + int(t), (_sys("video"),), int(d), "video")
            for i, (t, d) in enumerate(zip(tails, outs))]


def class_records(kind: str, n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    if kind == "mmlu":
        return mmlu_records(n, rng, start)
    if kind == "video":
        return video_records(n, rng, start)
    if kind == "base":
        half = n // 2
        return azure_records("conv", n - half, rng, start) + azure_records("code", half, rng, start)
    raise ValueError(f"unknown trace class {kind!r}; choose one of {list(CLASSES)}")


class MixReport(NamedTuple):
    counts: dict  # class -> requests
    density: float  # measured on the records' prefix tree
    sharing: float
    target_density: float
    target_sharing: float
    iterations: int


def _solve(stats: dict, cost: CostModel, density: float, sharing: float) -> np.ndarray:
    """Fractions f (per class, by request count) with sum f S = s sum f T and
    c sum f (T - S) = rho m sum f M, sum f = 1. stats[k] = (T, S, M) means per request."""
    c, m = cost.seconds_per_compute_token, cost.seconds_per_memory_unit
    a = np.array([[stats[k][1] - sharing * stats[k][0] for k in CLASSES],
                  [c * (stats[k][0] - stats[k][1]) - density * m * stats[k][2] for k in CLASSES],
                  [1.0] * len(CLASSES)])
    return np.linalg.solve(a, np.array([0.0, 0.0, 1.0]))


def mix(n: int, density: float, sharing: float, cost: CostModel, seed: int = 0, tol: float = 0.02,
        max_iter: int = 6) -> tuple[list[Record], MixReport]:
    """n records whose prefix tree has compute density `density` and sharing `sharing` (each
    within `tol` relative); raises ValueError when the classes cannot reach them."""
    from .policies import reference_tree
    from .request import from_records

    if n < 100:
        raise ValueError(f"a trace analog needs at least 100 requests, got {n}")
    pool_rng = np.random.default_rng(seed + 7919)
    stats = {}
    for k in CLASSES:
        pool = class_records(k, 4000, pool_rng)
        shared = np.array([sum(g for _, g in r.prefix) for r in pool], dtype=np.float64)
        p = np.array([r.prompt_len for r in pool], dtype=np.float64)
        d = np.array([r.output_len for r in pool], dtype=np.float64)
        stats[k] = ((p + d).mean(), shared.mean(), memory_units(p, d).mean())
    want_rho, want_s = density, sharing
    for it in range(1, max_iter + 1):
        f = _solve(stats, cost, want_rho, want_s)
        if (f < -1e-9).any():
            raise ValueError(f"density {density} with sharing {sharing} is out of reach of the classes "
                             f"{list(CLASSES)} (fractions {dict(zip(CLASSES, np.round(f, 4)))})")
        counts = np.floor(np.clip(f, 0, None) * n).astype(int)
        counts[int(np.argmax(f))] += n - counts.sum()
        rng = np.random.default_rng(seed)
        records = []
        for k, cnt in zip(CLASSES, counts):
            records += class_records(k, int(cnt), rng)
        records = [records[i] for i in rng.permutation(len(records))]
        tree = reference_tree(from_records(records), cost)
        rho, s = tree.density(tree.root), tree.root.sharing
        if abs(rho / density - 1) <= tol and abs(s / sharing - 1) <= tol:
            break
        want_rho *= density / rho
        want_s += sharing - s
    return records, MixReport(dict(zip(CLASSES, map(int, counts))), rho, s, density, sharing, it)


def trace(name: str, n: int, cost: CostModel, seed: int = 0) -> tuple[list[Record], MixReport]:
    """One of the paper's trace analogs (`TRACES`)."""
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; choose one of {sorted(TRACES)}")
    density, sharing = TRACES[name]
    return mix(n, density, sharing, cost, seed)
