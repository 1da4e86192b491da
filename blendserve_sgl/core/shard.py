"""The shard planner: one central sorted tree cut into N per-replica shards.

The sorted (and split) `ResourceTree` lists its requests in DFS order from compute-dense (left)
to memory-dense (right). Shard i takes one run from the left end and one from the right end,
the way the dual scanner takes from both cursors; the last shard takes the middle run. Cut i
is a pair of DFS positions (a_i, b_i): shards 0..i-1 hold [0, a_i) and [b_i, n). Each cut is
placed so that every shard ends with 1/N of the compute work (prompt + output tokens after prefix
sharing) and 1/N of the memory work (`memory_units`), so its density is near the root's (with
stripes, many pieces a shard, each cut aims at what the piece's shard still needs: `_Targets`).
Within the tolerance the cut goes where the two neighbours share the shortest prefix:
at a subtree boundary when one is close enough, else through one root-to-leaf path. A cut at
DFS position k recomputes `lcp[k]` prompt tokens (the prefix length of the lowest common
ancestor of requests k-1 and k): the only prefix a shard boundary costs.

Compute work is the tokens an engine computes. With `hold` = 0 every shared prefix is computed
once: request k computes p_k + d_k - lcp[k]. An engine caches a prompt only after the step that
computes it, so requests admitted in one step recompute what they share and is not cached yet;
the `blend` policy (like SGLang's in-batch prefix caching) holds a request back a step when that
shared, uncached part is >= `hold` tokens, so only shorter shared segments are computed again
(few-shot prompts whose copies share a short question after a long cached prefix). `hold` > 0
counts that: walking the DFS order with each step taking requests as long as none is held,
request k keeps `kept[k]` tokens (the prefix cached by earlier steps, or all of lcp[k] when k
starts a step); it computes p_k + d_k - kept[k]. A DFS run [s, e) costs its requests' tokens
with the first one computing its whole prompt (kept[s] added back); in `plan_strata`'s shards,
of many runs each, less what it shares with its shard's previous request (its engine has that
prefix cached: `_plan_of`'s `resume`).

    plan = plan_shards(tree, 4, stripes=1)  # tree sorted and split (split.sort_and_split)
    plan.shards[0]                          # request ids of shard 0, in DFS order
    plan_shards(tree, 4)                    # 4 x stripes pieces dealt in a snake (`stripes_for`)
    plan.check_integrity(tree)
"""

from __future__ import annotations

import bisect
import heapq
from collections import Counter
from itertools import accumulate
from typing import NamedTuple

from .cost import memory_units
from .split import sort_and_split
from .tree import Node, ResourceTree

SCAN = 16  # DFS positions tried on each side of a cut's exact solution
EXHAUSTIVE = 64  # at most this many requests: every cut pair is tried
PIECE_MIN = 1000  # default stripes: as many as keep this many requests a piece on average ...
MAX_STRIPES = 8  # ... up to this many (measured in bench/scale_out.py)
STRATUM_ATOM = 8  # plan_strata: a subtree of at most this many requests stays on one shard


