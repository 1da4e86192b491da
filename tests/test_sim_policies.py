"""Pickers: each baseline's order against its definition (SGLang's own dfs-weight function as the
reference), SGLang's admission rule, and the blend picker driving the core's DualScanner."""

import random
from dataclasses import replace

import pytest

from blendserve_sgl.core import CostModel, DualScanner
from blendserve_sgl.core.preset import PRESET
from blendserve_sgl.core.sharing import dfs_order
from blendserve_sgl.sim.adder import sglang_admit
from blendserve_sgl.sim.cache import RadixCache
from blendserve_sgl.sim.engine import Engine, EngineConfig
from blendserve_sgl.sim.policies import Picker, SGLangDFSWeight, SGLangLPM, make_picker, reference_tree
from blendserve_sgl.sim.request import SimRequest, from_records, from_tokens
from blendserve_sgl.workloads import Record
from blendserve_sgl.core.pacing import weight_read_seconds as weight_seconds

from test_sim_engine import token_work

COST = CostModel.from_names("llama-3.1-8b", "a100")
BIG = EngineConfig(kv_tokens=200_000, max_running=8, chunked_prefill=4096)


def record_picks(picker, into: list) -> None:
    """Wrap `picker.pick` so that the rids it admits are appended to `into`, in order."""
    inner = picker.pick

    def pick(view):
        out = inner(view)
        into.extend(p.req.rid for p in out)
        return out

    picker.pick = pick


def admissions(policy, work, config=BIG, **kw):
    reqs = from_tokens(work)
    picker = make_picker(policy, reqs, COST, **kw)
    order = []
    record_picks(picker, order)
    Engine(COST, config, picker, reqs).run(check=True)
    return order, reqs


def sglang_dfs_weight_order(root, nodes):
    """SGLang 0.5.23's `_dfs_weight_order` (mem_cache/base_prefix_cache.py), verbatim in logic."""
    last_node_to_indices = {}
    for index, node in enumerate(nodes):
        last_node_to_indices.setdefault(node, []).append(index)
    node_to_weight = {node: len(ix) for node, ix in last_node_to_indices.items()}
    stack = [(root, False)]
    while stack:
        node, visited = stack.pop()
        if visited:
            weight = node_to_weight.get(node, 0)
            for child in node.children.values():
                weight += node_to_weight.get(child, 0)
            node_to_weight[node] = weight
            continue
        stack.append((node, True))
        for child in reversed(list(node.children.values())):
            stack.append((child, False))
    order = []
    stack = [(root, False)]
    while stack:
        node, visited = stack.pop()
        if visited:
            order.extend(last_node_to_indices.get(node, ()))
            continue
        children = list(node.children.values())
        children.sort(key=lambda child: -node_to_weight.get(child, 0))
        stack.append((node, True))
        for child in reversed(children):
            stack.append((child, False))
    return order


def test_fcfs_dfs_and_balance_admit_in_their_orders():
    work = token_work(11, 90)
    fcfs, _ = admissions("fcfs", work)
    assert fcfs == list(work)
    dfs, reqs = admissions("dfs", work)
    assert dfs == dfs_order(reference_tree(reqs, COST))
    bal, _ = admissions("balance", work, seed=5)
    expect = list(work)
    random.Random(5).shuffle(expect)
    assert bal == expect


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dfs_weight_order_equals_sglangs_function(seed):
    """Same cache, same waiting queue (arrival order): the picker's order is what SGLang's
    `_dfs_weight_order` returns over each request's matched cache node."""
    rng = random.Random(seed)
    work = token_work(seed, 60)
    reqs = from_tokens(work)
    cache = RadixCache()
    for r in rng.sample(reqs, 25):  # publish some prompts, partly
        cache.insert(r.prompt_keys[:rng.randint(1, len(r.prompt_keys))])
    waiting = [r for r in reqs if rng.random() < 0.6]
    picker = SGLangDFSWeight(waiting)

    class View:
        pass

    view = View()
    view.cache = cache
    got = [r.rid for r in picker.ordered(view)]
    nodes = [cache.match(r.fill_keys)[0] for r in waiting]
    expect = [waiting[i].rid for i in sglang_dfs_weight_order(cache.root, nodes)]
    assert got == expect


