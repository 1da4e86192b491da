"""Output-length estimation: the seeded sample, per-subtree estimates, and the scanner's use of them."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl.core import Budget, DualScanner, OutputLengthEstimator, ResourceTree, ScanConfig
from blendserve_sgl.core.scanner import LEFT, RIGHT, SAMPLE

from _helpers import COST, one_class_sampled

BIG = Budget(kv_bytes=1e15, slots=10 ** 6, prefill_tokens=10 ** 9)


# ---------------------------------------------------------------- choose_sample
@settings(max_examples=60)
@given(st.lists(st.one_of(st.integers(), st.text(max_size=6)), unique=True, max_size=300),
       st.floats(0.001, 1.0), st.integers(0, 5), st.randoms(use_true_random=False))
def test_choose_sample_deterministic_and_sized(rids, frac, seed, rnd):
    """The sample is ceil(f x n) (at least 1) of the given ids, the same for any input order."""
    est = OutputLengthEstimator(sample_fraction=frac, seed=seed)
    chosen = est.choose_sample(rids)
    shuffled = list(rids)
    rnd.shuffle(shuffled)
    assert est.choose_sample(shuffled) == chosen
    assert OutputLengthEstimator(sample_fraction=frac, seed=seed).choose_sample(iter(rids)) == chosen
    if not rids:
        assert chosen == []
    else:
        assert len(chosen) == max(1, math.ceil(frac * len(rids)))
        assert len(set(chosen)) == len(chosen) and set(chosen) <= set(rids)


def test_choose_sample_edge_cases():
    """No ids or fraction 0: no sample; different seeds pick different samples."""
    assert OutputLengthEstimator().choose_sample([]) == []
    assert OutputLengthEstimator(sample_fraction=0.0).choose_sample(range(100)) == []
    assert OutputLengthEstimator(sample_fraction=0.01).choose_sample(range(1000)).__len__() == 10
    assert len(OutputLengthEstimator(sample_fraction=0.01).choose_sample(range(5))) == 1
    a = OutputLengthEstimator(sample_fraction=0.1, seed=0).choose_sample(range(1000))
    b = OutputLengthEstimator(sample_fraction=0.1, seed=1).choose_sample(range(1000))
    assert set(a) != set(b)


@pytest.mark.parametrize("kwargs", [dict(prior=0), dict(prior=2.5), dict(prior=True), dict(sample_fraction=1.5),
                                    dict(sample_fraction=-0.1), dict(overrun_factor=0.5)])
def test_estimator_rejects_bad_settings(kwargs):
    """Invalid estimator settings raise ValueError."""
    with pytest.raises(ValueError):
        OutputLengthEstimator(**kwargs)


def test_overran():
    """A request overruns when it generated more than overrun_factor x its estimate."""
    est = OutputLengthEstimator(overrun_factor=2.0)
    assert not est.overran(10, 20) and est.overran(10, 21)
    assert est.overran(0, 3)  # an estimate of 0 counts as 1


# ---------------------------------------------------------------- nearest ancestor
def _estimate_tree():
    t = ResourceTree(COST, OutputLengthEstimator(prior=77))
    t.add("a1", prompt_len=100, prefix=[("A", 10), ("A1", 10)], max_tokens=1000)
    t.add("a2", prompt_len=100, prefix=[("A", 10), ("A1", 10)], max_tokens=50)
    t.add("b1", prompt_len=100, prefix=[("A", 10), ("A2", 10)], max_tokens=1000)
    t.add("c1", prompt_len=100, prefix=[("C", 10)], max_tokens=1000)
    t.add("k", prompt_len=100, prefix=[("A", 10), ("A1", 10)], output_len=5)
    return t


def test_estimate_nearest_ancestor_with_samples():
    """Own subtree first, then the parent (= the siblings' samples), then the root, then the prior;
    capped at max_tokens; known lengths are left alone."""
    t = _estimate_tree()
    est = t.estimator
    nA1, nA2, nC = t.reqs["a1"].node, t.reqs["b1"].node, t.reqs["c1"].node
    nA = nA1.parent
    assert [r.output_len for r in (t.reqs["a1"], t.reqs["a2"], t.reqs["b1"])] == [77, 50, 77]  # prior, capped
    est.record(t.path(nA1), 200)  # a sample under A1
    assert est.estimate(nA1, None) == 200
    assert est.estimate(nA2, None) == 200  # no samples under A2: its parent A has one
    assert est.estimate(nC, None) == 200  # nothing under C or its parent but the root
    est.record(t.path(nA1), 301)
    assert est.estimate(nA1, None) == round(501 / 2)
    est.record(t.path(nA2), 40)
    assert est.estimate(nA2, None) == 40  # its own samples now
    assert est.estimate(nA, None) == round(541 / 3)
    assert est.estimate(nC, None) == round(541 / 3)
    est.record(t.path(nC), 9)
    assert est.estimate(nC, None) == 9
    assert est.estimate(nA1, 100) == 100  # capped at max_tokens
    assert est.refresh(t) == 3  # a2 stays at its cap of 50
    got = {rid: r.output_len for rid, r in t.reqs.items()}
    assert got == {"a1": 250, "a2": 50, "b1": 40, "c1": 9, "k": 5}
    t.check_integrity()  # aggregates follow the new estimates
    est.record(t.path(nC), -9, count=-1)  # taking a provisional record back
    assert nC.sample_n == 0 and est.estimate(nC, None) == round(541 / 3)


def test_estimate_before_any_sample_is_prior():
    """With no samples at all the prior is used (capped)."""
    t = _estimate_tree()
    assert t.estimator.estimate(t.root, None) == 77
    assert t.estimator.estimate(t.root, 10) == 10


# ---------------------------------------------------------------- scanner flow
def _unknown_workload(seed=0):
    """Two groups whose true output lengths differ a lot, all unknown, plus a few known ones."""
    rng = random.Random(seed)
    recs, true = [], {}
    for i in range(120):
        if i % 2:
            rid = f"s{i}"
            recs.append(dict(rid=rid, prompt_len=rng.randint(1500, 3000), prefix=[("short", 100)]))
            true[rid] = rng.randint(5, 15)
        else:
            rid = f"l{i}"
            recs.append(dict(rid=rid, prompt_len=rng.randint(50, 150), prefix=[("long", 30)]))
            true[rid] = rng.randint(1000, 3000)
    for i in range(6):
        rid = f"k{i}"
        recs.append(dict(rid=rid, prompt_len=200, prefix=[("short", 100)], output_len=4000 + i))
        true[rid] = 4000 + i
    return recs, true


def _scanner(frac=0.1, quorum=1.0, seed=3):
    recs, true = _unknown_workload()
    t = ResourceTree(COST, OutputLengthEstimator(prior=256, sample_fraction=frac, seed=seed))
    for r in recs:
        r = dict(r)
        t.add(r.pop("rid"), **r)
    return DualScanner(t, ScanConfig(sample_quorum=quorum)), t, true


def _expected_estimates(tree, sample_paths: dict, true: dict) -> dict:
    """Brute force: mean true length of the samples under the nearest ancestor that has any."""
    out = {}
    for rid, req in tree.reqs.items():
        if req.known:
            continue
        node = req.node
        while node is not None:
            under = [true[s] for s, path in sample_paths.items() if any(n is node for n in path)]
            if under:
                est = max(1, round(sum(under) / len(under)))
                break
            node = node.parent
        else:
            est = tree.estimator.prior
        out[rid] = min(est, req.max_tokens) if req.max_tokens else est
    return out


def test_scanner_runs_sample_first_then_plans():
    """Unknown lengths: the sample (seeded, known lengths excluded) is handed out first and alone;
    nothing else runs until it finished; then estimates are the sampled subtree means and the
    tree is sorted and split."""
    sc, t, true = _scanner()
    unknown = [rid for rid, r in t.reqs.items() if not r.known]
    chosen = t.estimator.choose_sample(unknown)
    assert len(chosen) == math.ceil(0.1 * len(unknown))
    paths = {rid: t.path(t.reqs[rid].node) for rid in chosen}
    first = sc.schedule(BIG)
    assert {a.rid for a in first} == set(chosen) and all(a.side == SAMPLE for a in first)
    assert not any(rid.startswith("k") for rid in chosen)
    assert sc.sampling and not sc.planned
    assert sc.schedule(BIG) == []  # the rest waits for the sample
    for a in first[:-1]:
        sc.finished(a.rid, true[a.rid])
        sc.check_integrity()
        assert not sc.planned and sc.schedule(BIG) == []
    sc.finished(first[-1].rid, true[first[-1].rid])
    assert sc.planned and not sc.sampling and t.is_sorted and sc.split_report is not None
    sc.check_integrity()
    got = {rid: r.output_len for rid, r in t.reqs.items() if not r.known}
    assert got == _expected_estimates(t, paths, true)
    assert {r.output_len for r in t.reqs.values() if r.known} == {4000 + i for i in range(6)}
    nxt = sc.schedule(BIG)
    assert nxt and {a.side for a in nxt} <= {LEFT, RIGHT}
    assert not set(chosen) & {a.rid for a in nxt}


def test_scanner_quorum_plans_early_and_replans():
    """With sample_quorum 0.5 planning starts when half the sample finished; when the rest
    finishes the estimates are refreshed with all of it."""
    sc, t, true = _scanner(quorum=0.5)
    chosen = [a.rid for a in sc.schedule(BIG)]
    paths = {rid: sc.running[rid].path for rid in chosen}
    half = math.ceil(len(chosen) / 2)
    for rid in chosen[:half - 1]:
        sc.finished(rid, true[rid])
    assert not sc.planned
    sc.finished(chosen[half - 1], true[chosen[half - 1]])
    assert sc.planned and sc.sampling
    sc.check_integrity()
    for rid in chosen[half:]:
        sc.finished(rid, true[rid])
    sc.check_integrity()
    got = {rid: r.output_len for rid, r in t.reqs.items() if not r.known}
    assert got == _expected_estimates(t, paths, true)


def test_known_lengths_are_never_sampled():
    """With every length known there is no sample: the scanner plans at once."""
    t = ResourceTree(COST, OutputLengthEstimator(sample_fraction=1.0))
    for i in range(20):
        t.add(i, prompt_len=100 + i, output_len=10 * i)
    sc = DualScanner(t)
    sc.prepare()
    assert sc.sample_size == 0 and sc.planned and not any(r.sample for r in t.reqs.values())
    assert all(a.side in (LEFT, RIGHT) for a in sc.schedule(BIG))


def test_overrun_moves_left_request_to_right():
    """A left-side request of unknown length running past overrun_factor x its estimate is
    accounted to the right side from then on; known-length and right-side requests never move."""
    sc, t, true = _scanner(frac=0.1)
    for a in sc.schedule(BIG):
        sc.finished(a.rid, true[a.rid])
    assert sc.planned
    adm = sc.schedule(Budget(kv_bytes=30e9, slots=64, prefill_tokens=20000))
    sc.check_integrity()
    lefts = [a for a in adm if a.side == LEFT and not sc.running[a.rid].req.known]
    rights = [a for a in adm if a.side == RIGHT]
    assert lefts and rights
    a = lefts[0]
    est = a.output_len
    used_l, used_r = sc.used[LEFT], sc.used[RIGHT]
    assert sc.progress(a.rid, int(2 * est)) is False  # at the limit, not past it
    assert sc.progress(a.rid, int(2 * est) + 1) is True
    assert sc.running[a.rid].side == RIGHT
    assert sc.used[LEFT] == pytest.approx(used_l - a.kv_bytes)
    assert sc.used[RIGHT] == pytest.approx(used_r + a.kv_bytes)
    sc.check_integrity()
    assert sc.progress(a.rid, 10 * est) is False  # already right
    r = rights[0]
    assert sc.progress(r.rid, 10 ** 6) is False and sc.running[r.rid].side == RIGHT
    sc.finished(a.rid, 3 * est)
    assert sc.used[RIGHT] == pytest.approx(used_r)
    sc.check_integrity()
    # a known-length request on the left never moves
    t2 = ResourceTree(COST)
    t2.add("known", prompt_len=3000, output_len=5)
    t2.add("mem", prompt_len=50, output_len=5000)
    sc2 = DualScanner(t2)
    adm2 = {a.rid: a for a in sc2.schedule(BIG)}
    assert adm2["known"].side == LEFT
    assert sc2.progress("known", 10 ** 6) is False and sc2.running["known"].side == LEFT


# ---------------------------------------------------------------- percentile and censored samples
def _nearest_rank(values, q):
    """Brute force: the smallest value with at least q of the values at or below it."""
    for v in sorted(values):
        if sum(x <= v for x in values) >= q * len(values) - 1e-9:
            return v


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=12), st.sampled_from([0.1, 0.5, 0.75, 0.9, 1.0]))
def test_percentile_estimate_equals_brute_force(values, q):
    from blendserve_sgl.core import OutputLengthEstimator

    est = OutputLengthEstimator(percentile=q)
    assert est.summarize([(v, None) for v in values]) == _nearest_rank(values, q)
    assert OutputLengthEstimator(censored=True).summarize([(v, None) for v in values]) == pytest.approx(
        sum(values) / len(values))


def test_censored_samples_are_at_least_their_output_so_far_and_at_most_max_tokens():
    """A running sample with 300 tokens so far takes the mean of the finished ones at least as
    long (400, 800: 600); one past every finished sample takes its max_tokens."""
    from blendserve_sgl.core import OutputLengthEstimator

    est = OutputLengthEstimator(censored=True)
    assert est.summarize([(10, None), (400, None), (800, None), (300, 5000)]) == pytest.approx((10 + 400 + 800 + 600) / 4)
    assert est.summarize([(10, None), (20, None), (900, 12_000)]) == pytest.approx((10 + 20 + 12_000) / 3)
    assert OutputLengthEstimator(censored=True, percentile=1.0).summarize([(10, None), (900, 12_000)]) == 12_000


def test_censored_switch_changes_the_plan_made_at_the_quorum():
    """The plan made at the sample quorum (half the sample finished at 20 tokens, half still
    running at 700): the plain estimator counts 700 as their length; the censored one counts
    them as at least 700 and, with no finished sample that long, as their max_tokens (4,000)."""
    def plan(est):
        tree = ResourceTree(COST, est)
        for i in range(40):
            tree.add(i, prompt_len=100, prefix=(("sysA" if i % 2 else "sysB", 50),), max_tokens=4000)
        sc = DualScanner(tree, ScanConfig(sample_quorum=0.5))
        sample = [a.rid for a in sc.schedule(Budget(1e15, 100, 10 ** 6)) if a.side == SAMPLE]
        assert len(sample) == 8
        for rid in sample[4:]:
            sc.progress(rid, 700)
        for rid in sample[:4]:
            sc.finished(rid, 20)
        assert sc.planned
        return sorted(r.output_len for r in sc.tree.reqs.values())

    plain = plan(OutputLengthEstimator(sample_fraction=0.2, seed=1))
    censored = plan(OutputLengthEstimator(sample_fraction=0.2, seed=1, censored=True))
    assert max(plain) <= 700 and min(censored) > max(plain), (plain[-1], censored[0])


def test_estimator_switches_are_preset_fields():
    from blendserve_sgl.core.preset import PRESET

    ablation = PRESET.replace(censored=True, percentile=0.9, overrun_factor=3.0)
    assert (ablation.estimator.censored, ablation.estimator.percentile, ablation.estimator.overrun_factor) == (True, 0.9, 3.0)
    assert ablation.scan == PRESET.scan and PRESET.estimator.percentile is None and not PRESET.estimator.censored
    with pytest.raises(ValueError, match="percentile"):
        PRESET.replace(percentile=0.0)


# ---------------------------------------------------------------- censored growth
def _imputed_brute_force(samples, growth, q):
    """Plain reference: each censored sample (g, cap) takes the mean of the finished samples >= g,
    else min(cap, growth x g); then the nearest-rank q-quantile (q None: the mean)."""
    finished = [v for v, cap in samples if cap is None]
    vals = []
    for v, cap in samples:
        if cap is not None:
            longer = [f for f in finished if f >= v]
            v = sum(longer) / len(longer) if longer else min(max(v, cap), growth * v)
        vals.append(v)
    if q is None:
        return sum(vals) / len(vals)
    return _nearest_rank(vals, q)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.one_of(st.none(), st.integers(1, 20_000))), min_size=1, max_size=12),
       st.sampled_from([None, 0.5, 0.9, 1.0]), st.sampled_from([1.0, 2.0, 3.5]))
def test_censored_growth_estimate_equals_brute_force(samples, q, growth):
    from blendserve_sgl.core import OutputLengthEstimator

    est = OutputLengthEstimator(censored=True, censored_growth=growth, percentile=q)
    assert est.summarize(samples) == pytest.approx(_imputed_brute_force(samples, growth, q))


def test_censored_growth_by_hand():
    """A sample at 900 tokens, past every finished one (10, 20), max_tokens 12,000: with growth 2
    it counts as 1,800 (not 12,000); within its cap (cap 1,000: 1,000); one at 15 takes the mean of
    the finished ones at least as long (20)."""
    from blendserve_sgl.core import OutputLengthEstimator

    est = OutputLengthEstimator(censored=True, censored_growth=2.0)
    assert est.summarize([(10, None), (20, None), (900, 12_000)]) == pytest.approx((10 + 20 + 1800) / 3)
    assert est.summarize([(10, None), (20, None), (900, 1000)]) == pytest.approx((10 + 20 + 1000) / 3)
    assert est.summarize([(10, None), (20, None), (15, 500)]) == pytest.approx((10 + 20 + 20) / 3)
    with pytest.raises(ValueError, match="censored_growth"):
        OutputLengthEstimator(censored_growth=0.5)


def _sampled_scanner(config, estimator):
    tree = ResourceTree(COST, estimator)
    for i in range(40):
        tree.add(i, prompt_len=100, prefix=(("sysA" if i % 2 else "sysB", 50),), max_tokens=50_000)
    sc = DualScanner(tree, config)
    sample = [a.rid for a in sc.schedule(Budget(1e15, 100, 10 ** 6)) if a.side == SAMPLE]
    assert len(sample) == 8
    return sc, sample


def test_replan_growth_replans_when_a_running_sample_outgrows_the_plan():
    """Half the sample finishes at 20 tokens, half is at 300 at the quorum: the plan counts them
    at 600 (censored growth 2). With replan_growth 2 the running samples reaching 600 make the
    next step re-plan, and the waiting requests' estimates grow; without it they stay."""
    est = OutputLengthEstimator(sample_fraction=0.2, seed=1, censored=True, censored_growth=2.0)
    estimates = {}
    for growth in (None, 2.0):
        sc, sample = _sampled_scanner(ScanConfig(sample_quorum=0.5, replan_growth=growth), est)
        for rid in sample[4:]:
            sc.progress(rid, 300)
        for rid in sample[:4]:
            sc.finished(rid, 20)
        assert sc.planned and not sc.replan_due
        before = max(r.output_len for r in sc.tree.reqs.values())
        assert growth is None or sc.watch_at(sample[4]) <= 600  # reported by the re-plan point
        for rid in sample[4:]:
            sc.progress(rid, 599)
        assert not sc.replan_due
        for rid in sample[4:]:
            sc.progress(rid, 3000)
        assert sc.replan_due == (growth is not None)
        sc.schedule(Budget(0.0, 100, 10 ** 6))  # no memory: nothing taken, the plan is redone
        after = max(r.output_len for r in sc.tree.reqs.values())
        estimates[growth] = (before, after, sc.replans)
        sc.check_integrity()
    assert estimates[None][0] == estimates[None][1] and estimates[None][2] == 0
    assert estimates[2.0][1] > estimates[2.0][0] and estimates[2.0][2] == 1
    assert estimates[2.0][0] == estimates[None][0]
    with pytest.raises(ValueError, match="replan_growth"):
        ScanConfig(replan_growth=1.0)


def test_fill_refresh_growth_reorders_the_fill_before_the_plan():
    """The whole sample must finish before the plan (quorum 1) and the fill takes the rest at the
    prior (256). A running sample at 600 tokens (past 2 x 256) makes the next step re-estimate the
    waiting requests with it as a lower bound and re-sort the tree: their estimates grow, no plan
    is made; without the switch they stay at the prior. The re-estimate point is what watch_at says."""
    est = OutputLengthEstimator(sample_fraction=0.2, seed=1)
    seen = {}
    for growth in (None, 2.0):
        tree = ResourceTree(COST, est)
        for i in range(40):
            tree.add(i, prompt_len=100, prefix=(("sysA" if i % 2 else "sysB", 50),), max_tokens=50_000)
        sc = DualScanner(tree, ScanConfig(sample_quorum=1.0, fill_while_sampling=True, fill_refresh_growth=growth))
        sample = [a.rid for a in sc.schedule(Budget(1e15, 8, 10 ** 6)) if a.side == SAMPLE]
        assert len(sample) == 8 and not sc.planned
        before = {r.output_len for r in sc.tree.reqs.values()}
        assert growth is None or sc.watch_at(sample[0]) == 512
        for rid in sample:
            sc.progress(rid, 511)
        assert not sc.replan_due
        for rid in sample:
            sc.progress(rid, 600)
        assert sc.replan_due == (growth is not None)
        sc.schedule(Budget(0.0, 8, 10 ** 6))  # no memory: nothing taken, the order is redone
        seen[growth] = (before, {r.output_len for r in sc.tree.reqs.values()}, sc.refreshes, sc.planned)
        assert growth is None or sc.watch_at(sample[0]) == 1200  # the next growth step
        sc.check_integrity()
    assert seen[None] == ({256}, {256}, 0, False)
    assert seen[2.0][0] == {256} and min(seen[2.0][1]) >= 600 and seen[2.0][2:] == (1, False)
    with pytest.raises(ValueError, match="fill_refresh_growth"):
        ScanConfig(fill_refresh_growth=1.0)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10 ** 6), st.integers(20, 120), st.sampled_from([1.5, 2.0, 4.0]), st.booleans(),
       st.sampled_from([None, 1.5, 2.0]))