class ShardPlan(NamedTuple):
    shards: list  # per shard: request ids in DFS order (the left run, then the right run)
    runs: list  # per shard: its DFS ranges [(s, e), ...], non-empty, sorted, none touching
    cuts: list  # per cut i = 1..pieces-1: (a, b), the pieces before it hold [0, a) and [b, n)
    compute: list  # per shard: computed tokens (prefix sharing within the shard)
    memory: list  # per shard: memory units
    cut_tokens: int  # prefix tokens the cuts take from sharing (at every run start, the part of its lcp
    # it does not share with its shard's previous request)
    saved_one: int  # saved prefix tokens of one engine running the whole tree in DFS order
    one_compute: int = 0  # tokens one engine computes running the whole DFS order (same measure)
    cut_compute: int = 0  # tokens the cuts add to compute (kept at every run start, as cut_tokens; <= it)
    hold: int = 0  # the measure's hold threshold (module docstring)
    pieces: tuple = ()  # per piece in dealing order: request ids (its left run, then its right run); piece k
    # belongs to shard `owner(k)`
    owners: tuple = ()  # per piece: its shard (`plan_strata`); empty: dealt in a snake

    def owner(self, k: int) -> int:
        """The shard of piece k."""
        return self.owners[k] if self.owners else snake(k, len(self.shards))

    @property
    def compute_imbalance(self) -> float:
        """Largest relative deviation of a shard's compute work from the mean."""
        return _imbalance(self.compute)

    @property
    def memory_imbalance(self) -> float:
        return _imbalance(self.memory)

    @property
    def sharing_vs_one(self) -> float:
        """Saved prefix tokens of all shards over one engine's (1.0: the cuts cost nothing)."""
        return (self.saved_one - self.cut_tokens) / self.saved_one if self.saved_one else 1.0

    def shard_of(self) -> dict:
        """Request id -> shard index."""
        return {rid: i for i, rids in enumerate(self.shards) for rid in rids}

    def check_integrity(self, tree: ResourceTree) -> None:
        """Every request of the tree in exactly one shard, runs in DFS order, work sums consistent."""
        order = [r.rid for r in tree.iter_requests()]
        got = [rid for rids in self.shards for rid in rids]
        assert len(got) == len(set(got)), "a request is in two shards"
        assert sorted(map(repr, got)) == sorted(map(repr, order)), "shards do not hold exactly the tree's requests"
        for i, runs in enumerate(self.runs):
            assert all(0 <= s < e <= len(order) for s, e in runs), f"shard {i}: empty or out-of-range run"
            assert all(e < s for (_, e), (s, _) in zip(runs, runs[1:])), f"shard {i}: runs unsorted or touching"
            assert self.shards[i] == [rid for s, e in runs for rid in order[s:e]], f"shard {i}: ids differ from its runs"
        n = len(self.shards)
        dealt: list = [[] for _ in range(n)]
        for k, ids in enumerate(self.pieces):
            dealt[self.owner(k)] += ids
        for i, mine in enumerate(dealt):
            assert Counter(mine) == Counter(self.shards[i]), f"shard {i}: its pieces differ from it"
        assert sum(self.memory) == tree.root.mem, f"memory {sum(self.memory)} != tree's {tree.root.mem}"
        ideal = tree.root.tokens - tree.root.saved  # every shared prefix computed once
        assert self.one_compute == ideal if self.hold == 0 else self.one_compute >= ideal, (
            f"one engine's compute {self.one_compute} vs the tree's {ideal} (hold {self.hold})")
        assert 0 <= self.cut_compute <= self.cut_tokens, f"cut compute {self.cut_compute} > cut tokens {self.cut_tokens}"
        assert sum(self.compute) == self.one_compute + self.cut_compute, (
            f"compute {sum(self.compute)} != one engine's {self.one_compute} + cut compute {self.cut_compute}")


def _imbalance(values: list) -> float:
    mean = sum(values) / len(values) if values else 0.0
    return max(abs(v - mean) for v in values) / mean if mean else 0.0


class _Order:
    """Prefix sums over the DFS order: compute (with sharing as `hold` allows), memory, cut prices."""

    def __init__(self, tree: ResourceTree, hold: int = 0):
        self.reqs, self.lcp, self.ancestors = [], [], []
        starts: dict = {}
        stack = [(tree.root, iter(tree.root.kids))]
        low = 0
        while stack:
            node, it = stack[-1]
            item = next(it, None)
            if item is None:
                stack.pop()
                if stack:
                    low = min(low, stack[-1][0].prefix_len)
            elif type(item) is Node:
                starts[id(item)] = len(self.reqs)
                stack.append((item, iter(item.kids)))
            else:
                self.lcp.append(low if self.reqs else 0)
                self.reqs.append(item)
                low = node.prefix_len
        n = len(self.reqs)
        self.kept, cached = [], 0  # the module docstring's walk: cached = prefix of earlier steps
        for low in self.lcp[:n]:
            cached = min(cached, low)
            if low - cached >= hold:  # held to a step of its own: its whole lcp is cached by then
                cached = low
            self.kept.append(cached)
        self.lcp.append(0)  # cutting after the last request costs nothing
        self.kept.append(0)
        own = [r.prompt_len + r.output_len - self.kept[k] for k, r in enumerate(self.reqs)]
        self.comp = [0, *accumulate(own)]  # comp[k]: sum over [0, k)
        self.mem = [0, *accumulate(memory_units(r.prompt_len, r.output_len) for r in self.reqs)]
        self.n = n
        self.starts = starts

    def comp_run(self, s: int, e: int) -> int:
        return self.comp[e] - self.comp[s] + self.kept[s] if e > s else 0

    def mem_run(self, s: int, e: int) -> int:
        return self.mem[e] - self.mem[s]

    def boundaries(self, k: int) -> list[int]:
        """DFS positions where a subtree around request k starts or ends."""
        if not 0 <= k < self.n:
            return []
        out, node = [], self.reqs[k].node
        while node is not None and node.parent is not None:
            s = self.starts[id(node)]
            out += (s, s + node.count)
            node = node.parent
        return out