class PlainDFSWeight(Picker):
    """The dfs-weight picker written plainly, as it ran before its match round was indexed: every
    class re-matched in creation order whenever the cache or the classes changed, the order
    rebuilt from all waiting requests by SGLang's own function. The indexed picker must make the
    same picks and leave the cache in the same state, step for step."""

    name = "plain-dfs-weight"

    def __init__(self, order):
        self.classes, self.anchors, self.version, self.n = {}, {}, -1, 0
        for r in order:
            self.add(r)

    def add(self, req):
        key = SGLangDFSWeight._key(req)
        if key not in self.classes:
            self.classes[key] = []
            self.version = -1
        self.classes[key].append(req)
        self.n += 1

    def __len__(self):
        return self.n

    def pick(self, view):
        cache = view.cache
        if self.version != cache.version:
            for key in self.classes:
                a = self.anchors.get(key)
                self.anchors[key] = cache.match_from(key, a if a is not None and a[0].alive else (cache.root, 0, 0))
            self.version = cache.version

        def order():
            waiting = sorted((r for q in self.classes.values() for r in q), key=lambda r: r.seq)
            nodes = [self.anchors[SGLangDFSWeight._key(r)][0] for r in waiting]
            for i in sglang_dfs_weight_order(cache.root, nodes):
                yield waiting[i]

        picks = sglang_admit(view, order())
        for p in picks:
            key = SGLangDFSWeight._key(p.req)
            self.classes[key].remove(p.req)
            if not self.classes[key]:
                del self.classes[key], self.anchors[key]
                self.version = -1
            self.n -= 1
        return picks


def cache_state(cache):
    """Every node, depth first in child order (key, length, last use, locks, creation order), and
    the clock: all that evictions and SGLang's order read from the cache."""
    out, stack = [cache.clock], [cache.root]
    while stack:
        n = stack.pop()
        out.append((n.key, n.length, n.last_access, n.lock_ref, n.order))
        stack.extend(reversed(list(n.children.values())))
    return out


def random_run(seed):
    """Requests, late arrivals by step and an engine config for one random run: token prompts
    (shared system prompts and subjects) or Mooncake-like block chains that branch, lengths known
    or not (then retractions re-queue requests with their output), a pool small enough to evict."""
    rng = random.Random(seed)
    known = rng.random() < 0.5
    out = (1, rng.choice([10, 60])) if known else (30, 60)
    limit = None if known else 60  # max_tokens near the outputs: SGLang's reservation falls short, it retracts
    if rng.random() < 0.5:
        reqs = from_tokens(token_work(seed, rng.randint(20, 90), out=out), known, limit)
    else:
        chains, records = [[]], []
        for i in range(rng.randint(20, 90)):
            chain = rng.choice(chains) + [f"b{seed}-{i}-{k}" for k in range(rng.randint(0, 3))]
            chains.append(chain)
            prefix = tuple((b, 16) for b in chain)
            records.append(Record(f"m{i}", 16 * len(chain) + rng.randint(1, 30), prefix, rng.randint(*out)))
        reqs = from_records(records, known, limit)
    need = max(r.prompt_len + r.max_new_tokens for r in reqs)
    late = {r.rid: rng.randint(1, 40) for r in reqs if rng.random() < 0.2}
    config = EngineConfig(kv_tokens=int(need * rng.uniform(1.05, 2)), max_running=rng.choice([2, 4, 16]),
                          chunked_prefill=rng.choice([16, 64, 512]), mixed_chunk=rng.random() < 0.5)
    return reqs, late, config