def test_replanning_scanner_hands_out_each_request_once_within_budgets(seed, n, growth, metered, refresh):
    """With re-plans on sample growth, and re-estimates of the fill before the plan (`refresh`;
    random progress, finishes, tight budgets): every request is
    handed out exactly once, no step admits more KV than is free or more requests than slots, and
    a step with nothing running admits when something fits (liveness)."""
    rng = random.Random(seed)
    est = OutputLengthEstimator(sample_fraction=0.1, seed=seed % 7, censored=True, censored_growth=2.0)
    tree = ResourceTree(COST, est)
    for i in range(n):
        tree.add(i, prompt_len=rng.randint(201, 3000), prefix=((f"g{rng.randrange(3)}", rng.choice([10, 200])),),
                 max_tokens=rng.randint(50, 20_000))
    sc = DualScanner(tree, ScanConfig(replan_growth=growth, hold_prefix_tokens=32, fill_while_sampling=True,
                                      final_wave=True, fill_refresh_growth=refresh))
    kvb = COST.kv_bytes_per_token
    gen, seen = {}, []
    for _ in range(50 * n):
        if not sc.tree.reqs and not sc.running:
            break
        budget = Budget(rng.randint(0, 40_000) * kvb, rng.randint(0, 6), rng.randint(0, 4096),
                        steps=rng.randint(0, 3) if metered else None, kv_pool=200_000 * kvb if metered else None)
        nothing_runs = not sc.running
        fits = budget.slots > 0 and budget.prefill_tokens > 0 and any(
            (r.prompt_len + r.output_len) * kvb <= budget.kv_bytes for r in sc.tree.reqs.values())
        out = sc.schedule(budget)
        assert len(out) <= budget.slots and sum(a.kv_bytes for a in out) <= budget.kv_bytes * (1 + 1e-9) + 1e-6
        assert not (nothing_runs and fits) or out
        seen += [a.rid for a in out]
        for a in out:
            gen[a.rid] = 0
        for rid in list(sc.running):
            gen[rid] += rng.choice([1, 10, 300])
            if rng.random() < 0.3:
                sc.finished(rid, gen.pop(rid))
            else:
                sc.progress(rid, gen[rid])
        sc.check_integrity()
    for rid in list(sc.running):
        sc.finished(rid, gen.pop(rid))
    assert not sc.tree.reqs, f"{len(sc.tree.reqs)} requests still wait after {50 * n} steps"  # liveness
    assert sorted(seen) == list(range(n))  # every request exactly once
    assert len(seen) == len(set(seen))