def plan_shards(tree: ResourceTree, n_shards: int, tol: float = 0.02, stripes: int | None = None,
                hold: int = 0, even_pieces: bool = False) -> ShardPlan:
    """Cut the tree's DFS order into `n_shards` shards (see the module docstring).

    `tol`: the relative deviation from 1/N of the work a shard may take so that a cut can move to
    a cheaper boundary; when no cut is within it (requests too large for the shard size), the
    most balanced cut is taken. `stripes` > 1 cuts N x stripes pieces instead and deals them to
    the shards in a snake (0..N-1, N-1..0, ...), so each shard holds pieces from the extremes to
    the middle: the same mix of request shapes as the whole, at 2 x stripes runs per shard; None:
    `stripes_for(len(tree), n_shards)`: more pieces on larger batches (small batches: each
    cut's recomputed prefix weighs more than the mix gains). `hold`: the engine policy's hold
    threshold for the compute measure (module docstring; `ScanConfig.hold_prefix_tokens`), 0: every
    shared prefix computed once. `even_pieces`: every cut aims at i / pieces of the totals instead
    (`_Targets`; the earlier rule, kept for the comparison in `bench/scale_out.py`: a shard's error is
    then the sum of its pieces'). The tree should be sorted (`sort_and_split`); it is not changed.
    """
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    if stripes is None:
        stripes = stripes_for(len(tree), n_shards)
    if isinstance(stripes, bool) or not isinstance(stripes, int) or stripes < 1:
        raise ValueError(f"stripes must be a positive integer, got {stripes!r}")
    if not (0.0 <= tol < 1.0):
        raise ValueError(f"tol must be in [0, 1), got {tol!r}")
    if isinstance(hold, bool) or not isinstance(hold, int) or hold < 0:
        raise ValueError(f"hold must be a non-negative integer (prefix tokens), got {hold!r}")
    o = _Order(tree, hold)
    n = o.n
    comp_total, mem_total = o.comp[n], o.mem[n]
    pieces = n_shards * stripes
    owner = [snake(k, n_shards) for k in range(pieces)]
    # each cut within eps of its target keeps every shard within tol of 1/N (`_Targets`); even pieces: a
    # shard's error is the sum of its 2 x stripes cut errors
    eps = tol / (2 * pieces) if even_pieces else tol / (n_shards * (1 + sum(1 / k for k in range(1, n_shards))))
    later = [0] * (pieces + 1)  # prompt tokens the cuts after cut i recompute (from the previous pass)
    for _ in range(3):
        cuts, paid, prices = [(0, n)], 0, [0] * (pieces + 1)
        targets = _Targets(owner, n_shards, even_pieces)
        for i in range(1, pieces):
            pay = owner[i] != owner[i - 1]  # pieces of one shard meet without a cut
            a, b, *shares = _cut(o, cuts[-1], targets.next(owner[i - 1]), comp_total + later[i], mem_total,
                                 eps, paid, pay)
            targets.took(owner[i - 1], shares)
            cuts.append((a, b))
            prices[i] = ((o.kept[a] if a < b else 0) + o.kept[b]) if pay else 0
            paid += prices[i]
        after = [sum(prices[i + 1:]) for i in range(pieces + 1)]
        if after == later:
            break
        later = after
    owned: list = [[] for _ in range(n_shards)]
    dealt = []
    for k, (a, b) in enumerate(cuts):
        a2, b2 = cuts[k + 1] if k + 1 < len(cuts) else (b, b)
        owned[owner[k]] += [(a, a2), (b2, b)]
        dealt.append([r.rid for r in o.reqs[a:a2]] + [r.rid for r in o.reqs[b2:b]])
    return _plan_of(o, tree, owned, cuts[1:], hold, dealt)


