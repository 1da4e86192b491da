"""The resource-aware prefix tree: building, exact aggregates under add/remove, validation, sort."""

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl.core import ResourceTree
from blendserve_sgl.core.tree import Group, Node, Req

from _helpers import COST, brute_aggregates, node_path_keys


def _live_entry(req: Req, keys) -> tuple:
    return (tuple(keys), req.prompt_len, req.output_len, req.tail)


def _assert_matches_brute(tree: ResourceTree, live: dict) -> None:
    """Root aggregates and every node's saved tokens equal a from-scratch recomputation."""
    want = brute_aggregates(live)
    r = tree.root
    got = dict(count=r.count, tokens=r.tokens, mem=r.mem, sum_p=r.sum_p, saved=r.saved)
    assert got == want
    assert set(tree.reqs) == set(live)
    for node in tree.nodes():
        if node is tree.root:
            continue
        path = node_path_keys(node)
        under = {rid: v for rid, v in live.items() if v[0][:len(path)] == path}
        sub = brute_aggregates(under)
        assert (node.count, node.tokens, node.mem, node.saved) == (
            sub["count"], sub["tokens"], sub["mem"], sub["saved"]), node


# ---------------------------------------------------------------- building
def test_build_from_tokens():
    """Token prompts share their common prefixes as radix-tree nodes; requests hang where their prompt ends."""
    t = ResourceTree(COST)
    t.add("a", tokens=[1, 2, 3, 4], output_len=10)
    t.add("b", tokens=[1, 2, 5, 6], output_len=20)
    t.add("c", tokens=[1, 2], output_len=5)  # a prompt that is a prefix of the others
    t.add("d", tokens=[7], output_len=1)
    t.check_integrity()
    shared = t.reqs["c"].node
    assert shared.keys == (1, 2) and shared.prefix_len == 2 and shared.count == 3
    assert t.reqs["a"].node.parent is shared and t.reqs["a"].node.keys == (3, 4)
    assert t.reqs["d"].node.parent is t.root
    assert t.root.count == 4 and t.root.saved == 2 * 2  # [1, 2] computed once instead of 3 times
    assert [r.rid for r in t.iter_requests()] == ["a", "b", "c", "d"]
    assert [r.rid for r in t.iter_requests(reverse=True)] == ["d", "c", "b", "a"]
    assert t.leftmost().rid == "a" and t.rightmost().rid == "d"


def test_build_from_length_records():
    """Length-only records share named prefix groups; the rest of each prompt is its private tail."""
    t = ResourceTree(COST)
    t.add(1, prompt_len=700, prefix=[("sys", 50), ("subj", 600)], output_len=2)
    t.add(2, prompt_len=750, prefix=[("sys", 50), ("subj", 600)], output_len=1)
    t.add(3, prompt_len=60, prefix=[("sys", 50)], output_len=100)
    t.add(4, prompt_len=30, output_len=3)  # no shared prefix at all
    t.check_integrity()
    r1 = t.reqs[1]
    assert r1.tail == 50 and r1.node.prefix_len == 650 and r1.node.keys == (Group("subj", 600),)
    assert r1.node is t.reqs[2].node
    assert t.reqs[3].node.keys == (Group("sys", 50),) and t.reqs[3].tail == 10
    assert t.reqs[4].node is t.root and t.reqs[4].tail == 30
    # computed: sys 50 + subj 600 + tails (50 + 100 + 10 + 30)
    assert t.root.saved == (700 + 750 + 60 + 30) - (650 + 190)
    assert len(t) == 4 and 3 in t and 99 not in t


def test_edge_split_on_partial_match():
    """A new prompt diverging inside an edge splits it; depth and prefix lengths stay right."""
    t = ResourceTree(COST)
    t.add("a", tokens=[1, 2, 3, 4, 5], output_len=1)
    t.add("b", tokens=[1, 2, 3, 9], output_len=1)
    t.check_integrity()
    upper = t.reqs["a"].node.parent
    assert upper.keys == (1, 2, 3) and upper.parent is t.root and upper.depth == 1
    assert t.reqs["a"].node.depth == 2 and t.reqs["a"].node.keys == (4, 5)