def test_reserve_overruns_keeps_the_kv_an_overrunning_request_will_still_need():
    """A request estimated at 20 tokens (its sample finished at 20) is at 100 (past overrun factor 2
    x 20): with reserve_overruns it is expected to reach 200 (within max_tokens), so 100 tokens of KV
    stay free; a budget of exactly the next request's KV then admits nothing; at 300 the reserve
    follows (600 - 300 = 300 tokens); when it finishes the reserve goes. Off: it is admitted."""
    kvb = COST.kv_bytes_per_token
    outcome = {}
    for on in (False, True):
        sc = one_class_sampled(ScanConfig(reserve_overruns=on), 20)
        first = sc.schedule(Budget((100 + 20) * kvb, 1, 10 ** 6))[0]
        assert first.output_len == 20
        sc.progress(first.rid, 100)
        assert sc.overrun_bytes == (100 * kvb if on else 0)
        assert (sc.watch_at(first.rid) == 200) if on else True
        outcome[on] = sc.schedule(Budget((100 + 20) * kvb, 1, 10 ** 6))
        if on:
            sc.progress(first.rid, 300)
            assert sc.overrun_bytes == 300 * kvb
            sc.check_integrity()
            sc.finished(first.rid, 350)
            assert sc.overrun_bytes == 0 and not sc.overrun
    assert len(outcome[False]) == 1 and outcome[True] == []


