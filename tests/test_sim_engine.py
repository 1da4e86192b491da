"""The step loop: invariants after every step, exact token accounting against closed forms,
prefix hits against a brute-force longest-common-prefix, SGLang's retraction, mixed steps."""

import random

import pytest

from blendserve_sgl.core import CostModel
from blendserve_sgl.sim.engine import Engine, EngineConfig
from blendserve_sgl.sim.policies import POLICIES, make_picker
from blendserve_sgl.sim.request import from_tokens

COST = CostModel.from_names("llama-3.1-8b", "a100")


def token_work(seed: int, n: int, out=(1, 40), long_share=0.0, long_out=(100, 300)) -> dict:
    """Prompts from a few shared system prompts and subjects plus a unique tail."""
    rng = random.Random(seed)
    systems = [[rng.randrange(500) for _ in range(rng.randint(5, 40))] for _ in range(3)]
    subjects = [[rng.randrange(500) for _ in range(rng.randint(5, 60))] for _ in range(5)]
    work = {}
    for i in range(n):
        toks = list(systems[rng.randrange(3)])
        if rng.random() < 0.7:
            toks += subjects[rng.randrange(5)]
        toks += [500 + rng.randrange(10_000) for _ in range(rng.randint(1, 30))]
        d = rng.randint(*long_out) if rng.random() < long_share else rng.randint(*out)
        work[f"r{i}"] = (toks, d)
    return work


def run(work, policy="fcfs", known=True, check=True, **cfg):
    reqs = from_tokens(work, known=known)
    config = EngineConfig(**{"kv_tokens": 20_000, "max_running": 64, "chunked_prefill": 128, **cfg})
    engine = Engine(COST, config, make_picker(policy, reqs, COST, seed=1), reqs)
    return engine.run(check=check)


def lcp(a, b) -> int:
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_finishes_every_request_once_with_invariants(policy):
    """Tight KV (evictions, and retractions under SGLang's clipped reservations), invariants
    checked after every step: pages conserved, each request in one state, locks consistent."""
    work = token_work(3, 120, long_share=0.25)
    eng = run(work, policy, kv_tokens=2_500, clip_max_new_tokens=40)
    assert sorted(eng.finish_order) == sorted(work)
    assert eng.counters.output_tokens == sum(d for _, d in work.values())
    assert eng.free_tokens + eng.cache.total_tokens == eng.config.kv_tokens and eng.private == 0
    assert eng.cache.evictable_tokens == eng.cache.total_tokens  # nothing left locked
    if policy != "blend":  # SGLang's rule under-reserves outputs past the clip: retractions happen
        assert eng.counters.retractions > 0
        assert eng.counters.admit_rejections == 0  # SGLang's rule never admits without room


def test_blend_with_unknown_lengths_samples_then_plans():
    work = token_work(4, 150, long_share=0.2)
    eng = run(work, "blend", known=False, kv_tokens=4_000)
    assert sorted(eng.finish_order) == sorted(work)
    scanner = eng.picker.scanner
    assert scanner.planned and scanner.sample_size >= 1