def test_three_request_sharing_and_density():
    """Node sharing ratio and density against hand-computed values."""
    t = ResourceTree(COST)
    t.add("r1", tokens=[1, 2, 3, 4], output_len=10)
    t.add("r2", tokens=[1, 2, 5, 6], output_len=20)
    t.add("r3", tokens=[7, 8, 9], output_len=30)
    n12 = t.reqs["r1"].node.parent
    assert n12.keys == (1, 2)
    # n12: two requests, [1, 2] saved once.
    tokens = (4 + 10) + (4 + 20)
    mem = (2 * 4 * 10 + 10 ** 2) + (2 * 4 * 20 + 20 ** 2)
    assert (n12.count, n12.tokens, n12.mem, n12.saved) == (2, tokens, mem, 2)
    assert n12.sharing == pytest.approx(2 / 38)
    spc = 2 * COST.model.gemm_params / COST.hardware.flops
    spm = COST.model.kv_bytes_per_token / (2 * COST.hardware.mem_bandwidth)
    assert t.density(n12) == pytest.approx((tokens - 2) * spc / (mem * spm), rel=1e-12)
    # (1 - s) Comp / Mem as in the brief
    comp = 2 * tokens * COST.model.gemm_params / COST.hardware.flops
    memt = ((4 * 10 + 50) + (4 * 20 + 200)) * COST.model.kv_bytes_per_token / COST.hardware.mem_bandwidth
    assert t.density(n12) == pytest.approx((1 - n12.sharing) * comp / memt, rel=1e-12)
    # leaves: nothing shared below the fork
    leaf = t.reqs["r1"].node
    assert leaf.saved == 0 and leaf.sharing == 0
    root = t.root
    assert (root.count, root.tokens, root.saved) == (3, 38 + 33, 2)
    assert root.mem == mem + 2 * 3 * 30 + 900
    assert root.sharing == pytest.approx(2 / 71)
    assert t.density(root) == pytest.approx(69 * spc / (root.mem * spm), rel=1e-12)
    assert t.reqs["r3"].sort_key == pytest.approx(COST.request_density(3, 30))


# ---------------------------------------------------------------- property test
_tok_prompt = st.lists(st.integers(0, 2), min_size=1, max_size=6)
_out = st.one_of(st.none(), st.integers(0, 50))
_groups = st.lists(st.sampled_from([("a", 3), ("b", 5), ("c", 2), ("a", 4)]), max_size=3)

_token_op = st.one_of(
    st.tuples(st.just("add"), _tok_prompt, _out),
    st.tuples(st.just("remove"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("sort")),
    st.tuples(st.just("setlen"), st.integers(0, 10 ** 6), st.integers(0, 60)),
)
_length_op = st.one_of(
    st.tuples(st.just("add"), _groups, st.integers(0, 4), _out),
    st.tuples(st.just("remove"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("sort")),
    st.tuples(st.just("setlen"), st.integers(0, 10 ** 6), st.integers(0, 60)),
)


def _run_ops(mode: str, ops) -> None:
    t = ResourceTree(COST)
    live: dict = {}
    next_id = 0
    for op in ops:
        kind = op[0]
        if kind == "add":
            rid = f"q{next_id}"
            next_id += 1
            if mode == "token":
                _, toks, d = op
                req = t.add(rid, tokens=toks, output_len=d)
                keys = tuple(toks)
            else:
                _, groups, tail, d = op
                p = sum(n for _, n in groups) + tail
                if p == 0:
                    continue
                req = t.add(rid, prompt_len=p, prefix=groups, output_len=d)
                keys = tuple(Group(g, n) for g, n in groups)
            if d is None:
                assert not req.known and req.output_len == t.estimator.prior
            else:
                assert req.known and req.output_len == d
            live[rid] = _live_entry(req, keys)
        elif kind == "remove":
            if not live:
                continue
            rid = sorted(live)[op[1] % len(live)]
            req = t.remove(rid)
            assert req.rid == rid and req.node is None
            del live[rid]
            with pytest.raises(KeyError):
                t.remove(rid)
        elif kind == "sort":
            t.sort()
        elif kind == "setlen":
            if not live:
                continue
            rid = sorted(live)[op[1] % len(live)]
            req = t.reqs[rid]
            t.set_output_len(req, op[2])
            live[rid] = (live[rid][0], live[rid][1], op[2], live[rid][3])
        t.check_integrity()
        _assert_matches_brute(t, live)
    # Draining the tree leaves an empty root.
    for rid in list(live):
        t.remove(rid)
        t.check_integrity()
    assert t.root.count == 0 and not t.root.kids and t.root.unique == 0 and not t.root.index


@settings(max_examples=150)
@given(st.lists(_token_op, min_size=1, max_size=40))
def test_random_token_ops_keep_exact_aggregates(ops):
    """Any sequence of add/remove/sort/set_output_len on token prompts keeps every invariant and
    the aggregates (count, tokens, mem, saved at every node) equal to a brute-force recomputation."""
    _run_ops("token", ops)


@settings(max_examples=150)
@given(st.lists(_length_op, min_size=1, max_size=40))
def test_random_length_ops_keep_exact_aggregates(ops):
    """Same for length-only records with random prefix-group paths."""
    _run_ops("length", ops)


def test_brute_force_is_not_vacuous():
    """The brute-force reference itself: distinct prefixes among [1,2,3], [1,2,4], [1,2] are 4 tokens."""
    live = {"x": ((1, 2, 3), 3, 0, 0), "y": ((1, 2, 4), 3, 0, 0), "z": ((1, 2), 2, 0, 0)}
    assert brute_aggregates(live)["saved"] == 8 - 4


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, field", [
    (dict(tokens=[]), "empty prompt"),
    (dict(tokens=[1, -2]), "token"),
    (dict(tokens=[1, 2], output_len=-1), "output_len"),
    (dict(tokens=[1, 2], output_len=math.nan), "output_len"),
    (dict(tokens=[1, 2], output_len=2.5), "output_len"),
    (dict(tokens=[1, 2], output_len=True), "output_len"),
    (dict(tokens=[1, 2], output_len="7"), "output_len"),
    (dict(prompt_len=-3), "prompt_len"),
    (dict(prompt_len=0), "prompt_len"),
    (dict(prompt_len=math.nan), "prompt_len"),
    (dict(prompt_len=10, prefix=[("sys", 8), ("x", 5)]), "prompt_len"),
    (dict(prompt_len=10, prefix=[("sys", 0)]), "length"),
    (dict(prompt_len=10, prefix=[("sys", -1)]), "length"),
    (dict(prompt_len=10, prefix=["sys"]), "pairs"),
    (dict(prompt_len=10, max_tokens=0), "max_tokens"),
    (dict(tokens=[1], prompt_len=1), "either"),
    (dict(), "tokens or prompt_len"),
])
def test_bad_requests_raise_with_the_request_id(kwargs, field):
    """Invalid requests raise ValueError naming the request, and leave the tree untouched."""
    t = ResourceTree(COST)
    t.add("ok", tokens=[1, 2, 3], output_len=4)
    with pytest.raises(ValueError) as e:
        t.add("bad-rid-17", **kwargs)
    assert "bad-rid-17" in str(e.value) and field in str(e.value)
    assert "bad-rid-17" not in t and len(t) == 1
    t.check_integrity()