def run_steps(picker_class, seed):
    """One random run (`random_run`) with a picker: per step the admitted rids and the cache state."""
    reqs, late, config = random_run(seed)
    picker = picker_class([r for r in reqs if r.rid not in late])
    engine = Engine(COST, config, picker, [r for r in reqs if r.rid not in late])
    admitted, trail = [], []
    record_picks(picker, admitted)
    while engine.finished < len(reqs):
        assert engine.steps < 100_000, "the run does not end"
        for r in reqs:
            if late.get(r.rid) == engine.steps:
                engine.submit(r)
        engine.step()
        engine.check_step()
        trail.append((tuple(admitted), cache_state(engine.cache)))
        admitted.clear()
    engine.check_integrity()
    return trail, engine


def test_dfs_weight_matches_the_plain_picker_step_for_step():
    """The indexed match round and lazy order (SGLangDFSWeight) against the plain picker on random
    runs: the same admissions at every step, the same cache (every node's last use, the clock,
    splits), the same counters and series. The runs cover evictions, retractions and late
    arrivals."""
    seen = {"evicted": 0, "retracted": 0, "rejected": 0}
    for seed in range(40):
        plain, plain_engine = run_steps(PlainDFSWeight, seed)
        indexed, engine = run_steps(SGLangDFSWeight, seed)
        assert len(indexed) == len(plain), f"seed {seed}: {len(indexed)} steps, the plain picker {len(plain)}"
        for step, (a, b) in enumerate(zip(indexed, plain)):
            assert a == b, f"seed {seed}, step {step}: the indexed picker differs from the plain one"
        assert {f: getattr(engine.counters, f) for f in engine.counters.__slots__} == \
            {f: getattr(plain_engine.counters, f) for f in plain_engine.counters.__slots__}
        assert engine.series == plain_engine.series and engine.finish_order == plain_engine.finish_order
        seen["evicted"] += engine.counters.evicted_tokens > 0
        seen["retracted"] += engine.counters.retractions > 0
        seen["rejected"] += engine.counters.admit_rejections > 0
    assert seen["evicted"] >= 5 and seen["retracted"] >= 3, f"the random runs miss a case: {seen}"


def test_dfs_weight_orders_a_cache_thousands_of_nodes_deep():
    """A prompt published one chunk at a time leaves a chain of cache nodes, one per chunk; a
    request on the chain's 5,000-node prefix is ordered (first: its subtree, before the root's
    own request) without recursing through the chain (a RecursionError before)."""
    deep = SimRequest("deep", 0, prompt_len=8 * 5000 + 3, prefix=[(f"g{i}", 8) for i in range(5000)], output_len=1)
    chain = deep.class_key()
    cache = RadixCache()
    cache.insert(chain)
    for end in range(len(chain) - 1, 0, -1):  # split after every atom, the last first: a node per atom
        cache.match(chain[:end])
    other = SimRequest("other", 1, prompt_len=5, output_len=1)

    class View:
        pass

    view = View()
    view.cache = cache
    picker = SGLangDFSWeight([other, deep])
    assert [r.rid for r in picker.ordered(view)] == ["deep", "other"]
    node = picker._anchors[chain][0]
    depth = 0
    while node.parent is not None:
        depth, node = depth + 1, node.parent
    assert depth == 5000
    picker.check_integrity()


def test_dfs_weight_matches_per_cache_node_not_per_waiting_class():
    """A Mooncake-like queue: 2,000 requests, each its own class (a shared system block, then a
    block of its own), all hanging on the system block's node once it is cached. The literal
    round matched every class whenever the cache changed: matches grew with requests x steps
    (quadratic in the trace, 38 s for 4,000 Mooncake rows). The indexed round matches the
    newest class per node and the classes that move: a few matches per request."""
    rng = random.Random(3)
    records = [Record(f"r{i}", 1024 + rng.randint(1, 400), (("sys", 512), (f"own{i}", 512)), rng.randint(1, 20))
               for i in range(2000)]
    reqs = from_records(records)
    picker = SGLangDFSWeight(reqs)
    engine = Engine(COST, EngineConfig(kv_tokens=300_000, max_running=64, chunked_prefill=4096), picker, reqs)
    calls = {"picker": 0, "rounds": 0}
    match_from, pick = engine.cache.match_from, picker.pick

    def counted_pick(view):
        calls["rounds"] += picker._cache_version != view.cache.version
        engine.cache.match_from = lambda *a: (calls.__setitem__("picker", calls["picker"] + 1), match_from(*a))[1]
        try:
            return pick(view)
        finally:
            engine.cache.match_from = match_from

    picker.pick = counted_pick
    engine.run()
    assert engine.finished == 2000 and calls["rounds"] > 300  # the cache changed under a long queue many times
    assert calls["picker"] <= 3 * len(reqs), f"{calls['picker']:,} matches for {len(reqs):,} requests"


