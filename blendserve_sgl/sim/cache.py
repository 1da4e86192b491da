"""The simulated engine's prefix cache: SGLang's radix tree with lock references and LRU eviction.

Edges are runs of atoms (`request.atom_len`: a token id is one token, a `Group` its length).
As in SGLang, a match that ends inside an edge splits it, so every match ends on a node;
`insert` publishes a sequence and reports how many of its tokens were already cached (the
caller frees its duplicate copies). Running requests `lock` the node their KV ends on: the
lock reference of every node on its root path goes up, and locked nodes are never evicted.
`evict(n)` removes unlocked leaves, least recently used first (whole nodes, as SGLang does),
until at least n tokens are freed. The cache only counts tokens; the engine owns the pages.

Recency is a logical clock that ticks once per match or insert; every node on the path gets
the tick. Evictable leaves sit in a heap with lazy deletion: an entry is valid while its node
is alive, still a leaf, unlocked and untouched since the entry was pushed.
"""

from __future__ import annotations

import heapq
import math
from typing import Callable, Sequence

from .request import atom_len, keys_len


def _common_length(edge: Sequence, keys: Sequence, i: int) -> int:
    """How many atoms of `edge` match `keys[i:]` (the first is known to match)."""
    j, limit = 1, min(len(edge), len(keys) - i)
    while j < limit and edge[j] == keys[i + j]:
        j += 1
    return j


class CacheNode:
    __slots__ = ("parent", "key", "length", "children", "lock_ref", "last_access", "alive", "order")

    def __init__(self, parent, key: tuple, length: int, order: int):
        self.parent = parent
        self.key = key
        self.length = length
        self.children: dict = {}
        self.lock_ref = 0
        self.last_access = 0
        self.alive = True
        self.order = order  # creation order: breaks ties like SGLang's insertion-ordered children

    @property
    def prefix_len(self) -> int:
        n, node = 0, self
        while node is not None:
            n += node.length
            node = node.parent
        return n

    def __repr__(self) -> str:
        return f"CacheNode(len={self.length}, lock={self.lock_ref}, t={self.last_access})"


