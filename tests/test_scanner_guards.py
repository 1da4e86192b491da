"""The scanner's guards against long outputs admitted on estimates: `fill_settled_only` (while the
sample runs, no fill from a class whose sample is still running) and `reserve_growth` (the KV
running requests will still grow into beyond their reservations is kept free). Each switch
changes the outcome on a small case; with both on, every request is handed out exactly once,
budgets (reservations plus growth reserves) are never exceeded, and the run ends."""

import collections

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl.core import Budget, DualScanner, OutputLengthEstimator, ResourceTree, ScanConfig
from blendserve_sgl.core.scanner import SAMPLE

from _helpers import COST, length_records, mixed_workload, one_class_sampled, sim_engine

KVB = COST.kv_bytes_per_token
SMALL = dict(compute_prompt=(200, 800), memory_output=(100, 400))


def _two_classes(est, n=20):
    tree = ResourceTree(COST, est)
    for i in range(n):
        tree.add(f"long{i}", prompt_len=100, prefix=(("sysL", 40),), max_tokens=50_000)
        tree.add(f"short{i}", prompt_len=100, prefix=(("sysS", 40),), max_tokens=50_000)
    return tree


def _sampled_both():
    """An estimator whose seeded sample holds requests of both classes."""
    for seed in range(100):
        est = OutputLengthEstimator(sample_fraction=0.1, seed=seed)
        chosen = est.choose_sample(r.rid for r in _two_classes(est).reqs.values())
        if {c[:4] for c in chosen} == {"long", "shor"}:
            return est, chosen
    raise AssertionError("no seed samples both classes")


@pytest.mark.parametrize("on", [False, True])
def test_fill_settled_only_holds_a_class_whose_sample_still_runs(on):
    """The short class's samples finished, the long class's still run: with the switch the fill
    takes only short-class requests (a long one's estimate may still grow); without it, both."""
    est, chosen = _sampled_both()
    sc = DualScanner(_two_classes(est), ScanConfig(fill_while_sampling=True, fill_settled_only=on, sample_quorum=1.0))
    first = sc.schedule(Budget(1e15, len(chosen), 10 ** 6))
    assert sorted(a.rid for a in first) == sorted(chosen) and {a.side for a in first} == {SAMPLE}
    for rid in chosen:
        if rid.startswith("short"):
            sc.finished(rid, 20)
    assert sc.sampling and not sc.planned
    fill = sc.schedule(Budget(1e15, 100, 10 ** 6))
    classes = {a.rid[:4] for a in fill}
    assert classes == ({"shor"} if on else {"shor", "long"})
    assert sc.unsettled(next(r for r in sc.tree.reqs.values() if r.rid.startswith("long"))) if on else True
    sc.check_integrity()
    for rid in chosen:
        if rid.startswith("long"):
            sc.finished(rid, 900)
    assert sc.planned and not sc.sampling_at  # the plan is made; nothing is unsettled any more
    sc.check_integrity()


def test_reserve_growth_keeps_free_what_running_requests_will_grow_into():
    """Estimate 1,000 (the one sample finished at 1,000), reservations at the engine's ratio 0.1:
    a request reserves 100 prompt + 100 output tokens. With reserve_growth the other 900 must fit
    too (a budget of 200 tokens admits nothing; off, it admits one); once running, its growth
    reserve is 1,000 - max(generated, 100) tokens, past its estimate overrun_factor x its output so
    far less its output, and goes when it finishes."""
    outcome = {}
    for on in (False, True):
        sc = one_class_sampled(ScanConfig(reserve_growth=on), 1000)
        outcome[on] = sc.schedule(Budget(200 * KVB, 1, 10 ** 6, output_ratio=0.1))
        if not on:
            continue
        (a,) = sc.schedule(Budget(1e15, 1, 10 ** 6, output_ratio=0.1))
        assert a.output_len == 1000 and a.kv_bytes == (100 - a.cached_tokens + 100) * KVB
        assert sc.overrun_bytes == 900 * KVB
        sc.progress(a.rid, 40)
        assert sc.overrun_bytes == 900 * KVB  # its reservation still holds its first 100 tokens
        sc.progress(a.rid, 400)
        assert sc.overrun_bytes == 600 * KVB
        assert sc.watch_at(a.rid) == 400 + 1000 // 8
        sc.progress(a.rid, 1200)  # past its estimate: expected to reach 2 x 1,200
        assert sc.overrun_bytes == 1200 * KVB
        sc.check_integrity()
        sc.finished(a.rid, 1300)
        assert sc.overrun_bytes == 0 and not sc.overrun
    assert len(outcome[False]) == 1 and outcome[True] == []