def test_lpm_sorts_small_queues_and_holds_back_in_batch_duplicates():
    """Queue [a, b, c, d]: b's prefix is cached (40 tokens), c shares a 50-token uncached prefix
    with a (held back: in-batch prefix caching), d shares nothing. Sorted: b, a, d, c. Above
    128 waiting requests lpm is FCFS and does not reorder."""
    shared, cached = list(range(1000, 1050)), list(range(2000, 2040))
    reqs = [SimRequest("a", 0, tokens=shared + [1], output_len=2), SimRequest("b", 1, tokens=cached + [2], output_len=2),
            SimRequest("c", 2, tokens=shared + [3], output_len=2), SimRequest("d", 3, tokens=[7, 8, 9], output_len=2)]
    cache = RadixCache()
    cache.insert(cached)

    class View:
        pass

    view = View()
    view.cache = cache
    lpm = SGLangLPM(reqs)
    lpm.reorder(view)
    assert [r.rid for r in lpm.queue] == ["b", "a", "d", "c"]
    many = [SimRequest(f"x{i}", i, tokens=[i + 5000, 1], output_len=1) for i in range(129)] + reqs
    lpm = SGLangLPM(many)
    lpm.reorder(view)
    assert [r.rid for r in lpm.queue] == [r.rid for r in many]


def test_sglang_rule_stops_at_the_first_request_that_does_not_fit():
    """rem = free + evictable - offset; a request fits when extend + min(max_new, clip) + 1 < rem
    (its own matched, unlocked prefix excluded); the first misfit ends admission."""
    reqs = [SimRequest(f"r{i}", i, tokens=[i * 100 + k for k in range(50)], output_len=30) for i in range(6)]

    class View:
        free_tokens, slots_left, prefill_left = 250, 10, 10_000
        cache = RadixCache()
        config = EngineConfig(kv_tokens=1000)

        def sglang_offset(self):
            return 20.0

        sglang_room = Engine.sglang_room  # free + evictable - offset, as the engine counts it

    picks = sglang_admit(View(), reqs)
    # each needs 50 + 30 + 1 = 81 of rem = 230: 230 -> 149 -> 68, the third (81 >= 68) stops
    assert [p.req.rid for p in picks] == ["r0", "r1"]
    view = View()
    view.prefill_left = 60  # the second one overflows the chunk: admitted truncated, then stop
    assert [p.req.rid for p in sglang_admit(view, reqs)] == ["r0", "r1"]
    view.prefill_left = 50
    assert [p.req.rid for p in sglang_admit(view, reqs)] == ["r0"]


def test_blend_drives_the_core_scanner():
    """Every blend admission is one the core DualScanner handed out, in the same order."""
    work = token_work(12, 120, long_share=0.2)
    reqs = from_tokens(work)
    picker = make_picker("blend", reqs, COST)
    assert isinstance(picker.scanner, DualScanner)
    handed = []
    inner = picker.scanner.schedule

    def schedule(budget):
        out = inner(budget)
        handed.extend(a.rid for a in out)
        return out

    picker.scanner.schedule = schedule
    rejected = []  # picks SGLang's walk refused (in the picker, as the plugin's queue) or the engine did
    back = picker.rejected

    def count_rejected(picks):
        rejected.extend(p.req.rid for p in picks)
        back(picks)

    picker.rejected = count_rejected
    eng = Engine(COST, EngineConfig(kv_tokens=6_000, max_running=32, chunked_prefill=256), picker, reqs)
    eng.run(check=True)
    assert sorted(eng.finish_order) == sorted(work)
    admitted = [r.rid for r in eng.requests for _ in range(r.admissions)]
    assert len(rejected) >= eng.counters.admit_rejections
    assert len(handed) == len(admitted) + len(rejected) and set(handed) == set(work)


