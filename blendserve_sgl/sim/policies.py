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

import itertools
import math
from operator import attrgetter
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


_SEQ = attrgetter("seq")  # arrival order


class SGLangDFSWeight(Picker):
    """dfs-weight as SGLang 0.5.23 runs it. Waiting requests are kept in classes of equal
    shareable keys (all requests of a class end on the same cache node); within a node,
    requests keep arrival order (SGLang keeps the previous order, the same while the node's
    classes do not change)."""

    name = "sglang-dfs-weight"

    def __init__(self, order: list[SimRequest]):
        self.classes: dict[tuple, deque] = {}
        self.n = 0
        self._cache_version = -1
        self._anchors: dict[tuple, tuple] = {}  # class key -> its last match (`RadixCache.match_from`): node first
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
            self._cache_version = -1
        if q and q[-1].seq > req.seq:  # keep each class in arrival order
            items = sorted([*q, req], key=lambda r: r.seq)
            q.clear()
            q.extend(items)
        else:
            q.append(req)
        self.n += 1

    def __len__(self) -> int:
        return self.n

    def _match_nodes(self, view) -> None:
        cache = view.cache
        if self._cache_version == cache.version:
            return
        anchors, root = self._anchors, (cache.root, 0, 0)
        for key in self.classes:  # every class is non-empty (`pick` drops an emptied one)
            a = anchors.get(key)
            anchors[key] = cache.match_from(key, a if a is not None and a[0].alive else root)
        self._cache_version = cache.version

    def ordered(self, view) -> Iterator[SimRequest]:
        """SGLang's order; the prefix match runs now, the order is built when the first request
        is asked for."""
        self._match_nodes(view)
        return self._visit(view.cache.root)

    def _visit(self, root) -> Iterator[SimRequest]:
        own: dict = {}  # cache node -> the classes ending on it
        for key, q in self.classes.items():
            own.setdefault(self._anchors[key][0], []).append(q)
        weight: dict = {}  # waiting requests under each node (SGLang's weight)
        kids: dict = {}
        for node, qs in own.items():
            count = sum(map(len, qs))
            n = node
            while n is not None:
                if n not in weight:
                    weight[n] = 0
                    if n.parent is not None:
                        kids.setdefault(n.parent, []).append(n)
                weight[n] += count
                n = n.parent

        def visit(node):
            for child in sorted(kids.get(node, ()), key=lambda c: (-weight[c], c.order)):
                yield from visit(child)
            qs = own.get(node)
            if qs:  # the node's classes in arrival order (one sort in C; a k-way merge is slower for many classes)
                yield from (qs[0] if len(qs) == 1 else sorted(itertools.chain.from_iterable(qs), key=_SEQ))

        yield from visit(root)

    def pick(self, view) -> list[Pick]:
        picks = sglang_admit(view, self.ordered(view))
        for p in picks:
            q = self.classes[self._key(p.req)]
            if q.popleft() is not p.req:
                raise AssertionError("dfs-weight admitted a request that is not first in its class")
            if not q:
                del self.classes[self._key(p.req)]
                self._anchors.pop(self._key(p.req), None)
                self._cache_version = -1
            self.n -= 1
        return picks

    def check_integrity(self) -> None:
        assert self.n == sum(len(q) for q in self.classes.values())
        for key, q in self.classes.items():
            assert q and all(self._key(r) == key and r.state == "waiting" for r in q)
            assert all(a.seq < b.seq for a, b in zip(q, list(q)[1:])), "a class is out of arrival order"
        assert self._anchors.keys() <= self.classes.keys(), "a match anchor outlived its class"


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

    def add(self, req: SimRequest) -> None:
        """Into the tree through `DualScanner.add` (as the SGLang plugin does): the prompt with the
        output so far after a retraction; the remaining output when lengths are known."""
        self.reqs[req.rid] = req
        known = req.ignore_eos
        d = req.output_len - req.gen if known else None
        max_tokens = max(1, req.max_new_tokens - req.gen)
        if req.tokens is not None:
            synthetic = [(1 << 40) + req.seq * (1 << 20) + i for i in range(req.out_len)]
            self.scanner.add(req.rid, tokens=[*req.tokens, *synthetic], output_len=d, max_tokens=max_tokens)
        else:
            self.scanner.add(req.rid, prompt_len=req.fill_len, prefix=req.prefix, output_len=d, max_tokens=max_tokens)

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
            self.add(p.req)

    def retracted(self, req: SimRequest) -> None:
        self.scanner.retracted(req.rid)
        self.add(req)

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
