"""The cascade plan: which requests of a decode batch read which KV pages at which level.

A plan uses FlashInfer's multi-level layout. Queries are put in *plan order* (`order[i]` is the
batch index of plan position i) so every group is a run of consecutive positions. Each level
partitions the positions into groups; group g of a level reads the KV pages
`kv_indices[kv_indptr[g]:kv_indptr[g + 1]]`, all full except the last, which holds
`last_page_len[g]` tokens (0 when the group reads no page). A token's KV slot is
`page * page_size + offset`. Over all levels, a request's groups read exactly its own tokens,
each once: the shared levels hold prefixes read once per group, the last level each request's
own suffix. Attention over the levels, merged by log-sum-exp, equals attention over the whole
sequence.

Plans are built in two steps, both pure NumPy:

1. a prefix tree of the batch: `prefix_tree_from_pages` finds it in page tables (identical
   leading page ids are shared pages, as SGLang's radix cache leaves them in `req_to_token`);
   tests and callers that know the sharing (a radix or blend tree) write a `Prefix` tree by hand;
2. `plan_from_tree` chooses which tree nodes become groups (at most `num_levels - 1` per
   request, most KV pages saved) and writes the arrays.

`plan_from_req_to_token` does both from SGLang's slot table.

Example (page size 1: pages are token slots)::

    >>> import numpy as np
    >>> table = np.array([[7, 8, 9, 20, 0], [7, 8, 9, 21, 22], [30, 31, 0, 0, 0]])
    >>> plan = plan_from_req_to_token(table, [0, 1, 2], [4, 5, 2], page_size=1, min_shared_pages=2)
    >>> plan.order.tolist(), plan.levels[0].qo_indptr.tolist(), plan.levels[0].kv_indices.tolist()
    ([0, 1, 2], [0, 2, 3], [7, 8, 9])
    >>> plan.levels[1].kv_indptr.tolist(), plan.levels[1].kv_indices.tolist()
    ([0, 1, 3, 5], [20, 21, 22, 30, 31])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["CascadePlan", "Level", "Prefix", "Seq", "plan_from_req_to_token", "plan_from_tree",
           "prefix_tree_from_pages"]


# ---------------------------------------------------------------------- the arrays
@dataclass(frozen=True)
class Level:
    """One cascade level: groups of consecutive plan positions that read the same KV pages.

    qo_indptr     int32 [groups + 1]  group g holds plan positions qo_indptr[g]:qo_indptr[g + 1]
    kv_indptr     int32 [groups + 1]  group g reads pages kv_indices[kv_indptr[g]:kv_indptr[g + 1]]
    kv_indices    int32 [pages]       page ids
    last_page_len int32 [groups]      tokens in the group's last page; 0 for a group without pages
    """

    qo_indptr: np.ndarray
    kv_indptr: np.ndarray
    kv_indices: np.ndarray
    last_page_len: np.ndarray

    @property
    def num_groups(self) -> int:
        return len(self.last_page_len)

    def kv_lens(self, page_size: int) -> np.ndarray:
        """Tokens read by each group."""
        pages = np.diff(self.kv_indptr)
        return np.where(pages > 0, (pages - 1) * page_size + self.last_page_len, 0)

    def group_slots(self, g: int, page_size: int) -> np.ndarray:
        """KV slots of group g's tokens, in sequence order."""
        pages = self.kv_indices[self.kv_indptr[g]:self.kv_indptr[g + 1]].astype(np.int64)
        if len(pages) == 0:
            return np.zeros(0, dtype=np.int64)
        slots = (pages[:, None] * page_size + np.arange(page_size)).reshape(-1)
        return slots[:(len(pages) - 1) * page_size + int(self.last_page_len[g])]


