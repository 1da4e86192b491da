"""Memory of a long windowed run: what the plan's tree keeps after requests leave it does not
grow with the number of requests that went through it."""

from __future__ import annotations

import gc
import random

from blendserve_sgl.core import ResourceTree
from blendserve_sgl.core.tree import Node

from _helpers import COST

WINDOW = 32
SAMPLES = 5  # the first requests are the output-length sample


def stream(n: int, seed: int = 0) -> ResourceTree:
    """`n` requests (three shared system prompts, unique tails) through a window of WINDOW:
    each added, then removed (admitted) once WINDOW newer ones wait; the first SAMPLES are
    sample requests, whose nodes may still receive their output lengths after they leave."""
    r = random.Random(seed)
    systems = [[r.randrange(500) for _ in range(40)] for _ in range(3)]
    t = ResourceTree(COST)
    live = []
    for i in range(n):
        req = t.add(i, tokens=systems[i % 3] + [r.randrange(500) for _ in range(r.randint(5, 60))], max_tokens=4)
        req.sample = i < SAMPLES
        live.append(i)
        if len(live) > WINDOW:
            t.remove(live.pop(0))
    for rid in live:
        t.remove(rid)
    t.check_integrity()
    return t


def nodes_alive() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Node)


def test_pruned_nodes_kept_do_not_grow_with_the_requests_streamed():
    """Every request left: the tree is empty, and the only nodes still alive besides its root are
    the pruned ones on the sample requests' paths (a few per sample), after 1,500 and after 3,000
    requests alike (keeping every pruned node held 1,025 and 1,475)."""
    before = nodes_alive()
    counts = []
    for n in (1500, 3000):
        t = stream(n)
        assert len(t) == 0 and t.root.count == 0
        counts.append(nodes_alive() - before - 1)  # the root
        del t
    assert max(counts) <= SAMPLES * 4, counts  # a sample's path: its system prompt, tail splits, its leaf


def test_a_sample_requests_pruned_node_still_passes_its_samples_on():
    """The nodes a sample request left through are kept when pruned: a request re-created under
    the same prefix reads the output length recorded after the prune."""
    t = ResourceTree(COST)
    t.add("s", tokens=[1, 2, 3, 4, 5, 6], max_tokens=10_000)
    t.add("o", tokens=[9, 9, 9], max_tokens=10_000)
    t.estimator.record(t.path(t.reqs["o"].node), 5)
    path = t.path(t.reqs["s"].node)
    t.reqs["s"].sample = True
    t.remove("s")  # [1..6] pruned while the sample runs
    t.estimator.record(path, 4000)
    again = t.add("s2", tokens=[1, 2, 3, 4, 5, 6, 7], max_tokens=10_000)
    assert again.output_len == 4000
