"""N simulated engines, each running its share of one workload.

Three ways to deal the requests to N engines:

- `blend`: what `blendserve run --dp/--ray` ships: one central tree with each request's output
  at its max_tokens (all the run knows before anything runs; `max_new_tokens`), sorted and split,
  dealt by `core.shard.plan_strata`; each engine gets its shard. Beside it, `blend-cuts`: the
  same tree cut by `plan_shards` (what shipped before `plan_strata`), `blend-cuts-told`: the cuts
  told every request's true output length (an oracle no run has; the simulator's `blend` row
  until this was found), `blend-even-pieces`: the told cuts with every cut at i / pieces of the
  totals (the planner's earlier rule);
- `round-robin`: request i to engine i mod N (SGLang's DP controller, `auto` method);
- `blocks`: blocks of 256 requests in arrival order, block j to engine j mod N (Ray Data's
  `batch_size` blocks to a replica pool, no prefix locality);
- `fed` (`blend-fed-K`): the told cuts with the snake's last K pieces kept back and fed to
  whichever engine runs low (work stealing at piece granularity); the engines run side by side.

Each engine runs its requests with the same policy and `RunSpec` as one engine would; the N
engines run side by side, so the job takes the slowest engine's time. Scaling is one engine's
time over that; sharing is the prefix-cache hits of all engines over one engine's.

`diagnose` splits the loss of scaling: engine time imbalance (slowest over mean), the engines'
summed time over one engine's (extra steps: each engine reads the weights every step and needs
at least its longest output's steps), the slowest engine's tail (the time after its last
prefill: decode only), the critical-path floor (`floor_seconds`: the longest single request's
steps at their least time, which no dealing over any N shortens, so the best scaling is
`bound` = one's time / max(one's time / N, floor)), the scaling the same engine time would give
spread evenly (`balanced_scaling` = N x one's time / the summed time: what no rebalancing of the
same work, work stealing included, can beat), the engines' own weight-charging bounds
T_w (`SimResult.weight_bound_s`: the slowest engine's time cannot go below the largest), lost
sharing and each engine's density against the whole workload's.

`shard_profiles` looks inside each engine of one dealing: its work totals and density, its
long-output requests (output at or above the batch's `LONG_QUANTILE`) and when each first starts,
its step count, KV use (mean, and the share of its time in steps holding under `LOW_KV` of the
pool), retractions, decode-only tail and its time split (`SimResult.time_split`).
"""

from __future__ import annotations

import math
import time
from typing import NamedTuple

import numpy as np

from ..core.shard import ShardPlan, plan_for, snake
from .engine import Engine
from .metrics import SimResult, result_from_engine
from .policies import make_picker, reference_tree
from .request import from_records, max_new_tokens
from .run import RunSpec, Workload, simulate
from .timing import ExecModel, operator_seconds, step_seconds, step_weight_seconds

DEALS = ("blend", "round-robin", "blocks")
EVEN_PIECES = "blend-even-pieces"  # blend cut with every cut at i / pieces of the totals (`plan_shards` even_pieces)
CUTS = "blend-cuts"  # plan_shards' cuts over the max_tokens tree (what --dp/--ray shipped before plan_strata)
CUTS_TOLD = "blend-cuts-told"  # plan_shards' cuts told the true output lengths (an oracle)
PLANNED = ("blend", CUTS, CUTS_TOLD, EVEN_PIECES)  # the dealings the shard planner makes
FED = "blend-fed"  # blend with the snake's last pieces fed on demand (`fed`), e.g. "blend-fed-8"
BLOCK = 256  # Ray Data LLM's default batch_size
LONG_QUANTILE = 0.99  # shard_profiles: a long-output request's output is at least this quantile of the batch's
LOW_KV = 0.2  # shard_profiles: a step holding less than this share of the KV pool counts as a low-KV step


class ScaleOut(NamedTuple):
    deal: str
    engines: list  # per engine: SimResult (None for an engine dealt no request)
    densities: list  # per engine: its requests' density (with its own prefix sharing); None when empty
    plan: ShardPlan | None = None  # the shard plan of a blend dealing

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


def floor_seconds(records: list, cost) -> float:
    """The longest single request's least time: its prefill step and each of its d - 1 decode
    steps read the weights, and decode step k reads its p + k KV tokens (overlapped or not), so an
    engine holding it runs at least this long whatever else it runs."""
    w, kv = step_weight_seconds(cost, 1), cost.kv_bytes_per_token / cost.hardware.effective_bandwidth
    return max(r.output_len * w + ((r.output_len - 1) * r.prompt_len + r.output_len * (r.output_len - 1) / 2) * kv
               for r in records)


