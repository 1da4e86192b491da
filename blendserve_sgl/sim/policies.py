"""Pickers: who is admitted next. One interface for the baselines and BlendServe.

A picker owns the waiting requests. Each step the engine calls `pick(view)` (the view is the
`Engine`: free pages, the cache, slots, prefill budget, SGLang's reservation offset) and commits
the returned picks in order; a pick that turns out not to fit comes back through `rejected`.
Feedback: `retracted` (the request waits again, with its output so far), `finished`, and
`progress` at the generated count `watch` asked for.

- `fcfs`: arrival order through SGLang's admission rule (`adder.py`).
- `sglang-lpm`: SGLang's lpm: above 128 waiting requests it is FCFS; otherwise the queue is
  sorted by cached prefix length, requests sharing an uncached prefix of >= 32 tokens with an
  earlier one in the queue held back (in-batch prefix caching).
- `sglang-dfs-weight`: SGLang's dfs-weight: waiting requests hang under the cache node their
  cached prefix ends on; a DFS of the cache, heavier subtrees first, a node's own requests after
  its subtree, so requests with nothing cached come last. Only cached prefixes count.
- `dfs`: the whole trace pre-sorted in DFS order of its prefix tree (the paper's baseline),
  admitted FCFS.
- `balance`: a seeded random order (NanoFlow-Balance), admitted FCFS.
- `blend`: the project's `DualScanner` over a `ResourceTree` of the waiting requests (the very
  objects the SGLang plugin drives); it reserves KV per request itself. With the engine's
  `kv_projection` it passes the projection on as `Budget.kv_horizons`; with `meter` it passes
  the engine's step count and pool size (each side admits memory work at the rate of its
  share), a scanner input the plugin can pass from SGLang too.

Pacing and the KV projection are engine features (`EngineConfig`), the same for every picker.

Retracted requests go to the back of the queue, as SGLang 0.5.23 re-queues them.
"""

from __future__ import annotations

import heapq
import math
import random
from abc import ABC, abstractmethod
from collections import deque
from typing import Iterator

from ..core.cost import CostModel
from ..core.preset import PRESET, BlendPreset
from ..core.scanner import Budget, DualScanner
from ..core.sharing import dfs_order
from ..core.tree import ResourceTree
from .adder import Pick, sglang_admit
from .cache import RadixCache
from ..workloads.tree import build_tree
from .request import SimRequest

POLICIES = ("fcfs", "sglang-lpm", "sglang-dfs-weight", "dfs", "balance", "blend")
LPM_MAX_QUEUE = 128  # WAITING_QUEUE_PREFIX_MATCH_MAX: lpm turns into FCFS above it
IN_BATCH_THRESHOLD = 32  # IN_BATCH_PREFIX_CACHING_{CHECK,DEPRIORITIZE}_THRESHOLD


class Picker(ABC):
    """Contract: every request handed to `add` is returned by `pick` exactly once per time it
    waits; `pick` returns requests in admission order and never more than fit by its own rule."""

    name = "picker"

    @abstractmethod
    def add(self, req: SimRequest) -> None:
        """`req` waits: at arrival, after a retraction, or after a rejected pick."""

    @abstractmethod
    def pick(self, view) -> list[Pick]:
        """Requests to admit this step, in order."""

    @abstractmethod
    def __len__(self) -> int:
        """Requests waiting."""

    def rejected(self, picks: list[Pick]) -> None:
        for p in picks:
            self.add(p.req)

    def retracted(self, req: SimRequest) -> None:
        self.add(req)

    def finished(self, req: SimRequest) -> None:
        pass

    def watch(self, req: SimRequest) -> int | None:
        """Generated count at which `progress` should be called for a newly decoding request."""
        return None

    def progress(self, req: SimRequest, generated: int) -> int | None:
        """Returns the next generated count to be called at, or None."""
        return None

    def check_integrity(self) -> None:
        pass


# ---------------------------------------------------------------------- queue pickers
class QueuePicker(Picker):
    """A fixed order admitted through SGLang's rule; re-queued requests go to the back."""

    name = "queue"

    def __init__(self, order: list[SimRequest]):
        self.queue: deque[SimRequest] = deque(order)

    def add(self, req: SimRequest) -> None:
        self.queue.append(req)

    def __len__(self) -> int:
        return len(self.queue)

    def pick(self, view) -> list[Pick]:
        self.reorder(view)
        picks = sglang_admit(view, iter(self.queue))
        for p in picks:
            if self.queue.popleft() is not p.req:
                raise AssertionError("admitted requests must be a prefix of the queue")
        return picks

    def reorder(self, view) -> None:
        pass

    def check_integrity(self) -> None:
        assert len({id(r) for r in self.queue}) == len(self.queue), "a request waits twice"
        assert all(r.state == "waiting" for r in self.queue), "a queued request is not waiting"


