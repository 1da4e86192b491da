"""The dual scanner: hands out every request exactly once, deterministically, within budgets,
keeps prefix sharing close to DFS, and keeps the batch near the workload's density."""

import collections
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blendserve_sgl.core.scanner as scanner_mod
from blendserve_sgl.core import Budget, DualScanner, OutputLengthEstimator, ScanConfig
from blendserve_sgl.core.scanner import LEFT, RIGHT, SAMPLE
from blendserve_sgl.sim.request import SimRequest

from _helpers import (COST, build_length_tree, length_records, mixed_workload,
                      run_batch_densities, sim_engine, token_records, token_workload, windowed_means)

SMALL = dict(compute_prompt=(200, 800), memory_output=(100, 400))  # short runs for per-step checks


def _small(n=240, seed=0):
    return mixed_workload(n, seed, **SMALL)


def _recording(picker):
    """Wrap picker.schedule to keep (budget, admissions) of every step."""
    log = []
    inner = picker.schedule

    def schedule(budget):
        out = inner(budget)
        log.append((budget, list(out)))
        return out

    picker.schedule = schedule
    return log


# ---------------------------------------------------------------- exactly once
@pytest.mark.parametrize("known,lend", [(True, False), (False, False), (True, True), (False, True)])
def test_run_hands_out_every_request_once(known, lend):
    """Over a full simulated run every request is admitted exactly once and finishes; the scanner's
    invariants hold after every step (check=True); budgets are never exceeded."""
    wl = _small()
    true = {rid: d for rid, _, _, d in wl}
    est = OutputLengthEstimator(sample_fraction=0.05, seed=1)
    engine = sim_engine(length_records(wl), known=known, estimator=est, kv_bytes=20e9, max_running=32, chunk=512,
                        scan=ScanConfig(lend_idle_share=lend))
    sc = engine.picker.scanner
    log = _recording(sc)
    engine.run(check=True)
    assert engine.counters.retractions == 0 and engine.counters.admit_rejections == 0
    assert sorted(r.rid for r in engine.requests if r.admissions == 1) == sorted(true)
    assert len(sc.tree) == 0 and not sc.running and sc.handed_out == len(true)
    assert sc.used[LEFT] == pytest.approx(0, abs=1) and sc.used[RIGHT] == pytest.approx(0, abs=1)
    assert engine.counters.output_tokens == sum(true.values())
    sides = [a.side for _, adm in log for a in adm]
    assert LEFT in sides and RIGHT in sides
    assert (SAMPLE in sides) == (not known)
    if not known:  # the sample comes first
        n_sample = sc.sample_size
        assert n_sample == math.ceil(0.05 * len(wl)) and set(sides[:n_sample]) == {SAMPLE}
    _assert_budgets(log, known)


def _assert_budgets(log, known):
    """Budgets hold; each admission reserves its uncached prompt and its output, an estimated
    one times the engine's new-token ratio (the simulator passes it, as the plugin passes SGLang's)."""
    bpt = COST.kv_bytes_per_token
    for budget, adm in log:
        assert len(adm) <= max(0, budget.slots)
        assert sum(a.kv_bytes for a in adm) <= budget.kv_bytes * (1 + 1e-12) + 1e-6
        ratio = 1.0 if known else budget.output_ratio
        assert 0 < ratio <= 1
        for a in adm:
            assert 0 <= a.cached_tokens < a.prompt_len
            assert a.kv_bytes == (a.prompt_len - a.cached_tokens + math.ceil(ratio * a.output_len)) * bpt  # whole tokens


def test_budgets_respected_under_pressure():
    """Tight slots, KV memory and prefill: no step admits more requests than free slots, or more
    KV bytes than free memory; a step without prefill budget admits nothing."""
    wl = _small(200, seed=5)
    engine = sim_engine(length_records(wl), kv_bytes=1e9, max_running=6, chunk=300)
    log = _recording(engine.picker.scanner)
    engine.run(check=True)
    _assert_budgets(log, known=True)
    assert any(len(adm) == b.slots and b.slots > 0 for b, adm in log)  # the slot limit was reached
    assert all(not adm for b, adm in log if b.prefill_tokens <= 0 or b.slots <= 0)
    sc2 = DualScanner(build_length_tree(wl))
    assert sc2.schedule(Budget(kv_bytes=1e12, slots=0, prefill_tokens=1000)) == []
    assert sc2.schedule(Budget(kv_bytes=0.0, slots=10, prefill_tokens=1000)) == []
    assert sc2.schedule(Budget(kv_bytes=1e12, slots=10, prefill_tokens=0)) == []
    assert sc2.handed_out == 0 and len(sc2.tree) == len(wl)


def test_own_loop_with_arrivals_mid_run():
    """Requests added to the tree after prepare (while sampling and after planning; new and
    existing prefixes; known and unknown lengths) are still handed out exactly once."""
    wl = _small(150, seed=2)
    est = OutputLengthEstimator(sample_fraction=0.05, seed=0)
    outputs = {rid: d for rid, _, _, d in wl}
    rng = random.Random(7)
    arrivals = {}
    for step in (0, 1, 3, 10, 40, 200, 201):
        batch = []
        for j in range(5):
            rid = f"late{step}_{j}"
            group = rng.choice([[("sysc", 40)], [("sysv", 40)], [("new", 30)], [("sys", 50), ("subj1", 600)]])
            p = sum(n for _, n in group) + rng.randint(1, 300)
            d = rng.randint(1, 300)
            outputs[rid] = d
            kwargs = dict(prompt_len=p, prefix=group)
            if j % 2:
                kwargs["output_len"] = d
            batch.append((rid, kwargs))
        arrivals[step] = batch
    engine = sim_engine(length_records(wl), known=False, estimator=est, kv_bytes=20e9, max_running=24, chunk=512)
    sc, tree = engine.picker.scanner, engine.picker.tree
    sc.prepare()
    log = _recording(sc)
    cancelled = collections.Counter()
    cancel = sc.cancel
    sc.cancel = lambda rid: (cancelled.update([rid]), cancel(rid))[1]
    step = 0
    while engine.finished < len(engine.requests) or arrivals:
        for rid, kwargs in arrivals.pop(step, []):
            known = "output_len" in kwargs
            engine.submit(SimRequest(rid, len(engine.requests), prompt_len=kwargs["prompt_len"], prefix=kwargs["prefix"],
                                     output_len=outputs[rid], max_new_tokens=None if known else 4 * outputs[rid],
                                     ignore_eos=known))
        engine.step()
        engine.check_integrity()
        step += 1
    assert engine.counters.retractions == 0 and engine.counters.admit_rejections == 0
    # SGLang's rule may refuse part of a plan (the picker cancels it back into the tree): net of
    # those, every request is handed out exactly once
    handed = collections.Counter(a.rid for _, adm in log for a in adm)
    handed.subtract(cancelled)
    assert set(handed.values()) == {1} and set(handed) == set(outputs)
    assert len(tree) == 0 and not sc.running


