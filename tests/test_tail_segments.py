"""The global plan sees prefixes shared inside tails (completion prompts, a chat's last message):
`order.tail_segments` against a brute force over all pairs, and the plan grouping them."""

from __future__ import annotations

import numpy as np
import pytest

from blendserve_sgl.batch.order import build_tree, cost_for, plan, tail_segments
from blendserve_sgl.batch.store import HEAD_BLOCK, Heads, TokenStore

B = 4  # a small block so short prompts exercise every case


def store_of(prompts: list[tuple[tuple[int, ...], list[int]]], share_heads: bool = True) -> TokenStore:
    """A store of (piece digests, tail tokens); pieces 1-3 exist."""
    s = TokenStore(share_heads)
    for d in (1, 2, 3):
        s.add_piece(d, [d, d + 10])
    for i, (refs, tail) in enumerate(prompts):
        s.add(line=i, custom_id=f"r{i}", kind="completion", model=None, sampling={}, max_tokens=4,
              piece_digests=list(refs), tail=tail)
    return s


def random_prompts(seed: int, n: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """Tails drawn as a prefix of one of a few stems plus a random rest, behind a few piece paths."""
    rng = np.random.default_rng(seed)
    stems = [rng.integers(0, 6, 40).tolist() for _ in range(3)]
    paths = [(), (1,), (1, 2), (3,)]
    out = []
    for _ in range(n):
        stem = stems[int(rng.integers(len(stems)))][:int(rng.integers(0, 41))]
        out.append((paths[int(rng.integers(len(paths)))], stem + rng.integers(0, 6, int(rng.integers(1, 9))).tolist()))
    return out


def brute_segments(prompts, block: int):
    """Per request: [(end depth in tokens, frozenset of the requests sharing the tail up to there)]
    for each segment, from all pairs."""
    out = {}
    for i, (refs, tail) in enumerate(prompts):
        counts = []
        for k in range(1, len(tail) // block + 1):
            sharers = frozenset(j for j, (r, t) in enumerate(prompts)
                                if r == refs and len(t) >= k * block and t[:k * block] == tail[:k * block])
            if len(sharers) < 2:
                break
            counts.append(sharers)
        segs = [((k + 1) * block, counts[k]) for k in range(len(counts))
                if k + 1 == len(counts) or counts[k + 1] != counts[k]]
        if segs:
            out[i] = segs
    return out


@pytest.mark.parametrize("seed", range(6))
def test_tail_segments_match_a_brute_force_over_all_pairs(seed):
    prompts = random_prompts(seed, 60)
    got = tail_segments(store_of(prompts), B)
    want = brute_segments(prompts, B)
    assert set(got) == set(want)
    names = {}
    for i, segs in want.items():
        ends = np.cumsum([n for _, n in got[i]]).tolist()
        assert ends == [d for d, _ in segs], i
        for (name, _), (_, sharers) in zip(got[i], segs):
            # one name per (prefix, sharers): equal names exactly where the brute force has equal prefixes
            assert names.setdefault(name, sharers) == sharers
    seen = {}
    for i, segs in want.items():
        for (name, _), (d, sharers) in zip(got[i], segs):
            assert seen.setdefault((d, sharers), name) == name


def test_requests_behind_different_pieces_never_share_a_tail_segment():
    tail = list(range(16))
    got = tail_segments(store_of([((1,), tail), ((2,), tail), ((1, 2), tail), ((), tail)]), B)
    assert got == {}
    got = tail_segments(store_of([((1,), tail + [1]), ((1,), tail + [2]), ((2,), tail)]), B)
    assert set(got) == {0, 1} and got[0] == got[1] and sum(n for _, n in got[0]) == 16


def test_completions_sharing_a_prefix_meet_under_one_node_of_the_plan_tree():
    """Pairs of completion prompts that share a long prefix, far apart in the file: the plan's tree
    holds each pair under a node of the shared length (before, every completion was one unshared
    tail, and the plan scattered them)."""
    rng = np.random.default_rng(0)
    stems = [rng.integers(0, 50_000, 300).tolist() for _ in range(20)]
    prompts = [((), stems[i % 20] + rng.integers(0, 50_000, 10).tolist()) for i in range(40)]
    tree = build_tree(store_of(prompts), cost_for(None))
    tree.check_integrity()
    for i in range(20):
        a, b = tree.reqs[i].node, tree.reqs[i + 20].node
        assert a is b and a.prefix_len == 288  # whole 32-token blocks: 9 of them within the 300 shared tokens


def headed_prompts(seed: int, n: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """Completion-like prompts: a prefix (any length, so heads match in part) of one of a few
    long headers, then a short item; some repeated whole, some behind pieces."""
    rng = np.random.default_rng(seed)
    headers = [rng.integers(0, 50, int(rng.integers(40, 400))).tolist() for _ in range(4)]
    paths = [(), (), (1,), (2, 3)]
    out = []
    for _ in range(n):
        h = headers[int(rng.integers(len(headers)))]
        head = h if rng.random() < 0.7 else h[:int(rng.integers(1, len(h) + 1))]
        out.append((paths[int(rng.integers(len(paths)))], head + rng.integers(0, 50, int(rng.integers(1, 40))).tolist()))
        if rng.random() < 0.1:
            out.append(out[-1])  # the same prompt twice
    return out


@pytest.mark.parametrize("seed", range(8))
def test_shared_heads_change_no_prompt_and_no_plan(seed):
    """Tails that start alike share their whole blocks as head pieces (`store.Heads`), stored
    once. Against the store that keeps every tail whole (the reference): every prompt the same
    tokens, the plan's tail segments and its order the same, the store smaller."""
    prompts = headed_prompts(seed, 120)
    headed, whole = store_of(prompts), store_of(prompts, share_heads=False)
    headed.check_integrity()
    whole.check_integrity()
    assert headed.heads.heads and not whole.head_piece.view.any()
    for i in range(len(prompts)):
        assert headed.input_ids(i) == whole.input_ids(i), i
    assert headed.prompt_lengths().tolist() == whole.prompt_lengths().tolist()
    assert headed.head_counts().sum() > 0 and headed.tail_tokens.n < whole.tail_tokens.n
    assert headed.nbytes() < whole.nbytes()
    assert tail_segments(headed) == tail_segments(whole)
    cost = cost_for(None)
    assert plan(headed, cost).tolist() == plan(whole, cost).tolist()


def test_shared_heads_are_bounded_and_need_two_whole_blocks():
    """At most `max_keys` tail starts are remembered and `max_bytes` of head tokens kept; a
    shared run under two blocks stays in the tails; at least one token stays in every tail."""
    header = list(range(1000, 1000 + 3 * HEAD_BLOCK))
    s = TokenStore()
    s.heads = Heads(max_keys=1)
    for i, (start, rest) in enumerate([(header, [1]), (header, [2]), ([7] * 80, [3]), ([7] * 80, [4]),
                                        (header[:2 * HEAD_BLOCK - 1] + [9] * 40, [5]), (header, [])]):
        s.add(line=i, custom_id=f"r{i}", kind="completion", model=None, sampling={}, max_tokens=4,
              piece_digests=[], tail=start + rest)
    s.check_integrity()
    assert s.head_counts().tolist() == [0, 3, 0, 0, 0, 2]  # r2/r3: a second start not remembered
    assert len(s.tail(5)) == HEAD_BLOCK  # r5 is the header alone: its last block stays its tail
    capped = TokenStore()
    capped.heads = Heads(max_bytes=2 * HEAD_BLOCK * 4)
    for i in range(2):
        capped.add(line=i, custom_id=f"r{i}", kind="completion", model=None, sampling={}, max_tokens=4,
                   piece_digests=[], tail=header + [i])
    assert capped.head_counts().tolist() == [0, 0]  # three blocks are over the cap