def _recording(sc):
    """(budget less the growth reserves held, admissions, their growth reserves) per schedule call;
    cancelled rids."""
    log, cancelled = [], collections.Counter()
    schedule, cancel = sc.schedule, sc.cancel

    def record(budget):
        held = sc.overrun_bytes
        out = schedule(budget)
        log.append((budget.kv_bytes - held, out, sum(sc.overrun.get(a.rid, 0.0) for a in out)))
        return out

    sc.schedule = record
    sc.cancel = lambda rid: (cancelled.update([rid]), cancel(rid))[1]
    return log, cancelled


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 1000), st.integers(60, 240), st.booleans(), st.booleans(), st.sampled_from([2e9, 6e9]))
def test_guarded_runs_hand_out_every_request_once_within_budget(seed, n, settled, growth, kv_bytes):
    """Simulated runs with estimated lengths and the guards on: every request handed out exactly
    once net of the admissions SGLang's rule sent back, invariants every step (check=True), the run
    ends, and no step admits more reservation plus growth reserve than the budget left after the
    running requests' growth reserves."""
    wl = mixed_workload(n, seed, **SMALL)
    est = OutputLengthEstimator(sample_fraction=0.05, seed=seed % 3)
    engine = sim_engine(length_records(wl), known=False, estimator=est, kv_bytes=kv_bytes, max_running=48, chunk=512,
                        scan=ScanConfig(fill_while_sampling=True, fill_settled_only=settled, reserve_growth=growth))
    sc = engine.picker.scanner
    log, cancelled = _recording(sc)
    engine.run(check=True)
    handed = collections.Counter(a.rid for _, adm, _ in log for a in adm)
    handed.subtract(cancelled)  # net: once per engine admission (a retracted request comes back)
    assert +handed == collections.Counter({r.rid: r.admissions for r in engine.requests})
    assert all(r.state == "finished" and r.admissions >= 1 for r in engine.requests)
    assert not sc.running and not sc.overrun and not sc.sampling_at
    for room, adm, aside in log:
        assert sum(a.kv_bytes for a in adm) + aside <= max(room, 0.0) + 1e-6 * KVB


@pytest.mark.parametrize("switch", ["fill_settled_only", "reserve_growth"])
def test_guard_changes_the_simulated_run(switch):
    """The preset's switch reaches the simulator's blend and changes the run (the engine check off: on
    this small case the room of SGLang's own check binds before either guard does)."""
    from blendserve_sgl.core.preset import PRESET
    from blendserve_sgl.sim import EngineConfig, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import trace

    records, _ = trace("trace4", 600, COST, 0)  # long outputs in the sample
    wl = Workload(records, COST)
    engine = EngineConfig.for_cost(COST, kv_gb=4.0, max_running=64, chunked_prefill=512, pace=True)
    runs = {flag: simulate(wl, "blend", RunSpec(COST, engine, preset=PRESET.replace(engine_check=False, **{switch: flag})),
                              check=True)
            for flag in (True, False)}
    assert (runs[True].steps, runs[True].retractions) != (runs[False].steps, runs[False].retractions)
    assert all(r.output_tokens == sum(x.output_len for x in records) for r in runs.values())
