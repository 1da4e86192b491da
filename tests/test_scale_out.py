"""Scale-out without an engine: the simulator's dealings, the replica assignment, CPU binding,
the every-rank blend check, and the routing field against SGLang 0.5.23's DP controller."""

from __future__ import annotations

import asyncio
import types

import pytest

from blendserve_sgl.batch import dispatch
from blendserve_sgl.batch.prompts import Prepared
from blendserve_sgl.batch.requests import BatchRequest
from blendserve_sgl.sim import EngineConfig, RunSpec
from blendserve_sgl.sim.scale_out import BLOCK, deal, scale_out
from blendserve_sgl.workloads import Record

from _helpers import COST


def _records(n: int) -> list[Record]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append(Record(f"m{i}", 900, (("sys", 100), (f"subj{i % 5}", 600)), 2, "mmlu"))
        elif kind == 1:
            out.append(Record(f"c{i}", 1500 + i % 50, (("sysc", 40),), 20, "code"))
        else:
            out.append(Record(f"v{i}", 150, (("sysv", 40),), 600 + 7 * (i % 40), "long"))
    return out


SPEC = RunSpec(COST, EngineConfig.for_cost(COST, kv_gb=2.0, max_running=64, chunked_prefill=512))


@pytest.mark.parametrize("how", ["blend", "round-robin", "blocks", "blend-even-pieces", "blend-cuts",
                                 "blend-cuts-told"])
def test_deal_gives_every_record_to_one_engine(how):
    recs = _records(700)
    parts = deal(recs, 3, how, SPEC)
    assert len(parts) == 3
    assert sorted(r.rid for p in parts for r in p) == sorted(r.rid for r in recs)
    order = {r.rid: i for i, r in enumerate(recs)}
    assert all([order[r.rid] for r in p] == sorted(order[r.rid] for r in p) for p in parts)  # arrival order kept
    if how == "round-robin":
        assert [r.rid for r in parts[1]] == [r.rid for r in recs[1::3]]
    if how == "blocks":
        assert [r.rid for r in parts[0]] == [r.rid for r in recs[:BLOCK] + recs[3 * BLOCK:]]


def test_scale_out_runs_each_part_and_keeps_sharing():
    """Shards keep most of one engine's prefix hits (the strata spread each 40-request subject over
    the 4 engines, each computing its prefix once, as round-robin does) and more than round-robin,
    which deals the two requests on one document apart."""
    from blendserve_sgl.sim import Workload, simulate

    recs = _records(600) + [Record(f"d{i}.{c}", 905, ((f"doc{i}", 900),), 8, "doc") for i in range(100)
                            for c in range(2)]
    one = simulate(Workload(recs, COST), "blend", SPEC)
    shards = scale_out(recs, 4, "blend", SPEC, check=True)
    rr = scale_out(recs, 4, "round-robin", SPEC)
    assert sum(r.requests for r in shards.engines) == len(recs)
    assert shards.sharing_vs_one(one) >= 0.93
    assert shards.sharing_vs_one(one) > rr.sharing_vs_one(one)
    assert rr.plan is None and [len(p) for p in shards.plan.shards] == [r.requests for r in shards.engines]


def _prepared(cid: str, ids: list[int], max_tokens: int) -> Prepared:
    return Prepared(BatchRequest(1, cid, "completion", None, tuple(ids), max_tokens), ids, max_tokens)


def test_assign_balances_replicas():
    items = []
    for g in range(4):
        for i in range(30):
            items.append(_prepared(f"g{g}-{i}", [100 + g] * 50 + [g, i], 8 if g < 2 else 200))
    ranks = dispatch.assign(items, 2, COST)
    assert set(ranks) == {p.request.custom_id for p in items} and set(ranks.values()) == {0, 1}
    parts = dispatch.shards(items, 2, COST)
    assert sorted(id(p) for part in parts for p in part) == sorted(id(p) for p in items)
    plan = dispatch.plan(items, 2, COST)  # the plan behind them: shards index the items
    assert [[items[i] for i in ids] for ids in plan.shards] == parts and len(plan.compute) == 2
    assert all(ranks[p.request.custom_id] == r for r, part in enumerate(parts) for p in part)
    # memory work (decode reads at max_tokens) is the same on both replicas within 5%
    mem = [sum(2 * len(p.input_ids) * p.max_tokens + p.max_tokens ** 2 for p in part) for part in parts]
    assert abs(mem[0] - mem[1]) <= 0.05 * max(mem)


