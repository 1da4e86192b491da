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
starves nor takes more than its share in the long run.

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
from .split import SplitReport, sort_and_split
from .tree import Node, Req, ResourceTree

LEFT, RIGHT, SAMPLE = "left", "right", "sample"


class Budget(NamedTuple):
    kv_bytes: float  # free KV-cache bytes this step's admissions may reserve (for good)
    slots: int  # free request slots
    prefill_tokens: int  # prefill tokens this step may compute (chunked-prefill size)
    output_ratio: float | None = None  # share of output reserved this step (else the config's)
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


class Admission(NamedTuple):
    rid: Any
    side: str  # LEFT (compute-dense end), RIGHT (memory-dense end) or SAMPLE
    prompt_len: int
    cached_tokens: int  # prefix estimated to be cached: shared with a recently taken request
    output_len: int  # known, or the current estimate
    kv_bytes: float  # KV bytes reserved: (uncached prompt + reserve_output_ratio x output) x bytes/token


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
    fill_while_sampling: bool = False  # True: while the output-length sample runs, the rest of the
    # step's budget goes to the dual scan over the tree sorted with the prior estimates (the
    # engine is not left idle; the plan is redone with the sample's estimates at the quorum)
    credit_steps: int = 256  # with Budget.steps: a side banks at most this many steps of its
    # memory-work rate (bounds the burst after a stretch in which it could not admit)
    final_wave: bool = False  # True: once every waiting request fits in the KV pool at once, admit
    # them longest output first (LPT), pooled, no shares: the batch ends in one wave instead of a
    # tail of the long requests one side left for last

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


class _Running(NamedTuple):
    side: str
    kv_bytes: float
    req: Req
    path: list  # root path at admission (sample results are recorded along it)
    work: float = 0.0  # memory-work credit spent on it (byte-steps), refunded by cancel
    node: Node | None = None  # its node when taken
    prev: Node | None = None  # the side's last taken node before it, and that request's rid
    prev_rid: Any = None


