"""N simulated engines, each running its share of one workload.

Three ways to deal the requests to N engines:

- `blend`: one central tree (lengths as the run knows them), sorted and split, cut by
  `core.shard.plan_shards`; each engine gets its shard;
- `round-robin`: request i to engine i mod N (SGLang's DP controller, `auto` method);
- `blocks`: blocks of 256 requests in arrival order, block j to engine j mod N (Ray Data's
  `batch_size` blocks to a replica pool, no prefix locality).

Each engine runs its requests with the same policy and `RunSpec` as one engine would; the N
engines run side by side, so the job takes the slowest engine's time. Scaling is one engine's
time over that; sharing is the prefix-cache hits of all engines over one engine's.
"""

from __future__ import annotations

from typing import NamedTuple

from ..core.shard import plan_shards
from ..core.split import sort_and_split
from .metrics import SimResult
from .policies import reference_tree
from .request import from_records
from .run import RunSpec, Workload, simulate
from .timing import ExecModel

DEALS = ("blend", "round-robin", "blocks")
BLOCK = 256  # Ray Data LLM's default batch_size


class ScaleOut(NamedTuple):
    deal: str
    engines: list  # per engine: SimResult (None for an engine dealt no request)

    def time(self, mode: ExecModel) -> float:
        return max(r.time(mode) for r in self.engines if r is not None)

    def scaling(self, one: SimResult, mode: ExecModel) -> float:
        """One engine's time over the slowest of the N engines'."""
        return one.time(mode) / self.time(mode)

    def sharing_vs_one(self, one: SimResult) -> float:
        hits = sum(r.first_hit_tokens for r in self.engines if r is not None)
        return hits / one.first_hit_tokens if one.first_hit_tokens else 1.0

    def work_imbalance(self, mode: ExecModel) -> float:
        """Largest relative deviation of an engine's time from the mean."""
        times = [r.time(mode) if r is not None else 0.0 for r in self.engines]
        mean = sum(times) / len(times)
        return max(abs(t - mean) for t in times) / mean


def deal(records: list, n: int, how: str, spec: RunSpec, stripes: int | None = None) -> list[list]:
    """The records of each of `n` engines (each list in arrival order)."""
    if how not in DEALS:
        raise ValueError(f"unknown dealing {how!r}; choose one of {', '.join(DEALS)}")
    if how == "round-robin":
        return [records[i::n] for i in range(n)]
    if how == "blocks":
        out = [[] for _ in range(n)]
        for j in range(0, len(records), BLOCK):
            out[(j // BLOCK) % n] += records[j:j + BLOCK]
        return out
    tree = reference_tree(from_records(records), spec.cost)
    sort_and_split(tree, spec.preset.scan.keep_sharing, spec.preset.scan.max_split_rounds)
    shard_of = plan_shards(tree, n, stripes=stripes).shard_of()
    out = [[] for _ in range(n)]
    for r in records:
        out[shard_of[r.rid]].append(r)
    return out


def scale_out(records: list, n: int, how: str, spec: RunSpec, policy: str = "blend",
              check: bool = False) -> ScaleOut:
    """Deal `records` to `n` engines and simulate each with `policy`."""
    parts = deal(records, n, how, spec)
    return ScaleOut(how, [simulate(Workload(part, spec.cost), policy, spec, check=check) if part else None
                          for part in parts])
