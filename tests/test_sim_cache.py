"""The simulator's radix cache against plain references on token lists: longest cached prefix,
token counts, lock protection and least-recently-used eviction."""

from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl.core.tree import Group
from blendserve_sgl.sim.cache import RadixCache


class Reference:
    """The cache as a set of cached token prefixes, each with the clock tick of its last use."""

    def __init__(self):
        self.used: dict[tuple, int] = {}  # cached prefix -> last use
        self.locks: list[tuple] = []  # locked sequences (one entry per lock)
        self.clock = 0

    def lcp(self, seq) -> int:
        k = 0
        while k < len(seq) and tuple(seq[:k + 1]) in self.used:
            k += 1
        return k

    def touch(self, seq, n) -> None:
        for i in range(1, n + 1):
            self.used[tuple(seq[:i])] = self.clock

    def locked(self, prefix) -> bool:
        return any(tuple(s[:len(prefix)]) == prefix for s in self.locks)

    def leaves(self):
        """Cached prefixes with no cached extension: what an evicting cache may take next."""
        firsts = {p[:-1] for p in self.used}
        return [p for p in self.used if p not in firsts and not self.locked(p)]


def _seqs():
    return st.lists(st.integers(0, 3), min_size=1, max_size=7)


@settings(max_examples=100)
@given(st.lists(st.tuples(st.sampled_from(["insert", "match", "match_from", "lock", "unlock", "evict"]), _seqs(),
                          st.integers(1, 12)), max_size=40))
def test_radix_cache_matches_a_token_level_reference(ops):
    """After any sequence of inserts, matches, locks, unlocks and evictions: the longest cached
    prefix and the cached/evictable token counts equal the reference's; every evicted node was
    an unlocked leaf used no later than any other unlocked leaf (LRU), and an eviction stops as
    soon as it freed enough. `match_from` resumes a sequence's last match while its node lives
    (as the dfs-weight picker does) and must give `match`'s result and recency."""
    ref = Reference()
    evicted = []
    cache = RadixCache(on_evict=lambda node: evicted.append(node))
    held = []  # (node, seq) locked by "requests"
    anchors = {}  # seq -> its last match_from
    for op, seq, n in ops:
        if op == "insert":
            ref.clock += 1
            node, dup = cache.insert(seq)
            assert dup == ref.lcp(seq)
            ref.touch(seq, len(seq))
        elif op == "match":
            ref.clock += 1
            node, hit = cache.match(seq)
            assert hit == ref.lcp(seq)
            ref.touch(seq, hit)
        elif op == "match_from":
            if anchors and n % 3:  # mostly a sequence matched before
                seq = list(list(anchors)[n % len(anchors)])
            ref.clock += 1
            a = anchors.get(tuple(seq))
            a = anchors[tuple(seq)] = cache.match_from(seq, a if a is not None and a[0].alive else (cache.root, 0, 0))
            assert a[2] == ref.lcp(seq) and a[0] is cache.match(seq)[0]
            ref.clock += 1  # the check's own match
            ref.touch(seq, a[2])
        elif op == "lock":
            node, hit = cache.match(seq)
            ref.clock += 1
            ref.touch(seq, hit)
            cache.lock(node)
            held.append((node, tuple(seq[:hit])))
            ref.locks.append(tuple(seq[:hit]))
        elif op == "unlock" and held:
            node, prefix = held.pop(n % len(held))
            cache.unlock(node)
            ref.locks.remove(prefix)
        elif op == "evict":
            evicted.clear()
            freed = cache.evict(n)
            gone = 0
            for node in evicted:
                path = cache.path_keys(node.parent) + node.key if node.parent is not cache.root else node.key
                leaf = tuple(path)
                assert leaf in ref.leaves(), f"evicted {leaf}, which is locked or not a leaf"
                oldest = min(ref.used[p] for p in ref.leaves())
                assert ref.used[leaf] == oldest, "evicted a leaf that was used more recently than another"
                for i in range(len(path), len(path) - node.length, -1):
                    del ref.used[tuple(path[:i])]
                gone += node.length
            assert freed == gone
            assert freed >= n or not ref.leaves(), "stopped evicting with evictable leaves left"
            assert freed - (evicted[-1].length if evicted else 0) < n, "evicted more nodes than needed"
        assert cache.total_tokens == len(ref.used)
        assert cache.evictable_tokens == sum(1 for p in ref.used if not ref.locked(p))
        cache.check_integrity()


def test_plain_lru_when_nothing_is_shared():
    """Disjoint sequences make the radix cache a plain LRU list of whole sequences."""
    cache = RadixCache()
    lru: list = []  # least recently used first
    seqs = [tuple(range(10 * i, 10 * i + 5)) for i in range(6)]
    for s in seqs[:4]:
        cache.insert(s)
        lru.append(s)
    cache.match(seqs[1])  # touch: moves to the back
    lru.remove(seqs[1])
    lru.append(seqs[1])
    assert cache.evict(7) == 10  # two whole sequences of 5
    lru = lru[2:]
    cached = {s for s in seqs if cache.match(s)[1] == 5}
    assert cached == set(lru)


def test_locked_prefix_survives_and_groups_count_their_length():
    cache = RadixCache()
    sys, subj = Group("system", 64), Group("mmlu:anatomy", 600)
    node, dup = cache.insert((sys, subj, Group("tail:a", 90)))
    assert dup == 0 and cache.total_tokens == 754
    hit_node, hit = cache.match((sys, subj, Group("tail:b", 80)))
    assert hit == 664 and hit_node.key == (sys, subj) and cache.nodes == 2  # the edge was split
    cache.lock(hit_node)
    assert cache.evict(10_000) == 90 and cache.total_tokens == 664  # only the unlocked tail goes
    cache.unlock(hit_node)
    assert cache.evictable_tokens == 664 and cache.evict(1) == 664
    cache.check_integrity()


def test_match_from_resumes_across_inserts_splits_and_evictions():
    """The dfs-weight picker resumes each class's match from its last node: after an insert
    below it (the match then splits the new edge), a split above it and an insert past its end
    the result is the root walk's; once its node is evicted the caller starts from the root."""
    seq = [1, 2, 3, 4, 5, 6, 7, 8]
    cache = RadixCache()
    cache.insert([1, 2, 3, 4, 5, 6])
    a = cache.match_from(seq, (cache.root, 0, 0))
    assert a[1:] == (6, 6)
    for more, hit in (([1, 2, 3, 4, 5, 6, 7, 9], 7), ([1, 2, 9], 7), ([1, 2, 3, 4, 5, 6, 7, 8, 1], 8)):
        cache.insert(more)
        a = cache.match_from(seq, a)
        node, matched = cache.match(seq)
        assert a[0] is node and a[1:] == (hit, hit) == (hit, matched) and node.last_access == cache.clock
        cache.check_integrity()
    assert cache.evict(100) and not a[0].alive  # nothing locked: all of it goes
    assert cache.match_from(seq, (cache.root, 0, 0))[1:] == (0, 0)
