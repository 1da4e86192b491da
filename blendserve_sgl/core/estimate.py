"""Output-length estimation for requests whose output length is unknown.

A seeded sample (default 1%) of the unknown requests runs first; its results are real results.
Each finished sample adds its output length to the nodes on its path, so every subtree knows
its sampled mean. A request's estimate is the mean of the nearest enclosing subtree that has
samples: its own node, else its parent's (that is, its siblings' samples), and so on up to the
root; before any sample finishes, `prior`. Estimates are capped at the request's `max_tokens`.
A node split off by `sort_and_split` (a twin repeating its origin's edge) keeps no samples of its
own: its origin is the one source for both, so a sample recorded along either path (before or
after the split, finished or still running) informs the requests under both. Likewise a node
re-created where one with samples was pruned (a retracted request re-added after its subtree was
taken) reads the pruned node's samples (`sample_source`).

Two switches (both off in the plain mean): `percentile` reserves by that quantile of the
subtree's samples (nearest rank) instead of their mean; `censored` counts a sample still running
when the plan is made as censored: at least its output so far, at most its max_tokens (it takes
the mean of the finished samples of the subtree that are at least as long, else its max_tokens,
or with `censored_growth` g that many times its output so far, within its max_tokens: a sample
that outlived every finished one is expected to run as long again, the doubling rule, instead of
to its cap); without it, its output so far counts as its length.
Known lengths (ignore_eos, or a hint on the request) are used as they are and never sampled.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass

from .tree import sample_source


@dataclass(frozen=True, slots=True)
class OutputLengthEstimator:
    prior: int = 256  # estimate before any sample has finished
    sample_fraction: float = 0.01
    seed: int = 0
    overrun_factor: float = 2.0  # a request past overrun_factor x its estimate is memory-dense
    percentile: float | None = None  # reserve by this quantile of the subtree's samples (None: the mean)
    censored: bool = False  # running samples are censored (>= output so far, <= max_tokens), not finished
    censored_growth: float | None = None  # censored sample past every finished one: this x its output so far
    stratify: bool = False  # every subtree with >= 1 / sample_fraction unknown requests gets a sample

    def __post_init__(self) -> None:
        if isinstance(self.prior, bool) or not isinstance(self.prior, int) or self.prior < 1:
            raise ValueError(f"prior output length must be a positive integer, got {self.prior!r}")
        if not (isinstance(self.sample_fraction, (int, float)) and 0.0 <= self.sample_fraction <= 1.0):
            raise ValueError(f"sample_fraction must be in [0, 1], got {self.sample_fraction!r}")
        if not (isinstance(self.overrun_factor, (int, float)) and self.overrun_factor >= 1.0):
            raise ValueError(f"overrun_factor must be >= 1, got {self.overrun_factor!r}")
        if self.percentile is not None and not (isinstance(self.percentile, (int, float)) and 0.0 < self.percentile <= 1.0):
            raise ValueError(f"percentile must be in (0, 1] or None, got {self.percentile!r}")
        if self.censored_growth is not None and not (
                isinstance(self.censored_growth, (int, float)) and self.censored_growth >= 1.0):
            raise ValueError(f"censored_growth must be >= 1 or None, got {self.censored_growth!r}")

    @property
    def keeps_values(self) -> bool:
        """Whether estimates need each sample's value (not only the subtree's sum and count)."""
        return self.percentile is not None or self.censored

    def estimate(self, node, max_tokens: int | None) -> int:
        n = sample_source(node)
        while n is not None and n.sample_n == 0:
            n = sample_source(n.parent)
        if n is None:
            est = self.prior
        elif self.keeps_values and n.sample_values:
            est = max(1, round(self.summarize(n.sample_values)))
        else:
            est = max(1, round(n.sample_sum / n.sample_n))
        return min(est, max_tokens) if max_tokens is not None else est

    def summarize(self, samples) -> float:
        """The estimate from one subtree's samples [(length, cap), ...] (cap None: finished;
        else a censored sample: at least length, at most cap): censored ones take the mean of the
        finished samples at least as long (else `censored_growth` x their length within their cap,
        or their cap, or their length without one); then the `percentile` (nearest rank) or the mean."""
        finished = [v for v, cap in samples if cap is None]
        values = []
        for v, cap in samples:
            if cap is not None:
                longer = [f for f in finished if f >= v]
                if longer:
                    v = sum(longer) / len(longer)
                elif self.censored_growth is not None:
                    v = min(max(v, cap), self.censored_growth * v)
                else:
                    v = max(v, cap)
            values.append(v)
        if self.percentile is None:
            return sum(values) / len(values)
        values.sort()
        return values[min(len(values), max(1, math.ceil(self.percentile * len(values)))) - 1]

    def sample_key(self, rid) -> bytes:
        """A stable per-request hash: the same on every machine and every run with this seed."""
        return hashlib.blake2b(f"{self.seed}\x00{rid!r}".encode(), digest_size=8).digest()

    def choose_sample(self, rids) -> list:
        """The ceil(fraction x n) requests with the smallest seeded hashes (at least one if any)."""
        rids = list(rids)
        if not rids or self.sample_fraction <= 0:
            return []
        k = max(1, math.ceil(self.sample_fraction * len(rids)))
        return heapq.nsmallest(k, rids, key=self.sample_key)

    def record(self, path, output_len: int, count: int = 1, cap: int | None = None, censored: bool = False) -> None:
        """Add one finished sample's output length to the sample source of every node on its root
        path, once each (count=-1 with a negated length takes a provisional record back). `censored`: a sample
        still running, `output_len` so far, at most `cap` (kept only where estimates use it)."""
        keep = self.keeps_values
        entry = (abs(output_len), cap if censored else None)
        seen: set = set()  # a node cut in two after it was re-created: both parts read one source
        for node in map(sample_source, path):
            if id(node) in seen:
                continue
            seen.add(id(node))
            node.sample_n += count
            node.sample_sum += output_len
            if keep:
                if count > 0:
                    node.sample_values = (node.sample_values or []) + [entry]
                elif node.sample_values and entry in node.sample_values:
                    node.sample_values.remove(entry)

    def refresh(self, tree) -> int:
        """Re-estimate every waiting request of unknown length; returns how many changed."""
        changed = 0
        for req in list(tree.reqs.values()):
            if req.known:
                continue
            est = self.estimate(req.node, req.max_tokens)
            if est != req.output_len:
                tree.set_output_len(req, est)
                changed += 1
        return changed

    def overran(self, estimate: int, generated: int) -> bool:
        return generated > self.overrun_factor * max(1, estimate)


def stratum_samples(tree, estimator: OutputLengthEstimator, chosen: set) -> list:
    """`estimator.stratify`: for every node below the root with at least 1 / sample_fraction
    unknown requests under it and none of them in `chosen` (after the additions below it), its
    request with the smallest seeded hash; deepest nodes first, so one addition serves every
    ancestor. A class of that size then has a sample of its own instead of an ancestor's mean."""
    inverse = 1 / estimator.sample_fraction
    if not math.isfinite(inverse):  # a fraction so small no node is that large (1 / 1e-320 is inf)
        return []
    need = math.ceil(inverse)
    added = []
    order, stack = [], [tree.root]
    while stack:  # pre-order; reversed below: every node after its descendants
        node = stack.pop()
        order.append(node)
        stack.extend(k for k in node.kids if hasattr(k, "kids"))
    below: dict = {}  # id(node) -> (unknown requests under it, the smallest (hash, rid) of them, one is chosen)
    for node in reversed(order):
        count, best, has = 0, None, False
        for k in node.kids:
            if hasattr(k, "kids"):
                n, b, h = below.pop(id(k))
            elif not k.known:
                n, b, h = 1, (estimator.sample_key(k.rid), k.rid), k.rid in chosen
            else:
                continue
            count, has = count + n, has or h
            if b is not None and (best is None or b[0] < best[0]):
                best = b
        if node is not tree.root and not has and count >= need:
            added.append(best[1])
            chosen.add(best[1])
            has = True
        below[id(node)] = (count, best, has)
    return added


