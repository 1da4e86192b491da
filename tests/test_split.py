"""Sort -> conditional split -> sort: budget, exact accounting, integrity, and that it fixes outliers."""

import math

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from blendserve_sgl.core import ResourceTree, sort_and_split
from blendserve_sgl.core.split import leaves_non_increasing

from _helpers import COST, inversions

_group = st.sampled_from([("sys", 200), ("sysB", 120), ("subj1", 600), ("subj2", 400), ("x", 30), ("y", 80)])
_record = st.tuples(
    st.lists(_group, max_size=3),
    st.integers(1, 3000),  # tail
    st.one_of(st.integers(0, 30), st.integers(500, 8000)),  # short or long output
)
_keep = st.one_of(st.sampled_from([0.0, 0.5, 0.9, 0.99, 1.0]), st.floats(0.0, 1.0))


def _tree(records) -> ResourceTree:
    t = ResourceTree(COST)
    for i, (groups, tail, d) in enumerate(records):
        t.add(i, prompt_len=sum(n for _, n in groups) + tail, prefix=groups, output_len=d)
    return t


def _snapshot(t: ResourceTree) -> dict:
    return {rid: (r.prompt_len, r.output_len) for rid, r in t.reqs.items()}


def _check_report(t: ResourceTree, rep, keep: float, before: dict) -> None:
    assert rep.spent_tokens <= rep.budget_tokens
    assert rep.budget_tokens == math.floor((1 - keep) * rep.saved_before)
    assert rep.saved_after >= keep * rep.saved_before - 1e-9 * max(1, rep.saved_before)
    assert rep.spent_tokens == rep.saved_before - rep.saved_after
    assert t.root.saved == rep.saved_after
    assert rep.leaves_sorted == leaves_non_increasing(t)
    t.check_integrity()
    assert _snapshot(t) == before  # the same requests, nothing lost or changed
    if keep == 1.0:
        assert rep.splits == 0 and rep.spent_tokens == 0


@settings(max_examples=120)
@given(st.lists(_record, min_size=1, max_size=60), _keep)
def test_split_stays_within_budget_length_records(records, keep):
    """On random length-record trees: spent <= budget, saved_after >= keep x saved_before,
    spent == saved_before - saved_after, the tree stays consistent and holds the same requests."""
    t = _tree(records)
    before = _snapshot(t)
    rep = sort_and_split(t, keep_sharing=keep)
    event(f"split: {rep.splits > 0}")
    _check_report(t, rep, keep, before)


_tok = st.lists(st.integers(0, 2), min_size=1, max_size=8)


@settings(max_examples=80)
@given(st.lists(st.tuples(_tok, st.one_of(st.integers(0, 5), st.integers(100, 3000))), min_size=1, max_size=50),
       _keep)
def test_split_stays_within_budget_token_trees(items, keep):
    """Same on token trees (many small shared edges)."""
    t = ResourceTree(COST)
    for i, (toks, d) in enumerate(items):
        t.add(i, tokens=toks, output_len=d)
    before = _snapshot(t)
    rep = sort_and_split(t, keep_sharing=keep)
    event(f"split: {rep.splits > 0}")
    _check_report(t, rep, keep, before)


def test_random_trees_do_split():
    """The property tests are not vacuous: random mixed trees with a loose budget do get split,
    and a later add/remove on the split tree keeps it consistent."""
    import random
    splits = 0
    for seed in range(10):
        rng = random.Random(seed)
        groups = [("sys", 200), ("subj1", 600), ("subj2", 400), ("x", 30)]
        records = [(rng.sample(groups, rng.randint(0, 2)), rng.randint(1, 2000),
                    rng.choice([rng.randint(0, 20), rng.randint(500, 8000)])) for _ in range(80)]
        t = _tree(records)
        before = _snapshot(t)
        rep = sort_and_split(t, keep_sharing=0.5)
        _check_report(t, rep, 0.5, before)
        splits += rep.splits
        t.add("late", prompt_len=900, prefix=[("sys", 200)], output_len=5)
        for rid in list(t.reqs)[::3]:
            t.remove(rid)
            t.check_integrity()
    assert splits > 0


def _outlier_tree() -> ResourceTree:
    t = ResourceTree(COST)
    for i in range(20):  # compute-dense subtree under a shared prefix
        t.add(f"c{i}", prompt_len=2000 + 10 * i, prefix=[("A", 100)], output_len=10)
    t.add("outlier", prompt_len=200, prefix=[("A", 100)], output_len=8000)
    for i in range(20):  # memory-dense sibling subtree
        t.add(f"m{i}", prompt_len=100, prefix=[("B", 50)], output_len=1000 + 50 * i)
    return t


def test_split_moves_obvious_outlier():
    """A long-output request under the compute-dense prefix is moved behind the memory-dense
    subtree; the DFS leaf order becomes non-increasing in density, for the price of one
    recomputation of the 100-token prefix."""
    t = _outlier_tree()
    t.sort()
    order = list(t.iter_requests())
    before_inv = inversions(r.sort_key for r in order)
    assert before_inv > 0 and not leaves_non_increasing(t)
    assert order[20].rid == "outlier"  # sorted last among A's children, still before B
    rep = sort_and_split(t, keep_sharing=0.95)
    t.check_integrity()
    after = list(t.iter_requests())
    assert rep.splits == 1 and rep.moved_requests == 1 and rep.spent_tokens == 100
    assert after[-1].rid == "outlier"
    assert inversions(r.sort_key for r in after) < before_inv
    assert rep.leaves_sorted and leaves_non_increasing(t)
    twin = t.reqs["outlier"].node
    assert twin.split_of is not None and twin.keys == twin.split_of.keys
    # the moved request pays for its prefix again
    assert t.root.saved == rep.saved_before - 100


def test_keep_sharing_one_splits_nothing():
    """keep_sharing=1.0 leaves no budget: the outlier stays, only the sort happens."""
    t = _outlier_tree()
    rep = sort_and_split(t, keep_sharing=1.0)
    assert rep.splits == 0 and rep.spent_tokens == 0 and rep.budget_tokens == 0
    assert rep.saved_after == rep.saved_before and not rep.leaves_sorted
    assert rep.stop == "budget spent"
    assert t.reqs["outlier"].node.split_of is None


def test_budget_too_small_for_the_outlier():
    """A budget below the outlier's prefix length (100) cannot pay for moving it."""
    t = _outlier_tree()
    t.sort()
    keep = 1 - 99.5 / t.root.saved  # budget floor(99.5) = 99 < 100 tokens
    rep = sort_and_split(t, keep_sharing=keep)
    assert rep.budget_tokens == 99 and rep.spent_tokens <= 99
    assert t.reqs["outlier"].node.split_of is None  # A was not split
    assert t.reqs["outlier"].node.count == 21
    t.check_integrity()


@pytest.mark.parametrize("keep", [-0.1, 1.1, math.nan])
def test_bad_keep_sharing(keep):
    """keep_sharing outside [0, 1] is rejected."""
    with pytest.raises(ValueError, match="keep_sharing"):
        sort_and_split(_outlier_tree(), keep_sharing=keep)