def test_retracted_request_comes_back_once():
    """A retracted request's memory is released; re-added to the tree it is handed out again,
    and every request is handed out (once more for the retracted one)."""
    wl = _small(40, seed=3)
    recs = {rid: (groups, p) for rid, groups, p, _ in wl}
    tree = build_length_tree(wl)
    sc = DualScanner(tree)
    budget = Budget(kv_bytes=5e9, slots=8, prefill_tokens=4096)
    adm = sc.schedule(budget)
    a = adm[0]
    used = sc.used[LEFT] + sc.used[RIGHT]
    req = sc.retracted(a.rid)
    assert req.rid == a.rid and a.rid not in sc.running
    assert sc.used[LEFT] + sc.used[RIGHT] == pytest.approx(used - a.kv_bytes)
    sc.check_integrity()
    groups, p = recs[a.rid]
    tree.add(a.rid, prompt_len=p, prefix=groups, output_len=req.output_len)
    sc.check_integrity()
    seen = [x.rid for x in adm]
    for _ in range(500):
        for r in list(sc.running):
            sc.finished(r, 1)
        seen += [x.rid for x in sc.schedule(budget)]
        sc.check_integrity()
        if not len(tree):
            break
    assert sorted(seen) == sorted(list(recs) + [a.rid])


# ---------------------------------------------------------------- determinism
@pytest.mark.parametrize("known", [True, False])
def test_deterministic(known):
    """Two scanners built from the same inputs make identical admissions, step by step."""
    wl = _small(200, seed=4)
    runs = []
    for _ in range(2):
        est = OutputLengthEstimator(sample_fraction=0.05, seed=9)
        engine = sim_engine(length_records(wl), known=known, estimator=est, kv_bytes=2e9, max_running=32, chunk=512)
        log = _recording(engine.picker.scanner)
        engine.run()
        runs.append([tuple(adm) for _, adm in log])
    assert runs[0] == runs[1]


# ---------------------------------------------------------------- prefix sharing
@pytest.mark.parametrize("seed", range(8))
def test_sharing_close_to_dfs(seed):
    """On random token workloads the scanner keeps >= 97% of the prefix hits of pure DFS order,
    both run by the simulator (SGLang's radix cache, 32 running requests, a KV pool that evicts;
    siblings of an uncached prefix of >= 32 tokens wait a step, as in the plugin and SGLang)."""
    n = random.Random(seed).randint(60, 200)
    records = token_records(token_workload(seed, n))
    hits = {}
    for policy in ("blend", "dfs"):
        engine = sim_engine(records, policy, kv_bytes=4e9, max_running=32, chunk=512,
                            scan=ScanConfig(hold_prefix_tokens=32))
        engine.run(check=True)
        hits[policy] = engine.counters.first_hit_tokens
    assert hits["dfs"] > 0 and hits["blend"] >= 0.97 * hits["dfs"], hits


# ---------------------------------------------------------------- batch density
def _density_errors(wl, picker_kind, kv_bytes, window=200):
    ref = build_length_tree(wl)
    root = ref.density(ref.root)
    engine = sim_engine(length_records(wl), "blend" if picker_kind == "scan" else "dfs", kv_bytes=kv_bytes,
                        max_running=256, chunk=256)
    means = windowed_means(run_batch_densities(engine), window)
    assert all(r.state == "finished" for r in engine.requests)
    return statistics.median(abs(math.log(m / root)) for m in means)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_density_tracks_root_balanced_mix(seed):
    """70% compute-dense / 30% memory-dense, both sides' requests small against their memory
    shares: the scanner's windowed batch density stays much closer to rho(root) than DFS's."""
    wl = mixed_workload(1500, seed, fractions=(0.0, 0.7), compute_prompt=(500, 1500), memory_output=(1000, 3000))
    scan, dfs = _density_errors(wl, "scan", 20e9), _density_errors(wl, "dfs", 20e9)
    assert scan < 0.5 * dfs, (scan, dfs)


def test_batch_density_tracks_root_mixed_workload():
    """The brief's workload (30% MMLU-like, 45% compute-dense, 25% memory-dense; llama-3.1-8b on
    A100, 20 GB KV, 256 slots, 256 prefill tokens): over 200-step windows the scanner's batch
    density must be clearly closer to rho(root) than DFS order's, for each of three seeds."""
    for seed in (0, 1, 2):
        wl = mixed_workload(1500, seed)
        scan, dfs = _density_errors(wl, "scan", 20e9), _density_errors(wl, "dfs", 20e9)
        assert scan < 0.75 * dfs, (seed, scan, dfs)