def diagnose(run: ScaleOut, one: SimResult, floor_s: float, density: float, mode: ExecModel) -> dict:
    """Where scaling is lost (module docstring): times in seconds, ratios rounded."""
    live = [r for r in run.engines if r is not None]
    times = [r.time(mode) for r in live]
    n = len(run.engines)
    tails = [_tail_seconds(r, mode) for r in live]
    slowest = int(np.argmax(times))
    one_t = one.time(mode)
    bound = one_t / max(one_t / n, floor_s)
    drift = [abs(d / density - 1.0) for d in run.densities if d is not None and math.isfinite(d)]
    return {"time_max_over_mean": round(max(times) / (sum(times) / n), 4),
            "work_sum_over_one": round(sum(times) / one_t, 4),
            "slowest_tail_s": round(tails[slowest], 1), "slowest_time_s": round(times[slowest], 1),
            "slowest_tail_share": round(tails[slowest] / times[slowest], 4),
            "floor_s": round(floor_s, 1), "one_s": round(one_t, 1), "bound": round(bound, 4),
            "scaling_over_bound": round(one_t / max(times) / bound, 4),
            "balanced_scaling": round(n * one_t / sum(times), 4),
            "engines_weight_bound_s": round(max(r.weight_bound_s for r in live), 1),
            "one_weight_bound_s": round(one.weight_bound_s, 1),
            "density_drift_max": round(max(drift), 4) if drift else 0.0}


def _tail_seconds(res: SimResult, mode: ExecModel) -> float:
    """The run's time after its last prefill (decode only)."""
    steps = step_seconds(res.ops, mode)
    prefill = np.flatnonzero(np.asarray(res.series["prefill"]) > 0)
    return float(steps[prefill[-1] + 1:].sum()) if prefill.size else float(steps.sum())


class _FirstAdmission:
    """`simulate`'s on_step hook: the engine step at which each watched request was first admitted."""

    def __init__(self, rids):
        self.rids, self.pending, self.step = set(rids), None, {}

    def __call__(self, engine) -> None:
        if self.pending is None:
            self.pending = [r for r in engine.requests if r.rid in self.rids]
        if any(r.admissions for r in self.pending):
            for r in self.pending:
                if r.admissions:
                    self.step[r.rid] = engine.steps
            self.pending = [r for r in self.pending if not r.admissions]