def plan_strata(tree: ResourceTree, n_shards: int, atom: int = STRATUM_ATOM, hold: int = 0) -> ShardPlan:
    """Every shard about 1/N of every large subtree: the cut for output lengths the planner cannot
    see. The cuts of `plan_shards` balance the work the tree's lengths say; where those are
    max_tokens (all `blendserve run` knows before anything runs), a class of long outputs behind
    one prompt reads like any other and lands whole on few shards, whose engines then run for
    its longest outputs long after the others are done (the simulator, lengths as shipped:
    below round-robin). Here the tree in DFS order is taken in atoms (a subtree of at most `atom`
    requests, or a request directly under a larger node), each dealt to the shard with the least
    work so far (work: compute and memory shares summed, as the tree's lengths say; ties to the
    lowest index), so every larger subtree is spread over the shards whatever its true lengths,
    its shared prefix computed once per shard holding part of it (as round-robin dealing does),
    while small groups stay whole and keep their sharing (which round-robin loses). A subtree
    kept whole for its small work would be a risk the lengths hide: a class of 80 long outputs
    among 8,000 requests (1/50 of a shard's work at max_tokens) on one shard of two made it run
    1.18x the mean (Trace#1 analog)."""
    if isinstance(atom, bool) or not isinstance(atom, int) or atom < 1:
        raise ValueError(f"atom must be a positive integer, got {atom!r}")
    if not isinstance(n_shards, int) or n_shards < 1:
        raise ValueError(f"n_shards must be a positive integer, got {n_shards!r}")
    o = _Order(tree, hold)
    comp_total, mem_total = max(o.comp[o.n], 1), max(o.mem[o.n], 1)

    def work(a: int, b: int) -> float:
        return o.comp_run(a, b) / comp_total + o.mem_run(a, b) / mem_total

    atoms, pos, stack = [], 0, [iter(tree.root.kids)]
    while stack:
        item = next(stack[-1], None)
        if item is None:
            stack.pop()
        elif type(item) is Node and item.count > atom:
            stack.append(iter(item.kids))
        else:
            size = item.count if type(item) is Node else 1
            atoms.append((pos, pos + size))
            pos += size
    assert pos == o.n, f"atoms cover {pos} of {o.n} requests"
    heap = [(0.0, i) for i in range(n_shards)]
    owned: list = [[] for _ in range(n_shards)]
    owners, dealt = [], []
    for a, b in atoms:
        load, i = heapq.heappop(heap)
        owned[i].append((a, b))
        owners.append(i)
        dealt.append([r.rid for r in o.reqs[a:b]])
        heapq.heappush(heap, (load + work(a, b), i))
    return _plan_of(o, tree, owned, [], hold, dealt, owners, resume=True)


def _plan_of(o: _Order, tree: ResourceTree, owned: list, cuts: list, hold: int, dealt: list,
             owners: list = (), resume: bool = False) -> ShardPlan:
    """The ShardPlan of each shard's DFS ranges (`owned`), its work counted as `o` counts it."""
    runs = [_merge(r) for r in owned]
    shards = [[r.rid for s, e in rs for r in o.reqs[s:e]] for rs in runs]
    # `resume` (the strata's many runs a shard): a run after the shard's first finds in its
    # engine's cache what it shares with the shard's previous request (the least lcp between
    # them), so only the rest of its prefix is recomputed; the cuts' few runs start cold, as
    # their search prices them
    common = [[0] * len(rs) if not resume else [0] + [min(o.lcp[e0:s + 1]) for (_, e0), (s, _) in zip(rs, rs[1:])]
              for rs in runs]
    compute = [sum(o.comp_run(s, e) - min(o.kept[s], c) for (s, e), c in zip(rs, cs)) for rs, cs in zip(runs, common)]
    memory = [sum(o.mem_run(s, e) for s, e in rs) for rs in runs]
    cut_tokens = sum(o.lcp[s] - min(o.lcp[s], c) for rs, cs in zip(runs, common) for (s, e), c in zip(rs, cs))
    cut_compute = sum(o.kept[s] - min(o.kept[s], c) for rs, cs in zip(runs, common) for (s, e), c in zip(rs, cs))
    return ShardPlan(shards, runs, cuts, compute, memory, cut_tokens, tree.root.saved, o.comp[o.n], cut_compute,
                     hold, tuple(dealt), tuple(owners))


def snake(k: int, n_shards: int) -> int:
    """The shard of piece k: dealt 0..N-1, N-1..0, 0..N-1, ..."""
    lap, pos = divmod(k, n_shards)
    return pos if lap % 2 == 0 else n_shards - 1 - pos