def test_left_side_holds_its_share_on_average(monkeypatch):
    """While compute-dense requests are still waiting and the left share M_L is the small one (below
    half the memory; its requests are larger than it), the left side's held KV averages at least
    half of M_L: shares hold on average over time, the small side does not starve."""
    wl = mixed_workload(1500, 0)
    compute = {rid for rid, groups, _, _ in wl if groups[0][0] == "sysc"}
    engine = sim_engine(length_records(wl), kv_bytes=20e9, max_running=256, chunk=256)
    sc, tree = engine.picker.scanner, engine.picker.tree
    shares, held = [], []
    inner_split = scanner_mod.split_memory
    last = {}

    def split_memory(total, rl, rr, r0):
        last["share"] = inner_split(total, rl, rr, r0)
        return last["share"]

    monkeypatch.setattr(scanner_mod, "split_memory", split_memory)
    inner = sc.schedule

    def schedule(budget):
        out = inner(budget)
        if "share" in last and last["share"] < 0.5 * 20e9 and any(rid in tree.reqs for rid in compute):
            shares.append(last["share"])
            held.append(sc.used[LEFT])
        return out

    sc.schedule = schedule
    engine.run()
    assert len(held) > 1000
    assert statistics.mean(held) >= 0.5 * statistics.mean(shares), (statistics.mean(held), statistics.mean(shares))


def test_scan_config_validation():
    """ScanConfig rejects out-of-range settings."""
    for kwargs in (dict(keep_sharing=1.5), dict(density_window=0), dict(sample_quorum=0.0),
                   dict(reserve_output_ratio=2.0), dict(credit_steps=0), dict(thin_batch_share=1.5),
                   dict(thin_batch_share=-0.1), dict(thin_batch_share=math.nan), dict(hold_prefix_tokens=-1),
                   dict(max_split_rounds=-1), dict(max_split_rounds=2.5), dict(replan_growth=math.nan)):
        name = next(iter(kwargs))
        with pytest.raises(ValueError, match=name):
            ScanConfig(**kwargs)
    ScanConfig(thin_batch_share=1.0, hold_prefix_tokens=0, max_split_rounds=0)


def test_hold_prefix_tokens_waits_for_a_shared_prefix_to_be_cached():
    """With hold_prefix_tokens, siblings of an uncached shared prefix are not admitted in the step
    that computes it (one per side), and all of them are admitted in the next step."""
    from blendserve_sgl.core import Budget, CostModel, DualScanner, ResourceTree, ScanConfig

    cost = CostModel.from_names("llama-3.1-8b", "a100")

    def build():
        tree = ResourceTree(cost)
        shared = list(range(1000, 1040))
        for i in range(10):
            tree.add(f"r{i}", tokens=shared + [i, i + 1, i + 2], output_len=8)
        return tree

    budget = Budget(kv_bytes=1e12, slots=100, prefill_tokens=100_000)
    held = DualScanner(build(), ScanConfig(hold_prefix_tokens=32))
    first = held.schedule(budget)
    assert 1 <= len(first) <= 2, first  # one per side at most: the prefix is not cached yet
    second = held.schedule(budget)
    assert len(first) + len(second) == 10 and all(a.cached_tokens >= 40 for a in second)
    plain = DualScanner(build(), ScanConfig())
    assert len(plain.schedule(budget)) == 10


# ---------------------------------------------------------------- horizons, metering, prefill caps
def _tree(records):
    from blendserve_sgl.core import ResourceTree

    tree = ResourceTree(COST)
    for rid, prefix, p, d in records:
        tree.add(rid, prompt_len=p, prefix=prefix, output_len=d)
    return tree


def test_kv_horizons_let_short_lived_requests_use_memory_reserved_for_later():
    """kv_bytes (free for good) is below a short request's need; a horizon covering its lifetime
    (prefill steps + output tokens) lets it in, one that is too short does not, and a long request
    never uses horizon memory. Each admission takes its bytes from every horizon."""
    bpt = COST.kv_bytes_per_token
    short = [("a", [("s", 10)], 3000, 2), ("b", [("t", 10)], 3000, 2)]  # lifetime 1 + 2 steps each
    big = 4000 * bpt

    def admitted(records, horizons, kv=1000 * bpt):
        sc = DualScanner(_tree(records))
        return [a.rid for a in sc.schedule(Budget(kv, 8, 4096, kv_horizons=horizons))]

    assert admitted(short[:1], ()) == []
    assert admitted(short[:1], ((2, big),)) == []  # lifetime 3 > 2: the horizon does not cover it
    assert admitted(short[:1], ((4, big),)) == ["a"]
    assert admitted(short[:1], ((2, 0.0), (4, big))) == ["a"]  # the shortest covering horizon counts
    assert len(admitted(short, ((4, big),))) == 1  # the first took 3000 of the 4000
    assert len(admitted(short, ((4, 2 * big),))) == 2
    assert admitted([("m", [("v", 10)], 100, 5000)], ((4, 10 ** 6 * bpt), (64, 10 ** 6 * bpt))) == []


def test_metered_sides_admit_memory_work_at_their_share_rate():
    """With steps and the pool size, a side admits memory work (KV byte-steps of decoding) at the
    rate of its share: identical memory-dense requests enter staggered, one every
    work / (share x pool) steps, instead of all in the first step; credit is banked for at most
    `credit_steps` steps and refunded by cancel."""
    from blendserve_sgl.core.cost import memory_units

    bpt = COST.kv_bytes_per_token
    records = [(f"m{i}", [("v", 40)], 100, 4000) for i in range(200)]
    pool = 40_000 * bpt
    work = bpt * memory_units(100, 4000) / 2
    unmetered = DualScanner(_tree(records))
    assert len(unmetered.schedule(Budget(1e15, 1000, 10 ** 6))) == 200  # everything at once
    sc = DualScanner(_tree(records), ScanConfig(credit_steps=64))
    per_step = [len(sc.schedule(Budget(1e15, 1000, 10 ** 6, steps=1, kv_pool=pool))) for _ in range(2000)]
    sc.check_integrity()
    # the two sides' rates add up to the pool: after s steps about s x pool / work requests ran
    expected = 2000 * pool / work
    assert abs(sum(per_step) - expected) <= 2, (sum(per_step), expected)
    assert max(per_step) <= 2  # one per side at most: a side waits until its credit is back above 0
    # banked credit: 500 steps without an admission (no slot) buy at most credit_steps x rate
    sc2 = DualScanner(_tree(records), ScanConfig(credit_steps=64))
    assert sc2.schedule(Budget(1e15, 0, 10 ** 6, steps=500, kv_pool=pool)) == []
    assert sc2.sides[RIGHT].credit + sc2.sides[LEFT].credit <= 64 * pool * (1 + 1e-9)
    adm = sc2.schedule(Budget(1e15, 1000, 10 ** 6, steps=1, kv_pool=pool))
    assert 1 <= len(adm) <= 2
    before = sc2.sides[adm[0].side].credit
    sc2.cancel(adm[0].rid)
    assert sc2.sides[adm[0].side].credit == pytest.approx(before + work)