# ---------------------------------------------------------------- where samples live
def test_split_twin_reads_its_origins_samples():
    """A twin made by split_off repeats its origin's prefix: a sample recorded along the origin's
    path after the split (a sample that finishes after the plan) informs the twin's requests,
    and one recorded along the twin's path informs the origin's; no node holds samples twice."""
    t = ResourceTree(COST, OutputLengthEstimator(prior=7))
    for i in range(4):
        t.add(f"a{i}", prompt_len=100, prefix=[("A", 10), (f"A{i % 2}", 10)], max_tokens=10_000)
    t.add("c", prompt_len=100, prefix=[("C", 10)], max_tokens=10_000)
    nA0 = t.reqs["a0"].node
    nA = nA0.parent
    origin_path = t.path(nA0)
    twin = t.split_off(nA, [nA0])
    assert t.reqs["a0"].node.parent is twin and t.reqs["a1"].node.parent is nA
    t.estimator.record(origin_path, 500)  # recorded along the path the sample was taken from
    assert t.estimator.estimate(twin, None) == 500
    assert t.estimator.estimate(t.reqs["a1"].node, None) == 500
    assert twin.sample_n == 0 and nA.sample_n == 1
    t.estimator.record(t.path(twin), 100)
    assert nA.sample_n == 2 and twin.sample_n == 0
    assert t.estimator.estimate(t.reqs["a1"].node, None) == 300
    assert t.estimator.estimate(t.reqs["c"].node, None) == 300  # the root holds both


