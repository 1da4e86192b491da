"""`OutputLengthEstimator.stratify`: every subtree with at least 1 / sample_fraction requests of
unknown length gets a sample of its own, checked against a brute-force walk of the tree."""

import math
import random

from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl.core import OutputLengthEstimator, ResourceTree
from blendserve_sgl.core.estimate import SamplePhase

from _helpers import COST


def _tree(est, sizes, seed):
    """Classes of the given sizes, each behind its own system prompt, some with two sub-prefixes;
    every fifth request of known length."""
    rng = random.Random(seed)
    tree = ResourceTree(COST, est)
    for c, n in enumerate(sizes):
        for i in range(n):
            prefix = ((f"sys{c}", 40),) + (((f"sub{c}.{i % 2}", 30),) if c % 2 else ())
            known = rng.randint(1, 50) if i % 5 == 4 else None
            tree.add(f"c{c}-{i}", prompt_len=100 + rng.randint(0, 50), prefix=prefix, output_len=known,
                     max_tokens=10_000)
    return tree


def _unknown_under(node):
    out = []
    for k in node.kids:
        out += _unknown_under(k) if hasattr(k, "kids") else ([] if k.known else [k])
    return out


def _nodes(node):
    yield node
    for k in node.kids:
        if hasattr(k, "kids"):
            yield from _nodes(k)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 260), min_size=1, max_size=6), st.integers(0, 10 ** 6),
       st.sampled_from([0.01, 0.02, 0.05]))
def test_every_large_subtree_gets_a_sample(sizes, seed, fraction):
    """With stratify, every node below the root holding >= ceil(1 / f) unknown requests has a
    sample among them; the plain sample is kept and only unknown requests are added, each once."""
    plain = OutputLengthEstimator(sample_fraction=fraction, seed=seed % 7)
    strat = OutputLengthEstimator(sample_fraction=fraction, seed=seed % 7, stratify=True)
    phases = {}
    for est in (plain, strat):
        tree = _tree(est, sizes, seed)
        phase = SamplePhase(est, 1.0)
        phase.start(tree)
        phases[est.stratify] = (tree, phase)
    tree, phase = phases[True]
    assert phases[False][1].pending <= phase.pending and phase.size == len(phase.pending)
    assert all(not tree.reqs[r].known and tree.reqs[r].sample for r in phase.pending)
    need = math.ceil(1 / fraction)
    for node in _nodes(tree.root):
        under = _unknown_under(node)
        if node is not tree.root and len(under) >= need and phase.pending:
            assert any(r.rid in phase.pending for r in under), (node, len(under))


def test_stratify_gives_a_small_class_its_own_sample():
    """A class of 150 requests among 5,000 (1%: 50 samples) that the seeded hashes miss gets its
    smallest-hash request added; its estimate then comes from its own sample, not the root's mean."""
    for seed in range(50):
        plain = OutputLengthEstimator(sample_fraction=0.01, seed=seed)
        tree = _tree(plain, [4850, 150], 0)
        phase = SamplePhase(plain, 1.0)
        phase.start(tree)
        if not any(r.startswith("c1-") for r in phase.pending):
            break
    else:
        raise AssertionError("every seed samples the small class: the case shows nothing")
    strat = OutputLengthEstimator(sample_fraction=0.01, seed=seed, stratify=True)
    tree = _tree(strat, [4850, 150], 0)
    phase = SamplePhase(strat, 1.0)
    phase.start(tree)
    added = [r for r in phase.pending if r.startswith("c1-")]
    unknown = [r.rid for r in tree.reqs.values() if r.rid.startswith("c1-") and not r.known]
    assert added == [min(unknown, key=strat.sample_key)]


def test_a_fraction_too_small_for_any_stratum_adds_none():
    """1 / sample_fraction beyond a float (1e-320): no node is that large, so no stratum sample is
    added (it raised OverflowError out of `SamplePhase.start`, a probe); the ordinary draw stands."""
    est = OutputLengthEstimator(sample_fraction=1e-320, seed=0, stratify=True)
    tree = _tree(est, [300, 20], 0)
    phase = SamplePhase(est, 1.0)
    phase.start(tree)
    plain = OutputLengthEstimator(sample_fraction=1e-320, seed=0)
    assert phase.pending == set(plain.choose_sample([r.rid for r in tree.reqs.values() if not r.known]))


def test_a_class_of_exactly_one_over_f_unknown_requests_gets_a_sample_and_one_fewer_does_not():
    """The boundary of the rule: at f = 5% a class with 20 unknown requests (25 requests, every
    fifth known) that the seeded sample misses gets one added; a class of 19 does not."""
    def pending(est, size):
        tree = _tree(est, [2000, size], 0)
        phase = SamplePhase(est, 1.0)
        phase.start(tree)
        unknown = [r.rid for r in tree.reqs.values() if r.rid.startswith("c1-") and not r.known]
        return [r for r in phase.pending if r.startswith("c1-")], unknown

    for size, want in ((25, 20), (23, 19)):
        for seed in range(200):
            taken, unknown = pending(OutputLengthEstimator(sample_fraction=0.05, seed=seed), size)
            if not taken:
                break
        else:
            raise AssertionError(f"every seed samples the class of {size}: the case shows nothing")
        assert len(unknown) == want
        strat = OutputLengthEstimator(sample_fraction=0.05, seed=seed, stratify=True)
        added, _ = pending(strat, size)
        assert added == ([min(unknown, key=strat.sample_key)] if want >= 20 else []), (size, added)