def test_the_first_metered_step_banks_the_full_credit():
    """A side starts with `credit_steps` steps of its rate banked (an engine that ran nothing before
    has been idle), so the empty pool fills in the first step, within that bank; from then on
    memory work enters at the share rate."""
    from blendserve_sgl.core.cost import memory_units

    bpt = COST.kv_bytes_per_token
    records = [(f"m{i}", [("v", 40)], 100, 100) for i in range(400)]
    pool = 40_000 * bpt
    work = bpt * memory_units(100, 100) / 2
    first = {}
    for steps in (1, 64):
        sc = DualScanner(_tree(records), ScanConfig(credit_steps=steps))
        out = sc.schedule(Budget(1e15, 1000, 10 ** 6, steps=0, kv_pool=pool))
        first[steps] = len(out)
        assert len(out) * work <= steps * pool + 2 * work
        if steps == 64:
            assert len(sc.schedule(Budget(1e15, 1000, 10 ** 6, steps=1, kv_pool=pool))) <= pool / work + 2
        sc.check_integrity()
    assert first[1] <= pool / work + 2 < 64 * pool / work - 2 <= first[64], first


def test_free_pool_credit_earns_memory_work_for_the_unused_pool():
    """ScanConfig.free_pool_credit: on top of the rate (its share of the pool per step), a side earns
    that many times its share of the KV free for admission, so a step with the whole pool free
    starts twice the memory work at 1.0; the first step (the full bank) is the same either way."""
    from blendserve_sgl.core.cost import memory_units

    bpt = COST.kv_bytes_per_token
    records = [(f"m{i}", [(f"v{i % 7}", 10)], 10, 10) for i in range(3000)]
    pool = 40_000 * bpt
    work = bpt * memory_units(10, 10) / 2  # 267 such requests' memory work a step fill the pool
    first, second = {}, {}
    for extra in (0.0, 1.0):
        sc = DualScanner(_tree(records), ScanConfig(credit_steps=4, free_pool_credit=extra))
        first[extra] = len(sc.schedule(Budget(1e15, 10_000, 10 ** 7, steps=0, kv_pool=pool)))  # the bank
        second[extra] = len(sc.schedule(Budget(pool, 10_000, 10 ** 7, steps=1, kv_pool=pool)))
        sc.check_integrity()
    assert first[0.0] == first[1.0] >= 4 * pool / work - 2
    assert pool / work - 20 <= second[0.0] <= pool / work + 2, second
    assert abs(second[1.0] - 2 * second[0.0]) <= 8, second
    with pytest.raises(ValueError, match="free_pool_credit must be 0 or more"):
        ScanConfig(free_pool_credit=-1.0)


def test_a_long_prompt_pays_prefill_only_up_to_its_sides_cap():
    """A compute-dense prompt longer than the step's prefill budget is charged only its side's cap,
    so the memory-dense side still admits within its own cap in the same step; the memory-dense
    side's admissions come first (an engine that stops at the first chunked prompt takes them)."""
    records = [("c", [("sc", 40)], 6000, 2)] + [(f"m{i}", [("v", 40)], 60, 3000) for i in range(6)]
    sc = DualScanner(_tree(records))
    adm = sc.schedule(Budget(1e15, 64, 1000))
    sides = [a.side for a in adm]
    assert "c" in [a.rid for a in adm] and sides.count(RIGHT) >= 3, adm
    assert sides == sorted(sides, key=lambda s: s != RIGHT)  # right-side admissions first


def _one_group_tree(n=10, shared_len=40):
    from blendserve_sgl.core import CostModel, ResourceTree

    tree = ResourceTree(CostModel.from_names("llama-3.1-8b", "a100"))
    shared = list(range(1000, 1000 + shared_len))
    for i in range(n):
        tree.add(f"r{i}", tokens=shared + [i, i + 1, i + 2], output_len=8)
    return tree


def test_hold_survives_an_admission_the_engine_refused():
    """The request that would compute a shared prefix is planned and then refused by the engine
    (cancelled): its prefix is not cached, so the next step still takes one sibling per side, not
    all of them (the side's last taken node goes back to what was admitted)."""
    from blendserve_sgl.core import Budget, DualScanner, ScanConfig

    sc = DualScanner(_one_group_tree(), ScanConfig(hold_prefix_tokens=32))
    budget = Budget(kv_bytes=1e12, slots=100, prefill_tokens=100_000)
    first = sc.schedule(budget)
    assert 1 <= len(first) <= 2
    for a in first:  # the engine took none of them: they go back to the tree, as the plugin does
        sc.cancel(a.rid)
        i = int(a.rid[1:])
        sc.add(a.rid, tokens=list(range(1000, 1040)) + [i, i + 1, i + 2], output_len=8)
    again = sc.schedule(budget)
    assert 1 <= len(again) <= 2, again  # still uncached: one per side
    assert all(a.cached_tokens < 40 for a in again)
    rest = sc.schedule(budget)
    assert len(again) + len(rest) == 10 and all(a.cached_tokens >= 40 for a in rest)


def test_hold_waits_while_the_prefix_is_prefilled_in_chunks():
    """A request whose prompt is not cached yet (Budget.prefilling: prefill chunks left, or its
    result not processed by an overlapping scheduler) holds its siblings until it is cached."""
    from blendserve_sgl.core import Budget, DualScanner, ScanConfig

    sc = DualScanner(_one_group_tree(shared_len=400), ScanConfig(hold_prefix_tokens=32))
    first = sc.schedule(Budget(kv_bytes=1e12, slots=100, prefill_tokens=100))  # 403 > 100: chunked
    assert len(first) == 1
    chunked = first[0].rid
    for _ in range(3):  # the engine continues the chunked prompt: nothing of its group is planned
        assert sc.schedule(Budget(kv_bytes=1e12, slots=100, prefill_tokens=100_000, prefilling={chunked})) == []
    rest = sc.schedule(Budget(kv_bytes=1e12, slots=100, prefill_tokens=100_000))
    assert len(rest) == 9 and all(a.cached_tokens >= 400 for a in rest)