def test_recreated_node_reads_the_samples_of_the_pruned_one():
    """All requests under prefix V are taken (V is pruned) while a sample of V still runs; a
    request retracted and re-added under V re-creates it, and the sample that finishes later
    (recorded along the pruned path) sets its estimate, as the brute-force rule (the nearest
    enclosing prefix with samples) says; a different prefix does not pick them up."""
    t = ResourceTree(COST, OutputLengthEstimator(prior=7))
    t.add("short", prompt_len=50, prefix=[("S", 10)], max_tokens=100_000)
    t.add("v0", prompt_len=50, prefix=[("V", 10)], max_tokens=100_000)
    t.add("v1", prompt_len=50, prefix=[("V", 10)], max_tokens=100_000)
    t.estimator.record(t.path(t.reqs["short"].node), 3)
    sample_path = t.path(t.reqs["v0"].node)
    t.reqs["v0"].sample = True  # marked as SamplePhase.start marks the sample
    t.remove("v0")
    t.remove("v1")  # V pruned
    t.estimator.record(sample_path, 9000)  # the V sample finishes after that
    v1 = t.add("v1", prompt_len=80, prefix=[("V", 10), ("v1-out", 30)], max_tokens=100_000)
    other = t.add("w", prompt_len=80, prefix=[("W", 10), ("V", 10)], max_tokens=100_000)
    assert v1.output_len == 9000
    assert other.output_len == round((3 + 9000) / 2)  # only the root encloses it
    t.add("v2", prompt_len=80, prefix=[("V", 10), ("v2-out", 30)], max_tokens=100_000)  # splits the edge
    assert t.reqs["v2"].output_len == 9000 and t.estimator.estimate(t.reqs["v1"].node, None) == 9000
    t.check_integrity()