def plan_for(tree: ResourceTree, n_shards: int, scan, keep_sharing: float | None = None,
             stripes: int | None = None, even_pieces: bool = False, cuts: bool = False) -> ShardPlan:
    """The cut `--dp`, `--ray` and the simulator run: the tree sorted and split under `scan`'s
    split budget (a `ScanConfig`; `keep_sharing` overrides its own), then `plan_strata` (what
    ships: the tree's output lengths are only max_tokens) or, with `cuts`, `plan_shards` (work
    balanced as the tree's lengths say: for lengths known, an ablation), each with the hold
    threshold, so the compute measure counts what each engine's `blend` policy recomputes."""
    sort_and_split(tree, scan.keep_sharing if keep_sharing is None else keep_sharing, scan.max_split_rounds)
    if not cuts:
        return plan_strata(tree, n_shards, hold=scan.hold_prefix_tokens)
    return plan_shards(tree, n_shards, stripes=stripes, hold=scan.hold_prefix_tokens, even_pieces=even_pieces)


def stripes_for(requests: int, n_shards: int) -> int:
    """Default pieces per shard: each piece `PIECE_MIN` requests on average, 1 to `MAX_STRIPES`.
    A shard's engine time depends on its mix of request shapes, not only on its compute and memory
    totals; more, smaller pieces give every shard the whole batch's mix (at one recomputed path per
    cut, which a large batch hardly notices)."""
    return max(1, min(MAX_STRIPES, requests // (PIECE_MIN * n_shards)))


def _merge(runs: list) -> list:
    """Non-empty runs sorted, touching ones joined."""
    out: list = []
    for s, e in sorted(r for r in runs if r[1] > r[0]):
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


class _Targets:
    """Where each cut aims, in shares of the totals (compute, memory) held before it: the piece it
    closes takes what its shard still needs spread over the shard's pieces not yet cut, the shard
    aiming at an equal share of what the unfinished shards have left. An earlier piece's error is
    made up by the shard's later pieces, so a shard keeps only its last cut's error e plus its part
    of the finished shards' errors: with every cut within d of its target (and d small next to a
    piece), every shard is within (1 + H_{N-1}) d of 1/N (H the harmonic number; the last shard takes
    the finished ones' errors, each weighted by 1 / (shards open when it finished)). Cutting each
    piece at i / pieces instead (`even_pieces`), a shard's error is the sum of its 2 x stripes cut
    errors, which on heavy-tailed batches (a 16K-token output is a tenth of a piece's memory at
    N = 8 x 8 pieces) add up to 5%."""

    def __init__(self, owner: list, n_shards: int, even_pieces: bool = False):
        self.even, self.pieces, self.cut = even_pieces, len(owner), 0
        self.left = [owner.count(s) for s in range(n_shards)]  # pieces of each shard not yet cut off
        self.got = [[0.0, 0.0] for _ in range(n_shards)]  # per shard: its shares so far
        self.held = [0.0, 0.0]  # shares before the next cut
        self.done = [0.0, 0.0]  # shares of the finished shards
        self.open = sum(1 for k in self.left if k)

    def next(self, shard: int) -> tuple[float, float]:
        """The shares the next cut should leave before it (it closes a piece of `shard`)."""
        if self.even:
            return (self.cut + 1) / self.pieces, (self.cut + 1) / self.pieces
        out = []
        for k in (0, 1):
            piece = ((1.0 - self.done[k]) / self.open - self.got[shard][k]) / self.left[shard]
            out.append(min(1.0, max(self.held[k], self.held[k] + piece)))
        return out[0], out[1]

    def took(self, shard: int, shares) -> None:
        """The cut closing a piece of `shard` left `shares` before it."""
        self.cut += 1
        for k in (0, 1):
            self.got[shard][k] += shares[k] - self.held[k]
            self.held[k] = shares[k]
        self.left[shard] -= 1
        if not self.left[shard]:
            self.open -= 1
            for k in (0, 1):
                self.done[k] += self.got[shard][k]


def _cut(o: _Order, prev: tuple[int, int], frac: tuple[float, float], comp_total: int, mem_total: int,
         eps: float, paid: int = 0, pay: bool = True) -> tuple[int, int, float, float]:
    """The cut (a, b) with prev_a <= a <= b <= prev_b whose left [0, a) and right [b, n) hold
    `frac` = (compute share, memory share) of the totals: among pairs within `eps` of both targets
    the cheapest (fewest prefix tokens taken from sharing), else the most balanced; with the shares
    it holds. Compute counts the prefix tokens cuts recompute (`kept`): `paid` by the earlier cuts,
    this cut's own (when `pay`: the pieces on its two sides belong to different shards), and those
    of the later cuts (included in `comp_total`, an estimate)."""
    lo, hi = prev
    frac_c, frac_m = frac
    want_m = frac_m * mem_total

    def shares(a: int, b: int) -> tuple[float, float]:
        own = ((o.kept[a] if a < b else 0) + o.kept[b]) if pay else 0
        total = comp_total + paid + own
        c = paid + o.comp[a] + (o.comp[o.n] - o.comp[b] + (o.kept[b] if pay else 0) if b < o.n else 0)
        m = o.mem[a] + o.mem[o.n] - o.mem[b]
        return c / total if total else frac_c, m / mem_total if mem_total else frac_m

    def err(a: int, b: int) -> float:
        sc, sm = shares(a, b)
        return max(abs(sc - frac_c), abs(sm - frac_m))

    def best_of(a_set, b_set) -> tuple:
        best = None
        for a in a_set:
            for b in b_set:
                if b < a:
                    continue
                e = err(a, b)
                price = o.lcp[a] + o.lcp[b] if pay else 0
                key = (0, price, e, a, -b) if e <= eps else (1, e, price, a, -b)
                if best is None or key < best[0]:
                    best = (key, a, b)
        return best

    def around(a0: int, b0: int) -> tuple:
        a_set = {a for a in range(a0 - SCAN, a0 + SCAN + 1)} | set(o.boundaries(a0)) | set(o.boundaries(a0 - 1))
        b_set = {b for b in range(b0 - SCAN, b0 + SCAN + 1)} | set(o.boundaries(b0)) | set(o.boundaries(b0 - 1))
        return sorted(a for a in a_set if lo <= a <= hi), sorted(b for b in b_set if lo <= b <= hi)

    if hi - lo <= EXHAUSTIVE:
        best = best_of(range(lo, hi + 1), range(lo, hi + 1))
    else:
        want_c = frac_c * (comp_total + paid)
        best = best_of(*around(*_exact(o, lo, hi, want_c, want_m, paid, pay)))
        if best[0][0]:  # nothing within eps near the bisection's answer (densities not monotone here): every a
            a0 = min(range(lo, hi + 1), key=lambda a: (err(a, _b_for(o, a, hi, want_c, paid, pay)), a))
            best = min(best, best_of(*around(a0, _b_for(o, a0, hi, want_c, paid, pay))))
    return (best[1], best[2], *shares(best[1], best[2]))


def _b_for(o: _Order, a: int, hi: int, want_c: float, paid: int = 0, pay: bool = False) -> int:
    """The right cut b in [a, hi] that makes the shard's compute (`_cut`'s shares: what earlier cuts
    `paid`, the left run [0, a), the right run [b, n) and, when this cut pays, the prefix it
    recomputes at b, taken as at a: b is not known yet) hold `want_c`. Without `paid` and that
    prefix, each cut through a long shared prefix landed further from its target (a probe: shards
    of 7 and 88 requests at N = 16 under one system prompt)."""
    target = o.comp[o.n] + o.comp[a] + paid + (o.kept[a] if pay else 0) - want_c  # comp[b]
    return min(max(bisect.bisect_left(o.comp, target, lo=a, hi=hi + 1), a), hi)


def _exact(o: _Order, lo: int, hi: int, want_c: float, want_m: float, paid: int = 0,
           pay: bool = False) -> tuple[int, int]:
    """Positions (a, b) near the continuous solution: for each a, b makes compute exact; memory
    falls as a grows (the left is compute-dense), so a is found by bisection on memory."""
    n = o.n
    left, right = lo, hi
    while left < right:
        mid = (left + right) // 2
        b = _b_for(o, mid, hi, want_c, paid, pay)
        if paid + o.comp[mid] > want_c or o.mem[mid] + o.mem[n] - o.mem[b] <= want_m:
            right = mid
        else:
            left = mid + 1
    return left, _b_for(o, left, hi, want_c, paid, pay)