@pytest.mark.parametrize("fill", [False, True])
def test_fill_while_sampling_uses_the_budget_the_sample_leaves(fill):
    """With unknown lengths the sample goes first; with fill_while_sampling the rest of the step's
    budget is planned too (each request still handed out once), without it only the sample runs."""
    from blendserve_sgl.core import Budget, ScanConfig

    wl = _small()
    est = OutputLengthEstimator(sample_fraction=0.05, seed=1)
    sc = DualScanner(build_length_tree(wl, known=False, estimator=est), ScanConfig(fill_while_sampling=fill))
    first = sc.schedule(Budget(kv_bytes=3e9, slots=64, prefill_tokens=100_000))
    n_sample = sum(a.side == SAMPLE for a in first)
    assert n_sample == sc.sample_size > 0
    assert (len(first) > n_sample) == fill
    assert len({a.rid for a in first}) == len(first)
    sc.check_integrity()


# ---------------------------------------------------------------- final wave
def test_final_wave_admits_longest_output_first_once_everything_fits():
    """When every waiting request fits in the KV pool at once, the final wave admits them longest
    output first from pooled memory; the first that does not fit stops the wave (a smaller one
    would take the memory it waits for). While the waiting work exceeds the pool, the dual scan
    runs as before."""
    bpt = COST.kv_bytes_per_token
    outs = [5, 300, 40, 120, 7, 220, 60, 9]
    records = [(f"q{i}", [(f"g{i % 3}", 16)], 100 + 10 * i, d) for i, d in enumerate(outs)]
    need = sum(100 + 10 * i + d for i, d in enumerate(outs))  # no shared prefix is cached yet: an upper bound

    sc = DualScanner(_tree(records), ScanConfig(final_wave=True))
    got = [a.rid for a in sc.schedule(Budget(need * bpt, 64, 10 ** 6))]
    assert got == [f"q{i}" for i in sorted(range(len(outs)), key=lambda i: -outs[i])]
    assert sc.last_step["final_wave"] == 0

    # room for the two longest only: the wave stops at the third, even though shorter ones would fit
    sc = DualScanner(_tree(records), ScanConfig(final_wave=True))
    room = (100 + 10 * 1 + 300) + (100 + 10 * 5 + 220) + 20
    assert [a.rid for a in sc.schedule(Budget(room * bpt, 64, 10 ** 6, kv_pool=need * bpt))] == ["q1", "q5"]
    rest = sc.schedule(Budget(need * bpt, 64, 10 ** 6))  # memory freed: the wave goes on in order
    assert [a.rid for a in rest] == ["q3", "q6", "q2", "q7", "q4", "q0"]
    sc.check_integrity()

    # a pool smaller than the waiting work: no final wave (the dual scan takes both ends)
    sc = DualScanner(_tree(records), ScanConfig(final_wave=True))
    sc.schedule(Budget(room * bpt, 64, 10 ** 6, kv_pool=(need // 2) * bpt))
    assert "final_wave" not in sc.last_step


def test_final_wave_goes_past_a_held_request_and_keeps_ties_in_dfs_order():
    """Equal outputs in two prefix groups: the wave takes them in the tree's DFS order (a group's
    requests adjacent), the hold keeps a group's second request for the next step (its 64 shared
    tokens are not cached yet), and a held request does not stop the wave: one of each group now,
    the other two next step."""
    records = [(rid, [(rid[0], 64)], 100, 50) for rid in ("a1", "b1", "a2", "b2")]
    bpt = COST.kv_bytes_per_token
    sc = DualScanner(_tree(records), ScanConfig(final_wave=True, hold_prefix_tokens=32))
    sc.prepare()
    dfs = [r.rid for r in sc.tree.iter_requests()]
    assert {dfs[0][0], dfs[1][0]} == {dfs[0][0]} and dfs[2][0] != dfs[0][0]  # each group adjacent
    first = [a.rid for a in sc.schedule(Budget(10 ** 5 * bpt, 64, 10 ** 6))]
    assert first == [dfs[0], dfs[2]] and "final_wave" in sc.last_step
    assert [a.rid for a in sc.schedule(Budget(10 ** 5 * bpt, 64, 10 ** 6))] == [dfs[1], dfs[3]]
    sc.check_integrity()


def test_final_wave_changes_the_run_with_the_same_prefix_hits():
    """Replayed to completion, the final wave changes the run's steps (the tail of long requests
    one side left for last); every request once, the same prefix hits."""
    wl = mixed_workload(600, 0, **SMALL)
    runs = {}
    for fw in (False, True):
        runs[fw] = sim_engine(length_records(wl), scan=ScanConfig(final_wave=fw), kv_bytes=3e9, max_running=256,
                              chunk=2048).run(check=True)
        assert all(r.state == "finished" for r in runs[fw].requests)
    assert runs[True].steps != runs[False].steps
    assert runs[True].counters.first_hit_tokens == runs[False].counters.first_hit_tokens


# ---------------------------------------------------------------- liveness
@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10 ** 6), st.integers(1, 40), st.booleans(), st.booleans(), st.sampled_from([0, 32]),
       st.booleans(), st.booleans(), st.sampled_from([0.0, 0.1, 0.5]), st.integers(0, 5),
       st.floats(-1e13, 1e13), st.floats(-1e10, 1e10), st.integers(1, 40_000), st.integers(1, 8),
       st.integers(1, 4096), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.25, 1.0]),
       st.sampled_from([0.0, 1.0]))