@dataclass(frozen=True)
class CascadePlan:
    """A decode batch's cascade: `levels[:-1]` shared prefixes, `levels[-1]` (usually) suffixes.

    order  int64 [n]  plan position i is request `order[i]` of the batch (its query row); a plan
                      built by `restrict` covers part of a batch
    """

    page_size: int
    order: np.ndarray
    levels: tuple[Level, ...]

    @property
    def num_requests(self) -> int:
        return len(self.order)

    @property
    def num_levels(self) -> int:
        return len(self.levels)

    def pages_read(self) -> int:
        """KV pages the cascade reads (each group's pages once)."""
        return int(sum(len(lv.kv_indices) for lv in self.levels))

    def tokens_read(self) -> int:
        return int(sum(lv.kv_lens(self.page_size).sum() for lv in self.levels))

    def shared_positions(self) -> np.ndarray:
        """Bool [n]: positions in a group of two or more positions that reads at least one page."""
        out = np.zeros(self.num_requests, dtype=bool)
        for lv in self.levels:
            for g in np.flatnonzero((np.diff(lv.qo_indptr) >= 2) & (np.diff(lv.kv_indptr) > 0)):
                out[lv.qo_indptr[g]:lv.qo_indptr[g + 1]] = True
        return out

    def request_slots(self, position: int) -> np.ndarray:
        """KV slots plan position `position` reads, level by level (its whole sequence)."""
        parts = []
        for lv in self.levels:
            g = int(np.searchsorted(lv.qo_indptr, position, side="right")) - 1
            parts.append(lv.group_slots(g, self.page_size))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def restrict(self, keep: np.ndarray) -> "CascadePlan":
        """The plan over the positions where `keep` (bool [n]) is set; every group that holds a
        dropped position must hold only that position (solo at every level)."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (self.num_requests,):
            raise ValueError(f"restrict: keep has shape {keep.shape}, the plan has {self.num_requests} positions")
        upto = np.concatenate([[0], np.cumsum(keep)])
        levels = []
        for i, lv in enumerate(self.levels):
            sizes = np.diff(lv.qo_indptr)
            kept = upto[lv.qo_indptr[1:]] - upto[lv.qo_indptr[:-1]]
            if np.any((kept != sizes) & (sizes != 1)):
                raise ValueError(f"restrict: level {i} has a group of several positions with some dropped; "
                                 "only positions that are alone in every level can be dropped")
            groups = np.flatnonzero(kept > 0)
            pages = np.diff(lv.kv_indptr)[groups]
            starts = lv.kv_indptr[groups]
            kv_indices = (np.concatenate([lv.kv_indices[s:s + p] for s, p in zip(starts, pages)])
                          if len(groups) else np.zeros(0, dtype=np.int32))
            levels.append(Level(_indptr(kept[groups]), _indptr(pages), kv_indices.astype(np.int32),
                                lv.last_page_len[groups].astype(np.int32)))
        return CascadePlan(self.page_size, self.order[keep], tuple(levels))

    def check(self) -> None:
        """Raise ValueError naming the first broken invariant."""
        n = self.num_requests
        if self.page_size < 1:
            raise ValueError(f"plan.page_size={self.page_size}: must be >= 1")
        if len(np.unique(self.order)) != n or (n and self.order.min() < 0):
            raise ValueError("plan.order must hold distinct batch indices >= 0")
        if not self.levels:
            raise ValueError("plan.levels is empty: a plan needs at least one level")
        for i, lv in enumerate(self.levels):
            where = f"plan.levels[{i}]"
            g = lv.num_groups
            for name, arr, size in (("qo_indptr", lv.qo_indptr, g + 1), ("kv_indptr", lv.kv_indptr, g + 1)):
                if len(arr) != size or arr[0] != 0 or np.any(np.diff(arr) < 0):
                    raise ValueError(f"{where}.{name} must have {size} non-decreasing entries from 0")
            if lv.qo_indptr[-1] != n:
                raise ValueError(f"{where}.qo_indptr ends at {lv.qo_indptr[-1]}, not at the batch size {n}")
            if lv.kv_indptr[-1] != len(lv.kv_indices):
                raise ValueError(f"{where}.kv_indptr ends at {lv.kv_indptr[-1]}, not at len(kv_indices) "
                                 f"{len(lv.kv_indices)}")
            if np.any(lv.kv_indices < 0):
                raise ValueError(f"{where}.kv_indices holds a negative page id")
            has_pages = np.diff(lv.kv_indptr) > 0
            ok = np.where(has_pages, (lv.last_page_len >= 1) & (lv.last_page_len <= self.page_size),
                          lv.last_page_len == 0)
            if not np.all(ok):
                g_bad = int(np.flatnonzero(~ok)[0])
                raise ValueError(f"{where}.last_page_len[{g_bad}]={lv.last_page_len[g_bad]}: must be in "
                                 f"1..{self.page_size} for a group with pages, 0 for one without")
        for pos in range(n):  # only the last non-empty segment of a request may end in a partial page
            seen_partial = False
            for i, lv in enumerate(self.levels):
                g = int(np.searchsorted(lv.qo_indptr, pos, side="right")) - 1
                if lv.kv_indptr[g + 1] == lv.kv_indptr[g]:
                    continue
                if seen_partial:
                    raise ValueError(f"plan position {pos}: level {i} reads pages after a partial last page")
                seen_partial = int(lv.last_page_len[g]) < self.page_size


def _indptr(sizes) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, dtype=np.int32)
    np.cumsum(sizes, out=out[1:])
    return out


# ---------------------------------------------------------------------- the prefix tree
@dataclass(frozen=True)
class Seq:
    """One request: its own pages after its parent's prefix; `last_page_len` tokens in the last
    (`page_size` when full; 0 when it has no pages of its own)."""

    request: int
    pages: tuple[int, ...] = ()
    last_page_len: int = 0


@dataclass(frozen=True)
class Prefix:
    """Full pages shared by every request below, after the parent's prefix."""

    pages: tuple[int, ...]
    children: tuple["Prefix | Seq", ...]