class FCFS(QueuePicker):
    name = "fcfs"


class DFSOrder(QueuePicker):
    name = "dfs"


class Balance(QueuePicker):
    name = "balance"


class SGLangLPM(QueuePicker):
    """lpm as SGLang 0.5.23 runs it (see the module docstring)."""

    name = "sglang-lpm"

    def reorder(self, view) -> None:
        if len(self.queue) > LPM_MAX_QUEUE:
            return
        in_batch = RadixCache()
        held: set = set()
        hits = {}
        for r in self.queue:
            hit = min(view.cache.probe(r.fill_keys)[0], r.fill_len - 1)
            hits[id(r)] = hit
            if hit <= IN_BATCH_THRESHOLD:
                if in_batch.probe(r.fill_keys)[0] >= IN_BATCH_THRESHOLD:
                    held.add(id(r))
                else:
                    in_batch.insert(r.fill_keys)
        self.queue = deque(sorted(self.queue, key=lambda r: math.inf if id(r) in held else -hits[id(r)]))


class _Ranks:
    """How many live classes were created before a given one: a class's position in the
    picker's creation order (`SGLangDFSWeight.classes`' dict order), in O(log n) while classes
    come and go. A Fenwick tree over creation numbers that doubles when it fills."""

    def __init__(self, size: int = 1024):
        self.live = bytearray(size)  # live[i]: class number i exists
        self.tree = [0] * (size + 1)  # 1-based Fenwick sums of `live`

    def set(self, number: int, alive: bool) -> None:
        if number >= len(self.live):
            self._grow(number + 1)
        if self.live[number] == alive:
            return
        self.live[number] = alive
        delta, i, tree, size = (1 if alive else -1), number + 1, self.tree, len(self.live)
        while i <= size:
            tree[i] += delta
            i += i & -i

    def below(self, number: int) -> int:
        """Live classes numbered below `number`."""
        total, tree, i = 0, self.tree, min(number, len(self.live))
        while i > 0:
            total += tree[i]
            i -= i & -i
        return total

    def _grow(self, need: int) -> None:
        size = max(need, 2 * len(self.live))
        self.live.extend(bytes(size - len(self.live)))
        tree = [0, *self.live]  # linear-time build: each sum handed to the next node that covers it
        for i in range(1, size + 1):
            up = i + (i & -i)
            if up <= size:
                tree[up] += tree[i]
        self.tree = tree


class _Hang:
    """What hangs on one cache node: the classes whose last match ends on it and their waiting
    requests. Both heaps drop entries lazily (`SGLangDFSWeight._tidy`)."""

    __slots__ = ("keys", "by_next", "newest", "waiting", "count")

    def __init__(self):
        self.keys: dict = {}  # class key -> None: the classes anchored here
        self.by_next: dict = {}  # the atom a class's key continues with below the node -> {class key: None}
        self.newest: list = []  # (-creation number, stamp, class key): the newest class on top
        self.waiting: list = []  # (seq, stamp, request): the waiting requests in arrival order
        self.count = 0  # waiting requests here (SGLang's weight of the node itself)