def test_unknown_policy_names_the_choices():
    with pytest.raises(ValueError, match="unknown policy 'nope'; choose from fcfs, sglang-lpm"):
        make_picker("nope", [], COST)


def _blend_engine(work, kv_tokens, **cfg):
    reqs = from_tokens(work)
    picker = make_picker("blend", reqs, COST)
    config = EngineConfig(**{"kv_tokens": kv_tokens, "max_running": 64, "chunked_prefill": 256, **cfg})
    return Engine(COST, config, picker, reqs)


def test_kv_projection_never_promises_pages_the_engine_does_not_free():
    """The engine's KV projection is conservative: run copies of the engine forward with
    admissions stopped; over the next SAFETY x h + SLACK steps the engine's free + evictable
    pages never fall below horizon h's promise, nor ever below the pages promised for good."""
    import copy

    from blendserve_sgl.sim.engine import SAFETY, SLACK

    work = token_work(21, 160, out=(1, 30), long_share=0.4, long_out=(200, 900))
    eng = _blend_engine(work, 12_000, kv_projection=True)
    checked = lent = 0
    while eng.finished < len(eng.requests):
        eng.step()
        if eng.steps % 37 or not eng.n_dec:
            continue
        floor = eng.free_tokens + eng.cache.evictable_tokens - eng.reserved_left()
        forever, horizons = eng.kv_horizons(floor)
        assert forever >= floor
        lent += forever > floor or horizons[0][1] > forever
        fork = copy.deepcopy(eng)
        fork.picker.pick = lambda view: []
        free = [fork.free_tokens + fork.cache.evictable_tokens]
        while fork.n_dec or fork.prefilling:
            fork.step()
            free.append(fork.free_tokens + fork.cache.evictable_tokens)
        assert min(free) >= forever, (eng.steps, min(free), forever)
        for h, promised in horizons:
            end = SAFETY * h + SLACK
            assert min(free[:end + 1]) >= promised, (eng.steps, h)
        checked += 1
    assert checked >= 5 and lent >= 3 and eng.counters.retractions == 0, (checked, lent)


@pytest.mark.parametrize("known", [True, False])
def test_pacing_counts_decode_tokens_at_the_waiting_density(known):
    """Paced prefill is an engine feature: prefill + decode tokens per step = rho x the step's
    memory time (the weight read + the next round's KV read) / compute time per token (at least the
    weight-read ridge), rho the
    waiting requests' Comp / Mem from the engine's incremental sums: exact remaining lengths
    when known, else the one estimate every picker gets (before any finish: the clipped
    max_new_tokens); the same for every policy."""
    from blendserve_sgl.core.cost import compute_tokens, memory_units

    work = token_work(2, 40, long_share=0.3)
    chunks = {}
    for policy in ("fcfs", "blend"):
        reqs = from_tokens(work, known=known)
        config = EngineConfig(kv_tokens=40_000, max_running=64, chunked_prefill=100_000, pace=True)
        eng = Engine(COST, config, make_picker(policy, reqs, COST), reqs)
        est = lambda r: r.output_len if known else min(r.max_new_tokens, config.clip_max_new_tokens)  # noqa: E731
        rho = COST.density(sum(compute_tokens(r.prompt_len, est(r)) for r in reqs),
                           sum(memory_units(r.prompt_len, est(r)) for r in reqs))
        assert eng.waiting_density() == pytest.approx(rho)
        eng.sum_base, eng.n_dec = 2_000_000, 40  # the next round reads 2M KV tokens: far above the ridge
        attn = 2_000_000 * COST.kv_bytes_per_token / COST.hardware.effective_bandwidth
        memory = attn + weight_seconds(COST) + COST.hardware.step_overhead_s
        assert eng.chunk_size() == max(1, int(max(rho * memory, weight_seconds(COST)) / COST.seconds_per_compute_token) - 40)
        chunks[policy] = eng.chunk_size()
    assert chunks["fcfs"] == chunks["blend"]