def prefix_tree_from_pages(page_tables: Sequence[Sequence[int]], seq_lens: Sequence[int], page_size: int) -> Prefix:
    """The prefix tree of a batch from its page tables: request i's tokens lie in pages
    `page_tables[i]` (at least ceil(seq_lens[i] / page_size) of them; extra entries are ignored).
    Two requests share a page when the same page id stands at the same position; only full pages
    are shared. Children are ordered by their smallest request index."""
    if page_size < 1:
        raise ValueError(f"page_size={page_size}: must be >= 1")
    n = len(seq_lens)
    if len(page_tables) != n:
        raise ValueError(f"page_tables has {len(page_tables)} rows for {n} seq_lens: give one row per request")
    lens = np.asarray(seq_lens, dtype=np.int64)
    if np.any(lens < 0):
        raise ValueError(f"seq_lens[{int(np.flatnonzero(lens < 0)[0])}] is negative")
    n_pages = -(-lens // page_size)
    n_full = lens // page_size
    width = int(n_pages.max()) if n else 0
    table = np.full((n, width), -1, dtype=np.int64)
    for i, row in enumerate(page_tables):
        row = np.asarray(row, dtype=np.int64)[:n_pages[i]]
        if len(row) < n_pages[i]:
            raise ValueError(f"page_tables[{i}] has {len(row)} pages; seq_lens[{i}]={lens[i]} needs {n_pages[i]}")
        table[i, :len(row)] = row
    last = np.where(n_pages > 0, lens - (n_pages - 1) * page_size, 0)

    def seq(i: int, depth: int) -> Seq:
        own = tuple(table[i, depth:n_pages[i]].tolist())
        return Seq(int(i), own, int(last[i]) if own else 0)

    def build(members: np.ndarray, depth: int) -> Prefix:
        full = int(n_full[members].min())
        block = table[members, depth:full]
        same = np.all(block == block[0], axis=0)
        common = depth + (int(np.argmin(same)) if not same.all() else full - depth)
        children: list[tuple[int, Prefix | Seq]] = []
        ends = members[n_full[members] <= common]
        children += [(int(i), seq(i, common)) for i in ends]
        rest = members[n_full[members] > common]
        if len(rest):
            keys = table[rest, common]
            for key in np.unique(keys):
                part = rest[keys == key]
                first = int(part.min())
                children.append((first, seq(part[0], common) if len(part) == 1 else build(part, common)))
        children.sort(key=lambda c: c[0])
        return Prefix(tuple(table[members[0], depth:common].tolist()), tuple(c for _, c in children))

    if n == 0:
        return Prefix((), ())
    if n == 1:
        return Prefix((), (seq(0, 0),))
    return build(np.arange(n), 0)


# ---------------------------------------------------------------------- choosing groups
def plan_from_tree(root: Prefix, page_size: int, num_levels: int = 2, min_shared_pages: int = 1) -> CascadePlan:
    """The plan that reads the fewest KV pages with at most `num_levels - 1` shared groups on any
    request's path. A prefix node becomes a group when it holds two or more requests and adds at
    least `min_shared_pages` pages to the group above it; the saving of a group is
    (requests - 1) x (pages it adds), maximized exactly by a dynamic program over the tree.
    Requests keep tree (DFS) order; levels without a group for a request give it an empty solo
    group there."""
    if num_levels < 1:
        raise ValueError(f"num_levels={num_levels}: must be >= 1 (1 = no shared level)")
    if min_shared_pages < 1:
        raise ValueError(f"min_shared_pages={min_shared_pages}: must be >= 1")
    if page_size < 1:
        raise ValueError(f"page_size={page_size}: must be >= 1")

    # DFS: positions of requests, each prefix node's (start, end, depth, count)
    info: dict[int, tuple[int, int, int]] = {}  # id(node) -> (start, end, depth in pages)
    seqs: list[tuple[Seq, list[Prefix]]] = []  # (request, its prefix path from the root)

    def walk(node: Prefix, path: list[Prefix], depth: int) -> None:
        if not isinstance(node, Prefix):
            raise TypeError(f"tree node {node!r}: expected Prefix or Seq")
        depth += len(node.pages)
        start = len(seqs)
        path = path + [node]
        for child in node.children:
            if isinstance(child, Seq):
                if not (0 <= child.last_page_len <= page_size) or (child.last_page_len == 0) != (len(child.pages) == 0):
                    raise ValueError(f"Seq(request={child.request}).last_page_len={child.last_page_len}: must be in "
                                     f"1..{page_size} with pages of its own, 0 without")
                seqs.append((child, path))
            else:
                walk(child, path, depth)
        info[id(node)] = (start, len(seqs), depth)

    walk(root, [], 0)
    requests = [s.request for s, _ in seqs]
    if sorted(requests) != list(range(len(requests))):
        raise ValueError(f"the tree's requests must be 0..{len(requests) - 1}, each once; got {sorted(requests)}")

    memo: dict[tuple[int, int, int], int] = {}

    def best(node: Prefix, k: int, above: int) -> int:
        """Most pages saved in node's subtree, with k levels left and the nearest group above
        ending at page depth `above`."""
        key = (id(node), k, above)
        if key in memo:
            return memo[key]
        subs = [c for c in node.children if isinstance(c, Prefix)]
        skip = sum(best(c, k, above) for c in subs)
        start, end, depth = info[id(node)]
        take = -1
        if k >= 1 and end - start >= 2 and depth - above >= min_shared_pages:
            take = (end - start - 1) * (depth - above) + sum(best(c, k - 1, depth) for c in subs)
        memo[key] = max(skip, take)
        return memo[key]

    chosen: dict[int, int] = {}  # id(node) -> level

    def pick(node: Prefix, k: int, above: int, level: int) -> None:
        subs = [c for c in node.children if isinstance(c, Prefix)]
        start, end, depth = info[id(node)]
        if k >= 1 and end - start >= 2 and depth - above >= min_shared_pages:
            take = (end - start - 1) * (depth - above) + sum(best(c, k - 1, depth) for c in subs)
            if take > sum(best(c, k, above) for c in subs):
                chosen[id(node)] = level
                for c in subs:
                    pick(c, k - 1, depth, level + 1)
                return
        for c in subs:
            pick(c, k, above, level)

    pick(root, num_levels - 1, 0, 0)

    # per request and level: (group key, the tree nodes whose pages it reads, last page length);
    # the last level is the request's own remainder
    n = len(seqs)
    segments: list[list[tuple[object, list, int]]] = [[] for _ in range(num_levels)]
    for pos, (s, path) in enumerate(seqs):
        nodes: list = []
        level = 0
        for node in path:
            nodes.append(node)
            if id(node) in chosen:
                segments[level].append((id(node), nodes, page_size))
                nodes, level = [], level + 1
        for lv in range(level, num_levels - 1):
            segments[lv].append((("solo", pos), [], 0))
        own_pages = sum(len(x.pages) for x in nodes)
        last = s.last_page_len if s.pages else (page_size if own_pages else 0)
        segments[num_levels - 1].append((("own", pos), nodes + [s], last))

    levels = []
    for segs in segments:
        sizes, pages_per, indices, lasts = [], [], [], []
        prev = object()
        for key, nodes, last in segs:
            if key == prev:  # another member of the group: its pages are the first member's
                sizes[-1] += 1
                continue
            prev = key
            pages = [p for x in nodes for p in x.pages]
            sizes.append(1)
            pages_per.append(len(pages))
            indices.extend(pages)
            lasts.append(last)
        levels.append(Level(_indptr(sizes), _indptr(pages_per), np.asarray(indices, dtype=np.int32),
                            np.asarray(lasts, dtype=np.int32)))
    assert all(lv.qo_indptr[-1] == n for lv in levels)
    return CascadePlan(page_size, np.asarray(requests, dtype=np.int64), tuple(levels))


# ---------------------------------------------------------------------- SGLang's slot table
def plan_from_req_to_token(req_to_token, req_pool_indices, seq_lens, page_size: int, num_levels: int = 2,
                           min_shared_pages: int = 1) -> CascadePlan:
    """The plan of a decode batch from SGLang's slot table: request i's token t is in slot
    `req_to_token[req_pool_indices[i], t]`, t < seq_lens[i]. With pages, a page's tokens must lie
    in consecutive slots from `page * page_size` (SGLang's paged allocator does this)."""
    table = np.asarray(req_to_token)
    rows = np.asarray(req_pool_indices, dtype=np.int64)
    lens = np.asarray(seq_lens, dtype=np.int64)
    if table.ndim != 2:
        raise ValueError(f"req_to_token must be 2-D [pool size, context length], got shape {table.shape}")
    if rows.shape != lens.shape:
        raise ValueError(f"req_pool_indices {rows.shape} and seq_lens {lens.shape} must have the same shape")
    if len(rows) and (rows.min() < 0 or rows.max() >= table.shape[0]):
        raise ValueError(f"req_pool_indices must be in 0..{table.shape[0] - 1}")
    if len(lens) and (lens.min() < 0 or lens.max() > table.shape[1]):
        raise ValueError(f"seq_lens must be in 0..{table.shape[1]} (the slot table's width)")
    width = int(lens.max()) if len(lens) else 0
    slots = table[rows, :width].astype(np.int64)
    if page_size == 1:
        pages = slots
    else:
        pages = slots[:, ::page_size] // page_size
        expect = np.repeat(pages, page_size, axis=1)[:, :width] * page_size + np.arange(width) % page_size
        bad = (slots != expect) & (np.arange(width) < lens[:, None])
        if bad.any():
            i, t = (int(x) for x in np.argwhere(bad)[0])
            raise ValueError(f"req_to_token row {rows[i]}: token {t} is in slot {slots[i, t]}, not in its page's "
                             f"slot {expect[i, t]}; page_size={page_size} needs each page in consecutive slots")
    tree = prefix_tree_from_pages(list(pages), lens, page_size)
    return plan_from_tree(tree, page_size, num_levels, min_shared_pages)