class SGLangDFSWeight(Picker):
    """dfs-weight as SGLang 0.5.23 runs it. Waiting requests are kept in classes of equal
    shareable keys (all requests of a class end on the same cache node); within a node,
    requests keep arrival order (SGLang keeps the previous order, the same while the node's
    classes do not change).

    SGLang matches every waiting request against the cache before it orders them; modelled as
    one match round over the classes, in creation order, whenever the cache or the classes
    changed since the last, each match (`RadixCache.match_from`, resumed from the class's last
    one) ticking the cache's clock and marking its path as used. Done literally that is
    O(classes) a step and quadratic over a trace of unshared prompts, so the round is indexed:
    the classes are kept per node (`_Hang`), and only the matches that change anything run:
    - a class whose key continues into a child its node now has (its match moves down), a
      class whose node was evicted (matched from the root) and a class new since the last round;
    - on every other node, the newest class: its path is the node's root path, and it is touched
      after every older class ending there, whose touches it overwrites (a moving class touches
      a path through the node too, so an older class below it is overwritten as well).
    Before each match the clock is set to what the skipped matches would have ticked it to
    (`_Ranks`: the class's position in creation order) and after the round to the full count,
    so every node's `last_access`, the splits, the clock and hence evictions are what the
    literal round gives; only the eviction heap holds fewer stale entries. The order is then
    built from the nodes with waiting requests alone, lazily: each node's children heaviest
    first (ties in creation order, as SGLang's insertion-ordered children), its own requests
    after its subtree from a heap in arrival order. `tests/test_sim_policies.py` checks all of
    it against the literal picker on random runs."""

    name = "sglang-dfs-weight"

    def __init__(self, order: list[SimRequest]):
        self.classes: dict[tuple, deque] = {}  # class key -> its requests in arrival order; dict order = creation
        self.n = 0
        self._cache_version = -1
        self._anchors: dict[tuple, tuple] = {}  # class key -> its last match (`RadixCache.match_from`): node first
        self._number: dict[tuple, int] = {}  # class key -> creation number
        self._created = 0
        self._ranks = _Ranks()
        self._new: dict[tuple, None] = {}  # classes created since the last match round (no anchor yet)
        self._hangs: dict = {}  # cache node -> _Hang, for every node a class is anchored on
        self._stamp: dict[SimRequest, int] = {}  # waiting request -> its live entry in a `_Hang.waiting`
        self._stamps = 0
        for r in order:
            self.add(r)

    @staticmethod
    def _key(req: SimRequest) -> tuple:
        return req.fill_keys if req.out_keys else req.class_key()

    def add(self, req: SimRequest) -> None:
        key = self._key(req)
        q = self.classes.get(key)
        if q is None:
            q = self.classes[key] = deque()
            self._number[key] = self._created
            self._ranks.set(self._created, True)
            self._created += 1
            self._new[key] = None
            self._cache_version = -1
        if q and q[-1].seq > req.seq:  # keep each class in arrival order
            items = sorted([*q, req], key=lambda r: r.seq)
            q.clear()
            q.extend(items)
        else:
            q.append(req)
        self.n += 1
        anchor = self._anchors.get(key)
        if anchor is not None:  # joins its class's node now (a new class's requests: at the next match round)
            self._place(req, self._hangs[anchor[0]])

    def __len__(self) -> int:
        return self.n

    # ------------------------------------------------------------------ the index
    def _place(self, req: SimRequest, hang: _Hang) -> None:
        self._stamps += 1
        self._stamp[req] = self._stamps
        heapq.heappush(hang.waiting, (req.seq, self._stamps, req))
        hang.count += 1

    def _hang(self, key: tuple, anchor: tuple) -> None:
        """Class `key` (not hanging anywhere) onto its match's node, with its requests."""
        node, i, _ = anchor
        hang = self._hangs.get(node)
        if hang is None:
            hang = self._hangs[node] = _Hang()
        hang.keys[key] = None
        if i < len(key):
            hang.by_next.setdefault(key[i], {})[key] = None
        self._stamps += 1
        heapq.heappush(hang.newest, (-self._number[key], self._stamps, key))
        for req in self.classes[key]:
            self._place(req, hang)

    def _unhang(self, key: tuple, anchor: tuple) -> None:
        """Class `key` off the node of its match `anchor`, with its requests (their heap entries go stale)."""
        node, i, _ = anchor
        hang = self._hangs[node]
        del hang.keys[key]
        if i < len(key):
            nxt = hang.by_next[key[i]]
            del nxt[key]
            if not nxt:
                del hang.by_next[key[i]]
        for req in self.classes.get(key, ()):
            del self._stamp[req]
            hang.count -= 1
        if hang.keys:
            self._tidy(hang)
        else:
            del self._hangs[node]

    def _tidy(self, hang: _Hang) -> None:
        """Drops stale heap entries: those on top (the next reads would skip them every time),
        and all of them once they outnumber the live ones, so a heap stays within twice its size."""
        stamp, waiting = self._stamp, hang.waiting
        while waiting and stamp.get(waiting[0][2]) != waiting[0][1]:
            heapq.heappop(waiting)
        if len(waiting) > 2 * hang.count + 64:
            hang.waiting = [e for e in waiting if stamp.get(e[2]) == e[1]]
            heapq.heapify(hang.waiting)
        newest, number = hang.newest, self._number
        if len(newest) > 2 * len(hang.keys) + 64:
            hang.newest = [e for e in newest if e[2] in hang.keys and number[e[2]] == -e[0]]
            heapq.heapify(hang.newest)

    def _newest_staying(self, hang: _Hang, moving: set) -> tuple | None:
        """The newest class on `hang` that is not in `moving` (those leave the node this round,
        so their entries are dropped with the stale ones)."""
        heap, number = hang.newest, self._number
        while heap:
            _, _, key = heap[0]
            if key in hang.keys and number[key] == -heap[0][0] and key not in moving:
                return key
            heapq.heappop(heap)
        return None

    # ------------------------------------------------------------------ matching
    def _match_nodes(self, view) -> None:
        """The match round (class docstring), when the cache or the classes changed."""
        cache = view.cache
        if self._cache_version == cache.version:
            return
        calls = list(self._new)
        for node, hang in self._hangs.items():
            if not node.alive:  # evicted: its classes match again from the root
                calls.extend(hang.keys)
                continue
            moving: set = set()
            for atom in node.children.keys() & hang.by_next.keys():
                moving.update(hang.by_next[atom])
            calls.extend(moving)
            newest = self._newest_staying(hang, moving)
            if newest is not None:
                calls.append(newest)
        number, anchors, root = self._number, self._anchors, (cache.root, 0, 0)
        calls.sort(key=number.__getitem__)
        base = cache.clock
        for key in calls:
            old = anchors.get(key)
            cache.clock = base + self._ranks.below(number[key])  # the ticks of the classes before it
            new = anchors[key] = cache.match_from(key, old if old is not None and old[0].alive else root)
            if old is None or new[0] is not old[0]:
                if old is not None:
                    self._unhang(key, old)
                self._hang(key, new)
        cache.clock = base + len(self.classes)
        self._new.clear()
        self._cache_version = cache.version

    # ------------------------------------------------------------------ the order
    def ordered(self, view) -> Iterator[SimRequest]:
        """SGLang's order; the prefix match runs now, the order is built when the first request
        is asked for."""
        self._match_nodes(view)
        return self._visit(view.cache.root)

    def _visit(self, root) -> Iterator[SimRequest]:
        """Depth first from `root` over the nodes with waiting requests below them (iterative:
        a cache can be thousands of nodes deep); a node's own requests after its subtree."""
        weight: dict = {node: hang.count for node, hang in self._hangs.items()}  # SGLang's weight, summed below
        kids: dict = {}
        linked: set = set()
        for node in list(weight):  # every anchored node's root path, each node linked to its parent once
            while node.parent is not None and node not in linked:
                linked.add(node)
                kids.setdefault(node.parent, []).append(node)
                weight.setdefault(node.parent, 0)
                node = node.parent
        post, stack = [], [root]  # children before parents, to sum the weights upwards
        while stack:
            node = stack.pop()
            post.append(node)
            stack.extend(kids.get(node, ()))
        for node in reversed(post):
            for child in kids.get(node, ()):
                weight[node] += weight[child]
        stack = [(root, False)]
        while stack:
            node, done = stack.pop()
            if done:
                hang = self._hangs.get(node)
                if hang is not None:
                    yield from self._in_arrival_order(hang)
                continue
            stack.append((node, True))
            below = kids.get(node)
            if below:  # heaviest first, ties in creation order: pushed in reverse
                stack.extend((c, False) for c in sorted(below, key=lambda c: (weight[c], -c.order)))

    def _in_arrival_order(self, hang: _Hang) -> Iterator[SimRequest]:
        """The node's waiting requests in arrival order, read from its heap without popping
        (a frontier of heap positions), the stale entries skipped."""
        heap, stamp = hang.waiting, self._stamp
        if not heap:
            return
        frontier = [(heap[0][0], heap[0][1], 0)]
        size = len(heap)
        while frontier:
            _, _, i = heapq.heappop(frontier)
            _, s, req = heap[i]
            if stamp.get(req) == s:
                yield req
            for c in (2 * i + 1, 2 * i + 2):
                if c < size:
                    heapq.heappush(frontier, (heap[c][0], heap[c][1], c))

    def pick(self, view) -> list[Pick]:
        picks = sglang_admit(view, self.ordered(view))
        touched = {}
        for p in picks:
            key = self._key(p.req)
            q = self.classes[key]
            if q.popleft() is not p.req:
                raise AssertionError("dfs-weight admitted a request that is not first in its class")
            anchor = self._anchors[key]
            hang = self._hangs[anchor[0]]
            del self._stamp[p.req]
            hang.count -= 1
            if not q:
                self._unhang(key, anchor)
                del self.classes[key], self._anchors[key]
                self._ranks.set(self._number.pop(key), False)
                self._cache_version = -1
            touched[id(hang)] = hang
            self.n -= 1
        for hang in touched.values():
            if hang.keys:
                self._tidy(hang)
        return picks

    def check_integrity(self) -> None:
        assert self.n == sum(len(q) for q in self.classes.values())
        for key, q in self.classes.items():
            assert q and all(self._key(r) == key and r.state == "waiting" for r in q)
            assert all(a.seq < b.seq for a, b in zip(q, list(q)[1:])), "a class is out of arrival order"
        assert self._anchors.keys() <= self.classes.keys(), "a match anchor outlived its class"
        # the index, recomputed: classes per node, their next atoms, requests and counts, creation order
        assert self._number.keys() == self.classes.keys(), "a creation number outlived its class"
        numbers = [self._number[k] for k in self.classes]
        assert numbers == sorted(numbers), "creation numbers do not follow the classes' order"
        assert all(self._ranks.below(self._number[k]) == i for i, k in enumerate(self.classes)), "class ranks are off"
        assert self._new.keys() == self.classes.keys() - self._anchors.keys(), "a class is neither new nor anchored"
        expect: dict = {}
        for key, (node, i, _) in self._anchors.items():
            keys, nxt, count = expect.setdefault(node, ({}, {}, [0]))
            keys[key] = None
            if i < len(key):
                nxt.setdefault(key[i], set()).add(key)
            count[0] += len(self.classes[key])
        assert self._hangs.keys() == expect.keys(), "the index hangs classes on other nodes than their matches"
        placed = 0
        for node, hang in self._hangs.items():
            keys, nxt, count = expect[node]
            assert hang.keys.keys() == keys.keys() and hang.count == count[0], f"{node}: wrong classes or count"
            assert {a: set(k) for a, k in hang.by_next.items()} == nxt, f"{node}: wrong next atoms"
            live = sorted(r.seq for _, s, r in hang.waiting if self._stamp.get(r) == s)
            assert live == sorted(r.seq for k in keys for r in self.classes[k]), f"{node}: wrong waiting requests"
            placed += len(live)
            live_keys = {e[2] for e in hang.newest if e[2] in hang.keys and self._number[e[2]] == -e[0]}
            assert live_keys == hang.keys.keys(), f"{node}: a class is missing from its newest-first heap"
        assert placed == len(self._stamp) == self.n - sum(len(self.classes[k]) for k in self._new), \
            "a waiting request is placed twice or not at all"