def test_nothing_running_and_something_fits_means_an_admission(seed, n, known, metered, hold, fill, final_wave,
                                                                sample_fraction, warm_steps, credit, debt,
                                                                kv_tokens, slots, prefill, lend, settled, growth, thin,
                                                                free_credit):
    """Liveness: whatever the shares, memory-work credits, debts, holds, sample state and
    estimates, a scanner with nothing running admits at least one request when one fits the free
    KV (a slot and prefill tokens left); else an engine waiting on it would stop for good."""
    rng = random.Random(seed)
    records = [(i, [(f"g{rng.randrange(3)}", rng.choice([10, 40, 600]))], rng.randint(700, 20_000 if i % 7 else 120_000),
                rng.randint(1, 6000)) for i in range(n)]
    est = OutputLengthEstimator(sample_fraction=sample_fraction, seed=seed % 5, prior=rng.choice([1, 256, 4000]))
    sc = DualScanner(build_length_tree(records, known=known, estimator=est),
                     ScanConfig(hold_prefix_tokens=hold, fill_while_sampling=fill, final_wave=final_wave,
                                lend_idle_share=lend, fill_settled_only=settled, reserve_growth=growth,
                                engine_check=bool(thin), thin_batch_share=thin, free_pool_credit=free_credit))
    kvb = COST.kv_bytes_per_token
    pool = 4 * kv_tokens * kvb if metered else None
    for _ in range(warm_steps):  # some history: takes, then everything running finishes
        sc.schedule(Budget(rng.randint(1, 200_000) * kvb, rng.randint(1, 8), rng.randint(1, 4096),
                           steps=rng.randint(0, 3) if metered else None, kv_pool=pool))
        for rid in list(sc.running):
            sc.finished(rid, rng.randint(1, 300))
    if not sc.prepared:
        sc.prepare()
    for side in sc.sides.values():
        side.credit, side.debt = credit, debt
    if not sc.tree.reqs:
        return
    budget = Budget(kv_tokens * kvb, slots, prefill, steps=rng.randint(0, 2) if metered else None, kv_pool=pool,
                    admit_room=10 ** 9 if thin else None)
    fits = any((r.prompt_len + r.output_len) * kvb <= budget.kv_bytes for r in sc.tree.reqs.values())
    out = sc.schedule(budget)
    assert not fits or out, "nothing runs, a request fits, and the scanner admitted none"
    assert all(a.kv_bytes <= budget.kv_bytes * (1 + 1e-9) for a in out[:1])
    sc.check_integrity()


def test_long_prompts_with_estimated_lengths_run_to_the_end_in_the_simulator():
    """Very long prompts (means of thousands of tokens, a few over 100K), unknown output lengths,
    blend as shipped (metered): the simulated engine finishes every request instead of stopping
    with requests waiting and nothing running."""
    from blendserve_sgl.sim.engine import Engine, EngineConfig
    from blendserve_sgl.sim.policies import make_picker
    from blendserve_sgl.sim.request import from_records
    from blendserve_sgl.workloads import Record

    rng = random.Random(3)
    records = []
    for i in range(300):
        p = 110_000 + rng.randint(0, 20_000) if i % 60 == 0 else int(rng.lognormvariate(8.0, 1.0)) + 50
        records.append(Record(f"r{i}", p, ((f"sys{i % 4}", 40),), rng.randint(1, 1500), "long"))
    reqs = from_records(records, known=False)
    engine = Engine(COST, EngineConfig(kv_tokens=200_000, max_running=64, chunked_prefill=4096),
                    make_picker("blend", reqs, COST), reqs)
    engine.run(max_steps=400_000)
    assert engine.finished == len(reqs)


def test_engine_ratio_reserves_estimated_outputs_at_the_engines_ratio():
    """`Budget.output_ratio` (the engine's new-token ratio) scales an estimated output's
    reservation; a known output is then reserved whole (SGLang reserves ignore_eos requests so);
    without it, `reserve_output_ratio` applies to both. The simulator's blend passes its
    engine's ratio exactly when the preset says `engine_ratio`, and the switch changes the run."""
    from blendserve_sgl.core import ResourceTree
    from blendserve_sgl.core.preset import PRESET
    from blendserve_sgl.sim import EngineConfig, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import trace

    bpt = COST.kv_bytes_per_token
    for ratio, want in ((0.25, {"known": 100 + 400, "est": 100 + 0.25 * 400}), (None, {"known": 500, "est": 500})):
        tree = ResourceTree(COST, OutputLengthEstimator(sample_fraction=0.0, prior=400))
        tree.add("known", prompt_len=100, prefix=[("k", 10)], output_len=400)
        tree.add("est", prompt_len=100, prefix=[("e", 10)], max_tokens=1000)
        sc = DualScanner(tree, ScanConfig())
        got = {a.rid: a.kv_bytes / bpt for a in sc.schedule(Budget(1e12, 10, 10_000, output_ratio=ratio))}
        assert got == pytest.approx(want)
    records, _ = trace("trace2", 400, COST, 0)
    wl = Workload(records, COST)
    engine = EngineConfig.for_cost(COST, kv_gb=4.0, max_running=64, chunked_prefill=512)
    runs = {flag: simulate(wl, "blend", RunSpec(COST, engine, preset=PRESET.replace(engine_ratio=flag)))
            for flag in (True, False)}
    assert runs[True].steps != runs[False].steps