class SamplePhase:
    """The output-length sample that runs before the tree is planned: which requests it holds,
    which are still running and their output so far, and when the rest can be planned (once
    `quorum` of it finished; with the running ones counted at their output so far)."""

    def __init__(self, estimator: OutputLengthEstimator, quorum: float):
        self.estimator = estimator
        self.quorum = quorum
        self.pending: set = set()  # sample requests not finished yet (the plan waits for them)
        self.size = 0
        self.generated: dict = {}  # running sample rid -> tokens generated so far
        self.seen = 0  # requests of unknown length the sample was drawn from or that arrived since
        self.drawn = 0  # sample requests chosen among them (a retracted one stays counted)
        self.late: set = set()  # sample requests that arrived after the plan, not finished yet

    def start(self, tree) -> None:
        """Choose the sample among the tree's requests of unknown length and mark them."""
        unknown = [r.rid for r in tree.reqs.values() if not r.known]
        chosen = self.estimator.choose_sample(unknown)
        if self.estimator.stratify and chosen:
            chosen += stratum_samples(tree, self.estimator, set(chosen))
        for rid in chosen:
            tree.reqs[rid].sample = True
        self.pending = set(chosen)
        self.size = len(chosen)
        self.seen, self.drawn = len(unknown), len(chosen)

    def arrived(self, req, planned: bool) -> None:
        """A request of unknown length arrived after the sample was drawn (an engine receives its
        batch over many steps, a server for ever): it joins the sample while fewer than
        ceil(sample_fraction x requests seen) were chosen. Before the plan it holds the plan like
        the first ones; after it, it is `late`: its length, once in, informs the estimates of
        requests that arrive later, and nothing waits for it."""
        if req.known or self.estimator.sample_fraction <= 0:
            return
        self.seen += 1
        if self.drawn >= math.ceil(self.estimator.sample_fraction * self.seen):
            return
        self.drawn += 1
        req.sample = True
        if planned:
            self.late.add(req.rid)
        else:
            self.pending.add(req.rid)
            self.size += 1

    def holds(self, rid) -> bool:
        """Whether `rid` is a sample request not finished yet (pending or late)."""
        return rid in self.pending or rid in self.late

    def waiting(self, tree) -> list:
        """Sample requests still in the tree, in arrival order."""
        rids = self.pending | self.late if self.late else self.pending
        return sorted((tree.reqs[r] for r in rids if r in tree.reqs), key=lambda r: r.seq)

    def quorum_reached(self) -> bool:
        return self.size - len(self.pending) >= self.quorum * self.size

    def progress(self, rid, generated: int) -> None:
        if rid in self.pending:
            self.generated[rid] = generated

    def finished(self, rid, path, output_len: int | None, aborted: bool = False) -> bool:
        """A sample request finished: record its length along `path`; `aborted` (while running):
        no length, and the sample shrinks as for a retraction. True when the rest should be
        planned now (the whole sample, or the quorum, is in)."""
        if output_len is not None and not aborted:
            self.estimator.record(path, output_len)
        self.generated.pop(rid, None)
        if rid in self.late:
            self.late.discard(rid)
            return False
        if aborted and rid in self.pending:
            self.size -= 1
        self.pending.discard(rid)
        return not self.pending or self.quorum_reached()

    def retracted(self, rid) -> None:
        """A sample request was preempted (it runs again later, no longer as a sample) or aborted."""
        self.generated.pop(rid, None)
        self.late.discard(rid)
        if rid in self.pending:
            self.pending.discard(rid)
            self.size -= 1

    def estimate(self, tree, running: dict) -> dict:
        """Re-estimate the tree's unknown lengths; running samples (rid -> (root path, max_tokens)
        in `running`) count with their output so far (a lower bound, or censored with
        `estimator.censored`) for this estimate only. Returns, per running sample, the estimate
        its own node got (what this plan assumes for requests like it)."""
        est = self.estimator
        partial = [(r, *running[r], g) for r, g in self.generated.items() if r in running and g > 0]
        for _, path, cap, g in partial:
            est.record(path, g, cap=cap, censored=est.censored)
        est.refresh(tree)
        assumed = {r: est.estimate(path[-1], cap) for r, (path, cap) in running.items() if r in self.pending and path}
        for _, path, cap, g in partial:
            est.record(path, -g, count=-1, cap=cap, censored=est.censored)
        return assumed
