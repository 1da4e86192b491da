"""The resource-aware prefix tree over waiting requests.

A radix tree whose edges are runs of keys: token ids (requests given as token sequences) or
`Group` segments (length-only records: a named shared prefix of known length). Requests hang
as leaves under the node where their keys end; a length-only request's unshared remainder is
its `tail`. Every node keeps exact integer aggregates of its subtree, updated along one
root path per insert or remove:

    count      live requests
    tokens     sum (p + d)                       -> compute
    mem        sum (2 p d + d^2)                 -> memory (cost.memory_units)
    sum_p      sum p
    tails      sum of request tails
    unique     sum of edge lengths of the subtree's nodes (this node included)

From them: saved prefix tokens = sum_p - (prefix_len - length + unique + tails), sharing
s = saved / tokens, density = cost.density(tokens - saved, mem). Children live in a deque,
sorted by density (compute-dense first) once `sort()` ran; later arrivals are placed by
bisection on the stored keys. A node exists while its subtree holds a request.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from typing import Iterator, NamedTuple, Sequence

from .cost import CostModel, memory_units


class Group(NamedTuple):
    """An opaque shared prompt segment of `length` tokens (length-only records)."""

    name: str
    length: int


class Req:
    __slots__ = ("rid", "node", "prompt_len", "tail", "output_len", "known", "max_tokens", "seq", "sort_key",
                 "sample")

    def __init__(self, rid, node, prompt_len, tail, output_len, known, max_tokens, seq):
        self.rid = rid
        self.node = node  # the Node whose kids hold this request; None once removed
        self.prompt_len = prompt_len
        self.tail = tail
        self.output_len = output_len  # known, or the current estimate
        self.known = known
        self.max_tokens = max_tokens
        self.seq = seq
        self.sort_key = 0.0
        self.sample = False

    def __repr__(self) -> str:
        return f"Req({self.rid!r}, p={self.prompt_len}, d={self.output_len}{'' if self.known else '~'})"


class Node:
    __slots__ = ("parent", "keys", "length", "prefix_len", "depth", "kids", "index", "seq", "sort_key", "split_of",
                 "count", "tokens", "mem", "sum_p", "tails", "unique", "sample_n", "sample_sum", "max_len",
                 "sample_values", "sample_from", "sampled")

    def __init__(self, parent, keys, length, seq):
        self.parent = parent
        self.keys = keys
        self.length = length
        self.prefix_len = (parent.prefix_len if parent else 0) + length
        self.depth = (parent.depth + 1) if parent else 0
        self.kids: deque = deque()
        self.index: dict = {}  # first key -> child Node (unsplit children only)
        self.seq = seq
        self.sort_key = 0.0
        self.split_of = None  # the node this one was split from, if any
        self.count = self.tokens = self.mem = self.sum_p = self.tails = 0
        self.unique = length
        self.sample_n = self.sample_sum = 0
        self.sample_values: list | None = None  # (length, cap or None if finished) per sample (estimate.py)
        self.max_len = 0  # upper bound on p + d over the subtree (exact after sort())
        self.sample_from = None  # a pruned node with samples whose edge this one's starts with (estimate.py)
        self.sampled = False  # a sample request left through here: its output length may still be recorded here

    @property
    def saved(self) -> int:
        """Prompt tokens not recomputed when this subtree runs in DFS order with its prefix cached once."""
        return self.sum_p - (self.prefix_len - self.length + self.unique + self.tails)

    @property
    def sharing(self) -> float:
        return self.saved / self.tokens if self.tokens else 0.0

    def __repr__(self) -> str:
        return f"Node(len={self.length}, prefix={self.prefix_len}, n={self.count})"


def _may_hold_samples(node: Node) -> bool:
    """Whether `node`, or a node it reads samples from, holds samples or may still receive some."""
    while node is not None:
        if node.sample_n or node.sampled:
            return True
        node = node.split_of if node.split_of is not None else node.sample_from
    return False


def sample_source(node):
    """The node whose samples stand for `node`'s subtree: a split twin's origin; for a node
    re-created after its predecessor was pruned (its requests all taken, then one retracted),
    that predecessor (None: None)."""
    while node is not None:
        nxt = node.split_of if node.split_of is not None else node.sample_from
        if nxt is None:
            return node
        node = nxt
    return node


def _keys_length(keys: Sequence) -> int:
    if keys and type(keys[0]) is Group:
        return sum(k.length for k in keys)
    return len(keys)


def _check_int(rid, field: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"request {rid!r}: {field} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"request {rid!r}: {field} must be >= {minimum}, got {value}")
    return value


class ResourceTree:
    """Prefix tree with compute/memory aggregates; see the module docstring."""

    def __init__(self, cost: CostModel, estimator=None):
        from .estimate import OutputLengthEstimator

        self.cost = cost
        self.estimator = estimator or OutputLengthEstimator()
        self._seq = 0
        self.root = Node(None, (), 0, self._next_seq())
        self.reqs: dict = {}
        # (id(parent), first key) -> the last node pruned there (its samples live on); only under
        # nodes still in the tree (nothing else can find them), the newest GHOST_LIMIT of them
        self._pruned: OrderedDict = OrderedDict()
        self._ghosts_under: dict = {}  # id(parent) -> the first keys of its entries in _pruned
        self.is_sorted = False

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def __len__(self) -> int:
        return len(self.reqs)

    def __contains__(self, rid) -> bool:
        return rid in self.reqs

    # ------------------------------------------------------------------ insert
    def add(self, rid, *, tokens: Sequence[int] | None = None, prompt_len: int | None = None,
            prefix: Sequence[tuple[str, int]] = (), output_len: int | None = None,
            max_tokens: int | None = None) -> Req:
        """Insert one request: either its prompt `tokens`, or its `prompt_len` with the shared
        `prefix` groups [(group_id, n_tokens), ...] it starts with (outermost first).

        `output_len` is the known output length (ignore_eos, or a hint); None means unknown:
        the estimator supplies one, capped at `max_tokens`.
        """
        if rid in self.reqs:
            raise ValueError(f"request {rid!r} is already in the tree; request ids must be unique")
        if tokens is not None:
            if prompt_len is not None or prefix:
                raise ValueError(f"request {rid!r}: give either tokens or prompt_len/prefix, not both")
            keys = tuple(tokens)
            if not keys:
                raise ValueError(f"request {rid!r}: empty prompt; a request needs at least one prompt token")
            if not all(type(t) is int and t >= 0 for t in keys):
                raise ValueError(f"request {rid!r}: tokens must be non-negative integer token ids")
            p, tail = len(keys), 0
        else:
            if prompt_len is None:
                raise ValueError(f"request {rid!r}: give tokens or prompt_len")
            p = _check_int(rid, "prompt_len", prompt_len, 1)
            groups = []
            for item in prefix:
                try:
                    name, n = item
                except (TypeError, ValueError):
                    raise ValueError(f"request {rid!r}: prefix items must be (group_id, n_tokens) pairs, got {item!r}")
                groups.append(Group(str(name), _check_int(rid, f"prefix group {name!r} length", n, 1)))
            keys = tuple(groups)
            tail = p - _keys_length(keys)
            if tail < 0:
                raise ValueError(f"request {rid!r}: prefix groups total {p - tail} tokens, more than prompt_len {p}")
        if max_tokens is not None:
            max_tokens = _check_int(rid, "max_tokens", max_tokens, 1)
        known = output_len is not None
        node, new_node = self._insert_path(keys)
        if known:
            d = _check_int(rid, "output_len", output_len, 0)
            if max_tokens is not None:
                d = min(d, max_tokens)
        else:
            d = self.estimator.estimate(node, max_tokens)
        req = Req(rid, node, p, tail, d, known, max_tokens, self._next_seq())
        req.sort_key = self.cost.request_density(p, d)
        self.reqs[rid] = req
        self._apply(node, req, +1)
        if new_node is not None:
            a = new_node.parent
            while a is not None:
                a.unique += new_node.length
                a = a.parent
            new_node.sort_key = self.density(new_node)
            self._place(new_node.parent, new_node)
        self._place(node, req)
        return req

    def _insert_path(self, keys: tuple) -> tuple[Node, Node | None]:
        node, i, n = self.root, 0, len(keys)
        while i < n:
            child = node.index.get(keys[i])
            if child is None:
                new = Node(node, keys[i:], _keys_length(keys[i:]), self._next_seq())
                node.index[keys[i]] = new
                ghost = self._pruned.get((id(node), keys[i]))
                if ghost is not None and keys[i:i + len(ghost.keys)] == ghost.keys:
                    # its source (an edge that starts this one too), not the ghost: a prefix that
                    # comes back batch after batch would chain a ghost per batch for ever
                    new.sample_from = sample_source(ghost)
                return new, new
            edge = child.keys
            m = len(edge)
            if keys[i:i + m] != edge:
                m = 1
                limit = min(len(edge), n - i)
                while m < limit and edge[m] == keys[i + m]:
                    m += 1
                child = self._split_edge(child, m)
            node, i = child, i + m
        return node, None

    def _split_edge(self, child: Node, m: int) -> Node:
        """Cut child's edge after m keys; the new upper node takes child's place."""
        parent = child.parent
        upper_keys, lower_keys = child.keys[:m], child.keys[m:]
        upper = Node(parent, upper_keys, _keys_length(upper_keys), child.seq)
        child.seq = self._next_seq()
        for f in ("count", "tokens", "mem", "sum_p", "tails", "unique", "sample_n", "sample_sum", "max_len"):
            setattr(upper, f, getattr(child, f))
        upper.sample_values = list(child.sample_values) if child.sample_values else None
        upper.sort_key = child.sort_key
        if child.sample_from is not None and len(upper_keys) >= len(child.sample_from.keys):
            upper.sample_from = child.sample_from
        child.keys, child.length = lower_keys, child.length - upper.length
        child.unique -= upper.length
        child.parent = upper
        upper.kids.append(child)
        upper.index[lower_keys[0]] = child
        parent.index[upper_keys[0]] = upper
        kids = parent.kids
        kids[_position(kids, child)] = upper
        self._shift_depth(child)
        return upper

    @staticmethod
    def _shift_depth(node: Node) -> None:
        stack = [node]
        while stack:
            n = stack.pop()
            n.depth = n.parent.depth + 1
            stack.extend(k for k in n.kids if type(k) is Node)

    def _place(self, parent: Node, item) -> None:
        kids = parent.kids
        if not self.is_sorted or not kids:
            kids.append(item)
            return
        key = -item.sort_key
        pos = bisect.bisect_right(kids, key, key=lambda c: -c.sort_key)
        kids.insert(pos, item)

    def _apply(self, node: Node, req: Req, sign: int) -> None:
        p, d = req.prompt_len, req.output_len
        t, mu, tail = sign * (p + d), sign * memory_units(p, d), sign * req.tail
        sp = sign * p
        total = p + d
        while node is not None:
            if total > node.max_len:
                node.max_len = total
            node.count += sign
            node.tokens += t
            node.mem += mu
            node.sum_p += sp
            node.tails += tail
            node = node.parent

    # ------------------------------------------------------------------ remove
    def remove(self, rid) -> Req:
        """Take a request out (admitted, aborted); prunes nodes left without requests."""
        req = self.reqs.pop(rid, None)
        if req is None:
            raise KeyError(f"request {rid!r} is not in the tree")
        node = req.node
        _unlink(node.kids, req)
        req.node = None
        self._apply(node, req, -1)
        if req.sample:
            a = node
            while a is not None:
                a.sampled = True
                sample_source(a).sampled = True  # where its length will be recorded
                a = a.parent
        while node.count == 0 and node.parent is not None:
            parent = node.parent
            _unlink(parent.kids, node)
            for first in self._ghosts_under.pop(id(node), ()):  # out of the tree: no lookup reaches them
                del self._pruned[(id(node), first)]
            if node.keys and parent.index.get(node.keys[0]) is node:
                del parent.index[node.keys[0]]
                if parent.count == 0 and parent.parent is not None:
                    pass  # its parent goes next: nothing could find it there
                elif _may_hold_samples(node):  # samples recorded later still count
                    self._remember(parent, node)
                else:  # kept only where samples can be: the memory of a long run stays bounded
                    self._forget(id(parent), node.keys[0])
            a = parent
            while a is not None:
                a.unique -= node.length
                a = a.parent
            node = parent
        return req

    def _remember(self, parent: Node, node: Node) -> None:
        """Keep `node`, just pruned from `parent`, for a node re-created there (`sample_from`); the
        oldest entry goes beyond GHOST_LIMIT (a server's batches would add some for ever). Where
        its samples go to another node whose edge starts its own (`sample_source`), that node is
        kept instead: the same samples, and more edges start with it."""
        key = (id(parent), node.keys[0])
        src = sample_source(node)
        self._pruned[key] = src if node.keys[:len(src.keys)] == src.keys else node
        self._pruned.move_to_end(key)
        self._ghosts_under.setdefault(key[0], set()).add(key[1])
        while len(self._pruned) > GHOST_LIMIT:
            (pid, first), _ = self._pruned.popitem(last=False)
            self._unindex(pid, first)

    def _forget(self, pid: int, first) -> None:
        if self._pruned.pop((pid, first), None) is not None:
            self._unindex(pid, first)

    def _unindex(self, pid: int, first) -> None:
        keys = self._ghosts_under[pid]
        keys.discard(first)
        if not keys:
            del self._ghosts_under[pid]

    def set_output_len(self, req: Req, output_len: int) -> None:
        """Change a waiting request's (estimated) output length, keeping aggregates exact."""
        if req.node is None:
            raise KeyError(f"request {req.rid!r} is not in the tree")
        self._apply(req.node, req, -1)
        req.output_len = output_len
        req.sort_key = self.cost.request_density(req.prompt_len, output_len)
        self._apply(req.node, req, +1)

    def split_off(self, node: Node, items: list) -> Node:
        """Move some of `node`'s children into a new sibling that repeats node's edge.

        The new node is not in the parent's index (arrivals keep matching the original); its
        edge is recomputed once more in DFS order, so the tree's saved tokens drop by exactly
        `node.length`. Returns the new node.
        """
        parent = node.parent
        if parent is None:
            raise ValueError("the root cannot be split")
        moving = set(map(id, items))
        if not moving or len(moving) >= len(node.kids):
            raise ValueError("split_off needs a non-empty proper subset of the node's children")
        twin = Node(parent, node.keys, node.length, self._next_seq())
        twin.split_of = node
        twin.max_len = node.max_len
        keep = deque()
        for k in node.kids:
            if id(k) not in moving:
                keep.append(k)
                continue
            twin.kids.append(k)
            if type(k) is Req:
                k.node = twin
                p, d = k.prompt_len, k.output_len
                sub = (1, p + d, memory_units(p, d), p, k.tail, 0)
            else:
                k.parent = twin
                if node.index.get(k.keys[0]) is k:
                    del node.index[k.keys[0]]
                    twin.index[k.keys[0]] = k
                sub = (k.count, k.tokens, k.mem, k.sum_p, k.tails, k.unique)
            twin.count += sub[0]
            twin.tokens += sub[1]
            twin.mem += sub[2]
            twin.sum_p += sub[3]
            twin.tails += sub[4]
            twin.unique += sub[5]
        if len(twin.kids) != len(moving):
            raise ValueError("split_off: some items are not children of the node")
        node.kids = keep
        node.count -= twin.count
        node.tokens -= twin.tokens
        node.mem -= twin.mem
        node.sum_p -= twin.sum_p
        node.tails -= twin.tails
        node.unique -= twin.unique - twin.length
        a = parent
        while a is not None:
            a.unique += node.length
            a = a.parent
        node.sort_key = self.density(node)
        twin.sort_key = self.density(twin)
        self._place(parent, twin)
        return twin

    # ------------------------------------------------------------------ views
    def density(self, node: Node) -> float:
        return self.cost.density(node.tokens - node.saved, node.mem)

    def item_density(self, item) -> float:
        return self.density(item) if type(item) is Node else item.sort_key

    def nodes(self) -> Iterator[Node]:
        """All nodes, pre-order."""
        stack = [self.root]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(reversed([k for k in n.kids if type(k) is Node]))

    def iter_requests(self, reverse: bool = False) -> Iterator[Req]:
        """Requests in DFS order of the current child order (right to left if reverse); lazy, so
        peeking at the first few costs O(depth + few). Do not change the tree while iterating."""
        stack = [reversed(self.root.kids) if reverse else iter(self.root.kids)]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif type(item) is Req:
                yield item
            else:
                stack.append(reversed(item.kids) if reverse else iter(item.kids))

    def path(self, node: Node) -> list[Node]:
        out = []
        while node is not None:
            out.append(node)
            node = node.parent
        return out[::-1]

    def leftmost(self) -> Req | None:
        item = self.root
        while type(item) is Node:
            if not item.kids:
                return None
            item = item.kids[0]
        return item

    def rightmost(self) -> Req | None:
        item = self.root
        while type(item) is Node:
            if not item.kids:
                return None
            item = item.kids[-1]
        return item

    # ------------------------------------------------------------------ sort
    def sort(self) -> None:
        """Layer-wise sort: at every node, children by density, compute-dense first (ties by age).
        Also makes every node's `max_len` bound exact again."""
        nodes = list(self.nodes())
        for node in reversed(nodes):  # children before parents
            node.max_len = max((k.max_len if type(k) is Node else k.prompt_len + k.output_len for k in node.kids),
                               default=0)
        for node in nodes:
            for k in node.kids:
                if type(k) is Node:
                    k.sort_key = self.density(k)
            if len(node.kids) > 1:
                node.kids = deque(sorted(node.kids, key=_order_key))
        self.is_sorted = True

    # ------------------------------------------------------------------ checks
    def check_integrity(self) -> None:
        """Raise AssertionError unless every invariant holds (recomputed from scratch)."""
        seen: dict = {}
        order: list[Req] = []

        # the nodes children first, the requests in DFS order: an explicit stack, since a
        # conversation or a Mooncake block chain makes trees thousands of levels deep
        post: list[Node] = []
        stack, path = [iter(self.root.kids)], [self.root]
        while stack:
            k = next(stack[-1], None)
            if k is None:
                stack.pop()
                post.append(path.pop())
                continue
            node = path[-1]
            if type(k) is Req:
                assert k.node is node, f"{k} lists a different parent"
                assert k.rid not in seen, f"request {k.rid!r} appears twice"
                assert self.reqs.get(k.rid) is k, f"{k} is in the tree but not in the request table"
                seen[k.rid] = k
                order.append(k)
                assert k.prompt_len == node.prefix_len + k.tail, f"{k}: prompt_len != prefix_len + tail"
            else:
                assert k.parent is node, f"{k} lists a different parent"
                assert k.depth == node.depth + 1 and k.prefix_len == node.prefix_len + k.length
                assert k.length == _keys_length(k.keys) and k.length > 0
                if k.split_of is None:
                    assert node.index.get(k.keys[0]) is k, f"{k} is missing from its parent's index"
                path.append(k)
                stack.append(iter(k.kids))
        aggs: dict[int, tuple] = {}
        for node in post:
            agg = [0, 0, 0, 0, 0, node.length]
            for k in node.kids:
                if type(k) is Req:
                    p, d = k.prompt_len, k.output_len
                    sub = (1, p + d, memory_units(p, d), p, k.tail, 0)
                else:
                    sub = aggs.pop(id(k))
                    assert sub[0] > 0, f"{k} holds no request but is still in the tree"
                for i in range(6):
                    agg[i] += sub[i]
            for key, child in node.index.items():
                assert child.parent is node and child.keys[0] == key and child in node.kids
            longest = max((k.max_len if type(k) is Node else k.prompt_len + k.output_len for k in node.kids), default=0)
            assert node.max_len >= longest, f"{node}: max_len {node.max_len} below a request's p + d {longest}"
            got = (node.count, node.tokens, node.mem, node.sum_p, node.tails, node.unique)
            assert got == tuple(agg), f"{node}: aggregates {got} != recomputed {tuple(agg)}"
            aggs[id(node)] = tuple(agg)

        assert len(seen) == len(self.reqs), "request table holds requests that are in no leaf"
        live = {id(n) for n in post}
        assert len(self._pruned) <= GHOST_LIMIT, f"{len(self._pruned)} pruned nodes kept, over {GHOST_LIMIT}"
        assert sum(map(len, self._ghosts_under.values())) == len(self._pruned), "ghost index out of step"
        for (pid, first), ghost in self._pruned.items():
            assert pid in live, f"a pruned node {ghost} is kept under a node no longer in the tree"
            assert first in self._ghosts_under[pid] and ghost.keys[0] == first
        # DFS keeps every node's requests contiguous.
        first: dict = {}
        for pos, r in enumerate(order):
            n = r.node
            while n is not None:
                first.setdefault(id(n), pos)
                assert pos - first[id(n)] < n.count, f"{n}: its requests are not contiguous in DFS order"
                n = n.parent


def _order_key(item) -> tuple[float, int]:
    key = item.sort_key
    return (-key if not math.isnan(key) else math.inf, item.seq)


def _unlink(kids: deque, item) -> None:
    del kids[_position(kids, item)]


def _position(kids: deque, item) -> int:
    """Where `item` stands in `kids`: the last `_NEAR_END` first, then from the left at C speed.
    The scanner's cursors take at the ends, the final wave (longest output first, ties in DFS
    order) a run of equal outputs from its first member, near the right end of a node's sorted
    requests, and an arrival mostly cuts the edge of a recent one (prompts alike come together);
    a Python scan from the left made that wave quadratic (20,000 requests under one prompt: 32 s,
    a probe). Deque indexing walks blocks: iterators only."""
    n = len(kids)
    for i, k in enumerate(reversed(kids)):
        if k is item:
            return n - 1 - i
        if i >= _NEAR_END:
            break
    try:
        return kids.index(item)  # no __eq__ on nodes and requests: identity
    except ValueError:
        raise AssertionError(f"{item!r} is not among its parent's children") from None


_NEAR_END = 64
GHOST_LIMIT = 1 << 14  # pruned nodes kept for their samples (`ResourceTree._pruned`), newest first