def test_duplicate_request_id_raises():
    """Request ids are unique; a duplicate raises ValueError naming it."""
    t = ResourceTree(COST)
    t.add("dup", tokens=[1, 2], output_len=1)
    with pytest.raises(ValueError, match="dup"):
        t.add("dup", prompt_len=5, output_len=1)
    t.check_integrity()
    assert t.root.count == 1


def test_float_integer_lengths_accepted_and_max_tokens_caps():
    """Integral floats are accepted as integers; a known output length is capped at max_tokens."""
    t = ResourceTree(COST)
    r = t.add("f", prompt_len=10.0, output_len=7.0)
    assert r.prompt_len == 10 and r.output_len == 7 and type(r.output_len) is int
    r = t.add("cap", tokens=[1], output_len=100, max_tokens=30)
    assert r.output_len == 30
    r = t.add("est", tokens=[2], max_tokens=5)  # unknown: the prior (256) capped at 5
    assert r.output_len == 5 and not r.known
    t.check_integrity()


# ---------------------------------------------------------------- sort
def _assert_sorted(t: ResourceTree) -> None:
    for node in t.nodes():
        kids = list(node.kids)
        for a, b in zip(kids, kids[1:]):
            da, db = t.item_density(a), t.item_density(b)
            assert da >= db, (node, a, b, da, db)
            if da == db:
                assert a.seq < b.seq, "ties must be broken by arrival"


@settings(max_examples=60)
@given(st.lists(st.tuples(_tok_prompt, st.integers(0, 40)), min_size=1, max_size=40))
def test_sort_orders_children_by_density(items):
    """After sort(), every node's children have non-increasing density, ties in arrival order;
    the same input sorted twice gives the same DFS order."""
    trees = []
    for _ in range(2):
        t = ResourceTree(COST)
        for i, (toks, d) in enumerate(items):
            t.add(i, tokens=toks, output_len=d)
        t.sort()
        t.check_integrity()
        _assert_sorted(t)
        trees.append(t)
    assert [r.rid for r in trees[0].iter_requests()] == [r.rid for r in trees[1].iter_requests()]