class RadixCache:
    def __init__(self, on_evict: Callable[[CacheNode], None] | None = None):
        self._order = 0
        self.root = CacheNode(None, (), 0, 0)
        self.root.lock_ref = 1  # never evicted
        self.total_tokens = 0
        self.evictable_tokens = 0  # in unlocked nodes
        self.nodes = 0
        self.clock = 0
        self.version = 0  # bumped whenever the set of cached sequences changes
        self._heap: list = []
        self._pushes = 0
        self.on_evict = on_evict  # tests watch evictions through this

    # ------------------------------------------------------------------ lookups
    def match(self, keys: Sequence) -> tuple[CacheNode, int]:
        """The longest cached prefix of `keys`: (the node it ends on, its length in tokens).
        Splits the edge it ends inside and marks the path as used now."""
        node, _, matched = self.match_from(keys, (self.root, 0, 0))
        return node, matched

    def match_from(self, keys: Sequence, anchor: tuple) -> tuple[CacheNode, int, int]:
        """`match` resumed from `anchor` = (node, atoms, tokens), an earlier `match_from` of the
        same keys whose node is still alive: (node, atoms, tokens), the anchor for the next call.
        The walk from the root would pass the anchor over whole edges (splits above it keep its
        position, evictions remove leaves only), so the result and the side effects (the
        clock, the path touched) are `match`'s."""
        self.clock += 1
        node, i, matched = anchor
        n = len(keys)
        while i < n:
            child = node.children.get(keys[i])
            if child is None:
                break
            edge = child.key
            m = len(edge)
            j = _common_length(edge, keys, i)
            if j < m:
                child = self._split(child, j)
            node = child
            i += j
            matched += child.length
        self._touch(node)
        return node, i, matched

    def probe(self, keys: Sequence, limit: int | None = None) -> tuple[int, int]:
        """(cached prefix length, unlocked tokens on that prefix) without splitting or touching;
        at most `limit` tokens (SGLang matches a prompt's first len - 1 and locks those only)."""
        node, i, n, matched, unlocked = self.root, 0, len(keys), 0, 0
        limit = math.inf if limit is None else limit
        while i < n and matched < limit:
            child = node.children.get(keys[i])
            if child is None:
                break
            edge = child.key
            m = len(edge)
            j = _common_length(edge, keys, i)
            part = min(child.length if j == m else keys_len(edge[:j]), limit - matched)
            matched += part
            if child.lock_ref == 0:
                unlocked += part
            if j < m:
                break
            node = child
            i += j
        return matched, unlocked

    # ------------------------------------------------------------------ updates
    def insert(self, keys: Sequence) -> tuple[CacheNode, int]:
        """Publish `keys`; returns (the node they end on, tokens that were already cached)."""
        self.clock += 1
        node, i, n, dup = self.root, 0, len(keys), 0
        while i < n:
            child = node.children.get(keys[i])
            if child is None:
                rest = tuple(keys[i:])
                new = self._new_node(node, rest, keys_len(rest))
                self.total_tokens += new.length
                self.evictable_tokens += new.length
                self.version += 1
                node = new
                break
            edge = child.key
            m = len(edge)
            j = _common_length(edge, keys, i)
            if j < m:
                child = self._split(child, j)
            dup += child.length
            node = child
            i += j
        self._touch(node)
        return node, dup

    def lock(self, node: CacheNode) -> None:
        while node is not None:
            if node.lock_ref == 0:
                self.evictable_tokens -= node.length
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: CacheNode) -> None:
        leaf = node
        while node is not None:
            node.lock_ref -= 1
            if node.lock_ref < 0:
                raise AssertionError(f"{node}: unlocked more often than locked")
            if node.lock_ref == 0:
                self.evictable_tokens += node.length
            node = node.parent
        if leaf.lock_ref == 0 and not leaf.children:
            self._push(leaf)

    def evict(self, tokens: int) -> int:
        """Remove unlocked leaves, least recently used first, until `tokens` are freed (or none
        is left). Returns the tokens freed."""
        freed = 0
        heap = self._heap
        while freed < tokens and heap:
            t, _, node = heapq.heappop(heap)
            if not node.alive or node.children or node.lock_ref or node.last_access != t:
                continue
            parent = node.parent
            del parent.children[node.key[0]]
            node.alive = False
            self.nodes -= 1
            self.total_tokens -= node.length
            self.evictable_tokens -= node.length
            self.version += 1
            freed += node.length
            if self.on_evict is not None:
                self.on_evict(node)
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                self._push(parent)
        return freed

    # ------------------------------------------------------------------ internals
    def _new_node(self, parent: CacheNode, key: tuple, length: int) -> CacheNode:
        self._order += 1
        node = CacheNode(parent, key, length, self._order)
        parent.children[key[0]] = node
        self.nodes += 1
        return node

    def _split(self, child: CacheNode, j: int) -> CacheNode:
        """Cut child's edge after j atoms; the new upper node takes child's place (and order)."""
        parent = child.parent
        upper_key = child.key[:j]
        upper = CacheNode(parent, upper_key, keys_len(upper_key), child.order)
        self._order += 1
        child.order = self._order
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        parent.children[upper_key[0]] = upper  # same dict key: keeps child's position
        child.key = child.key[j:]
        child.length -= upper.length
        child.parent = upper
        upper.children[child.key[0]] = child
        self.nodes += 1
        return upper

    def _touch(self, node: CacheNode) -> None:
        t = self.clock
        leaf = node
        while node is not None:
            node.last_access = t
            node = node.parent
        if leaf is not self.root and not leaf.children and leaf.lock_ref == 0:
            self._push(leaf)

    def _push(self, node: CacheNode) -> None:
        self._pushes += 1
        heapq.heappush(self._heap, (node.last_access, self._pushes, node))
        if len(self._heap) > 4 * self.nodes + 4096:
            self._rebuild_heap()

    def _rebuild_heap(self) -> None:
        self._heap = [(n.last_access, i, n) for i, n in enumerate(self.iter_nodes())
                      if not n.children and n.lock_ref == 0]
        heapq.heapify(self._heap)

    def iter_nodes(self):
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children.values())

    def path_keys(self, node: CacheNode) -> tuple:
        keys: list = []
        while node is not None and node is not self.root:
            keys[:0] = node.key
            node = node.parent
        return tuple(keys)

    # ------------------------------------------------------------------ checks
    def check_integrity(self, locks: dict | None = None) -> None:
        """Recompute every count from scratch. `locks` (node -> expected lock count from the
        engine's running requests) checks the lock references too."""
        total = evictable = count = 0
        expected = {} if locks is None else dict(locks)
        stack = [self.root]
        below: dict = {}
        order = []
        while stack:
            n = stack.pop()
            order.append(n)
            for k, c in n.children.items():
                assert c.parent is n and c.alive and c.key and c.key[0] == k, f"{c}: broken parent/child link"
                assert c.length == keys_len(c.key) > 0, f"{c}: length does not match its key"
                assert c.last_access <= n.last_access or n is self.root, f"{c}: used after its parent"
                stack.append(c)
        for n in reversed(order):  # children before parents
            below[id(n)] = sum(below[id(c)] for c in n.children.values()) + (expected.get(n, 0) if locks is not None else 0)
            if n is self.root:
                continue
            count += 1
            total += n.length
            if n.lock_ref == 0:
                evictable += n.length
            if locks is not None:
                assert n.lock_ref == below[id(n)], f"{n}: lock_ref {n.lock_ref} != {below[id(n)]} locks below it"
            assert all(atom_len(a) >= 1 for a in n.key)
        assert (count, total, evictable) == (self.nodes, self.total_tokens, self.evictable_tokens), \
            f"cache counts {(self.nodes, self.total_tokens, self.evictable_tokens)} != recomputed {(count, total, evictable)}"
        live = {id(n) for n in order if not n.children and n.lock_ref == 0 and n is not self.root}
        queued = {id(n) for t, _, n in self._heap if n.alive and n.last_access == t}
        assert live <= queued, "an evictable leaf is missing from the LRU heap"