def test_oracle_pacing_paces_unknown_lengths_at_their_true_density():
    """pace_density="true" (an ablation): requests of unknown length are paced as if their true
    remaining lengths were known, so the chunk equals the known-length run's; the default
    estimate differs from it here (before any finish: the clipped max_new_tokens)."""
    work = token_work(2, 40, long_share=0.3)
    sizes = {}
    for name, known, density in (("known", True, "estimate"), ("oracle", False, "true"), ("estimate", False, "estimate")):
        reqs = from_tokens(work, known=known, max_tokens=5000)
        config = EngineConfig(kv_tokens=400_000, max_running=64, chunked_prefill=100_000, pace=True,
                              pace_density=density)
        eng = Engine(COST, config, make_picker("fcfs", reqs, COST), reqs)
        eng.sum_base, eng.n_dec = 2_000_000, 40
        sizes[name] = (eng.waiting_density(), eng.chunk_size())
    assert sizes["oracle"] == pytest.approx(sizes["known"]) and sizes["estimate"][0] != pytest.approx(sizes["known"][0])
    with pytest.raises(ValueError, match="pace_density"):
        EngineConfig(kv_tokens=10, pace_density="tree")


@pytest.mark.parametrize("known", [True, False])
def test_waiting_work_sums_follow_admissions_and_retractions(known):
    """The incremental waiting sums (`core.pacing.WaitingWork`) equal a recount over the waiting
    and finished requests after every step of a run with retractions."""
    from blendserve_sgl.core.cost import compute_tokens, memory_units

    reqs = from_tokens(token_work(8, 60, out=(150, 250)), known=known)
    clip = 30
    eng = Engine(COST, EngineConfig(kv_tokens=3_000, max_running=64, chunked_prefill=256, clip_max_new_tokens=clip,
                                    pace=True), make_picker("fcfs", reqs, COST), reqs)
    while eng.finished < len(reqs):
        eng.step()
        waiting = [r for r in reqs if r.state == "waiting"]
        done = [r for r in reqs if r.state == "finished"]
        w = eng.work
        if known:
            assert w.known_comp == sum(compute_tokens(r.fill_len, r.output_len - r.gen) for r in waiting)
            assert w.known_mem == sum(memory_units(r.fill_len, r.output_len - r.gen) for r in waiting)
            assert w.n == w.fill == w.cap == 0
        else:
            assert w.known_comp == w.known_mem == 0
            assert (w.n, w.fill) == (len(waiting), sum(r.fill_len for r in waiting))
            assert w.cap == sum(min(max(r.max_new_tokens - r.gen, 1), clip) for r in waiting)
        assert (w.done, w.done_out) == (len(done), sum(r.gen for r in done))
    assert eng.counters.retractions > 0


