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
from blendserve_sgl.sim.policies import SGLangDFSWeight, SGLangLPM, make_picker, reference_tree
from blendserve_sgl.sim.request import SimRequest, from_tokens
from blendserve_sgl.core.pacing import weight_read_seconds as weight_seconds

from test_sim_engine import token_work

COST = CostModel.from_names("llama-3.1-8b", "a100")
BIG = EngineConfig(kv_tokens=200_000, max_running=8, chunked_prefill=4096)


def admissions(policy, work, config=BIG, **kw):
    reqs = from_tokens(work)
    picker = make_picker(policy, reqs, COST, **kw)
    order = []
    inner = picker.pick

    def pick(view):
        out = inner(view)
        order.extend(p.req.rid for p in out)
        return out

    picker.pick = pick
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
