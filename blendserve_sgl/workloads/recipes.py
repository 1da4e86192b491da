"""The recipes that mix request classes (`classes.py`) into a workload.

- `mixed_workload(n, mix)`: fixed fractions per class, shuffled (the default mix of MMLU, Azure
  code and conversation, and long outputs).
- `mix(n, density, sharing)`: the paper's recipe: the fractions of `MIX_CLASSES` that reach a
  target compute density and prefix-sharing ratio. Density rho = (1 - s) Comp / Mem and
  sharing s are ratios of sums over requests, so they are linear in the fractions: solve,
  generate, measure the real prefix tree, correct the targets until both are within `tol`.
- `trace(name, n)`: the paper's Trace#1-#4 analogs (`TRACES`: density 1.4 or 0.9, sharing 35%
  or 5%), built by `mix`; and `conversation`, real multi-turn conversations alone (ShareGPT V3,
  `conversation.py`: deep chained prefixes), its density and sharing whatever they are.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..core.cost import CostModel, memory_units
from .classes import CLASSES, class_records
from .data import Record
from .tree import build_tree

TRACES = {  # name: (compute density, prefix-sharing ratio), the paper's Trace#1-#4
    "trace1": (1.4, 0.35),
    "trace2": (1.4, 0.05),
    "trace3": (0.9, 0.35),
    "trace4": (0.9, 0.05),
}
WORKLOADS = (*TRACES, "conversation")  # what `trace` builds
MIX_CLASSES = ("mmlu", "base", "video")  # what `mix` solves over
DEFAULT_MIX = {"mmlu": 0.3, "azure-code": 0.25, "azure-conv": 0.35, "long-output": 0.1}


def mixed_workload(n: int, seed: int = 0, mix: dict[str, float] | None = None) -> list[Record]:
    """n records mixing the classes of `mix` (fractions by request count), shuffled with `seed`."""
    if n < 1:
        raise ValueError(f"workload size must be >= 1, got {n}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - set(CLASSES)
    if unknown or any(not (v >= 0) for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"bad mix {mix}: fractions >= 0 over {', '.join(CLASSES)}")
    rng = np.random.default_rng(seed)
    total = sum(mix.values())
    counts = {k: int(round(n * v / total)) for k, v in mix.items()}
    counts[max(counts, key=counts.get)] += n - sum(counts.values())
    records: list[Record] = []
    for kind, count in counts.items():
        # `base` is Azure conv and code requests under the azure-* classes' names: those start after it
        start = counts.get("base", 0) if kind.startswith("azure-") else 0
        records += class_records(kind, count, rng, start)
    return [records[i] for i in rng.permutation(len(records))]


class MixReport(NamedTuple):
    counts: dict  # class -> requests
    density: float  # measured on the records' prefix tree
    sharing: float
    target_density: float
    target_sharing: float
    iterations: int  # the round returned (the first within tol, else the nearest)


def _solve(stats: dict, cost: CostModel, density: float, sharing: float) -> np.ndarray:
    """Fractions f (per class, by request count) with sum f S = s sum f T and
    c sum f (T - S) = rho m sum f M, sum f = 1. stats[k] = (T, S, M) means per request."""
    c, m = cost.seconds_per_compute_token, cost.seconds_per_memory_unit
    a = np.array([[stats[k][1] - sharing * stats[k][0] for k in MIX_CLASSES],
                  [c * (stats[k][0] - stats[k][1]) - density * m * stats[k][2] for k in MIX_CLASSES],
                  [1.0] * len(MIX_CLASSES)])
    return np.linalg.solve(a, np.array([0.0, 0.0, 1.0]))


def mix(n: int, density: float, sharing: float, cost: CostModel, seed: int = 0, tol: float = 0.02,
        max_iter: int = 6) -> tuple[list[Record], MixReport]:
    """n records whose prefix tree has compute density `density` and sharing `sharing`, aimed at
    within `tol` relative over at most `max_iter` rounds; raises ValueError when the classes'
    mix cannot reach them at all, else returns the first round within `tol`, or, when none is,
    the round nearest the targets (the larger relative miss of the two), whose reached density
    and sharing the `MixReport` carries (at small n a few long-output requests move the density
    past `tol` and the rounds swing around it: the sweep reports each cell's measured values beside
    its target)."""
    if n < 100:
        raise ValueError(f"a trace analog needs at least 100 requests, got {n}")
    if not (math.isfinite(density) and density > 0 and math.isfinite(sharing) and 0 <= sharing < 1):
        raise ValueError(f"density {density} with sharing {sharing}: the density must be a positive number and the "
                         "sharing a fraction from 0 to below 1, e.g. mix:1.2,0.25")
    pool_rng = np.random.default_rng(seed + 7919)
    stats = {}
    for k in MIX_CLASSES:
        pool = class_records(k, 4000, pool_rng)
        shared = np.array([sum(g for _, g in r.prefix) for r in pool], dtype=np.float64)
        p = np.array([r.prompt_len for r in pool], dtype=np.float64)
        d = np.array([r.output_len for r in pool], dtype=np.float64)
        stats[k] = ((p + d).mean(), shared.mean(), memory_units(p, d).mean())
    want_rho, want_s = density, sharing
    best = None  # (miss, round's records, counts, density, sharing, round)
    for it in range(1, max_iter + 1):
        f = _solve(stats, cost, want_rho, want_s)
        if (f < -1e-9).any():
            raise ValueError(f"density {density} with sharing {sharing} is out of reach of the classes "
                             f"{list(MIX_CLASSES)} (fractions {dict(zip(MIX_CLASSES, np.round(f, 4).tolist()))}) for "
                             f"{cost.model.name} on {cost.hardware.name}: a density is compute per KV byte read, so "
                             "it depends on the model; use a trace file (--workload PATH.csv), another mix:D,S, or "
                             "another model")
        counts = np.floor(np.clip(f, 0, None) * n).astype(int)
        counts[int(np.argmax(f))] += n - counts.sum()
        rng = np.random.default_rng(seed)
        records = []
        for k, cnt in zip(MIX_CLASSES, counts):
            records += class_records(k, int(cnt), rng)
        records = [records[i] for i in rng.permutation(len(records))]
        tree = build_tree(records, cost)
        rho, s = tree.density(tree.root), tree.root.sharing
        miss = max(abs(rho / density - 1), abs(s / sharing - 1) if sharing else abs(s))
        if best is None or miss < best[0]:
            best = (miss, records, counts, rho, s, it)
        if miss <= tol:
            break
        want_rho *= density / rho
        want_s += sharing - s
    _, records, counts, rho, s, it = best
    return records, MixReport(dict(zip(MIX_CLASSES, map(int, counts))), rho, s, density, sharing, it)


def trace(name: str, n: int, cost: CostModel, seed: int = 0) -> tuple[list[Record], MixReport]:
    """One of the paper's trace analogs (`TRACES`), or the multi-turn conversation workload."""
    if name == "conversation":
        records = class_records("conversation", n, np.random.default_rng(seed))
        tree = build_tree(records, cost)
        rho, s = tree.density(tree.root), tree.root.sharing
        return records, MixReport({"conversation": n}, rho, s, rho, s, 0)
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; choose one of {list(WORKLOADS)}")
    density, sharing = TRACES[name]
    return mix(n, density, sharing, cost, seed)