def _batch_under(t, b: int, prefix: str, n: int = 4):
    """A batch of `n` requests under `prefix` (one of them a sample) taken out of the tree, the
    sample recorded after: what a server's tree sees of a system prompt, batch after batch."""
    for i in range(n):
        t.add(f"{prefix}{b}-{i}", prompt_len=60, prefix=[(prefix, 10), (f"{prefix}{b}-{i}", 50)], max_tokens=10_000)
    path = t.path(t.reqs[f"{prefix}{b}-0"].node)
    t.reqs[f"{prefix}{b}-0"].sample = True
    for i in range(n):
        t.remove(f"{prefix}{b}-{i}")
    t.estimator.record(path, 100 + b)
    t.check_integrity()


def test_a_prefix_that_comes_back_batch_after_batch_keeps_a_bounded_memory():
    """Each batch under a system prompt left its nodes behind for their samples: the pruned
    prompt node (reached from the root) and, under it, the pruned request nodes (reached from
    nothing once it was pruned), and each re-created node pointed to the one before, so a server
    kept a node per batch for ever (probe 27). Now one node per place in the live tree, pointing
    straight to where the samples are; every batch's sample still counts."""
    from blendserve_sgl.core.tree import sample_source

    t = ResourceTree(COST, OutputLengthEstimator(prior=7))
    for b in range(40):
        _batch_under(t, b, "S")
        assert len(t._pruned) == 1  # the prompt node, under the root
        new = t.add(f"probe{b}", prompt_len=60, prefix=[("S", 10), (f"probe{b}", 50)], max_tokens=10_000)
        src = sample_source(new.node)
        assert new.node.sample_from is src and src.sample_from is None  # one step, however many batches before
        assert src.sample_n == b + 1 and new.output_len == round(sum(100 + k for k in range(b + 1)) / (b + 1))
        t.remove(f"probe{b}")
    t.check_integrity()