def test_token_accounting_matches_closed_forms():
    """No retraction, no eviction: prefill computes sum (p - first hit); decode rounds compute
    d - 1 tokens per request (the first comes from prefill) and read sum over k=1..d-1 of
    (p + k) KV tokens."""
    work = token_work(5, 80)
    eng = run(work, "fcfs")
    reqs = {r.rid: r for r in eng.requests}
    assert eng.counters.retractions == 0 and eng.counters.evicted_tokens == 0
    s = eng.series
    assert sum(s["prefill"]) == sum(len(t) - reqs[rid].first_hit for rid, (t, _) in work.items())
    assert sum(s["decode"]) == sum(d - 1 for _, d in work.values())
    assert sum(s["kv_read"]) == sum((d - 1) * len(t) + d * (d - 1) // 2 for t, d in work.values())


def test_prefix_hits_equal_brute_force_when_requests_run_one_at_a_time():
    """One request at a time and a cache that never evicts: each request hits exactly its longest
    common prefix with any earlier prompt (capped one short of its length)."""
    work = token_work(6, 60)
    eng = run(work, "fcfs", max_running=1)
    prompts = [t for t, _ in work.values()]
    for i, r in enumerate(eng.requests):
        expect = max((lcp(prompts[i], p) for p in prompts[:i]), default=0)
        assert r.first_hit == min(expect, len(prompts[i]) - 1), r.rid


def test_prefix_hits_never_exceed_what_was_published_before():
    work = token_work(7, 200)
    eng = run(work, "balance", kv_tokens=3_000)
    prompts = {rid: t for rid, (t, _) in work.items()}
    for r in eng.requests:  # anything published before r was admitted came from another prompt
        best = max(lcp(prompts[r.rid], p) for rid, p in prompts.items() if rid != r.rid)
        assert r.first_hit <= best
    assert eng.counters.first_hit_tokens > 0 and eng.counters.evicted_tokens > 0


def test_retraction_follows_sglang_order_and_recomputes():
    """SGLang retracts the request with the fewest output tokens first; it waits again with its
    output so far, re-prefills it (prompt from the cache when still there) and finishes."""
    work = token_work(8, 60, out=(150, 250))
    seen = []
    reqs = from_tokens(work)
    picker = make_picker("fcfs", reqs, COST)
    inner = picker.retracted

    def retracted(r):
        running = [int(eng._gen[x.slot]) for x in eng._dec[:eng.n_dec]]
        seen.append((r.gen, min(running, default=r.gen)))
        inner(r)

    picker.retracted = retracted
    eng = Engine(COST, EngineConfig(kv_tokens=3_000, max_running=64, chunked_prefill=256, clip_max_new_tokens=30),
                 picker, reqs)
    eng.run(check=True)
    assert seen and eng.counters.retractions == len(seen)
    assert all(gen <= others for gen, others in seen)  # never one with more output than a survivor
    assert sum(eng.series["prefill"]) > sum(len(t) for t, _ in work.values()) - eng.counters.first_hit_tokens
    assert sorted(eng.finish_order) == sorted(work)


def test_mixed_and_alternating_steps():
    work = token_work(9, 60)
    mixed = run(work, "fcfs", mixed_chunk=True)
    alt = run(work, "fcfs", mixed_chunk=False)
    both = lambda e: sum(1 for p, d in zip(e.series["prefill"], e.series["decode"]) if p and d)  # noqa: E731
    assert both(mixed) > 0 and both(alt) == 0
    assert sum(mixed.series["decode"]) == sum(alt.series["decode"])


def test_request_larger_than_the_pool_is_named():
    """SGLang's admission never takes a request whose prompt and reserved output exceed the
    pool, so the run stalls; the error names the request that asks the most."""
    work = {"small": (list(range(1000, 1010)), 5), "big": (list(range(300)), 400)}
    with pytest.raises(RuntimeError, match=r"stalled .* largest waiting request, 'big' \(prompt 300, "
                                           r"max_new_tokens 400\), may need 700 KV tokens"):
        run(work, "fcfs", kv_tokens=500, check=False)


def test_config_is_checked():
    with pytest.raises(ValueError, match="kv_tokens"):
        EngineConfig(kv_tokens=0)
    cfg = EngineConfig.for_cost(COST)
    assert 400_000 < cfg.kv_tokens < 420_000  # 0.88 x 80 GB - 16 GB of weights, 128 KiB per token


@pytest.mark.parametrize("groups", [False, True])
def test_each_finished_chunk_is_cached(groups):
    """SGLang caches each finished prefill chunk (stash_chunked_request -> cache_unfinished_req):
    A and B share 4,096 prompt tokens, chunk 1,024. A is prefilled in steps 1-4 (1,024 each) and
    5 (its 100-token tail); B is admitted in step 5 next to it and finds all 4,096 shared tokens
    cached, though A's prefill is not done yet."""
    from blendserve_sgl.sim.request import SimRequest

    if groups:
        reqs = [SimRequest(rid, i, prompt_len=4196, prefix=(("shared", 4096),), output_len=3)
                for i, rid in enumerate("AB")]
    else:
        shared = list(range(4096))
        reqs = from_tokens({"A": (shared + [10_000 + i for i in range(100)], 3),
                            "B": (shared + [20_000 + i for i in range(100)], 3)})
    eng = Engine(COST, EngineConfig(kv_tokens=50_000, max_running=8, chunked_prefill=1024),
                 make_picker("fcfs", reqs, COST), reqs)
    eng.run(check=True)
    a, b = reqs
    assert (a.first_hit, b.first_hit) == (0, 4096)
    assert eng.series["prefill"][:6] == [1024, 1024, 1024, 1024, 100 + 100, 0]
    assert eng.counters.prefill_tokens == 4196 + 100
    # prefill attention: chunk i of A attends to the 1,024 i tokens before it and causally to
    # itself; A's tail and B's 100 uncached tokens attend to 4,096 cached tokens
    tri = lambda c: c * (c + 1) // 2  # noqa: E731
    assert eng.series["attn_pairs"][:5] == [1024 * 1024 * i + tri(1024) for i in range(4)] + [2 * (100 * 4096 + tri(100))]


def test_the_run_never_ends_with_requests_waiting():
    """Nothing runs, requests wait and the picker admits nothing: the run stops with the numbers."""
    reqs = from_tokens(token_work(1, 5))
    picker = make_picker("fcfs", reqs, COST)
    picker.pick = lambda view: []
    eng = Engine(COST, EngineConfig(kv_tokens=20_000, max_running=8, chunked_prefill=128), picker, reqs)
    with pytest.raises(RuntimeError, match=r"stalled at step 1: 5 requests wait \(5 in the fcfs picker\).*"
                                           r"free 20000 \+ evictable 0 of 20000 KV tokens, 8 slots, chunk 128"):
        eng.run()


def test_incremental_check_catches_a_leak_and_recounts_every_k_steps(monkeypatch):
    """run(check=True) checks what a step can break every step and recounts everything every
    FULL_CHECK_EVERY steps and at the end; a page leaked in between is caught at the next step."""
    from blendserve_sgl.sim import engine as engine_mod

    monkeypatch.setattr(engine_mod, "FULL_CHECK_EVERY", 7)
    reqs = from_tokens(token_work(4, 60))
    eng = Engine(COST, EngineConfig(kv_tokens=20_000, max_running=64, chunked_prefill=128),
                 make_picker("fcfs", reqs, COST), reqs)
    full = []
    inner = eng.check_integrity
    monkeypatch.setattr(eng, "check_integrity", lambda: (full.append(eng.steps), inner())[1])
    eng.run(check=True)
    assert full == [7 * k for k in range(1, eng.steps // 7 + 1)] + [eng.steps]

    reqs = from_tokens(token_work(4, 60))
    eng = Engine(COST, EngineConfig(kv_tokens=20_000, max_running=64, chunked_prefill=128),
                 make_picker("fcfs", reqs, COST), reqs)

    def leak(e):
        if e.steps == 3:
            e.free_tokens -= 1

    with pytest.raises(AssertionError, match="KV pages not conserved"):
        eng.run(check=True, on_step=leak)
    assert eng.steps == 4


def test_pacing_needs_mixed_steps():
    """Paced prefill sizes a step's chunk to the decode work in that step: with mixed steps it
    changes the schedule; without them (SGLang's default, a prefill step decodes nothing) the
    engine runs exactly as unpaced, as the plugin does (`core.pacing.paces`)."""
    from blendserve_sgl.core.pacing import paces

    assert paces(True, True) and not paces(True, False) and not paces(False, True)
    work = token_work(5, 150, out=(100, 300))  # memory-dense enough that paced chunks stay under the cap

    def steps(pace, mixed):
        eng = run(work, "fcfs", pace=pace, mixed_chunk=mixed, chunked_prefill=2048, max_running=1024,
                  kv_tokens=200_000)
        return eng.series["prefill"], eng.finish_order

    assert steps(True, False) == steps(False, False)
    assert steps(True, True) != steps(False, True)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_fully_cached_prompt_is_admitted_at_the_pools_bound(policy):
    """SGLang matches a prompt's first len - 1 tokens and locks only those; the admission rule
    charged the last token both as recomputed and as locked, so a workload `check_fits` passed,
    sized at its bound, stalled every policy (two one-token prompts in a 103-token pool: a probe)."""
    from blendserve_sgl.sim.run import RunSpec, Workload, simulate
    from blendserve_sgl.workloads import Record

    cost = CostModel.from_names("llama-3.1-8b", "a100")
    recs = [Record(rid, 1, (), 5, tokens=(0,), max_tokens=100) for rid in ("a", "b")]
    cfg = EngineConfig(kv_tokens=1 + 100 + 2, max_running=4, chunked_prefill=64)
    cfg.check_fits(recs, known=False)
    res = simulate(Workload(recs, cost), policy, RunSpec(cost, cfg, known_lengths=False), check=True)
    assert res.requests == 2 and res.output_tokens >= 2  # a stall raises before this