def test_interleave_advances_each_part_at_its_share():
    parts = [list(range(0, 6)), list(range(100, 102)), [], list(range(200, 203))]
    seq = list(dispatch.interleave(parts))
    assert sorted(seq) == sorted(x for p in parts for x in p)
    for p in parts:  # each part's order kept
        assert [x for x in seq if x in p] == p
    for k in range(1, len(seq) + 1):  # every prefix holds about its share of each part
        head = seq[:k]
        for p in parts:
            if p:
                assert abs(sum(x in p for x in head) - k * len(p) / len(seq)) <= 2


def test_cpu_bind_splits_cores():
    assert dispatch.cpu_bind(2, [0, 1]) == "0|1"
    assert dispatch.cpu_bind(2, [0, 1, 2, 3, 4]) == "0,1,2|3,4"
    with pytest.raises(dispatch.DispatchError, match="--dp 3 on CPU needs at least 3 CPU cores"):
        dispatch.cpu_bind(3, [0, 1])


def test_dp_takes_the_bind_the_user_set_as_the_error_advises(monkeypatch):
    """The error for --dp beyond the cores says to set SGLANG_CPU_OMP_THREADS_BIND; setting it
    changed nothing (the bind was computed, and refused, before the user's value was looked at)."""
    monkeypatch.setattr(dispatch.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.delenv("SGLANG_CPU_OMP_THREADS_BIND", raising=False)
    with pytest.raises(dispatch.DispatchError, match="or set SGLANG_CPU_OMP_THREADS_BIND yourself"):
        dispatch.dp_engine_kwargs(3, "cpu")
    monkeypatch.setenv("SGLANG_CPU_OMP_THREADS_BIND", "0|1|0")
    assert dispatch.dp_engine_kwargs(3, "cpu") == {"dp_size": 3}
    assert dispatch.os.environ["SGLANG_CPU_OMP_THREADS_BIND"] == "0|1|0"


class _StandInEngine:
    def __init__(self, policies):
        self.loop = asyncio.new_event_loop()

        async def get_internal_state():
            return [{"blendserve_policy": p} if p else {} for p in policies]

        self.tokenizer_manager = types.SimpleNamespace(get_internal_state=get_internal_state)


def test_check_ranks_fails_loudly_when_a_rank_is_not_blend():
    dispatch.check_ranks(_StandInEngine(["BlendPolicy", "BlendPolicy"]), 2)
    with pytest.raises(dispatch.DispatchError, match=r"expected 2 ranks running BlendPolicy, got \['BlendPolicy', None\]"):
        dispatch.check_ranks(_StandInEngine(["BlendPolicy", None]), 2)
    with pytest.raises(dispatch.DispatchError, match="expected 2 ranks"):
        dispatch.check_ranks(_StandInEngine(["BlendPolicy"]), 2)


def test_plugin_reports_the_policy_class_in_the_internal_state():
    from blendserve_sgl.sglang_plugin import _after_get_internal_state

    class BlendPolicy:
        pass

    result = types.SimpleNamespace(internal_state={"schedule_policy": "blend"})
    _after_get_internal_state(result, types.SimpleNamespace(policy=BlendPolicy()))
    assert result.internal_state["blendserve_policy"] == dispatch.POLICY_CLASS


def test_routed_dp_rank_reaches_that_rank_in_sglangs_controller(monkeypatch):
    """SGLang's own DP controller method, on a stand-in controller: a request that carries
    routed_dp_rank goes to that worker, whatever the round-robin counter says."""
    dpc = pytest.importorskip("sglang.srt.managers.data_parallel_controller")
    sent = []
    monkeypatch.setattr(dpc, "sock_send", lambda worker, req: sent.append((worker, req)))
    ctl = types.SimpleNamespace(workers=["w0", "w1"], _active_workers=[0, 1], round_robin_counter=0,
                                status=[True, True])
    ctl.maybe_external_dp_rank_routing = types.MethodType(dpc.DataParallelController.maybe_external_dp_rank_routing,
                                                          ctl)
    for rank in (1, 1, 0, 1):
        req = types.SimpleNamespace(routed_dp_rank=rank)
        dpc.DataParallelController.round_robin_scheduler(ctl, req)
        assert sent[-1] == (f"w{rank}", req)
    dpc.DataParallelController.round_robin_scheduler(ctl, types.SimpleNamespace(routed_dp_rank=None))
    assert sent[-1][0] == "w0"  # without it, the controller's own round-robin


@pytest.mark.parametrize("argv, message", [
    (["--dp", "2", "--ray"], "--dp and --ray are two ways to run replicas"),
    (["--ray-address", "head:6379"], "--replicas, --ray-address and --gpus-per-replica apply to --ray runs"),
    (["--gpus-per-replica", "1"], "--replicas, --ray-address and --gpus-per-replica apply to --ray runs"),
    (["--replicas", "3"], "--replicas, --ray-address and --gpus-per-replica apply to --ray runs"),  # was ignored
    (["--ray", "--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1"),
])
def test_scale_out_flags_are_checked_before_anything_starts(tmp_path, capsys, argv, message):
    from blendserve_sgl.batch.cli import main

    src = tmp_path / "in.jsonl"
    src.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "hi"}}\n')
    assert main([str(src), "-o", str(tmp_path / "out.jsonl"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()


def test_replicas_beyond_the_cores_are_named_by_their_flag():
    """`--ray --replicas 4` on 2 cores was a DispatchError traceback naming `--dp 4`, after a
    local Ray cluster had started."""
    from blendserve_sgl.batch.dispatch import DispatchError, cpu_bind

    assert cpu_bind(2, cpus=[0, 1], flag="--replicas") == "0|1"
    with pytest.raises(DispatchError, match="--replicas 4 on CPU needs at least 4 CPU cores .* lower --replicas$"):
        cpu_bind(4, cpus=[0, 1], flag="--replicas")  # each replica is bound by the run: no variable to set


def test_floor_is_a_lone_requests_least_time():
    """The critical-path floor by hand, a lower bound on any engine holding the request, and
    tight for the request alone (decode steps: weights + its KV, plus the interference share of
    one token's compute; the prefill step at least its weights)."""
    from blendserve_sgl.sim import ExecModel, Workload, simulate
    from blendserve_sgl.sim.scale_out import floor_seconds
    from blendserve_sgl.core.pacing import weight_read_seconds as weight_seconds

    p, d = 300, 400
    lone = Record("lone", p, (), d, "long")
    w, kv = weight_seconds(COST), COST.kv_bytes_per_token / COST.hardware.effective_bandwidth
    floor = floor_seconds([lone, Record("short", 50, (), 3, "x")], COST)
    assert floor == pytest.approx(d * w + sum(p + k for k in range(1, d)) * kv)
    mode = ExecModel("overlapped", 0.1)
    alone = simulate(Workload([lone], COST), "blend", SPEC).time(mode)
    slack = 0.1 * (d - 1) * COST.comp_time(1) + 1.1 * COST.comp_time(p)
    assert floor <= alone <= floor + slack
    crowd = simulate(Workload(_records(300) + [lone], COST), "blend", SPEC).time(mode)
    assert crowd >= floor


def test_diagnose_splits_the_loss_consistently():
    from blendserve_sgl.sim import ExecModel, Workload, simulate
    from blendserve_sgl.sim.scale_out import diagnose, floor_seconds

    recs = _records(600)
    mode = ExecModel("overlapped", 0.1)
    whole = Workload(recs, COST)
    one = simulate(whole, "blend", SPEC)
    floor = floor_seconds(recs, COST)
    for how in ("blend", "round-robin"):
        run = scale_out(recs, 3, how, SPEC)
        got = diagnose(run, one, floor, whole.density, mode)
        times = [r.time(mode) for r in run.engines]
        assert got["time_max_over_mean"] == pytest.approx(max(times) * 3 / sum(times), abs=1e-4)
        assert got["work_sum_over_one"] == pytest.approx(sum(times) / one.time(mode), abs=1e-4)
        assert got["bound"] == pytest.approx(min(3.0, one.time(mode) / floor), abs=1e-4)
        assert got["scaling_over_bound"] == pytest.approx(run.scaling(one, mode) / got["bound"], abs=1e-3)
        # the scaling is the balanced one over the slowest engine's excess: N / (max/mean) / (sum/one)
        assert got["balanced_scaling"] == pytest.approx(3 * one.time(mode) / sum(times), abs=1e-4)
        assert run.scaling(one, mode) == pytest.approx(got["balanced_scaling"] / got["time_max_over_mean"], rel=1e-3)
        assert 0 < got["slowest_tail_s"] <= got["slowest_time_s"] == pytest.approx(max(times), abs=0.1)
        assert got["engines_weight_bound_s"] <= got["slowest_time_s"] + 0.1  # T_w is a lower bound
        drift = max(abs(Workload(part, COST).density / whole.density - 1) for part in deal(recs, 3, how, SPEC))
        assert got["density_drift_max"] == pytest.approx(drift, abs=1e-4)


def test_fed_pieces_run_once_and_none_held_is_the_static_dealing():
    """`fed`: with no piece held back the engines run exactly their shards (the engine times of
    `scale_out`); with pieces held back and fed on demand every request still runs once."""
    from blendserve_sgl.sim import ExecModel
    from blendserve_sgl.sim.scale_out import fed

    recs = _records(600)
    mode = ExecModel("overlapped", 0.1)
    static = scale_out(recs, 3, "blend-cuts-told", SPEC)
    same = fed(recs, 3, SPEC, mode, held=0)
    assert [r.time(mode) for r in same.engines] == [r.time(mode) for r in static.engines]
    assert [r.requests for r in same.engines] == [r.requests for r in static.engines]
    for held in (1, 3):
        run = fed(recs, 3, SPEC, mode, held=held, stripes=2)
        assert len(run.plan.pieces) == 6
        assert sum(r.requests for r in run.engines) == len(recs)
        assert sum(r.output_tokens for r in run.engines) == sum(r.output_len for r in recs)
    with pytest.raises(ValueError, match="held"):
        fed(recs, 3, SPEC, mode, held=6, stripes=2)


def test_ray_replica_holds_its_engines_window_in_chunks():
    """Chunks in flight per replica: the engine's window (`feed.window_size` over the shard's mean
    prompt + max_tokens) in chunks, rounded up, at least 2."""
    from blendserve_sgl.batch.feed import FALLBACK_WINDOW, FACTOR, MIN_WINDOW
    from blendserve_sgl.batch.ray_runner import chunks_in_flight

    part = [_prepared(f"r{i}", [1] * 90, 10) for i in range(10)]  # 100 tokens each
    assert chunks_in_flight(None, None, part, 256) == -(-FALLBACK_WINDOW // 256)
    assert chunks_in_flight(400_000, 1000, part, 256) == -(-FACTOR * 1000 // 256)  # running slots bind
    assert chunks_in_flight(60_000, 1000, part, 256) == -(-FACTOR * 600 // 256)  # KV tokens / 100 bind
    assert chunks_in_flight(1000, 4, part, 256) == max(2, -(-MIN_WINDOW // 256))
    assert chunks_in_flight(400_000, 1000, [], 256) >= 2


def test_shard_profiles_against_each_engine_run_by_hand():
    """Every field of `shard_profiles` recomputed from a plain run of each part: work totals from
    the part's tree, long-output requests counted by hand, first admissions recorded by scanning
    every request after every step, the time split and tail from the run's own steps."""
    import numpy as np

    from blendserve_sgl.sim import ExecModel, Workload, simulate
    from blendserve_sgl.sim.scale_out import LONG_QUANTILE, LOW_KV, diagnose, floor_seconds, shard_profiles
    from blendserve_sgl.sim.timing import step_seconds

    recs = _records(600)
    mode = ExecModel("overlapped", 0.1)
    parts = deal(recs, 3, "blend", SPEC)
    got = shard_profiles(parts + [[]], SPEC, mode)
    assert got[3] is None
    long_len = np.quantile([r.output_len for r in recs], LONG_QUANTILE)
    for part, prof in zip(parts, got):
        first: dict = {}

        def every(engine, first=first):
            for r in engine.requests:
                if r.admissions and r.rid not in first:
                    first[r.rid] = engine.steps

        load = Workload(part, COST)
        res = simulate(load, "blend", SPEC, on_step=every)
        steps = step_seconds(res.ops, mode)
        total = steps.sum()
        longs = [r for r in part if r.output_len >= long_len]
        starts = sorted(steps[:first[r.rid] - 1].sum() / total for r in longs)
        assert prof["requests"] == len(part) and prof["steps"] == res.steps
        assert prof["compute_tokens"] == load.reference.root.tokens - load.reference.root.saved
        assert prof["memory_units"] == load.reference.root.mem
        assert prof["long_requests"] == len(longs)
        assert prof["long_output_tokens"] == sum(r.output_len for r in longs)
        if longs:
            assert prof["long_start"] == pytest.approx([starts[0], starts[len(starts) // 2], starts[-1]], abs=1e-4)
        else:
            assert prof["long_start"] is None
        assert prof["time_s"] == pytest.approx(total, abs=0.05)
        assert prof["retractions"] == res.retractions and prof["mean_kv"] == pytest.approx(res.mean_kv, abs=1e-4)
        low = np.asarray(res.series["kv_active"]) < LOW_KV * res.kv_tokens
        assert prof["low_kv_time_share"] == pytest.approx(steps[low].sum() / total, abs=1e-4)
        split = res.time_split(mode)
        assert all(prof[f"{k}_s"] == split[k] for k in ("compute_only", "memory_only", "weights", "kv_read"))
    run = scale_out(recs, 3, "blend", SPEC)
    loss = diagnose(run, simulate(Workload(recs, COST), "blend", SPEC), floor_seconds(recs, COST), 1.0, mode)
    assert sum(p["long_requests"] for p in got[:3]) >= 0.01 * len(recs)
    slowest = max(got[:3], key=lambda p: p["time_s"])
    assert loss["slowest_tail_s"] == pytest.approx(slowest["tail_share"] * slowest["time_s"], abs=0.2)