def test_sort_ties_by_arrival():
    """Identical requests keep arrival order; compute-dense ones come first."""
    t = ResourceTree(COST)
    for rid in ["m1", "c1", "m2", "c2", "m3"]:
        if rid.startswith("m"):
            t.add(rid, prompt_len=50, prefix=[("g", 10)], output_len=3000)
        else:
            t.add(rid, prompt_len=3000, prefix=[("g", 10)], output_len=5)
    t.add("inf1", prompt_len=40, prefix=[("g", 10)], output_len=0)  # prefill only: density inf
    t.add("inf2", prompt_len=40, prefix=[("g", 10)], output_len=0)
    t.sort()
    assert [r.rid for r in t.iter_requests()] == ["inf1", "inf2", "c1", "c2", "m1", "m2", "m3"]


def test_arrivals_after_sort_are_placed_in_order():
    """Once sorted, new requests and new nodes are inserted at their density position."""
    t = ResourceTree(COST)
    for i in range(5):
        t.add(f"a{i}", prompt_len=100 + 500 * i, prefix=[("g", 10)], output_len=100)
    t.add("h", prompt_len=3000, prefix=[("hot", 20)], output_len=2)
    t.add("v", prompt_len=30, prefix=[("cold", 20)], output_len=4000)
    t.sort()
    t.add("mid", prompt_len=1100, prefix=[("g", 10)], output_len=100)
    t.add("cold2", prompt_len=25, prefix=[("colder", 20)], output_len=8000)
    t.check_integrity()
    _assert_sorted(t)
    order = [r.rid for r in t.iter_requests()]
    assert order[0] == "h" and order[-1] == "cold2"
    assert order.index("a1") < order.index("mid") < order.index("a3")


def test_remove_prunes_and_reuses_paths():
    """Removing the last request under a node prunes it; re-adding rebuilds the same path."""
    t = ResourceTree(COST)
    t.add("a", tokens=[1, 2, 3], output_len=1)
    t.add("b", tokens=[1, 2, 4], output_len=1)
    t.remove("a")
    t.check_integrity()
    assert [n.keys for n in t.nodes()][1:] == [(1, 2), (4,)]
    t.add("c", tokens=[1, 2, 3, 5], output_len=1)
    t.check_integrity()
    assert t.root.saved == 2
    with pytest.raises(KeyError, match="zzz"):
        t.remove("zzz")
    assert isinstance(t.reqs["b"].node, Node)


def test_integrity_check_of_a_tree_thousands_of_levels_deep():
    """A Mooncake block chain or a long conversation makes the tree as deep as its branch points;
    the recursive check raised RecursionError past about 1,000 levels (`simulate --check`)."""
    t = ResourceTree(COST)
    chain = list(range(1, 4001))
    for depth in range(1, 4000, 2):  # a branch off the chain at every other token: a node per branch point
        t.add(f"b{depth}", tokens=chain[:depth] + [10**6 + depth], output_len=4)
    t.add("whole", tokens=chain, output_len=8)
    t.check_integrity()
    t.remove("b2001")
    t.check_integrity()


def test_unlink_takes_out_exactly_the_item_wherever_it_stands():
    """`_unlink` looks near the right end, then from the left: against a plain removal by
    identity, for every position of short lists and of lists longer than the end it looks at
    first (equal-looking items are distinct objects)."""
    from collections import deque

    from blendserve_sgl.core.tree import _unlink

    class Item:
        __slots__ = ()

    for n in [*range(1, 8), 200]:
        for pos in range(n):
            items = [Item() for _ in range(n)]
            kids = deque(items)
            _unlink(kids, items[pos])
            assert list(kids) == items[:pos] + items[pos + 1:]
        with pytest.raises(AssertionError, match="not among"):
            _unlink(deque(Item() for _ in range(n)), Item())


def test_position_looks_only_near_the_right_end_before_searching_at_c_speed():
    """The final wave and the cursors take near a node's right end: `_position` finds those
    among the last `_NEAR_END` children without `index`, and looks at no more than that many
    in Python before handing the search to `deque.index` (a plain `index` for every item, or a
    Python scan of the whole list, made the final wave quadratic; only a benchmark showed it)."""
    from collections import deque

    from blendserve_sgl.core.tree import _NEAR_END, _position

    class Counting(deque):
        looked = indexed = 0

        def __reversed__(self):
            for x in super().__reversed__():
                Counting.looked += 1
                yield x

        def index(self, *args):
            Counting.indexed += 1
            return super().index(*args)

    n = 5 * _NEAR_END
    items = [object() for _ in range(n)]
    kids = Counting(items)
    for pos in range(n):
        Counting.looked = Counting.indexed = 0
        assert _position(kids, items[pos]) == pos
        assert Counting.looked <= _NEAR_END + 1
        near = pos >= n - 1 - _NEAR_END  # the last child and the _NEAR_END before it
        assert Counting.indexed == (0 if near else 1), (pos, Counting.indexed)