def test_lend_idle_share_lets_a_side_use_the_share_the_other_cannot_use():
    """lend_idle_share: the memory-dense side stopped for a reason other than memory (here: no
    memory-work credit), so the compute-dense side goes on past its (small) share, within the free
    KV and its hard cap; without the switch it stops at its share. Each request is handed out once,
    and nothing is lent while the other side is refused for lack of memory."""
    bpt = COST.kv_bytes_per_token
    records = ([(f"c{i}", [("sc", 40)], 2000, 4) for i in range(40)]
               + [(f"m{i}", [("v", 40)], 60, 8000) for i in range(40)])

    def step(lend, right_credit, kv=400_000):
        sc = DualScanner(_tree(records), ScanConfig(lend_idle_share=lend))
        sc.prepare()
        sc.sides[RIGHT].credit = right_credit
        sc.sides[LEFT].credit = 1e30
        budget = Budget(kv * bpt, 1000, 10 ** 6, steps=0, kv_pool=kv * bpt)
        out = sc.schedule(budget)
        sc.check_integrity()
        assert len({a.rid for a in out}) == len(out) and sum(a.kv_bytes for a in out) <= budget.kv_bytes
        assert sc.used[LEFT] <= budget.kv_bytes - 8060 * bpt  # the hard cap: room for the right's largest
        return [a.rid for a in out if a.side == LEFT], sc

    plain, sc = step(False, -1e30)
    assert sc.last_step["stop"] == {LEFT: "share", RIGHT: "credit"}
    lent, sc = step(True, -1e30)
    assert len(lent) > len(plain) and lent[:len(plain)] == plain
    assert sc.last_step["stop"][RIGHT] == "credit" and sc.last_step["stop"][LEFT] != "share"
    # the right side is refused for lack of memory: nothing is lent
    assert step(True, 1e30, kv=20_000)[0] == step(False, 1e30, kv=20_000)[0]


def test_lend_idle_share_changes_the_simulated_run():
    """The preset's switch reaches the simulator's blend and changes the run."""
    from blendserve_sgl.core.preset import PRESET
    from blendserve_sgl.sim import EngineConfig, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import trace

    records, _ = trace("trace2", 600, COST, 0)
    wl = Workload(records, COST)
    engine = EngineConfig.for_cost(COST, kv_gb=4.0, max_running=64, chunked_prefill=512, pace=True)
    runs = {flag: simulate(wl, "blend", RunSpec(COST, engine, preset=PRESET.replace(lend_idle_share=flag)), check=True)
            for flag in (True, False)}
    assert runs[True].steps != runs[False].steps
    assert all(r.output_tokens == sum(x.output_len for x in records) for r in runs.values())


# ---------------------------------------------------------------- the engine's own check
def _engine_walk(adm, room: float, clip: int, prefill: int, max_tokens: dict) -> int:
    """A plain model of SGLang's PrefillAdder walking a plan: in order, a request is charged its
    uncached prompt + min(max_new, clip) + 1, which must stay below the room left; its prompt is taken
    whole while it is shorter than the prefill tokens left, else it is chunked and the walk ends; the
    first refusal ends it too. Returns how many requests it admits."""
    for i, a in enumerate(adm):
        uncached = a.prompt_len - a.cached_tokens
        charge = uncached + min(max_tokens[a.rid], clip) + 1
        if prefill <= 0 or charge >= room:
            return i
        room -= charge
        if uncached >= prefill:
            return i + 1
        prefill -= uncached
    return len(adm)


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 10 ** 6), st.integers(1, 30), st.integers(1, 200_000), st.integers(1, 6000),
       st.integers(1, 16), st.sampled_from([512, 4096]), st.booleans(), st.booleans(), st.sampled_from([0.0, 0.5]))
def test_engine_check_plans_only_what_the_engine_admits(seed, n, room, prefill, slots, clip, known, lend, thin):
    """With ScanConfig.engine_check and Budget.admit_room, the engine's own check, walking the plan in
    its order, admits every planned request (prompts with no shared prefix, so the scanner's cached
    estimate is exact): the charges stay within the room, at most one prompt is chunked and it is
    last. Over several steps every request is still handed out once."""
    rng = random.Random(seed)
    records = [(i, [(f"u{i}", 5)], rng.choice([20, 300, 3000, 9000]), rng.choice([4, 200, 6000])) for i in range(n)]
    sc = DualScanner(build_length_tree(records, known=known, estimator=OutputLengthEstimator(sample_fraction=0.0)),
                     ScanConfig(engine_check=True, lend_idle_share=lend, thin_batch_share=thin))
    max_tokens = {r.rid: r.max_tokens or r.output_len for r in sc.tree.reqs.values()}
    kvb = COST.kv_bytes_per_token
    handed = []
    for _ in range(4 * n):
        if not sc.tree.reqs:
            break
        out = sc.schedule(Budget(1e15, slots, prefill, admit_room=room, admit_clip=clip))
        assert _engine_walk(out, room, clip, prefill, max_tokens) == len(out), out
        handed += [a.rid for a in out]
        for a in out:
            sc.finished(a.rid, a.output_len)
        sc.check_integrity()
    fits = [r for r in range(n) if min(max_tokens[r], clip) + 1 + records[r][2] < room]
    assert sorted(handed) == sorted(set(handed)) and set(fits) <= set(handed)
    del kvb


def test_engine_check_changes_the_plan_where_the_engine_would_refuse_it():
    """Two long compute-dense prompts and short memory-dense requests: without the check the scanner
    plans both long prompts (each charged only its side's cap), and SGLang's walk stops at the first
    one it chunks; with it one is planned, last, and the walk admits the whole plan. A room below the
    charges of all requests together admits fewer with the check, and all of those."""
    records = [("c1", [("a", 40)], 6000, 2), ("c2", [("b", 40)], 6000, 2)] + \
              [(f"m{i}", [(f"v{i}", 40)], 60, 3000) for i in range(6)]
    max_tokens = {r[0]: r[3] for r in records}
    plans = {}
    for check in (False, True):
        sc = DualScanner(_tree(records), ScanConfig(engine_check=check))
        plans[check] = sc.schedule(Budget(1e15, 64, 4000, admit_room=1e9, admit_clip=4096))
    walked = {c: _engine_walk(p, 1e9, 4096, 4000, max_tokens) for c, p in plans.items()}
    assert walked[False] < len(plans[False]), plans[False]
    assert walked[True] == len(plans[True]) and plans[True][-1].rid in ("c1", "c2")
    assert sum(a.rid.startswith("c") for a in plans[True]) == 1
    room = 3 * (3000 + 60 + 1) + 10  # three memory-dense requests' charges
    sc = DualScanner(_tree(records[2:]), ScanConfig(engine_check=True))
    out = sc.schedule(Budget(1e15, 64, 8000, admit_room=room, admit_clip=4096))
    assert len(out) == 3 and _engine_walk(out, room, 4096, 8000, max_tokens) == 3