def test_the_pruned_nodes_kept_are_the_newest_ghost_limit(monkeypatch):
    """Beyond GHOST_LIMIT the oldest pruned node is forgotten (a prefix seen again after it takes
    the estimate of the nodes above it); the newest are kept."""
    from blendserve_sgl.core import tree as tree_mod

    monkeypatch.setattr(tree_mod, "GHOST_LIMIT", 4)
    t = ResourceTree(COST, OutputLengthEstimator(prior=7))
    for b, prefix in enumerate("ABCDE"):
        _batch_under(t, b, prefix, n=2)
        assert len(t._pruned) == min(b + 1, 4)
    assert [g.keys[0].name for g in t._pruned.values()] == ["B", "C", "D", "E"]
    again = t.add("a-again", prompt_len=60, prefix=[("A", 10), ("a-again", 50)], max_tokens=10_000)
    assert again.node.sample_from is None and again.output_len == 102  # the root's mean of 5
    assert t.add("e-again", prompt_len=60, prefix=[("E", 10), ("e-again", 50)], max_tokens=10_000).output_len == 104
    t.check_integrity()


def test_replan_growth_counts_each_sample_against_what_the_plan_assumed():
    """After the plan, a sample re-plans only once it outgrows growth x what the plan assumed for
    it (its node's estimate, or its own output if larger) and by REPLAN_MIN_TOKENS: a long sample
    among short ones re-plans once per doubling, not at every step; a 1-token estimate does not
    re-plan at 2 tokens."""
    from blendserve_sgl.core.scanner import REPLAN_MIN_TOKENS

    est = OutputLengthEstimator(sample_fraction=0.2, seed=1)
    sc, sample = _sampled_scanner(ScanConfig(sample_quorum=0.5, replan_growth=2.0), est)
    for rid in sample[:4]:
        sc.finished(rid, 1)
    assert sc.planned
    long = sample[4]
    sc.progress(long, 300)
    assert sc.replan_due  # the plan assumed 1 for requests like it
    sc.schedule(Budget(0.0, 100, 10 ** 6))
    assert sc.replans == 1 and not sc.replan_due
    assert sc.watch_at(long) <= 600  # reported by the next re-plan point: 2 x its own output (300)
    for g in range(301, 600):
        sc.progress(long, g)
    assert not sc.replan_due
    sc.progress(long, 600)
    assert sc.replan_due
    sc.schedule(Budget(0.0, 100, 10 ** 6))
    short = sample[5]
    sc.progress(short, 2)
    assert not sc.replan_due and sc.replans == 2
    assert sc._replan_at(short) >= sc._assumed[short] + REPLAN_MIN_TOKENS
    sc.progress(short, 20_000)
    assert sc.replan_due
    sc.check_integrity()


# ---------------------------------------------------------------- a batch that arrives over time
def _arriving(fraction=0.1, fill=False):
    t = ResourceTree(COST, OutputLengthEstimator(prior=100, sample_fraction=fraction, seed=1))
    return DualScanner(t, ScanConfig(sample_quorum=1.0, fill_while_sampling=fill)), t


def _arrive(sc, rid, group="g"):
    sc.add(rid, prefix=[(group, 64)], prompt_len=80, max_tokens=1000)


