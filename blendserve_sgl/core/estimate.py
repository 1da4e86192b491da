"""Output-length estimation for requests whose output length is unknown.

A seeded sample (default 1%) of the unknown requests runs first; its results are real results.
Each finished sample adds its output length to the nodes on its path, so every subtree knows
its sampled mean. A request's estimate is the mean of the nearest enclosing subtree that has
samples: its own node, else its parent's (that is, its siblings' samples), and so on up to the
root; before any sample finishes, `prior`. Estimates are capped at the request's `max_tokens`.
Known lengths (ignore_eos, or a hint on the request) are used as they are and never sampled.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OutputLengthEstimator:
    prior: int = 256  # estimate before any sample has finished
    sample_fraction: float = 0.01
    seed: int = 0
    overrun_factor: float = 2.0  # a request past overrun_factor x its estimate is memory-dense

    def __post_init__(self) -> None:
        if isinstance(self.prior, bool) or not isinstance(self.prior, int) or self.prior < 1:
            raise ValueError(f"prior output length must be a positive integer, got {self.prior!r}")
        if not (isinstance(self.sample_fraction, (int, float)) and 0.0 <= self.sample_fraction <= 1.0):
            raise ValueError(f"sample_fraction must be in [0, 1], got {self.sample_fraction!r}")
        if not (isinstance(self.overrun_factor, (int, float)) and self.overrun_factor >= 1.0):
            raise ValueError(f"overrun_factor must be >= 1, got {self.overrun_factor!r}")

    def estimate(self, node, max_tokens: int | None) -> int:
        n = node
        while n is not None and n.sample_n == 0:
            n = n.parent
        est = self.prior if n is None else max(1, round(n.sample_sum / n.sample_n))
        return min(est, max_tokens) if max_tokens is not None else est

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

    @staticmethod
    def record(path, output_len: int, count: int = 1) -> None:
        """Add one finished sample's output length to every node on its root path
        (count=-1 with a negated length takes a provisional record back)."""
        for node in path:
            node.sample_n += count
            node.sample_sum += output_len

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


class SamplePhase:
    """The output-length sample that runs before the tree is planned: which requests it holds,
    which are still running and their output so far, and when the rest can be planned (once
    `quorum` of it finished; with the running ones counted at their output so far)."""

    def __init__(self, estimator: OutputLengthEstimator, quorum: float):
        self.estimator = estimator
        self.quorum = quorum
        self.pending: set = set()  # sample requests not finished yet
        self.size = 0
        self.generated: dict = {}  # running sample rid -> tokens generated so far

    def start(self, tree) -> None:
        """Choose the sample among the tree's requests of unknown length and mark them."""
        chosen = self.estimator.choose_sample([r.rid for r in tree.reqs.values() if not r.known])
        for rid in chosen:
            tree.reqs[rid].sample = True
        self.pending = set(chosen)
        self.size = len(chosen)

    def waiting(self, tree) -> list:
        """Sample requests still in the tree, in arrival order."""
        return sorted((tree.reqs[r] for r in self.pending if r in tree.reqs), key=lambda r: r.seq)

    def quorum_reached(self) -> bool:
        return self.size - len(self.pending) >= self.quorum * self.size

    def progress(self, rid, generated: int) -> None:
        if rid in self.pending:
            self.generated[rid] = generated

    def finished(self, rid, path, output_len: int | None) -> bool:
        """A sample request finished: record its length along `path`. True when the rest should
        be planned now (the whole sample, or the quorum, is in)."""
        if output_len is not None:
            self.estimator.record(path, output_len)
        self.pending.discard(rid)
        self.generated.pop(rid, None)
        return not self.pending or self.quorum_reached()

    def retracted(self, rid) -> None:
        """A running sample request was preempted: it runs again later, no longer as a sample."""
        self.generated.pop(rid, None)
        if rid in self.pending:
            self.pending.discard(rid)
            self.size -= 1

    def estimate(self, tree, paths: dict) -> None:
        """Re-estimate the tree's unknown lengths; running samples (rid -> root path in `paths`)
        count with their output so far (a lower bound) for this estimate only."""
        partial = [(paths[r], g) for r, g in self.generated.items() if r in paths and g > 0]
        for path, g in partial:
            self.estimator.record(path, g)
        self.estimator.refresh(tree)
        for path, g in partial:
            self.estimator.record(path, -g, count=-1)