# ---------------------------------------------------------------------- BlendServe
class BlendPicker(Picker):
    """The dual scanner of `core/scanner.py` over a `ResourceTree` of the waiting requests.

    The KV budget it sees is free + evictable pages minus what its running requests still
    have reserved; its reservations are its own (uncached prompt + r x output, r the engine's
    new-token ratio for estimated outputs when the preset says `engine_ratio`, as the plugin
    passes SGLang's). Its plan then goes through SGLang's admission rule (`adder.sglang_admit`),
    as the plugin's queue does: the first request SGLang refuses ends the step's admissions and
    the rest go back to the tree (`rejected`).
    With unknown output lengths (requests without ignore_eos) the tree gets none: the scanner
    samples first and estimates, and a left-side request that runs far past its estimate is
    reported through `progress` so it moves to the memory-dense side. With the engine's
    `kv_projection` the scanner gets `Budget.kv_horizons`; `meter` passes the step count and
    pool size."""

    name = "blend"

    def __init__(self, requests: list[SimRequest], cost: CostModel, preset: BlendPreset = PRESET):
        self.cost = cost
        self.preset = preset
        self.meter = preset.metering
        self._steps = 0  # engine step at the previous pick
        self.tree = ResourceTree(cost, preset.estimator)
        self.reqs: dict = {}
        self.scanner = DualScanner(self.tree, preset.scan)
        self._view = None
        for r in requests:
            self.add(r)

    def add(self, req: SimRequest, readd: bool = False) -> None:
        """Into the tree through `DualScanner.add` (as the SGLang plugin does): the prompt with the
        output so far after a retraction (`readd`: not an arrival); the remaining output when
        lengths are known."""
        self.reqs[req.rid] = req
        known = req.ignore_eos
        d = req.output_len - req.gen if known else None
        max_tokens = max(1, req.max_new_tokens - req.gen)
        if req.tokens is not None:
            synthetic = [(1 << 40) + req.seq * (1 << 20) + i for i in range(req.out_len)]
            self.scanner.add(req.rid, readd=readd, tokens=[*req.tokens, *synthetic], output_len=d, max_tokens=max_tokens)
        else:
            self.scanner.add(req.rid, readd=readd, prompt_len=req.fill_len, prefix=req.prefix, output_len=d,
                             max_tokens=max_tokens)

    def __len__(self) -> int:
        return len(self.tree)

    def pick(self, view) -> list[Pick]:
        self._view = view
        if self.scanner.replan_due:
            self._report_samples()
        bpt = view.kv_bytes_per_token
        free = view.free_tokens + view.cache.evictable_tokens - view.reserved_left()
        horizons: tuple = ()
        # the room SGLang's own check sees (adder.sglang_admit), for ScanConfig.engine_check
        room = sglang_room = view.sglang_room()
        if view.config.kv_projection:  # pages free for good and over horizons, never below either floor
            forever, pages = view.kv_horizons(min(free, room))
            free, room = max(free, forever), max(room, forever)
            horizons = tuple((h, f * bpt) for h, f in pages)
        steps = pool = None
        if self.meter:
            steps, self._steps = view.steps - self._steps, view.steps
            pool = view.kv_pool_bytes
        budget = Budget(max(0, free) * bpt, view.slots_left, view.prefill_left, output_ratio=view.new_token_ratio if self.preset.engine_ratio else None,
                        kv_horizons=horizons, steps=steps, kv_pool=pool, admit_room=room,
                        admit_clip=view.config.clip_max_new_tokens, mixed_steps=view.config.mixed_chunk)
        picks = [Pick(self.reqs[a.rid], math.ceil(a.kv_bytes / bpt - 1e-9)) for a in self.scanner.schedule(budget)]
        # SGLang's own admission walks the plan (the plugin's queue): its first refusal ends the step
        admitted = len(sglang_admit(view, (p.req for p in picks), sglang_room)) if picks else 0
        if admitted < len(picks):
            self.rejected(picks[admitted:])
        return picks[:admitted]

    def rejected(self, picks: list[Pick]) -> None:
        for p in picks:
            self.scanner.cancel(p.req.rid)
            self.add(p.req, readd=True)

    def retracted(self, req: SimRequest) -> None:
        self.scanner.retracted(req.rid)
        self.add(req, readd=True)

    def _report_samples(self, but=None) -> None:
        """The running samples' output so far, to the scanner (a plan counts them with it)."""
        sc = self.scanner
        for rid in sc.pending_sample:
            other = self.reqs[rid]
            if rid != but and rid in sc.running and other.state == "decoding":
                sc.progress(rid, self._view.generated(other))

    def finished(self, req: SimRequest) -> None:
        sc = self.scanner
        if sc.pending_sample and req.rid in sc.pending_sample and self._view is not None:
            self._report_samples(but=req.rid)
        sc.finished(req.rid, req.gen)
        del self.reqs[req.rid]

    def watch(self, req: SimRequest) -> int | None:
        return self.scanner.watch_at(req.rid) if req.rid in self.scanner.running else None

    def progress(self, req: SimRequest, generated: int) -> int | None:
        self.scanner.progress(req.rid, generated)
        return self.scanner.watch_at(req.rid)

    def check_integrity(self) -> None:
        self.scanner.check_integrity()


# ---------------------------------------------------------------------- factory
def reference_tree(requests: list[SimRequest], cost: CostModel) -> ResourceTree:
    """The workload's prefix tree in arrival order, lengths known: the DFS order and s_o."""
    return build_tree(requests, cost)


def make_picker(name: str, requests: list[SimRequest], cost: CostModel, *, seed: int = 0,
                preset: BlendPreset = PRESET, reference: ResourceTree | None = None) -> Picker:
    """The picker `name` over `requests`; blend runs `preset` (the plugin's, unless an ablation)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
    if name == "fcfs":
        return FCFS(requests)
    if name == "sglang-lpm":
        return SGLangLPM(requests)
    if name == "sglang-dfs-weight":
        return SGLangDFSWeight(requests)
    if name == "dfs":
        ref = reference or reference_tree(requests, cost)
        by_rid = {r.rid: r for r in requests}
        return DFSOrder([by_rid[rid] for rid in dfs_order(ref)])
    if name == "balance":
        order = list(requests)
        random.Random(seed).shuffle(order)
        return Balance(order)
    return BlendPicker(requests, cost, preset)