def test_waiting_work_spread_counts_each_finished_output_not_their_mean():
    """`WaitingWork(spread=True)` (`pace_density="spread"`, an ablation): the waiting requests'
    memory is its expectation when each one's output is drawn from the finished outputs, a brute
    force over every waiting request and every finished output; without it, the memory at the mean."""
    from blendserve_sgl.core.cost import memory_units
    from blendserve_sgl.core.pacing import WaitingWork

    fills, outs = [40, 7, 300], [2, 10, 10, 500]
    for spread in (True, False):
        w = WaitingWork(64, spread=spread)
        for f in fills:
            w.wait(f, 100)
        for d in outs:
            w.finished(d)
        m = sum(outs) / len(outs)
        if spread:
            mem = sum(memory_units(f, d) for f in fills for d in outs) / len(outs)
        else:
            mem = sum(memory_units(f, m) for f in fills)
        assert w.density(COST) == pytest.approx(COST.density(sum(fills) + len(fills) * m, mem), rel=1e-12)
    w = WaitingWork(64, spread=True)  # before any finish: the capped max_new_tokens, no spread to count
    w.wait(40, 100)
    assert w.density(COST) == pytest.approx(COST.density(40 + 64, memory_units(40, 64)), rel=1e-12)
    chunks = {}
    for density in ("estimate", "spread"):
        reqs = from_tokens(token_work(8, 60, out=(1, 400)), known=False)
        eng = Engine(COST, EngineConfig(kv_tokens=30_000, max_running=64, chunked_prefill=4096, pace=True,
                                        pace_density=density), make_picker("fcfs", reqs, COST), reqs)
        sizes = []
        while eng.finished < 8:
            sizes.append(eng.chunk_size())
            eng.step()
        chunks[density] = sizes
    assert chunks["spread"] != chunks["estimate"]  # the switch reaches the engine's paced chunk


def test_blend_keeps_the_kv_pool_fuller_than_with_reservations_alone():
    """Blend on an engine with the KV projection, told the step count, holds more KV in use,
    needs fewer steps (each step reads the weights once) and gets closer to the optimum than the
    same scanner on plain free-minus-reservations budgets; lengths are known, so it never
    retracts."""
    import random

    from blendserve_sgl.sim import ExecModel, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import Record

    rng = random.Random(0)
    records = []
    for i in range(3000):
        u = rng.random()
        if u < 0.5:  # memory-dense: short prompt, long output
            records.append(Record(f"m{i}", 64 + rng.randint(20, 200), (("sys:m", 64),), rng.randint(500, 1500), "m"))
        elif u < 0.8:  # MMLU-like: shared 5-shot prefix, 1-2 output tokens
            records.append(Record(f"q{i}", 664 + rng.randint(20, 100), (("sys:q", 64), (f"s{rng.randrange(8)}", 600)),
                                  rng.randint(1, 2), "q"))
        else:  # compute-dense: long prompt, short output
            records.append(Record(f"c{i}", 64 + rng.randint(500, 3000), (("sys:c", 64),), rng.randint(2, 40), "c"))
    wl = Workload(records, COST)
    config = EngineConfig.for_cost(COST, kv_gb=6, max_running=256, chunked_prefill=1024, pace=True)
    model = ExecModel("overlapped", 0.1)
    full = simulate(wl, "blend", RunSpec(COST, replace(config, kv_projection=True), known_lengths=True))
    plain = simulate(wl, "blend", RunSpec(COST, config, known_lengths=True, preset=PRESET.replace(metering=False)))
    assert full.retractions == plain.retractions == 0
    assert full.mean_kv >= plain.mean_kv + 0.08, (full.mean_kv, plain.mean_kv)
    assert full.steps <= 0.9 * plain.steps
    assert full.fraction_of_optimal(model) >= 1.15 * plain.fraction_of_optimal(model)


def test_kv_projection_adds_nothing_for_sglang_admission_without_known_lengths():
    """With estimated lengths no running request has a known end: the projection holds SGLang's
    own reservations, so SGLang's rule admits exactly as without it; with known lengths it lends
    pages that running requests will release (more admitted early, fewer steps)."""
    work = token_work(8, 80, out=(150, 250))
    runs = {}
    for known in (False, True):
        for proj in (False, True):
            reqs = from_tokens(work, known=known)
            config = EngineConfig(kv_tokens=6_000, max_running=64, chunked_prefill=256, kv_projection=proj)
            runs[known, proj] = Engine(COST, config, make_picker("fcfs", reqs, COST), reqs).run(check=True)
    assert runs[False, True].series == runs[False, False].series
    assert runs[True, True].steps < runs[True, False].steps
