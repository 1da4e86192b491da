"""Sort -> conditional split -> sort: move density outliers to where they belong.

After the layer-wise sort, each child C of a node G sits between its left and right siblings;
so every leaf under C "belongs" between the densities of those neighbours (and of G's own
neighbours, inherited). A child X of node P whose density is above P's upper bound or below
its lower bound is misplaced. Splitting P moves its misplaced children (a prefix or a suffix of
P's sorted children) into a twin of P under the same parent; the twin then sorts among P's
siblings. The price is recomputing P's edge once more: `P.length` prompt tokens.

Greedy by misplaced work per recomputed token, under a budget that keeps at least
`keep_sharing` of the tree's saved prefix tokens. Rounds repeat until leaf densities are
non-increasing in DFS order, nothing is misplaced, nothing affordable is left, or
`max_rounds` is reached. Outliers bubble up one level per round.
"""

from __future__ import annotations

import bisect
import math
from typing import NamedTuple

from .tree import Node, ResourceTree


class SplitReport(NamedTuple):
    rounds: int  # sort -> split rounds run
    splits: int  # nodes split
    moved_requests: int  # distinct requests that ended up under a twin (moved away from their prefix)
    spent_tokens: int  # prompt tokens recomputed because of splits
    budget_tokens: int  # the most that could be spent
    saved_before: int  # tree.root.saved before splitting
    saved_after: int
    leaves_sorted: bool  # leaf densities non-increasing in DFS order at the end
    stop: str  # why the loop ended


class _Candidate(NamedTuple):
    score: float
    cost: int
    node: Node
    items: list


def sort_and_split(tree: ResourceTree, keep_sharing: float = 0.99, max_rounds: int = 8) -> SplitReport:
    if not (0.0 <= keep_sharing <= 1.0) or math.isnan(keep_sharing):
        raise ValueError(f"keep_sharing must be in [0, 1], got {keep_sharing!r}")
    tree.sort()
    saved_before = tree.root.saved
    budget = int(math.floor((1.0 - keep_sharing) * saved_before))
    spent = splits = rounds = 0
    stop = "max_rounds"
    for rounds in range(1, max_rounds + 1):
        if leaves_non_increasing(tree):
            stop = "leaves sorted"
            break
        cands = _candidates(tree)
        if not cands:
            stop = "no misplaced subtree"
            break
        touched: list[Node] = []
        for c in cands:
            if spent + c.cost > budget:
                continue
            if len(c.items) >= len(c.node.kids) or any(
                    (it.node if hasattr(it, "rid") else it.parent) is not c.node for it in c.items):
                continue  # the node changed earlier in this round
            tree.split_off(c.node, c.items)
            spent += c.cost
            splits += 1
            touched.append(c.node.parent)
        if not touched:
            stop = "budget spent"
            break
        _resort_upwards(tree, touched)
    return SplitReport(rounds, splits, _moved_requests(tree), spent, budget, saved_before, tree.root.saved,
                       leaves_non_increasing(tree), stop)


def _moved_requests(tree: ResourceTree) -> int:
    total, stack = 0, [tree.root]
    while stack:
        node = stack.pop()
        if node.split_of is not None:
            total += node.count
            continue
        stack.extend(k for k in node.kids if type(k) is Node)
    return total


def _candidates(tree: ResourceTree) -> list[_Candidate]:
    out: list[_Candidate] = []
    cost = tree.cost
    stack = [(tree.root, math.inf, -math.inf)]
    while stack:
        node, hi, lo = stack.pop()
        kids = node.kids
        n = len(kids)
        for i, k in enumerate(kids):
            if type(k) is not Node:
                continue
            k_hi = min(hi, kids[i - 1].sort_key) if i > 0 else hi
            k_lo = max(lo, kids[i + 1].sort_key) if i + 1 < n else lo
            stack.append((k, k_hi, k_lo))
        if node.parent is None or n < 2 or hi < lo:
            continue
        neg = lambda c: -c.sort_key  # noqa: E731  kids are sorted by -sort_key ascending
        n_high = bisect.bisect_left(kids, -hi, key=neg)  # sort_key > hi
        n_low = n - bisect.bisect_right(kids, -lo, key=neg)  # sort_key < lo
        if n_high + n_low >= n:  # keep at least one child in place: split one side only
            if 0 < n_high < n:
                n_low = 0
            elif 0 < n_low < n:
                n_high = 0
            else:
                continue
        for items in (list(kids)[:n_high], list(kids)[n - n_low:] if n_low else []):
            if not items:
                continue
            work = 0.0
            for it in items:
                if type(it) is Node:
                    work += cost.comp_time(it.tokens) + cost.mem_time(it.mem)
                else:
                    p, d = it.prompt_len, it.output_len
                    work += cost.request_comp_time(p, d) + cost.request_mem_time(p, d)
            out.append(_Candidate(work / node.length, node.length, node, items))
    out.sort(key=lambda c: (-c.score, c.node.seq))
    return out


def _resort_upwards(tree: ResourceTree, parents: list[Node]) -> None:
    """Re-sort the children lists of `parents` and of all their ancestors."""
    todo = {}
    for p in parents:
        while p is not None:
            todo[id(p)] = p
            p = p.parent
    for node in sorted(todo.values(), key=lambda n: -n.depth):
        for k in node.kids:
            if type(k) is Node:
                k.sort_key = tree.density(k)
        node.kids = type(node.kids)(sorted(node.kids, key=lambda c: (-c.sort_key, c.seq)))


def leaves_non_increasing(tree: ResourceTree) -> bool:
    prev = math.inf
    for r in tree.iter_requests():
        if r.sort_key > prev:
            return False
        prev = r.sort_key
    return True