class DualScanner:
    def __init__(self, tree: ResourceTree, config: ScanConfig = ScanConfig()):
        self.tree = tree
        self.config = config
        self.running: dict[Any, _Running] = {}
        self.used = {LEFT: 0.0, RIGHT: 0.0}
        self.debt = {LEFT: 0.0, RIGHT: 0.0}  # sum over steps of (held - share): time-averaged shares
        self.credit = {LEFT: 0.0, RIGHT: 0.0}  # memory-work credit (byte-steps), with Budget.steps
        self.pending_sample: set = set()  # sample requests not finished yet
        self.sample_size = 0
        self.sample_generated: dict = {}  # running sample rid -> tokens generated so far
        self.planned = False  # sorted and split with sample-based estimates
        self._presorted = False  # sorted with the prior estimates (fill_while_sampling)
        self.prepared = False
        self.split_report: SplitReport | None = None
        self.handed_out = 0
        self._last: dict[str, Node | None] = {LEFT: None, RIGHT: None}
        self._ratio = config.reserve_output_ratio
        self._last_rid: dict[str, Any] = {LEFT: None, RIGHT: None}
        self._last_before: dict[str, Node | None] = dict(self._last)  # the last taken node whose
        # prompt is in the engine's prefix cache, per side
        self._at_start: tuple = (dict(self._last), dict(self._last_rid))
        self._step_taken: dict[str, dict] = {LEFT: {}, RIGHT: {}}  # this step's takes: rid -> node
        self._wave: list[Req] = []  # final wave (ScanConfig.final_wave): waiting requests, longest first
        self._record: tuple | None = None  # (budget, extra) of the last schedule call: see last_step

    # ------------------------------------------------------------------ setup
    def prepare(self) -> None:
        """Pick the output-length sample (if any length is unknown), else sort and split now."""
        self.prepared = True
        unknown = [r.rid for r in self.tree.reqs.values() if not r.known]
        chosen = self.tree.estimator.choose_sample(unknown)
        for rid in chosen:
            self.tree.reqs[rid].sample = True
        self.pending_sample = set(chosen)
        self.sample_size = len(chosen)
        if not self.pending_sample:
            self._plan()

    def _plan(self) -> None:
        """Re-estimate unknown lengths and sort + split. Samples still running count with their
        output so far (a lower bound) for this plan only."""
        est = self.tree.estimator
        partial = [(self.running[r].path, g) for r, g in self.sample_generated.items()
                   if r in self.running and g > 0]
        for path, g in partial:
            est.record(path, g)
        est.refresh(self.tree)
        for path, g in partial:
            est.record(path, -g, count=-1)
        self.split_report = sort_and_split(self.tree, self.config.keep_sharing, self.config.max_split_rounds)
        self.planned = True

    def _sample_quorum_reached(self) -> bool:
        done = self.sample_size - len(self.pending_sample)
        return done >= self.config.sample_quorum * self.sample_size

    @property
    def sampling(self) -> bool:
        return bool(self.pending_sample)

    # ------------------------------------------------------------------ step
    def schedule(self, budget: Budget) -> list[Admission]:
        """Admissions for this step, in the order they should be admitted."""
        if not self.prepared:
            self.prepare()
        state = _StepState(budget)
        self._record = None
        self._at_start = (dict(self._last), dict(self._last_rid))
        self._step_taken = {LEFT: {}, RIGHT: {}}
        self._last_before = self._cached_last(budget.prefilling)
        self._ratio = self.config.reserve_output_ratio if budget.output_ratio is None else budget.output_ratio
        out: list[Admission] = []
        if self.pending_sample:
            for req in sorted((self.tree.reqs[r] for r in self.pending_sample if r in self.tree.reqs),
                              key=lambda r: r.seq):
                if not self._try_take(req, SAMPLE, state, out, share=None, prefill_cap=None):
                    break
            if not self.planned:
                if not self.config.fill_while_sampling:
                    return out
                if not self._presorted:  # until the sample is in: order by the prior estimates
                    self.tree.sort()
                    self._presorted = True
        root = self.tree.root
        if root.count == 0:
            return out
        total = self.used[LEFT] + self.used[RIGHT] + max(0.0, budget.kv_bytes)
        if self.config.final_wave and (self.planned or self._presorted):
            pool = budget.kv_pool if budget.kv_pool else total
            if (root.tokens - root.saved) * self.tree.cost.kv_bytes_per_token <= pool:
                self._take_final_wave(state, out)
                self._record = (budget, {"final_wave": len(self.tree.reqs), "stop": state.why})
                return out
        window = min(self.config.density_window, max(1, root.count // 8))
        rho_l = self._region_density(self.tree.leftmost(), window)
        rho_r = self._region_density(self.tree.rightmost(), window)
        share_l = split_memory(total, rho_l, rho_r, self.tree.density(root))
        shares = {LEFT: share_l, RIGHT: total - share_l}
        for side in (LEFT, RIGHT):
            self.debt[side] = max(self.debt[side] + self.used[side] - shares[side], -8.0 * shares[side])
        state.overdraft = {LEFT: self.debt[LEFT] <= 0, RIGHT: self.debt[RIGHT] <= 0}
        frac_l = share_l / total if total > 0 else 0.5
        if budget.steps is not None:
            # Memory work at the rate of the shares: per step, a side may start decode KV reads
            # (byte-steps: KV held x decode steps, its requests' Mem) worth its share of the pool.
            # Requests admitted in a burst grow, peak and finish together, so the KV in use swings
            # between empty and full; metered, they enter staggered and the KV stays full.
            pool = budget.kv_pool if budget.kv_pool else total
            for side, frac in ((LEFT, frac_l), (RIGHT, 1.0 - frac_l)):
                rate = frac * pool
                self.credit[side] = min(self.credit[side] + max(0, budget.steps) * rate,
                                        self.config.credit_steps * rate)
            state.metered = True
        caps = {LEFT: math.ceil(budget.prefill_tokens * frac_l)}
        caps[RIGHT] = budget.prefill_tokens - caps[LEFT]
        # Each side leaves room for the largest of the other side's coming requests, so a side
        # whose requests are larger than its share can still overdraw when its turn comes.
        state.hard_cap = {LEFT: total - self._largest_coming(RIGHT), RIGHT: total - self._largest_coming(LEFT)}
        first = len(out)
        stops = {LEFT: "empty", RIGHT: "empty"}
        for pooled in (False, True):
            for side in (LEFT, RIGHT):
                cap = None if pooled else caps[side]
                while self.tree.root.count:
                    req = self.tree.leftmost() if side == LEFT else self.tree.rightmost()
                    if not self._try_take(req, side, state, out, shares[side], cap):
                        stops[side] = state.why
                        break
                    if cap is not None:
                        cap = caps[side] - state.prefill_used[side]
        # The memory-dense side's admissions first: their prompts are short, and an engine that
        # stops admitting at the first prompt it has to chunk (SGLang) still takes them.
        out[first:] = [a for a in out[first:] if a.side == RIGHT] + [a for a in out[first:] if a.side != RIGHT]
        self._record = (budget, {"stop": stops, "share": shares})
        return out

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

    def _take_final_wave(self, state: "_StepState", out: list) -> None:
        """The last wave: every waiting request fits in the KV pool, so what is left to decide is
        when the batch ends. Longest output first (LPT; ties: longer prompt first), from the
        pooled memory: the long requests start as soon as memory frees instead of forming a tail
        after the short ones. A held request (its prefix is being computed) waits for the next
        step without stopping the wave; the first one that does not fit stops it (smaller ones
        would take the memory it is waiting for)."""
        reqs = self.tree.reqs
        alive = [r for r in self._wave if reqs.get(r.rid) is r]
        if len(alive) != len(reqs):  # arrivals, retractions or cancels since the wave was sorted
            alive = sorted(reqs.values(), key=lambda r: (-r.output_len, -r.prompt_len, r.seq))
        self._wave = alive  # taken ones drop out at the next call's filter
        mid = self.tree.density(self.tree.root)
        for req in alive:
            side = RIGHT if req.sort_key < mid else LEFT
            if not self._try_take(req, side, state, out, share=None, prefill_cap=None) and state.why != "hold":
                break

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

    def _cached_last(self, prefilling) -> dict:
        """Per side, the last taken node whose prompt the engine has cached: walk back past the
        requests still prefilling (an engine that overlaps scheduling with the model step caches
        a prefill's prompt one iteration after it was admitted)."""
        out = dict(self._last)
        if not prefilling:
            return out
        for side in (LEFT, RIGHT):
            node, rid = self._last[side], self._last_rid[side]
            for _ in range(len(prefilling) + 1):  # each step back passes a prefilling request
                run = self.running.get(rid) if rid is not None and rid in prefilling else None
                if run is None:
                    break
                node, rid = run.prev, run.prev_rid
            else:
                node = None
            out[side] = node
        return out

    def _cached_prefix(self, node: Node, last_taken: dict | None = None) -> int:
        best = 0
        for last in (self._last if last_taken is None else last_taken).values():
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
        """(estimated cached prefix, KV bytes reserved) if `req` were admitted now."""
        cached = min(self._cached_prefix(req.node), req.prompt_len - 1)
        tokens = req.prompt_len - cached + self._ratio * req.output_len
        return cached, tokens * self.tree.cost.kv_bytes_per_token

    def _lifetime(self, req: Req, uncached: int, st: "_StepState") -> int:
        """Steps `req` would hold KV if taken now: its prefill chunks at this step's budget, then
        one step per output token (an estimate counts `overrun_factor` times, within max_tokens)."""
        d = req.output_len
        if not req.known:
            d = math.ceil(self.tree.estimator.overrun_factor * d)
            if req.max_tokens is not None:
                d = min(d, req.max_tokens)
        return d + -(-uncached // max(1, st.prefill_budget))

    def _try_take(self, req: Req, side: str, st: "_StepState", out: list, share, prefill_cap) -> bool:
        if st.slots <= 0 or st.prefill <= 0:
            st.why = "slots" if st.slots <= 0 else "prefill"
            return False
        if prefill_cap is not None and prefill_cap <= 0:
            st.why = "side-prefill-cap"
            return False
        cached, need = self._reservation(req)
        hold = self.config.hold_prefix_tokens
        if hold and cached >= hold and cached - self._cached_prefix(req.node, self._last_before) >= hold:
            st.why = "hold"
            return False  # its shared prefix is computed this step: take it next step, cached
        uncached = req.prompt_len - cached
        lent = need > st.kv_free  # fits only in memory running requests do not need before it ends
        if lent and (not st.horizons or need > st.free_for(self._lifetime(req, uncached, st))):
            st.why = "kv"
            return False
        acct = RIGHT if side == RIGHT or (side == SAMPLE and req.sort_key < self.tree.density(self.tree.root)) else LEFT
        # Shares divide the memory free for good; a request on lent memory is gone before it is needed.
        if share is not None and not lent and self.used[acct] + need > st.hard_cap[acct]:
            st.why = "hard-cap"
            return False
        if share is not None and not lent and self.used[acct] + need > share:
            # Over the share: one request per step, and only while the side is not in debt, so a
            # side whose requests are larger than its share still holds its share on average.
            if not st.overdraft.get(acct):
                st.why = "share"
                return False
            st.overdraft[acct] = False
        work = 0.0
        if st.metered and share is not None:
            if self.credit[acct] <= 0:
                st.why = "credit"
                return False  # the side started its share of memory work already
            work = self.tree.cost.kv_bytes_per_token * memory_units(req.prompt_len, req.output_len) / 2
            self.credit[acct] -= work
        node = req.node
        self.tree.remove(req.rid)
        path = self.tree.path(node) if req.sample else []
        self.running[req.rid] = _Running(acct, need, req, path, work, node, self._last[acct], self._last_rid[acct])
        self._step_taken[acct][req.rid] = node
        self.used[acct] += need
        self.handed_out += 1
        st.kv_free -= need
        if st.horizons:
            st.h_free = [f - need for f in st.h_free]
        st.slots -= 1
        # A side pays for a prompt longer than its cap only up to the cap: the rest is chunked
        # into later steps, and the other side keeps its own part of this step's budget.
        charged = min(uncached, st.prefill if prefill_cap is None else min(st.prefill, prefill_cap))
        st.prefill -= charged
        st.prefill_used[acct] += charged
        self._last[acct] = node
        self._last_rid[acct] = req.rid
        out.append(Admission(req.rid, side, req.prompt_len, cached, req.output_len, need))
        return True

    # ------------------------------------------------------------------ feedback
    def finished(self, rid, output_len: int | None = None) -> None:
        """A handed-out request finished (or was aborted while running)."""
        run = self.running.pop(rid)
        self.used[run.side] -= run.kv_bytes
        if run.req.sample and rid in self.pending_sample:
            if output_len is not None:
                self.tree.estimator.record(run.path, output_len)
            self.pending_sample.discard(rid)
            self.sample_generated.pop(rid, None)
            if not self.pending_sample or (not self.planned and self._sample_quorum_reached()):
                self._plan()

    def progress(self, rid, generated: int) -> bool:
        """Report tokens generated so far; a left-side request far past its estimate moves right."""
        run = self.running[rid]
        if rid in self.pending_sample:
            self.sample_generated[rid] = generated
        if run.side == RIGHT or run.req.known or not self.tree.estimator.overran(run.req.output_len, generated):
            return False
        self.used[LEFT] -= run.kv_bytes
        self.used[RIGHT] += run.kv_bytes
        self.running[rid] = run._replace(side=RIGHT)
        return True

    def add(self, rid, **request) -> Req:
        """Add a waiting request (an arrival, or one handed back by `cancel`): `ResourceTree.add`."""
        req = self.tree.add(rid, **request)
        if rid in self.pending_sample:
            req.sample = True
        return req

    def cancel(self, rid) -> Req:
        """An admission the engine did not take after all: forget it; the caller adds it back
        with `add` (a sample request stays in the sample)."""
        run = self.running.pop(rid)
        self.used[run.side] -= run.kv_bytes
        self.credit[run.side] += run.work
        self.handed_out -= 1
        taken = self._step_taken[run.side]
        if taken.pop(rid, None) is not None:  # its prompt will not be computed: the side's last
            # taken request is the last one still admitted this step, else the one before the step
            if taken:
                self._last_rid[run.side] = last = next(reversed(taken))
                self._last[run.side] = taken[last]
            else:
                self._last[run.side] = self._at_start[0][run.side]
                self._last_rid[run.side] = self._at_start[1][run.side]
        return run.req

    def retracted(self, rid) -> Req:
        """A running request was preempted; the caller re-adds it (with its output so far)."""
        run = self.running.pop(rid)
        self.used[run.side] -= run.kv_bytes
        self.sample_generated.pop(rid, None)
        if rid in self.pending_sample:  # it comes back and runs again as a sample
            self.pending_sample.discard(rid)
            self.sample_size -= 1
        return run.req

    def check_integrity(self) -> None:
        self.tree.check_integrity()
        for side in (LEFT, RIGHT):
            held = sum(r.kv_bytes for r in self.running.values() if r.side == side)
            assert abs(held - self.used[side]) <= 1e-6 * max(1.0, held), f"{side} accounting drifted"
        assert not (set(self.running) & set(self.tree.reqs)), "a running request is still waiting in the tree"


class _StepState:
    __slots__ = ("kv_free", "slots", "prefill", "prefill_budget", "prefill_used", "overdraft", "hard_cap",
                 "horizons", "h_free", "metered", "why")

    def __init__(self, budget: Budget):
        self.kv_free = float(budget.kv_bytes)
        self.slots = int(budget.slots)
        self.prefill = self.prefill_budget = int(budget.prefill_tokens)
        self.prefill_used = {LEFT: 0, RIGHT: 0}
        self.overdraft: dict = {}
        self.hard_cap: dict = {}
        self.horizons = [int(h) for h, _ in budget.kv_horizons]
        self.h_free = [max(float(f), self.kv_free) for _, f in budget.kv_horizons]
        self.metered = False
        self.why = ""  # why the last refused take was refused (diagnostics)

    def free_for(self, lifetime: int) -> float:
        """KV bytes free for a request that holds KV `lifetime` steps: the entry of the shortest
        horizon that covers it, else what is free for good."""
        i = bisect.bisect_left(self.horizons, lifetime)
        return self.h_free[i] if i < len(self.horizons) else self.kv_free


def common_prefix_len(a: Node, b: Node) -> int:
    """prefix_len of the deepest common ancestor of two nodes (split twins count as different).

    Works for nodes already pruned from the tree: they keep their parent links.
    """
    ancestors = set()
    while a is not None:
        ancestors.add(id(a))
        a = a.parent
    while b is not None and id(b) not in ancestors:
        b = b.parent
    return b.prefix_len if b is not None else 0