def test_without_mixed_steps_the_memory_dense_side_has_the_first_claim_on_the_room():
    """Budget.mixed_steps False (a prefill step decodes nothing): the memory-dense side scans first,
    and while the engine check's room stops it the compute-dense side waits too; with mixed steps the
    compute-dense side takes the room the memory-dense request cannot use. Either way the engine's walk
    admits the whole plan."""
    records = [("c", [("a", 40)], 200, 2), ("m", [("b", 40)], 60, 3000), ("m2", [("b2", 40)], 60, 3000)]
    max_tokens = {"c": 2, "m": 3000, "m2": 3000}
    room = 1000  # below a memory-dense request's charge (60 + 3000 + 1), above c's (200 + 2 + 1)
    plans = {}
    for mixed in (True, False):
        sc = DualScanner(_tree(records), ScanConfig(engine_check=True))
        first = sc.schedule(Budget(1e15, 1, 4000, admit_room=1e6, admit_clip=4096, mixed_steps=False))
        assert [a.rid for a in first] in (["m"], ["m2"])  # something runs: no liveness admission below
        plans[mixed] = sc.schedule(Budget(1e15, 64, 4000, admit_room=room, admit_clip=4096, mixed_steps=mixed))
        assert _engine_walk(plans[mixed], room, 4096, 4000, max_tokens) == len(plans[mixed])
    assert [a.rid for a in plans[True]] == ["c"] and plans[False] == []
    sc = DualScanner(_tree(records), ScanConfig(engine_check=True))
    out = sc.schedule(Budget(1e15, 64, 4000, admit_room=1e6, admit_clip=4096, mixed_steps=False))
    assert out[0].side == RIGHT and sorted(a.rid for a in out) == ["c", "m", "m2"]


def test_thin_batch_share_holds_a_long_chunked_prompt_while_the_memory_dense_side_is_thin():
    """ScanConfig.thin_batch_share: the compute-dense side does not start a prompt the step has to
    chunk while the memory-dense side holds less than that part of its share (SGLang admits nothing
    while it prefills a chunked prompt). Here metering lets the memory-dense side start one request,
    far below its share: with the rule the long prompt waits; without it, it is planned, last."""
    records = [("c", [("a", 40)], 6000, 2)] + [(f"m{i}", [(f"v{i}", 40)], 60, 3000) for i in range(8)]
    plans, stops = {}, {}
    for thin in (0.0, 0.5):
        sc = DualScanner(_tree(records), ScanConfig(engine_check=True, thin_batch_share=thin))
        plans[thin] = [a.rid for a in sc.schedule(Budget(1e12, 64, 1000, admit_room=1e9, admit_clip=4096,
                                                         steps=1, kv_pool=1e9))]
        stops[thin] = sc.last_step["stop"]
        sc.check_integrity()
    assert plans[0.0][-1] == "c" and "c" not in plans[0.5], plans
    assert [r for r in plans[0.0] if r != "c"] == plans[0.5] and len(plans[0.5]) == 1
    assert stops[0.5][LEFT] == "thin" and stops[0.0][LEFT] != "thin"


@pytest.mark.parametrize("engine_check", [False, True])
def test_a_request_of_nearly_the_whole_pool_goes_first_rather_than_starve(engine_check):
    """Each side leaves room for the largest request at the other end. With small requests at one
    end and one of nearly the whole pool at the other the two caps shut each other out: the big
    one never fit under its cap while small ones waited (on a server with arrivals it starved for
    a minute), and the small side, capped by it, ran one request at a time. When the two ends'
    largest cannot share the pool the larger goes first: admitted on an empty pool, and the small
    ones after it as room allows. The same with the big request at the compute-dense end."""
    bpt = COST.kv_bytes_per_token
    kw = dict(admit_room=1536, admit_clip=4096, mixed_steps=False) if engine_check else {}
    for big in (("big", [("b", 10)], 30, 1500), ("big", [("b", 10)], 1500, 2)):
        records = [(f"s{i}", [(f"g{i}", 10)], 20, 64) for i in range(20)] + [big]
        sc = DualScanner(_tree(records), ScanConfig(engine_check=engine_check))
        assert [a.rid for a in sc.schedule(Budget(1536 * bpt, 64, 4096, **kw))] == ["big"]
        sc.finished("big", big[3])
        after = sc.schedule(Budget(1536 * bpt, 64, 4096, **kw))
        assert len(after) > 1 and "big" not in {a.rid for a in after}  # the small ones, many at once
    # ends that fit together keep their caps: the small ones go first as before
    records = [(f"s{i}", [(f"g{i}", 10)], 20, 64) for i in range(20)] + [("mid", [("b", 10)], 30, 600)]
    out = DualScanner(_tree(records), ScanConfig(engine_check=engine_check)).schedule(Budget(1536 * bpt, 64, 4096,
                                                                                              **kw))
    assert len(out) > 1


@settings(max_examples=40, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), min_size=2, max_size=25),
       st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=12), max_size=10), st.integers(0, 2**16))
def test_common_prefix_len_matches_the_set_reference_also_on_pruned_nodes(first, later, seed):
    """The depth walk against the plain reference for every pair of nodes ever in the tree: nodes
    pruned by removals (whose depth goes stale when a later insert splits an edge above them)
    included."""
    from blendserve_sgl.core import ResourceTree
    from blendserve_sgl.core.scanner import common_prefix_len, common_prefix_len_by_set

    rnd = random.Random(seed)
    tree = ResourceTree(COST)
    for i, tokens in enumerate(first):
        tree.add(i, tokens=tokens, output_len=4)
    seen = {id(n): n for n in tree.nodes()}
    for i in rnd.sample(range(len(first)), len(first) // 2):
        tree.remove(i)
    for j, tokens in enumerate(later):
        tree.add(1000 + j, tokens=tokens, output_len=4)
    seen.update({id(n): n for n in tree.nodes()})
    nodes = list(seen.values())
    for a in nodes:
        for b in nodes:
            assert common_prefix_len(a, b) == common_prefix_len_by_set(a, b)
