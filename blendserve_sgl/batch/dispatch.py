"""Shards of one central plan for N replicas: `--dp N` (SGLang's DP ranks) and `--ray`.

`plan(items, n, cost)` builds the resource tree over every pending request (prompt token ids,
output length at its max_tokens, the bound the engine reserves), runs sort -> split -> sort and
deals it with `core.shard.plan_strata` (the lengths are only max_tokens: every larger subtree
spread over the replicas, small groups whole); `shards` gives the items of each replica, `assign`
custom_id -> replica. With `--dp N` the engine is one
`sglang.Engine(dp_size=N)` and each request carries `routed_dp_rank` = its replica, which
SGLang's DP controller honours before its own round-robin (`maybe_external_dp_rank_routing`,
0.5.23), so each rank's `blend` policy plans exactly its shard. `check_ranks` asks every rank
which policy object it runs (the plugin adds `blendserve_policy` to the internal state) and
fails when one is not `BlendPolicy`: a plugin that fails to load is only logged by SGLang.

On CPU every rank needs its own cores: `cpu_bind(n)` splits this process's CPUs into n groups
(`SGLANG_CPU_OMP_THREADS_BIND`, e.g. "0|1").
"""

from __future__ import annotations

import heapq
import os
from typing import Iterator, Sequence

from ..core.cost import CostModel
from ..core.preset import PRESET
from ..core.shard import ShardPlan, plan_for
from ..core.tree import ResourceTree
from .prompts import Prepared

POLICY_CLASS = "BlendPolicy"


class DispatchError(RuntimeError):
    pass


def cut(tree: ResourceTree, n: int, keep_sharing: float = PRESET.scan.keep_sharing) -> list[list]:
    """Request ids of each of n replicas, each list in the plan's DFS order (`plan_tree`)."""
    return plan_tree(tree, n, keep_sharing).shards


def plan_tree(tree: ResourceTree, n: int, keep_sharing: float = PRESET.scan.keep_sharing) -> ShardPlan:
    """The tree sorted, split and dealt by `plan_strata` (`plan_for`), whose compute measure counts
    the shared segments each rank's `blend` policy computes again (below its hold threshold)."""
    out = plan_for(tree, n, PRESET.scan, keep_sharing)  # the plugin's split budget and hold
    out.check_integrity(tree)
    return out


def plan(items: Sequence[Prepared], n: int, cost: CostModel,
         keep_sharing: float = PRESET.scan.keep_sharing) -> ShardPlan:
    """The plan over the items' token tree (output length = max_tokens); its shards hold indices
    into `items`."""
    tree = ResourceTree(cost)
    for i, p in enumerate(items):
        tree.add(i, tokens=p.input_ids, output_len=p.max_tokens, max_tokens=p.max_tokens)
    return plan_tree(tree, n, keep_sharing)


def shards(items: Sequence[Prepared], n: int, cost: CostModel,
           keep_sharing: float = PRESET.scan.keep_sharing) -> list[list[Prepared]]:
    """The items of each of n replicas (`plan`)."""
    return [[items[i] for i in ids] for ids in plan(items, n, cost, keep_sharing).shards]


def store_shards(store, done, n: int, cost: CostModel,
                 keep_sharing: float = PRESET.scan.keep_sharing) -> list[list[int]]:
    """Store indices of the requests still to run (`done` False), per replica (`cut` over the
    batch's tree as `order.build_tree` builds it)."""
    from .order import build_tree

    tree = build_tree(store, cost)
    for i in range(len(store)):
        if done[i]:
            tree.remove(i)
    return cut(tree, n, keep_sharing)


def interleave(parts: Sequence[Sequence]) -> Iterator:
    """One sequence of every part's items, each part advancing at its own share of the total, so a
    window over it always holds the next requests of every replica."""
    heap = [(1 / len(p), r, 0) for r, p in enumerate(parts) if p]
    heapq.heapify(heap)
    while heap:
        _, r, i = heapq.heappop(heap)
        yield parts[r][i]
        if i + 1 < len(parts[r]):
            heapq.heappush(heap, ((i + 2) / len(parts[r]), r, i + 1))


def assign(items: Sequence[Prepared], n: int, cost: CostModel,
           keep_sharing: float = PRESET.scan.keep_sharing) -> dict:
    """custom_id -> replica index in [0, n)."""
    return {p.request.custom_id: r for r, part in enumerate(shards(items, n, cost, keep_sharing)) for p in part}


def cpu_bind(n: int, cpus: Sequence[int] | None = None, flag: str = "--dp") -> str:
    """`SGLANG_CPU_OMP_THREADS_BIND` for n ranks: this process's CPUs in n contiguous groups
    (`flag`: the option that asked for n, named in the error; `--dp` takes the variable when it is
    set, `--replicas` binds each replica itself)."""
    cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if len(cpus) < n:
        own = " or set SGLANG_CPU_OMP_THREADS_BIND yourself (one group of cores per rank, '|' between)" \
            if flag == "--dp" else ""
        raise DispatchError(f"{flag} {n} on CPU needs at least {n} CPU cores (one per rank); this process may use "
                            f"{len(cpus)}: lower {flag}{own}")
    size, extra = divmod(len(cpus), n)
    groups, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        groups.append(",".join(map(str, cpus[start:end])))
        start = end
    return "|".join(groups)


def dp_engine_kwargs(n: int, device: str) -> dict:
    """Engine keyword arguments for N ranks; sets the CPU bind variable (unless the user did)."""
    if n > 1 and device == "cpu" and not os.environ.get("SGLANG_CPU_OMP_THREADS_BIND"):
        os.environ["SGLANG_CPU_OMP_THREADS_BIND"] = cpu_bind(n)  # the user's own, when set, is taken as it is
    return {"dp_size": n} if n > 1 else {}


def rank_policies(engine) -> list:
    """Each rank's policy class name as the rank reports it (None where it says nothing)."""
    states = engine.loop.run_until_complete(engine.tokenizer_manager.get_internal_state())
    return [s.get("blendserve_policy") if isinstance(s, dict) else None for s in states]


def check_ranks(engine, n: int) -> None:
    """Raise DispatchError unless all n ranks run the blend policy."""
    found = rank_policies(engine)
    bad = [i for i, name in enumerate(found) if name != POLICY_CLASS]
    if len(found) != n or bad:
        raise DispatchError(f"--dp {n}: expected {n} ranks running {POLICY_CLASS}, got {found}; the blendserve "
                            "plugin did not load in every scheduler (is blendserve-sgl installed in the engine's "
                            "Python, and PYTHONPATH the same for its subprocesses?)")
