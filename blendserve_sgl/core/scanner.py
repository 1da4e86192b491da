"""The dual scanner: admissions from both ends of the density-sorted tree.

The left cursor is the leftmost waiting request (compute-dense end), the right cursor the
rightmost (memory-dense end); taking a request removes it from the tree, so each cursor walks
its end in DFS order and every request is handed out exactly once. The KV memory M (what the
running requests hold plus what is free) is split so the running batch holds the workload's
density:

    M_L + M_R = M,    M_L rho(L) + M_R rho(R) = M rho(root)        (cost.split_memory)

rho(L), rho(R) are the densities of the subtrees each cursor is scanning (the lowest ancestor
holding at least `density_window` requests), rho(root) that of all waiting requests. Each side
admits while its next request fits: its KV reservation within the side's share and the free
memory, a free request slot, and prefill tokens left (the step's chunked-prefill budget is
split like the memory; what one side leaves is offered to the other). Shares hold on average
over time: a side may go over its share by one request per step while its running sum of
(held - share) is not positive, so a side whose requests are larger than its share neither
starves nor takes more than its share in the long run. With `lend_idle_share`, a share whose side
stopped for a reason other than memory is lent for the step to the other side if that one stopped
at its share.

Callers that can project the running requests' KV over time pass `Budget.kv_horizons`: a
short-lived request may then use memory that is only reserved for later. Callers that count
steps pass `Budget.steps` (and the pool size): each side then admits memory work (its requests'
decode KV reads) at the rate of its share, so long-output requests enter staggered rather than
in bursts that grow, peak and finish together.

With unknown output lengths, a seeded sample runs first (`estimate.py`); the tree is sorted
and split once its results are in. Deterministic: no clocks, no unseeded randomness, ties
broken by arrival order.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from .cost import memory_units, split_memory
from .estimate import SamplePhase
from .split import SplitReport, sort_and_split
from .tree import Node, Req, ResourceTree, sample_source

LEFT, RIGHT, SAMPLE = "left", "right", "sample"
MEMORY_STOPS = ("kv", "hard-cap", "share")  # a side stopped for lack of memory (ScanConfig.lend_idle_share)
REPLAN_MIN_TOKENS = 64  # a sample outgrowing the plan's estimate by fewer tokens leaves the plan as it is


class Budget(NamedTuple):
    kv_bytes: float  # free KV-cache bytes this step's admissions may reserve (for good)
    slots: int  # free request slots
    prefill_tokens: int  # prefill tokens this step may compute (chunked-prefill size)
    output_ratio: float | None = None  # share of estimated output reserved this step, the engine's new-token
    # ratio (known outputs are then reserved whole, as SGLang does for ignore_eos); None: the config's, for all
    # Optional, from callers that can project the running requests' KV over time:
    # ((steps, bytes), ...) with ascending steps: the KV bytes that stay free over the next
    # `steps` steps (each >= kv_bytes). A request that holds KV at most that long (its prefill
    # steps plus its output tokens) may use them: memory that running requests reserve for
    # output they have not generated yet, or that they release before this request ends.
    kv_horizons: tuple = ()
    # Optional, from callers that count steps: steps (forward passes) since the previous call,
    # and the whole KV pool in bytes. With them each side admits memory work at the rate of its
    # share (see DualScanner.schedule); without, shares bound reservations only.
    steps: int | None = None
    kv_pool: float | None = None
    prefilling: Any = ()  # rids of handed-out requests whose prompt is not in the engine's prefix
    # cache yet (prefill chunks left, or the result of their prefill not processed yet)
    # Optional, from callers whose engine walks the plan with its own admission check and stops at
    # its first refusal (SGLang's PrefillAdder; used with ScanConfig.engine_check): the room that check
    # sees, in tokens (free + evictable - what running requests may still write), and its per-request
    # clip: a new request is charged uncached prompt + min(max_tokens, clip) + 1.
    admit_room: float | None = None
    admit_clip: int = 4096
    mixed_steps: bool = True  # the engine decodes the running requests in its prefill steps (SGLang's
    # --enable-mixed-chunk); False: a prefill step decodes nothing, and the memory-dense side has the first
    # claim on the engine check's room (see DualScanner._dual_scan)


class Admission(NamedTuple):
    rid: Any
    side: str  # LEFT (compute-dense end), RIGHT (memory-dense end) or SAMPLE
    prompt_len: int
    cached_tokens: int  # prefix estimated to be cached: shared with a recently taken request
    output_len: int  # known, or the current estimate
    kv_bytes: float  # KV bytes reserved: (uncached prompt + r x output) x bytes/token (r: Budget.output_ratio)


@dataclass(frozen=True, slots=True)
class ScanConfig:
    keep_sharing: float = 0.99  # split budget: keep this fraction of the tree's saved prefix tokens
    density_window: int = 64  # rho(L)/rho(R): lowest ancestor with at least this many requests
    reserve_output_ratio: float = 1.0  # share of the output length reserved at admission
    sample_quorum: float = 0.5  # plan the rest once this share of the sample finished (1.0: all)
    max_split_rounds: int = 8
    hold_prefix_tokens: int = 0  # >0: stop a side whose next request shares at least this many
    # uncached prefix tokens with a request taken in the same step or still prefilling (engines
    # that compute a shared prefix once only across steps, like SGLang's in-batch prefix caching)
    prefix_cache: bool = True  # False: the engine caches no prefix across requests (SGLang's
    # --disable-radix-cache): nothing taken is estimated cached for the next request, and no
    # request is held for a prefix that would never be cached
    fill_while_sampling: bool = False  # True: while the output-length sample runs, the rest of the
    # step's budget goes to the dual scan over the tree sorted with the prior estimates (the
    # engine is not left idle; the plan is redone with the sample's estimates at the quorum)
    credit_steps: int = 256  # with Budget.steps: a side banks at most this many steps of its
    # memory-work rate (bounds the burst after a stretch in which it could not admit); a side starts
    # with the full bank (an engine that ran nothing before has been idle), so the empty pool fills
    final_wave: bool = False  # True: once every waiting request fits in the KV pool at once, admit
    # them longest output first (LPT), pooled, no shares: the batch ends in one wave instead of a
    # tail of the long requests one side left for last
    replan_growth: float | None = None  # after the plan: re-estimate, sort and split the waiting tree
    # when a sample still running reaches this many times its output at the last plan (the plan
    # counted it at that; long outputs are the samples that finish last), at the next step
    reserve_overruns: bool = False  # True: a running request past its estimate is expected to run
    # overrun_factor x its output so far (within max_tokens); the KV it will still need beyond its
    # reservation is kept free (admissions see that much less), so overruns do not force retractions
    reserve_growth: bool = False  # True: every running request of unknown length is expected to reach its
    # estimate (past it: overrun_factor x its output so far, within max_tokens); the output it will still
    # write beyond its reservation (r x estimate) is kept free, and a request is admitted only if that part
    # of it fits too: requests reserved at the engine's new-token ratio cannot together outgrow the pool
    fill_refresh_growth: float | None = None  # while the sample runs and the fill takes the rest
    # (fill_while_sampling): when a running sample reaches this many times what the fill assumes for
    # requests like it (its node's estimate at the last refresh, or its own output then), re-estimate
    # with the running samples counted at their output so far (a lower bound) and re-sort, at the next
    # step: the long outputs are the samples that finish last, and the fill otherwise takes their class
    # at the prior until the plan
    fill_settled_only: bool = False  # True: while the sample runs, the fill (fill_while_sampling) takes only
    # requests whose estimate is settled: walking up from the request, a node with finished samples comes
    # before any node that holds a sample still running (whose class may be longer than anything seen yet:
    # the long outputs are the samples that finish last)
    lend_idle_share: bool = False  # True: when one side stopped this step for a reason other than memory
    # (credit, prefill, hold, slots, nothing left) and the other for its share, the other goes on past
    # its share and its memory-work credit, within the free KV and its hard cap: a share the owner
    # cannot use this step is not left idle while the other side is refused for lack of it

    engine_check: bool = False  # True (with Budget.admit_room): plan only what the engine's own check admits,
    # in the order it walks: each request's charge (uncached + min(max_tokens, clip) + 1) within the room, split
    # between the sides like the memory in the first pass; requests whose prompt the step takes whole first,
    # at most one prompt the step has to chunk, and it last (SGLang stops admitting after it)

    free_pool_credit: float = 0.0  # >0 (with Budget.steps): per step a side also earns this many times its part of
    # the KV free for admission as memory-work credit (within its bank): memory the pool leaves unused is credit,
    # so a pool running part-empty fills faster than the rate alone, which takes a request's lifetime to fill it

    thin_batch_share: float = 0.0  # >0 (with engine_check): the compute-dense side starts a prompt the step
    # has to chunk only while the memory-dense side holds at least this part of its share; SGLang admits
    # nothing while it prefills a chunked prompt, so a long one started at a thin batch keeps it thin

    def __post_init__(self) -> None:
        if not (0.0 <= self.keep_sharing <= 1.0):
            raise ValueError(f"keep_sharing must be in [0, 1], got {self.keep_sharing!r}")
        if not (isinstance(self.density_window, int) and self.density_window >= 1):
            raise ValueError(f"density_window must be a positive integer, got {self.density_window!r}")
        if not (0.0 < self.sample_quorum <= 1.0):
            raise ValueError(f"sample_quorum must be in (0, 1], got {self.sample_quorum!r}")
        if not (isinstance(self.credit_steps, int) and self.credit_steps >= 1):
            raise ValueError(f"credit_steps must be a positive integer, got {self.credit_steps!r}")
        if not (0.0 <= self.reserve_output_ratio <= 1.0):
            raise ValueError(f"reserve_output_ratio must be in [0, 1], got {self.reserve_output_ratio!r}")
        if not (isinstance(self.free_pool_credit, (int, float)) and 0.0 <= self.free_pool_credit < math.inf):
            raise ValueError(f"free_pool_credit must be 0 or more, got {self.free_pool_credit!r}")
        if not (0.0 <= self.thin_batch_share <= 1.0):
            raise ValueError(f"thin_batch_share must be in [0, 1], got {self.thin_batch_share!r}")
        for name in ("hold_prefix_tokens", "max_split_rounds"):
            value = getattr(self, name)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("replan_growth", "fill_refresh_growth"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and 1.0 < value < math.inf):
                raise ValueError(f"{name} must be > 1 or None, got {value!r}")


class _Running(NamedTuple):
    side: str
    kv_bytes: float
    req: Req
    path: list  # root path at admission (sample results are recorded along it)
    work: float = 0.0  # memory-work credit spent on it (byte-steps), refunded by cancel
    node: Node | None = None  # its node when taken
    prev: Node | None = None  # the side's last taken node before it, and that request's rid
    prev_rid: Any = None
    sources: tuple = ()  # a sample's sample_source nodes along its path (DualScanner.sampling_at)
    out_reserved: int = 0  # output tokens its reservation holds (r x its estimate)


class _Side:
    """One end of the tree and its account: the KV its running requests hold, its debt (the sum
    over steps of held - share), its memory-work credit, the last requests it took; during a step,
    its share, hard cap, overdraft and prefill cap. `DualScanner.fits` / `take` check and commit a
    request against it."""

    __slots__ = ("name", "used", "debt", "credit", "metered", "last", "last_rid", "last_cached", "at_start", "taken",
                 "share", "hard_cap", "overdraft", "prefill_cap", "prefill_used", "borrowing", "room_cap", "room_used")

    def __init__(self, name: str):
        self.name = name
        self.used = self.debt = self.credit = 0.0
        self.metered = False  # whether a metered step has set its credit (the first one banks it full)
        self.last: Node | None = None  # the last node it took, and that request's rid
        self.last_rid: Any = None
        self.last_cached: Node | None = None  # the last taken node whose prompt the engine has cached
        self.at_start: tuple = (None, None)  # (last, last_rid) when the step began
        self.taken: dict = {}  # this step's takes: rid -> node
        self.begin_step(None, math.inf, True, None)

    def begin_step(self, share, hard_cap: float, overdraft: bool, prefill_cap, room_cap=None) -> None:
        self.share, self.hard_cap, self.overdraft, self.prefill_cap = share, hard_cap, overdraft, prefill_cap
        self.room_cap = room_cap  # its part of the engine check's room this step (None: pooled)
        self.prefill_used = self.room_used = 0
        self.borrowing = False  # holds the other side's idle share this step (ScanConfig.lend_idle_share)


class _Check(NamedTuple):
    cached: int  # estimated cached prefix
    need: float  # KV bytes reserved
    lent: bool  # fits only in memory running requests do not need before it ends
    account: _Side  # the side whose share it counts against
    aside: float = 0.0  # KV bytes of its expected growth beyond `need` (ScanConfig.reserve_growth)
    charge: int = 0  # tokens the engine's own check charges it (ScanConfig.engine_check)
    chunked: bool = False  # the engine computes its prompt over this and later steps (the step's last admission)


class DualScanner:
    def __init__(self, tree: ResourceTree, config: ScanConfig = ScanConfig()):
        self.tree = tree
        self.config = config
        self.running: dict[Any, _Running] = {}
        self.sides = {LEFT: _Side(LEFT), RIGHT: _Side(RIGHT)}
        self.sample = SamplePhase(tree.estimator, config.sample_quorum)
        self.planned = False  # sorted and split with sample-based estimates
        self._presorted = False  # sorted with the prior estimates (fill_while_sampling)
        self.prepared = False
        self.split_report: SplitReport | None = None
        self.handed_out = 0
        self._ratio = config.reserve_output_ratio
        self._engine_ratio = False  # the ratio is the engine's (Budget.output_ratio): known outputs are reserved whole
        self._wave: list[Req] = []  # final wave (ScanConfig.final_wave): waiting requests, longest first
        self._record: tuple | None = None  # (budget, extra) of the last schedule call: see last_step
        self._assumed: dict = {}  # running sample rid -> max(its node's estimate, its output) at the last plan
        self.replan_due = False  # ScanConfig.replan_growth: a running sample outgrew the plan
        self.overrun: dict = {}  # ScanConfig.reserve_overruns: rid -> KV bytes still expected past its reservation
        self.overrun_bytes = 0.0  # their sum
        self.generated: dict = {}  # running rid -> output so far, as last reported by `progress`
        self.sampling_at: dict = {}  # sample source node -> running sample requests below it (fill_settled_only)
        self.replans = 0
        self.refreshes = 0  # fill_refresh_growth: re-estimates before the plan

    @property
    def used(self) -> dict:
        """KV bytes held by each side's running requests."""
        return {name: side.used for name, side in self.sides.items()}

    @property
    def pending_sample(self) -> set:
        return self.sample.pending

    @property
    def sample_size(self) -> int:
        return self.sample.size

    @property
    def sampling(self) -> bool:
        return bool(self.sample.pending)

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Pick the output-length sample (if any length is unknown), else sort and split now."""
        self.prepared = True
        self.sample.start(self.tree)
        if not self.sample.pending:
            self._plan()

    def _plan(self) -> None:
        """Re-estimate unknown lengths (running samples at their output so far) and sort + split."""
        self.replans += self.planned
        self._estimate()
        self.split_report = sort_and_split(self.tree, self.config.keep_sharing, self.config.max_split_rounds)
        self.planned = True

    def _refresh(self) -> None:
        """Before the plan (ScanConfig.fill_refresh_growth): re-estimate with the running samples at
        their output so far and re-sort the tree the fill scans; no split (the plan does that)."""
        self.refreshes += 1
        self._estimate()
        self.tree.sort()
        self._presorted = True

    def _estimate(self) -> None:
        assumed = self.sample.estimate(self.tree, {rid: (run.path, run.req.max_tokens) for rid, run in self.running.items()})
        self.replan_due = False
        self._assumed = {rid: max(est, self.sample.generated.get(rid, 0)) for rid, est in assumed.items()}
        self._wave = []

    def _growth(self) -> float | None:
        """The growth at which a running sample makes the order stale: replan_growth after the plan,
        fill_refresh_growth before it (while the fill scans the tree)."""
        if self.planned:
            return self.config.replan_growth
        return self.config.fill_refresh_growth if self.config.fill_while_sampling else None

    def _replan_at(self, rid) -> int | None:
        """The output length at which running sample `rid` makes the plan (or, before it, the fill's
        order) stale (`_growth`): growth x what the plan assumed for requests like it (its node's estimate at the plan; for
        one taken after the plan, the estimate it was taken with), or x its own output at the plan
        if larger (a long sample among many short ones re-plans once per growth step, not every
        step), and at least REPLAN_MIN_TOKENS more."""
        growth = self._growth()
        if growth is None or rid not in self.sample.pending:
            return None
        base = max(1, self._assumed.get(rid, self.running[rid].req.output_len))
        return max(math.ceil(growth * base), base + REPLAN_MIN_TOKENS)

    def watch_at(self, rid) -> int | None:
        """The output length of running request `rid` at which `progress` should next be called
        (None: it need not be, unless it finishes): a sample's re-plan point, a left-side
        estimate's overrun point. Callers that report every step need not ask."""
        run = self.running[rid]
        gen = self.generated.get(rid, 0)
        marks = []
        replan = self._replan_at(rid)
        if replan is not None:  # past it (the re-plan is due): the next growth step
            marks.append(replan if replan > gen else max(math.ceil(self._growth() * gen), gen + REPLAN_MIN_TOKENS))
        if not run.req.known and (run.side == LEFT or self.config.reserve_overruns):
            mark = int(self.tree.estimator.overrun_factor * max(1, run.req.output_len)) + 1
            if self.config.reserve_overruns and gen >= mark:  # past it: each further growth step
                mark = math.ceil(self.tree.estimator.overrun_factor * gen)
            marks.append(mark)
        if not run.req.known and self.config.reserve_growth:  # the reserve shrinks as it writes; past its
            e = max(1, run.req.output_len)  # estimate it grows at each overrun_factor step
            marks.append(min(e + 1, gen + max(REPLAN_MIN_TOKENS, e // 8)) if gen <= e else
                         math.ceil(self.tree.estimator.overrun_factor * gen))
        return min((m for m in marks if m > gen), default=None)

    # ------------------------------------------------------------------ step
    def schedule(self, budget: Budget) -> list[Admission]:
        """Admissions for this step, in the order they should be admitted. Live: when nothing runs
        and a waiting request fits the free KV (with a slot and prefill tokens left), at least one."""
        if not self.prepared:
            self.prepare()
        elif not self.planned and not self.sample.pending and self.tree.root.count:
            self._plan()  # the sample left without finishing (retracted, aborted): plan with what is in
        if self.overrun_bytes:
            budget = budget._replace(kv_bytes=budget.kv_bytes - self.overrun_bytes)
        if self.replan_due and self.tree.root.count:
            self._plan() if self.planned else self._refresh()
        st = _StepState(budget, self.config.engine_check)
        self._record = None
        for side in self.sides.values():
            side.at_start = (side.last, side.last_rid)
            side.taken = {}
            side.begin_step(None, math.inf, True, None)
        self._set_cached_last(budget.prefilling)
        self._ratio = self.config.reserve_output_ratio if budget.output_ratio is None else budget.output_ratio
        self._engine_ratio = budget.output_ratio is not None
        out: list[Admission] = []
        if self._sample_phase(st, out) and self.tree.root.count:
            if not self._final_wave(budget, st, out):
                self._dual_scan(budget, st, out)
        if not out and not self.running and self.tree.root.count:
            self._admit_one(st, out)
        if st.chunked is not None:  # the engine stops admitting after the prompt it chunks: it goes last
            out.sort(key=lambda a: a.rid == st.chunked)
        return out

    def _sample_phase(self, st: "_StepState", out: list) -> bool:
        """Take the waiting sample requests (arrival order, no shares). False when the rest of the
        tree must wait for the sample (not planned and not filling while sampling)."""
        if self.sample.pending or self.sample.late:
            for req in self.sample.waiting(self.tree):
                if not self._offer(req, SAMPLE, st, out, shared=False):
                    break
            if not self.planned:
                if not self.config.fill_while_sampling:
                    return False
                if not self._presorted:  # until the sample is in: order by the prior estimates
                    self.tree.sort()
                    self._presorted = True
        return True

    def _final_wave(self, budget: Budget, st: "_StepState", out: list) -> bool:
        """The last wave (ScanConfig.final_wave): once every waiting request fits in the KV pool
        at once, what is left to decide is when the batch ends. Longest output first (LPT; ties in
        the tree's DFS order, so requests that share a prefix stay together and the hold keeps
        them from computing it twice in one step), pooled memory, no shares: the long requests start as soon as memory
        frees instead of forming a tail after the short ones. A held request waits for the next
        step without stopping the wave; the first one that does not fit stops it (smaller ones
        would take the memory it is waiting for). False when the wave has not begun."""
        root = self.tree.root
        if not self.config.final_wave or not (self.planned or self._presorted):
            return False
        pool = budget.kv_pool if budget.kv_pool else self._total(budget)
        if (root.tokens - root.saved) * self.tree.cost.kv_bytes_per_token > pool:
            return False
        reqs = self.tree.reqs
        alive = [r for r in self._wave if reqs.get(r.rid) is r]
        if len(alive) != len(reqs):  # arrivals, retractions or cancels since the wave was sorted
            alive = sorted(self.tree.iter_requests(), key=lambda r: -r.output_len)  # stable: ties stay in DFS order
        self._wave = alive  # taken ones drop out at the next call's filter
        mid = self.tree.density(root)
        for req in alive:
            if not self._offer(req, RIGHT if req.sort_key < mid else LEFT, st, out, shared=False) and \
                    st.why not in ("hold", "unsettled"):
                break
        self._record = (budget, {"final_wave": len(reqs), "stop": st.why})
        return True

    def _total(self, budget: Budget) -> float:
        return self.sides[LEFT].used + self.sides[RIGHT].used + max(0.0, budget.kv_bytes)

    def _dual_scan(self, budget: Budget, st: "_StepState", out: list) -> None:
        """Both cursors, each within its memory share (split by density), its part of the step's
        prefill tokens, and (with Budget.steps) its memory-work credit; then both pooled."""
        root = self.tree.root
        total = self._total(budget)
        window = min(self.config.density_window, max(1, root.count // 8))
        rho_l = self._region_density(self.tree.leftmost(), window)
        rho_r = self._region_density(self.tree.rightmost(), window)
        share_l = split_memory(total, rho_l, rho_r, self.tree.density(root))
        frac_l = share_l / total if total > 0 else 0.5
        caps = {LEFT: math.ceil(budget.prefill_tokens * frac_l)}
        caps[RIGHT] = budget.prefill_tokens - caps[LEFT]
        rooms = {LEFT: None, RIGHT: None}
        if st.room is not None:  # the engine check's room, split like the memory in the first pass
            rooms = {LEFT: st.room * frac_l, RIGHT: st.room * (1.0 - frac_l)}
        largest = {LEFT: self._largest_coming(LEFT), RIGHT: self._largest_coming(RIGHT)}
        for name, share, frac in ((LEFT, share_l, frac_l), (RIGHT, total - share_l, 1.0 - frac_l)):
            side = self.sides[name]
            side.debt = max(side.debt + side.used - share, -8.0 * share)
            # Each side leaves room for the largest of the other side's coming requests, so a side
            # whose requests are larger than its share can still overdraw when its turn comes. When
            # the two ends' largest cannot be in the pool together, the larger goes first: capped by
            # the other's, it could never be admitted while the other end had requests (a request
            # of nearly the whole pool starved while small ones kept arriving, and the small side,
            # capped by it, ran one request at a time).
            other = largest[RIGHT if name == LEFT else LEFT]
            hard_cap = total if largest[name] + other > total and largest[name] >= other else total - other
            side.begin_step(share, hard_cap, side.debt <= 0, caps[name], rooms[name])
            if budget.steps is not None:
                # Memory work at the rate of the shares: per step, a side may start decode KV reads
                # (byte-steps: KV held x decode steps, its requests' Mem) worth its share of the pool.
                # Requests admitted in a burst grow, peak and finish together, so the KV in use swings
                # between empty and full; metered, they enter staggered and the KV stays full.
                rate = frac * (budget.kv_pool if budget.kv_pool else total)
                bank = self.config.credit_steps * rate
                earned = max(0, budget.steps) * (rate + self.config.free_pool_credit * frac * max(0.0, budget.kv_bytes))
                side.credit = min(side.credit + earned, bank) if side.metered else bank
                side.metered = True
                if not self.running:  # nothing runs: no memory work is under way, whatever was spent
                    side.credit = max(side.credit, rate)
                st.metered = True
        first = len(out)
        stops = {LEFT: "empty", RIGHT: "empty"}
        # Where a prefill step decodes nothing, the steps a batch takes are its decode batches': the
        # memory-dense side (long outputs, large batches) goes first, and while the engine check's room
        # stops it the compute-dense side waits too, rather than take the room it is waiting for.
        right_first = st.room is not None and not budget.mixed_steps
        for pooled in (False, True):
            for name in (RIGHT, LEFT) if right_first else (LEFT, RIGHT):
                if pooled:
                    self.sides[name].prefill_cap = self.sides[name].room_cap = None
                if right_first and name == LEFT and stops[RIGHT] in ("engine", "engine-share"):
                    stops[LEFT] = "engine-wait"
                    continue
                self._scan_side(name, st, out, stops)
        if self.config.lend_idle_share:
            for name, other in ((LEFT, RIGHT), (RIGHT, LEFT)):
                if stops[name] == "share" and stops[other] not in MEMORY_STOPS:
                    self.sides[name].share = math.inf  # the other side cannot use its share this step
                    self.sides[name].borrowing = True
                    self._scan_side(name, st, out, stops)
        # The memory-dense side's admissions first: their prompts are short, and an engine that
        # stops admitting at the first prompt it has to chunk (SGLang) still takes them.
        out[first:] = [a for a in out[first:] if a.side == RIGHT] + [a for a in out[first:] if a.side != RIGHT]
        self._record = (budget, {"stop": stops, "share": {LEFT: share_l, RIGHT: total - share_l}})

    def _scan_side(self, name: str, st: "_StepState", out: list, stops: dict) -> None:
        """`name`'s cursor takes its end's requests while they fit (within its share); why it stopped."""
        while self.tree.root.count:
            req = self.tree.leftmost() if name == LEFT else self.tree.rightmost()
            if not self._offer(req, name, st, out, shared=True):
                stops[name] = st.why
                return
        stops[name] = "empty"

    def _admit_one(self, st: "_StepState", out: list) -> None:
        """Liveness: nothing runs and nothing was admitted (shares, credit, holds or the sample
        refused everything): the first waiting request that fits the free KV, from the cursor ends,
        then in arrival order, with no shares."""
        reqs = [self.tree.leftmost(), self.tree.rightmost()]
        for req in [*reqs, *sorted(self.tree.reqs.values(), key=lambda r: r.seq)]:
            side = SAMPLE if req.sample and self.sample.holds(req.rid) else \
                RIGHT if req.sort_key < self.tree.density(self.tree.root) else LEFT
            if self._offer(req, side, st, out, shared=False, hold=False):
                return
            if st.why in ("slots", "prefill"):
                return

    @property
    def last_step(self) -> dict:
        """The last `schedule` call, in tokens (for traces; built only when read): the budget, the
        sides' KV in use, the shares, why each side stopped ({} if it returned early)."""
        if self._record is None:
            return {}
        budget, extra = self._record
        kvb = self.tree.cost.kv_bytes_per_token
        extra = {k: ({s: round(b / kvb) for s, b in v.items()} if k == "share" else v) for k, v in extra.items()}
        return {"kv_free": round(budget.kv_bytes / kvb), "slots": budget.slots, "prefill": budget.prefill_tokens,
                "used": {k: round(v / kvb) for k, v in self.used.items()}, **extra}

    def _region_density(self, req: Req | None, window: int) -> float:
        """Density of the region a cursor scans: the lowest ancestor of `req` below the root that
        holds `window` requests; if even the root's child at that end holds fewer, the root's
        children from that end pooled until they do. Never the root itself: rho(root) on one side
        would make split_memory hand that side all the memory."""
        tree, root = self.tree, self.tree.root
        if req is None:
            return tree.density(root)
        node = req.node
        while node is not root and node.count < window and node.parent is not root:
            node = node.parent
        if node is not root and node.count >= window:
            return tree.density(node)
        computed = mem = count = 0
        for k in (root.kids if tree.leftmost() is req else reversed(root.kids)):
            if type(k) is Node:
                computed, mem, count = computed + k.tokens - k.saved, mem + k.mem, count + k.count
            else:
                p, d = k.prompt_len, k.output_len
                computed, mem, count = computed + p + d, mem + memory_units(p, d), count + 1
            if count >= window:
                break
        return tree.cost.density(computed, mem)

    def _set_cached_last(self, prefilling) -> None:
        """Per side, the last taken node whose prompt the engine has cached: walk back past the
        requests still prefilling (an engine that overlaps scheduling with the model step caches
        a prefill's prompt one iteration after it was admitted)."""
        for side in self.sides.values():
            node, rid = side.last, side.last_rid
            if prefilling:
                for _ in range(len(prefilling) + 1):  # each step back passes a prefilling request
                    run = self.running.get(rid) if rid is not None and rid in prefilling else None
                    if run is None:
                        break
                    node, rid = run.prev, run.prev_rid
                else:
                    node = None
            side.last_cached = node

    def _cached_prefix(self, node: Node, cached_only: bool = False) -> int:
        if not self.config.prefix_cache:
            return 0
        best = 0
        for side in self.sides.values():
            last = side.last_cached if cached_only else side.last
            if last is not None:
                best = max(best, common_prefix_len(last, node))
        return best

    def _largest_coming(self, side: str) -> float:
        """Upper bound on the KV bytes of the side's coming requests: the largest p + d in the
        first two subtrees at its end of the tree (the one it scans and the next one), taken at
        the first node that branches."""
        node = self.tree.root
        while len(node.kids) == 1 and type(node.kids[0]) is Node:
            node = node.kids[0]
        kids = node.kids
        ends = (kids[0], kids[1]) if side == LEFT and len(kids) > 1 else (kids[-1], kids[-2]) if len(kids) > 1 else tuple(kids)
        longest = max((k.max_len if type(k) is Node else k.prompt_len + k.output_len for k in ends), default=0)
        return longest * self.tree.cost.kv_bytes_per_token

    def _reservation(self, req: Req) -> tuple[int, float]:
        """(estimated cached prefix, KV bytes reserved) if `req` were admitted now: whole tokens, so
        the sides' accounts stay exact sums (`check_integrity`)."""
        cached = min(self._cached_prefix(req.node), req.prompt_len - 1)
        ratio = 1.0 if req.known and self._engine_ratio else self._ratio
        tokens = req.prompt_len - cached + math.ceil(ratio * req.output_len)
        return cached, float(tokens * self.tree.cost.kv_bytes_per_token)

    def _lifetime(self, req: Req, uncached: int, st: "_StepState") -> int:
        """Steps `req` would hold KV if taken now: its prefill chunks at this step's budget, then
        one step per output token (an estimate counts `overrun_factor` times, within max_tokens)."""
        d = req.output_len
        if not req.known:
            d = math.ceil(self.tree.estimator.overrun_factor * d)
            if req.max_tokens is not None:
                d = min(d, req.max_tokens)
        return d + -(-uncached // max(1, st.prefill_budget))

    def _thin(self) -> bool:
        """ScanConfig.thin_batch_share: the memory-dense side holds less than that part of its share."""
        t = self.config.thin_batch_share
        right = self.sides[RIGHT]
        return bool(t) and right.used < t * right.share and self.tree.root.count > 1

    def _account(self, req: Req, side: str) -> _Side:
        """The side whose share `req` counts against (a sample request: by its density)."""
        if side == SAMPLE:
            side = RIGHT if req.sort_key < self.tree.density(self.tree.root) else LEFT
        return self.sides[side]

    def fits(self, req: Req, side: str, st: "_StepState", shared: bool = True, hold: bool = True) -> str | _Check:
        """Can `side` take `req` now? The reason it cannot ("slots", "prefill", "side-prefill-cap",
        "unsettled", "hold", "kv", "hard-cap", "share", "credit"), or the `_Check` that `take` commits.
        `shared`: within the side's share, prefill cap and credit (the dual scan); `hold`: hold a
        request whose shared prefix is computed this step (ScanConfig.hold_prefix_tokens)."""
        acct = self._account(req, side)
        cap = acct.prefill_cap if shared else None
        if st.slots <= 0:
            return "slots"
        if st.prefill <= 0:
            return "prefill"
        if cap is not None and cap - acct.prefill_used <= 0:
            return "side-prefill-cap"
        if side != SAMPLE and not self.planned and self.config.fill_settled_only and self.unsettled(req):
            return "unsettled"
        cached, need = self._reservation(req)
        charge, chunked = 0, False
        if st.room is not None:
            # What the engine's own check charges (SGLang: uncached + min(max_new, clip) + 1 against its room;
            # the first request it refuses ends its admissions), and whether the step computes the prompt whole.
            uncached = req.prompt_len - cached
            charge = uncached + min(req.max_tokens or req.output_len, st.clip) + 1
            if charge >= st.room:
                return "engine"
            if shared and acct.room_cap is not None and acct.room_used + charge > acct.room_cap:
                return "engine-share"
            chunked = uncached >= st.whole_left
            if chunked and st.chunked is not None:
                return "chunk"  # one prompt a step is chunked, and the engine admits nothing after it
            if chunked and shared and side == LEFT and self._thin():
                return "thin"
        h = self.config.hold_prefix_tokens
        if hold and h and cached >= h and cached - self._cached_prefix(req.node, cached_only=True) >= h:
            return "hold"  # its shared prefix is computed this step: take it next step, cached
        aside = self._aside(req, 0, self._out_reserved(req, cached, need)) if self.config.reserve_growth else 0.0
        lent = need + aside > st.kv_free
        if lent and (aside or not st.horizons or need > st.free_for(self._lifetime(req, req.prompt_len - cached, st))):
            return "kv"
        # Shares divide the memory free for good; a request on lent memory is gone before it is needed.
        if shared and not lent:
            if acct.used + need > acct.hard_cap:
                return "hard-cap"
            # Over the share: one request per step, and only while the side is not in debt, so a
            # side whose requests are larger than its share still holds its share on average.
            if acct.used + need > acct.share and not acct.overdraft:
                return "share"
        if shared and st.metered and acct.credit <= 0 and not acct.borrowing:
            return "credit"  # the side started its share of memory work already
        return _Check(cached, need, lent, acct, aside, charge, chunked)

    def take(self, req: Req, side: str, st: "_StepState", check: _Check, shared: bool = True) -> Admission:
        """Commit `req` on `side` after `fits` returned `check`."""
        cached, need, lent, acct, aside, charge, chunked = check
        if shared and not lent and acct.used + need > acct.share:
            acct.overdraft = False
        work = 0.0
        if shared and st.metered:
            work = self.tree.cost.kv_bytes_per_token * memory_units(req.prompt_len, req.output_len) / 2
            acct.credit -= work
        node = req.node
        self.tree.remove(req.rid)
        path = self.tree.path(node) if req.sample else []
        sources = tuple(sample_source(n) for n in path)
        self._count_sampling(sources, +1)
        self.running[req.rid] = _Running(acct.name, need, req, path, work, node, acct.last, acct.last_rid, sources,
                                         self._out_reserved(req, cached, need))
        if aside:
            self.overrun[req.rid] = aside
            self.overrun_bytes += aside
            st.kv_free -= aside
        acct.taken[req.rid] = node
        acct.used += need
        self.handed_out += 1
        st.kv_free -= need
        if st.horizons:
            st.h_free = [f - need for f in st.h_free]
        st.slots -= 1
        if st.room is not None:
            st.room -= charge
            acct.room_used += charge
            if chunked:
                st.chunked = req.rid
            else:
                st.whole_left -= req.prompt_len - cached
        # A side pays for a prompt longer than its cap only up to the cap: the rest is chunked
        # into later steps, and the other side keeps its own part of this step's budget.
        uncached = req.prompt_len - cached
        cap = acct.prefill_cap if shared else None
        charged = min(uncached, st.prefill if cap is None else min(st.prefill, cap - acct.prefill_used))
        st.prefill -= charged
        acct.prefill_used += charged
        acct.last, acct.last_rid = node, req.rid
        return Admission(req.rid, side, req.prompt_len, cached, req.output_len, need)

    def _offer(self, req: Req, side: str, st: "_StepState", out: list, shared: bool, hold: bool = True) -> bool:
        """`fits`, then `take`: the one path every admission goes through."""
        check = self.fits(req, side, st, shared, hold)
        if isinstance(check, str):
            st.why = check
            return False
        out.append(self.take(req, side, st, check, shared))
        return True

    # ------------------------------------------------------------------ feedback
    def finished(self, rid, output_len: int | None = None, aborted: bool = False) -> None:
        """A handed-out request finished, or was `aborted` while running: its output so far says
        nothing of its length, so a sample request leaves the sample unrecorded."""
        run = self.running.pop(rid)
        self.sides[run.side].used -= run.kv_bytes
        self._release_overrun(rid)
        self._count_sampling(run.sources, -1)
        if run.req.sample and self.sample.holds(rid):
            due = self.sample.finished(rid, run.path, output_len, aborted)
            if due and (not self.sample.pending or not self.planned):
                self._plan()

    def progress(self, rid, generated: int) -> bool:
        """Report tokens generated so far; a left-side request far past its estimate moves right."""
        run = self.running[rid]
        self.generated[rid] = generated
        self.sample.progress(rid, generated)
        mark = self._replan_at(rid)
        if mark is not None and generated >= mark:
            self.replan_due = True
        if (self.config.reserve_overruns or self.config.reserve_growth) and not run.req.known:
            extra = self._aside(run.req, generated, run.out_reserved)
            self.overrun_bytes += extra - self.overrun.get(rid, 0.0)
            self.overrun[rid] = extra
        if run.side == RIGHT or run.req.known or not self.tree.estimator.overran(run.req.output_len, generated):
            return False
        self.sides[LEFT].used -= run.kv_bytes
        self.sides[RIGHT].used += run.kv_bytes
        self.running[rid] = run._replace(side=RIGHT)
        return True

    def _out_reserved(self, req: Req, cached: int, need: float) -> int:
        """Output tokens a reservation of `need` KV bytes holds beyond `req`'s uncached prompt."""
        return round(need / self.tree.cost.kv_bytes_per_token) - (req.prompt_len - cached)

    def _aside(self, req: Req, generated: int, out_reserved: int) -> float:
        """KV bytes a running request of unknown length (`generated` so far) is expected to write
        beyond its reservation: past overrun_factor x its estimate (reserve_overruns, reserve_growth)
        it runs overrun_factor x its output so far; otherwise (reserve_growth) to its estimate, or,
        past it, overrun_factor x its output so far; within max_tokens. The engine's free memory
        already counts what it holds, the caller's budget what its reservation holds (`out_reserved`
        output tokens)."""
        if req.known:
            return 0.0
        est, kvb = self.tree.estimator, self.tree.cost.kv_bytes_per_token
        e = req.output_len
        if est.overran(e, generated) or (self.config.reserve_growth and generated > e):
            total = math.ceil(est.overrun_factor * generated)
        elif self.config.reserve_growth:
            total = e
        else:
            return 0.0
        if req.max_tokens is not None:
            total = min(total, req.max_tokens)
        return max(0, total - max(generated, out_reserved)) * kvb

    def _release_overrun(self, rid) -> None:
        """`rid` stopped running: its overrun reserve and reported output go."""
        self.generated.pop(rid, None)
        self.overrun_bytes -= self.overrun.pop(rid, 0.0)
        if not self.overrun:
            self.overrun_bytes = 0.0

    def _count_sampling(self, sources: tuple, sign: int) -> None:
        """A sample request taken (+1) or gone (-1): its path's sample sources (`sampling_at`)."""
        for src in sources:
            left = self.sampling_at.get(src, 0) + sign
            if left:
                self.sampling_at[src] = left
            else:
                del self.sampling_at[src]

    def unsettled(self, req: Req) -> bool:
        """Whether `req`'s estimate may still grow (ScanConfig.fill_settled_only): walking up from its
        node, one that holds a running sample comes before any that has finished samples."""
        node = req.node
        while node is not None:
            src = sample_source(node)
            if src.sample_n:
                return False
            if src in self.sampling_at:
                return True
            node = node.parent
        return False

    def add(self, rid, *, readd: bool = False, **request) -> Req:
        """Add a waiting request: an arrival, or (`readd`) one handed back by `cancel` or after
        `retracted`: `ResourceTree.add`. An arrival after the sample was drawn may join it
        (`SamplePhase.arrived`); one that finds nothing waiting or running after the plan starts a
        new batch: its sample is drawn anew at the next step (a server's warm-up request was the
        sample of everything after it)."""
        if self.planned and not readd and not self.running and not self.tree.root.count:
            self._new_batch()
        req = self.tree.add(rid, **request)
        if self.sample.holds(rid):
            req.sample = True
        elif self.prepared and not readd:
            self.sample.arrived(req, self.planned)
        return req

    def _new_batch(self) -> None:
        """Everything handed out finished and nothing waits: the next arrivals are a new batch, sampled
        and planned afresh (the estimator keeps what earlier samples recorded)."""
        self.sample = SamplePhase(self.tree.estimator, self.config.sample_quorum)
        self.prepared = self.planned = self._presorted = False
        self._assumed, self._wave, self.replan_due = {}, [], False

    def remove(self, rid) -> Req:
        """A waiting request leaves without running (aborted): out of the tree and the sample."""
        req = self.tree.remove(rid)
        self.sample.retracted(rid)
        return req

    def cancel(self, rid) -> Req:
        """An admission the engine did not take after all: forget it; the caller adds it back
        with `add` (a sample request stays in the sample)."""
        run = self.running.pop(rid)
        self._release_overrun(rid)
        self._count_sampling(run.sources, -1)
        side = self.sides[run.side]
        side.used -= run.kv_bytes
        side.credit += run.work
        self.handed_out -= 1
        if side.taken.pop(rid, None) is not None:  # its prompt will not be computed: the side's last
            # taken request is the last one still admitted this step, else the one before the step
            if side.taken:
                side.last_rid = last = next(reversed(side.taken))
                side.last = side.taken[last]
            else:
                side.last, side.last_rid = side.at_start
        return run.req

    def retracted(self, rid) -> Req:
        """A running request was preempted; the caller re-adds it (with its output so far)."""
        run = self.running.pop(rid)
        self.sides[run.side].used -= run.kv_bytes
        self._release_overrun(rid)
        self._count_sampling(run.sources, -1)
        self.sample.retracted(rid)
        return run.req

    def check_integrity(self) -> None:
        self.tree.check_integrity()
        for name, side in self.sides.items():
            held = sum(r.kv_bytes for r in self.running.values() if r.side == name)
            assert abs(held - side.used) <= 1e-6 * max(1.0, held), f"{name} accounting drifted: {held} vs {side.used}"
        assert not (set(self.running) & set(self.tree.reqs)), "a running request is still waiting in the tree"
        assert set(self.overrun) <= set(self.running), "overrun reserve kept for a request that is not running"
        sample = self.sample
        assert not (sample.late & sample.pending), "a sample request both holds the plan and is late"
        assert sample.drawn <= sample.seen, "more sample requests drawn than requests seen"
        for rid in sample.late | sample.pending:
            req = self.tree.reqs.get(rid) or (self.running[rid].req if rid in self.running else None)
            assert req is None or req.sample, f"sample request {rid!r} lost its mark"
        sampling: dict = {}
        for run in self.running.values():
            for src in run.sources:
                sampling[src] = sampling.get(src, 0) + 1
        assert sampling == self.sampling_at, "running-sample counts drifted"
        assert abs(sum(self.overrun.values()) - self.overrun_bytes) <= 1e-6 * max(1.0, self.overrun_bytes), \
            f"overrun reserve drifted: {sum(self.overrun.values())} vs {self.overrun_bytes}"


class _StepState:
    __slots__ = ("kv_free", "slots", "prefill", "prefill_budget", "horizons", "h_free", "metered", "why",
                 "room", "clip", "whole_left", "chunked")

    def __init__(self, budget: Budget, engine_check: bool = False):
        self.kv_free = float(budget.kv_bytes)
        self.slots = int(budget.slots)
        self.prefill = self.prefill_budget = int(budget.prefill_tokens)
        self.horizons = [int(h) for h, _ in budget.kv_horizons]
        self.h_free = [max(float(f), self.kv_free) for _, f in budget.kv_horizons]
        self.metered = False
        self.why = ""  # why the last refused take was refused (diagnostics)
        # The engine's own check (ScanConfig.engine_check): its room left, in tokens (None: not modelled),
        # the prefill tokens the step still computes for prompts taken whole, and the one it chunks.
        self.room = float(budget.admit_room) if engine_check and budget.admit_room is not None else None
        self.clip = int(budget.admit_clip)
        self.whole_left = self.prefill_budget
        self.chunked = None

    def free_for(self, lifetime: int) -> float:
        """KV bytes free for a request that holds KV `lifetime` steps: the entry of the shortest
        horizon that covers it, else what is free for good."""
        i = bisect.bisect_left(self.horizons, lifetime)
        return self.h_free[i] if i < len(self.horizons) else self.kv_free


def common_prefix_len(a: Node, b: Node) -> int:
    """prefix_len of the deepest common ancestor of two nodes (split twins count as different):
    the deeper one lifted to the other's depth, then both walked up together, so neighbours in DFS
    order cost the steps to their common ancestor, not the depth of the tree (a batch of prompts
    each extending the previous one made the set of every ancestor cost its depth per call: a
    4,000-deep chain planned in 617 s, a probe). A pruned node keeps its parent links but not its
    depth when an edge above it was split since: its walk then never meets the other's, and the
    reference (`common_prefix_len_by_set`) answers."""
    x, y = a, b
    while x is not None and y is not None and x.depth > y.depth:
        x = x.parent
    while x is not None and y is not None and y.depth > x.depth:
        y = y.parent
    while x is not y and x is not None and y is not None:
        x, y = x.parent, y.parent
    if x is y and x is not None:
        return x.prefix_len
    return common_prefix_len_by_set(a, b)


def common_prefix_len_by_set(a: Node, b: Node) -> int:
    """`common_prefix_len` from the set of a's ancestors (the plain reference)."""
    ancestors = set()
    while a is not None:
        ancestors.add(id(a))
        a = a.parent
    while b is not None and id(b) not in ancestors:
        b = b.parent
    return b.prefix_len if b is not None else 0