def test_requests_arriving_after_the_draw_join_the_sample_up_to_its_fraction():
    """An engine receives its batch over many steps: the first step saw one request, and it was
    the whole sample (`blendserve run`, 200 requests at 0.1: 1 sample). Arrivals join it while
    fewer than ceil(fraction x seen) are chosen, and hold the plan like the first."""
    sc, t = _arriving(0.1)
    _arrive(sc, "r0")
    first = sc.schedule(BIG)
    assert [a.rid for a in first] == ["r0"] and first[0].side == SAMPLE and sc.sample_size == 1
    for i in range(1, 200):
        _arrive(sc, f"r{i}")
    assert sc.sample_size == 20 == math.ceil(0.1 * 200)
    took = sc.schedule(BIG)
    sampled = {a.rid for a in took if a.side == SAMPLE}
    assert len(sampled) == 19 and not sc.planned
    for rid in ["r0", *sorted(sampled)][:-1]:
        sc.finished(rid, 300)
        assert not sc.planned
    sc.finished(sorted(sampled)[-1], 300)
    assert sc.planned and t.root.sample_n == 20
    assert {r.output_len for r in t.reqs.values()} == {300}
    sc.check_integrity()
    for i in range(200, 260):  # after the plan: late samples, taken first, never holding the plan
        _arrive(sc, f"r{i}", "h")
    late = set(sc.sample.late)
    assert len(late) == math.ceil(0.1 * 260) - 20 and not sc.sample.pending
    taken = sc.schedule(BIG)
    assert {a.rid for a in taken if a.side == SAMPLE} == late and sc.planned
    for rid in late:
        sc.finished(rid, 40)
    assert t.root.sample_n == 20 + len(late) and not sc.sample.late and sc.replans == 0
    sc.check_integrity()


def test_readded_requests_are_not_arrivals():
    """A request retracted or handed back (`readd`) does not count toward the sample again."""
    sc, t = _arriving(0.5, fill=True)
    for i in range(4):
        _arrive(sc, f"r{i}")
    sc.schedule(BIG)
    size, seen = sc.sample_size, sc.sample.seen
    running = [rid for rid in sc.running if rid not in sc.pending_sample]
    for rid in running:
        sc.retracted(rid)
        sc.add(rid, readd=True, prefix=[("g", 64)], prompt_len=80, max_tokens=1000)
    assert (sc.sample_size, sc.sample.seen) == (size, seen)


@pytest.mark.parametrize("how", ["retracted", "aborted"])
def test_a_sample_that_leaves_unfinished_lets_the_plan_happen(how):
    """The only sample request retracted (it runs again, no longer as a sample) or aborted while it
    waited: the sample is empty and the plan was never made, so estimation stayed off for good.
    Now the next step plans with what is in."""
    sc, t = _arriving(0.01)
    for i in range(5):
        _arrive(sc, f"r{i}")
    sc.prepare()
    (only,) = sc.pending_sample
    if how == "retracted":
        sc.schedule(BIG._replace(slots=1))
        assert set(sc.running) == {only}
        sc.retracted(only)
        sc.add(only, readd=True, prefix=[("g", 64)], prompt_len=80, max_tokens=1000)
    else:
        sc.remove(only)
    assert not sc.pending_sample and not sc.planned
    sc.schedule(BIG._replace(slots=1))
    assert sc.planned
    sc.check_integrity()


def test_a_batch_after_the_engine_drained_is_sampled_anew():
    """A server's warm-up request (8 tokens) was the sample of everything after it: every later
    request was estimated at 8. A request that finds nothing waiting or running after the plan
    starts a new batch, sampled and planned afresh."""
    sc, t = _arriving(0.1)
    _arrive(sc, "warmup", "w")
    (a,) = sc.schedule(BIG)
    sc.finished(a.rid, 8)
    assert sc.planned and not len(t)
    for i in range(30):
        _arrive(sc, f"u{i}", "user")
    assert not sc.prepared and not sc.planned
    took = sc.schedule(BIG)
    sample = [x.rid for x in took if x.side == SAMPLE]
    assert len(sample) == 3 and not sc.planned
    for rid in sample:
        sc.finished(rid, 400)
    assert sc.planned and {r.output_len for r in t.reqs.values()} == {400}
    sc.check_integrity()


def test_a_recreated_node_cut_in_two_counts_its_sample_once():
    """A node re-created where a sampled node was pruned reads that node's samples; once a later
    arrival cut its edge, both parts read them, and a sample below was added twice to the pruned
    node (n 3 where 2 samples finished: a probe)."""
    est = OutputLengthEstimator(sample_fraction=0.0)
    tree = ResourceTree(COST, est)
    tree.add("s0", tokens=[1, 2], max_tokens=1000)
    tree.add("anchor", tokens=[9], max_tokens=1000)
    tree.reqs["s0"].sample = True
    pruned_path = tree.path(tree.reqs["s0"].node)
    tree.remove("s0")  # taken: its node pruned and remembered (a sample went through it)
    est.record(pruned_path, 100)
    tree.add("a", tokens=[1, 2, 3, 4], max_tokens=1000)  # re-created below the pruned node's place
    tree.add("b", tokens=[1, 2, 3, 5], max_tokens=1000)  # cuts the new node after (1, 2, 3)
    path = tree.path(tree.reqs["a"].node)
    est.record(path, 300)
    pruned = pruned_path[-1]
    assert (pruned.sample_n, pruned.sample_sum) == (2, 400)
    assert est.estimate(tree.reqs["b"].node, 1000) == 200
    est.record(path, -300, count=-1)  # a provisional record taken back leaves the first one alone
    assert (pruned.sample_n, pruned.sample_sum) == (1, 100)
    tree.check_integrity()
