"""How much prefix sharing an execution order keeps.

Model of the prefix cache: a request's prompt hits the longest prefix it shares with any of the
`window` requests admitted just before it (those are running or just finished, so their KV is
still cached). `prefix_hits` computes it on a reference prefix tree in O(depth) per request:
every divergence point between two prompts is a node of the tree, so the longest shared prefix
with a recent request is the prefix length of the deepest node a recent request passed through.
`prefix_hits_bruteforce` is the plain reference on token lists that the tests compare against.
"""

from __future__ import annotations

from typing import Iterable, Sequence

from .tree import ResourceTree


class PrefixHitCounter:
    """Incremental form: feed requests in admission order, get each one's hit length."""

    def __init__(self, reference: ResourceTree, window: int):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.reference = reference
        self.window = window
        self._stamp: dict[int, int] = {}
        self._pos = 0
        self.hits = 0
        self.prompt_tokens = 0

    def admit(self, rid) -> int:
        req = self.reference.reqs[rid]
        oldest = self._pos - self.window
        stamp = self._stamp
        hit = 0
        n = req.node
        while n is not None:
            s = stamp.get(id(n))
            if s is not None and s >= oldest:
                hit = n.prefix_len
                break
            n = n.parent
        n = req.node
        while n is not None:
            stamp[id(n)] = self._pos
            n = n.parent
        self._pos += 1
        hit = min(hit, req.prompt_len)
        self.hits += hit
        self.prompt_tokens += req.prompt_len
        return hit


def prefix_hits(reference: ResourceTree, order: Iterable, window: int) -> int:
    counter = PrefixHitCounter(reference, window)
    for rid in order:
        counter.admit(rid)
    return counter.hits


def prefix_hits_bruteforce(prompts: dict, order: Sequence, window: int) -> int:
    """Reference: for each request, the longest common prefix with any of the previous `window`."""
    hits = 0
    for i, rid in enumerate(order):
        a = prompts[rid]
        best = 0
        for j in range(max(0, i - window), i):
            b = prompts[order[j]]
            k = 0
            limit = min(len(a), len(b))
            while k < limit and a[k] == b[k]:
                k += 1
            best = max(best, k)
        hits += best
    return hits


def dfs_order(reference: ResourceTree) -> list:
    """Pure DFS order of the reference tree (children in arrival order): the sharing baseline."""
    return [r.rid for r in reference.iter_requests()]