def shard_profiles(parts: list[list], spec: RunSpec, mode: ExecModel, policy: str = "blend") -> list:
    """Per engine of a dealing (`deal`): what it holds and how its run went (module docstring);
    None for an engine dealt no request. Times in seconds, `long_start` as fractions of the
    engine's time (first, median, last long-output request's first admission)."""
    outputs = [r.output_len for part in parts for r in part]
    long_len = float(np.quantile(outputs, LONG_QUANTILE)) if outputs else 0.0
    out = []
    for part in parts:
        if not part:
            out.append(None)
            continue
        load = Workload(part, spec.cost)
        longs = [r for r in part if r.output_len >= long_len]
        first = _FirstAdmission(r.rid for r in longs)
        res = simulate(load, policy, spec, on_step=first)
        steps = step_seconds(res.ops, mode)
        total = float(steps.sum())
        before = np.cumsum(steps) - steps  # time at each step's start
        starts = sorted(float(before[first.step[r.rid] - 1]) / total for r in longs)
        low = np.asarray(res.series["kv_active"]) < LOW_KV * res.kv_tokens
        split = res.time_split(mode)
        root = load.reference.root
        out.append({"requests": len(part), "compute_tokens": root.tokens - root.saved, "memory_units": root.mem,
                    "density": round(load.density, 4), "long_requests": len(longs),
                    "long_output_tokens": sum(r.output_len for r in longs), "time_s": round(total, 1),
                    "steps": res.steps, "mean_kv": round(res.mean_kv, 4),
                    "low_kv_time_share": round(float(steps[low].sum()) / total, 4),
                    "retractions": res.retractions, "tail_share": round(_tail_seconds(res, mode) / total, 4),
                    "long_start": [round(starts[0], 4), round(starts[len(starts) // 2], 4), round(starts[-1], 4)]
                    if starts else None,
                    **{f"{k}_s": split[k] for k in ("compute_only", "memory_only", "weights", "kv_read")}})
    return out


def deal(records: list, n: int, how: str, spec: RunSpec, stripes: int | None = None) -> list[list]:
    """The records of each of `n` engines (each list in arrival order)."""
    return _deal(records, n, how, spec, stripes)[0]


def _deal(records: list, n: int, how: str, spec: RunSpec,
          stripes: int | None = None) -> tuple[list[list], ShardPlan | None]:
    """`deal`'s parts, with the shard plan of a blend dealing."""
    if how not in (*DEALS, *PLANNED):
        raise ValueError(f"unknown dealing {how!r}; choose one of {', '.join(dict.fromkeys((*DEALS, *PLANNED)))}")
    if how == "round-robin":
        return [records[i::n] for i in range(n)], None
    if how == "blocks":
        out = [[] for _ in range(n)]
        for j in range(0, len(records), BLOCK):
            out[(j // BLOCK) % n] += records[j:j + BLOCK]
        return out, None
    tree = planner_tree(records, spec.cost, told=how in (CUTS_TOLD, EVEN_PIECES))
    plan = plan_for(tree, n, spec.preset.scan, stripes=stripes, even_pieces=how == EVEN_PIECES, cuts=how != "blend")
    shard_of = plan.shard_of()
    out = [[] for _ in range(n)]
    for r in records:
        out[shard_of[r.rid]].append(r)
    return out, plan


def planner_tree(records: list, cost, told: bool = False):
    """The tree the shard planner cuts: each request's output at its max_tokens, as `blendserve
    run` builds it (`batch.dispatch.plan`); `told`: at its true length (an oracle)."""
    if not told:
        caps = max_new_tokens(records, known=False)
        records = [r._replace(output_len=m) for r, m in zip(records, caps)]
    return reference_tree(from_records(records), cost)


def fed(records: list, n: int, spec: RunSpec, mode: ExecModel, held: int, low: float = 1.5,
        stripes: int | None = None, policy: str = "blend") -> ScaleOut:
    """The told cuts (`blend-cuts-told`) with the snake's last `held` pieces kept back and fed on
    demand (work stealing at piece granularity, as a driver feeding pieces to the replica that
    asks): the N engines step in time order (the one furthest behind steps next); an engine whose
    unfinished requests fall under `low` mean pieces takes the next kept piece. `held` = 0 is
    `scale_out(records, n, "blend-cuts-told", spec)` exactly."""
    t0 = time.perf_counter()
    tree = planner_tree(records, spec.cost, told=True)  # the told cuts' pieces (an ablation)
    plan = plan_for(tree, n, spec.preset.scan, stripes=stripes, cuts=True)
    if not 0 <= held < len(plan.pieces):
        raise ValueError(f"held must be in [0, {len(plan.pieces)}) pieces, got {held!r}")
    index = {r.rid: i for i, r in enumerate(records)}
    pieces = [sorted((records[index[rid]] for rid in ids), key=lambda r: index[r.rid]) for ids in plan.pieces]
    kept = len(pieces) - held
    parts = [sorted((r for k in range(kept) if snake(k, n) == e for r in pieces[k]), key=lambda r: index[r.rid])
             for e in range(n)]
    engines = []
    for part in parts:
        reqs = from_records(part, known=spec.known_lengths)
        picker = make_picker(policy, reqs, spec.cost, seed=spec.seed, preset=spec.preset,
                             reference=Workload(part, spec.cost).reference if part else None)
        engines.append(Engine(spec.cost, spec.engine, picker, reqs))
    clock, queue, done = [0.0] * n, list(range(kept, len(pieces))), [False] * n
    threshold = low * len(records) / len(pieces)
    while not all(done):
        e = min((i for i in range(n) if not done[i]), key=clock.__getitem__)
        eng = engines[e]
        if queue and len(eng.requests) - eng.finished < threshold:
            k = queue.pop(0)
            parts[e] += pieces[k]
            for req in from_records(pieces[k], known=spec.known_lengths):
                eng.submit(req)
        if eng.finished >= len(eng.requests):
            done[e] = not queue
            continue
        eng.step()
        clock[e] += _last_step_seconds(eng, mode)
    wall = time.perf_counter() - t0
    loads = [Workload(part, spec.cost) if part else None for part in parts]
    results = [result_from_engine(eng, policy, w.optimal_s, wall, w.weight_bound_s(spec.cost, spec.engine.max_running))
               if w else None for eng, w in zip(engines, loads)]
    return ScaleOut(f"{FED}-{held}", results, [w.density if w else None for w in loads], plan)


def _last_step_seconds(engine: Engine, mode: ExecModel) -> float:
    s = engine.series
    ops = operator_seconds(engine.cost, [s["prefill"][-1] + s["decode"][-1]], [s["kv_read"][-1]],
                           [s["attn_pairs"][-1]], [s["decode"][-1]], [s["kv_active"][-1]])
    return float(step_seconds(ops, mode)[0])


def scale_out(records: list, n: int, how: str, spec: RunSpec, policy: str = "blend",
              check: bool = False) -> ScaleOut:
    """Deal `records` to `n` engines and simulate each with `policy`."""
    parts, plan = _deal(records, n, how, spec)
    loads = [Workload(part, spec.cost) if part else None for part in parts]
    return ScaleOut(how, [simulate(w, policy, spec, check=check) if w else None for w in loads],
                    [w.density if w else None for w in loads], plan)
