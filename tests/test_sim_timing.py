"""Step time in the two execution modes, and the run metrics built on it."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np

import pytest

from blendserve_sgl.core import CostModel
from blendserve_sgl.sim import ExecModel
from blendserve_sgl.sim.metrics import min_steps, optimal_seconds, weight_bound_seconds
from blendserve_sgl.sim.run import RunSpec, Workload, simulate
from blendserve_sgl.sim.engine import EngineConfig
from blendserve_sgl.sim.request import from_records
from blendserve_sgl.core.pacing import weight_read_seconds as weight_seconds
from blendserve_sgl.sim.timing import StepSeconds, operator_seconds, split_seconds, step_seconds
from blendserve_sgl.workloads import mixed_workload

COST = CostModel.from_names("llama-3.1-8b", "a100")


def test_operator_times_by_hand():
    """A100: 312 TFLOP/s, 2.039 TB/s. Llama-3.1-8B: 2 x 7.5e9 FLOP per token (GEMM weights with
    the LM head), 128 KiB of KV per token, 16.06 GB of weights."""
    comp, weights, attn, over = operator_seconds(COST, [0, 100, 10_000], [1_000_000, 0, 0])
    assert list(over) == [0.0, 0.0, 0.0]  # the GPU presets carry no engine overhead
    w = COST.model.num_params * 2 / 2.039e12
    assert w == pytest.approx(weight_seconds(COST)) and 7.8e-3 < w < 8.0e-3
    assert list(weights) == [0.0, w, w]  # a step that runs a GEMM reads the weights once
    assert comp[2] == pytest.approx(10_000 * 2 * COST.model.gemm_params / 312e12)
    assert attn[0] == pytest.approx(1_000_000 * 131072 / 2.039e12)



def test_a_mixture_of_experts_step_reads_the_experts_its_tokens_route_to():
    """Mixtral-8x7B on an A100: a step reads the dense weights and, per sparse layer, the experts
    its tokens reach, 1 - (3/4)^n of them for n tokens (top-2 of 8); enumerated here for two tokens
    over every pair of routings. The weight-charging bound and the scale-out floor charge one
    token's read; a dense model reads everything at any size."""
    from itertools import combinations, product

    cost = CostModel.from_names("mixtral-8x7b", "a100")
    m = cost.model
    bw = cost.hardware.effective_bandwidth
    picks = list(combinations(range(8), 2))
    touched = sum(len(set(a) | set(b)) for a, b in product(picks, picks)) / len(picks) ** 2 / 8
    assert touched == pytest.approx(1 - 0.75 ** 2)
    _, weights, _, _ = operator_seconds(cost, [0, 1, 2, 4096], [0, 0, 0, 0])
    dense = m.weight_read_bytes - m.expert_bytes
    assert list(weights[:3]) == pytest.approx([0.0, (dense + m.expert_bytes / 4) / bw,
                                               (dense + m.expert_bytes * touched) / bw])
    assert weights[3] == pytest.approx(m.weight_read_bytes / bw)
    reqs = [SimpleNamespace(prompt_len=100, output_len=50)]
    mem = (49 * 100 + 50 * 49 / 2) * m.kv_bytes_per_token / bw
    assert weight_bound_seconds(reqs, cost, 0.0, 64) == pytest.approx(mem + 50 * (dense + m.expert_bytes / 4) / bw)
    _, dense_w, _, _ = operator_seconds(COST, [1, 4096], [0, 0])
    assert dense_w[0] == dense_w[1] == pytest.approx(weight_seconds(COST))

def test_lm_head_only_for_sampled_tokens():
    """SGLang computes logits only for the tokens it samples: a prefill step of 512 prompt tokens
    pays the decoder layers for 512 tokens and no LM head; a decode step of 64 requests pays both
    for 64 tokens. Llama-3.1-8B's LM head: 128,256 x 4,096 weights of its GEMM weights."""
    head = 128_256 * 4_096
    assert COST.model.lm_head_params == head
    layers = COST.model.gemm_params - head
    comp = operator_seconds(COST, [512, 64, 576], [0, 40_000, 40_000], None, [0, 64, 64]).comp
    assert list(comp) == pytest.approx([512 * 2 * layers / 312e12, 64 * 2 * (layers + head) / 312e12,
                                        (576 * layers + 64 * head) * 2 / 312e12])
    assert COST.seconds_per_layer_token + COST.seconds_per_sampled_token == pytest.approx(COST.seconds_per_compute_token)


def test_modes():
    ops = StepSeconds(np.array([3.0, 1.0, 0.0, 1.0]), np.array([0.5, 0.5, 0.0, 0.5]), np.array([1.0, 2.0, 5.0, 0.0]))
    # sequential: max(comp, w) + attn; overlapped: max(comp, w + attn) + i x min(comp, w + attn)
    assert list(step_seconds(ops, ExecModel("sequential"))) == [4.0, 3.0, 5.0, 1.0]
    assert list(step_seconds(ops, ExecModel("overlapped", 0.0))) == [3.0, 2.5, 5.0, 1.0]
    assert list(step_seconds(ops, ExecModel("overlapped", 0.5))) == [3.75, 3.0, 5.0, 1.25]
    assert list(step_seconds(ops, ExecModel("overlapped", 1.0))) == [4.5, 3.5, 5.0, 1.5]  # no overlap: comp + mem
    with pytest.raises(ValueError, match="unknown execution mode 'fast'"):
        ExecModel("fast")
    with pytest.raises(ValueError, match="interference"):
        ExecModel("overlapped", 1.5)


def test_decode_step_pays_weights_and_kv_reads_on_one_hbm():
    """A100 preset: a decode step of 128 requests reading 31,416 KV tokens moves 7.88 ms of
    weights and 2.02 ms of KV through HBM; it cannot take 8.08 ms (weights and KV overlapped for
    free), only at least their sum: 9.90 ms, plus interference x its tiny compute."""
    ops = operator_seconds(COST, [128], [31_416])
    assert ops.weights[0] == pytest.approx(7.88e-3, abs=0.01e-3)
    assert ops.attn[0] == pytest.approx(31_416 * 131072 / 2.039e12) == pytest.approx(2.02e-3, abs=0.01e-3)
    t = step_seconds(ops, ExecModel("overlapped", 0.1))[0]
    assert t >= ops.weights[0] + ops.attn[0] > 9.8e-3
    assert t == pytest.approx(ops.weights[0] + ops.attn[0] + 0.1 * ops.comp[0])
    assert step_seconds(ops, ExecModel("sequential"))[0] == pytest.approx(ops.weights[0] + ops.attn[0])


def test_time_split_adds_up():
    ops = operator_seconds(COST, [128, 4096, 0, 700], [31_416, 50_000, 0, 400_000])
    model = ExecModel("overlapped", 0.1)
    split = split_seconds(ops, model)
    total = step_seconds(ops, model).sum()
    assert split["overlapped"] + split["compute_only"] + split["memory_only"] + split["interference"] + \
        split["overhead"] == pytest.approx(total)
    assert split["weights"] + split["kv_read"] == pytest.approx(float((ops.weights + ops.attn).sum()))


def test_weight_bound_by_hand():
    """T_w = max(C, M + N_min w): C the decoder layers for every token but the last output and
    the shared prefixes, the LM head for the d - 1 tokens decode steps sample; M the decode steps'
    KV reads, (d - 1) p + d (d - 1) / 2 tokens; N_min = max(longest output, ceil(output tokens /
    max_running))."""
    from blendserve_sgl.workloads import Record

    recs = [Record("a", 100, (), 10, "x"), Record("b", 300, (), 50, "x"), Record("c", 20, (), 5, "x")]
    reqs = from_records(recs)
    assert min_steps(reqs, 1) == 65 and min_steps(reqs, 64) == 50
    reads = 9 * 100 + 45 + 49 * 300 + 1225 + 4 * 20 + 10
    mem = reads * COST.kv_bytes_per_token / COST.hardware.effective_bandwidth
    comp = (109 + 349 + 24 - 0.2 * (110 + 350 + 25)) * COST.seconds_per_layer_token + \
        (9 + 49 + 4) * COST.seconds_per_sampled_token
    assert weight_bound_seconds(reqs, COST, 0.2, 64) == pytest.approx(max(comp, mem + 50 * weight_seconds(COST)))
    assert weight_bound_seconds(reqs, COST, 0.2, 1) == pytest.approx(max(comp, mem + 65 * weight_seconds(COST)))


def test_weight_bound_holds_where_the_papers_optimum_does_not():
    """Long prompts, short outputs (the Azure code shape): T_o charges every token the LM head
    and 2 p d + d^2 KV units, more than any step does, so a run reads above 1 of T_o; T_w, the
    step model's own count, stays a bound in both modes."""
    from blendserve_sgl.workloads import Record

    recs = [Record(f"r{i}", 2048, (), 4, "x") for i in range(64)]
    wl = Workload(recs, COST)
    spec = RunSpec(COST, EngineConfig.for_cost(COST, kv_gb=8, max_running=64, chunked_prefill=8192))
    res = simulate(wl, "fcfs", spec)
    for model in (ExecModel("overlapped", 0.0), ExecModel("sequential")):
        assert res.fraction_of_optimal(model) > 1.0 >= res.fraction_of_weight_bound(model) > 0.5


def test_run_metrics_are_consistent():
    """T_o is the cost model's optimum with the DFS sharing; no schedule beats it; overlapped is
    never slower than sequential; throughput is tokens over time; sharing equals the hits."""
    recs = mixed_workload(400, seed=2)
    wl = Workload(recs, COST)
    assert wl.optimal_s == pytest.approx(optimal_seconds(from_records(recs), COST, wl.reference.root.sharing))
    spec = RunSpec(COST, EngineConfig.for_cost(COST, kv_gb=8, max_running=128, chunked_prefill=512))
    ovl, seq = ExecModel("overlapped", 0.0), ExecModel("sequential")
    for policy in ("dfs", "blend"):
        res = simulate(wl, policy, spec)
        assert 0 < res.fraction_of_weight_bound(ovl) <= 1.0 and res.fraction_of_weight_bound(seq) <= 1.0
        assert res.time(ovl) <= res.time(seq)
        assert res.throughput(seq) == pytest.approx((res.prompt_tokens + res.output_tokens) / res.time(seq))
        assert res.sharing == pytest.approx(res.first_hit_tokens / res.prompt_tokens) and res.sharing > 0
        assert 0 < res.mean_kv <= res.peak_kv <= 1


def test_causal_prefill_attention_adds_compute_only():
    """With the cost model's "causal" option a step's compute carries its prefill-attention
    pairs; weights and KV reads are the same; the paper's option ignores them."""
    causal = CostModel.from_names("llama-3.1-8b", "a100", prefill_attention="causal")
    paper = operator_seconds(COST, [2048, 64], [0, 10_000], [2048 * 2049 // 2, 0])
    charged = operator_seconds(causal, [2048, 64], [0, 10_000], [2048 * 2049 // 2, 0])
    assert list(charged.comp - paper.comp) == pytest.approx([2048 * 2049 // 2 * causal.seconds_per_attention_pair, 0])
    assert list(charged.weights) == list(paper.weights) and list(charged.attn) == list(paper.attn)


OVERHEAD = CostModel(COST.model, replace(COST.hardware, step_overhead_s=0.01, request_overhead_s=0.001,
                                         prefill_token_overhead_s=1e-5, kv_token_overhead_s=1e-7))


def test_engine_overhead_by_hand():
    """10 ms per step that runs, 1 ms per decoding request, 10 us per prompt token, 0.1 us per KV
    token held while decoding: a prefill step of 512 tokens with no decode pays 10 + 5.12 ms (its
    pool's tokens are not charged), a decode step of 64 requests holding 40,000 KV tokens 10 + 64 +
    4 = 78 ms, an empty step nothing; added to both modes' operator time."""
    ops = operator_seconds(OVERHEAD, [512, 64, 0], [0, 40_000, 0], None, [0, 64, 0], [30_000, 40_000, 0])
    assert list(ops.overhead) == pytest.approx([0.01512, 0.078, 0.0])
    base = operator_seconds(COST, [512, 64, 0], [0, 40_000, 0], None, [0, 64, 0], [30_000, 40_000, 0])
    for mode in (ExecModel("sequential"), ExecModel("overlapped", 0.1)):
        assert list(step_seconds(ops, mode) - step_seconds(base, mode)) == pytest.approx([0.01512, 0.078, 0.0])
    split = split_seconds(ops, ExecModel("overlapped", 0.1))
    assert split["overhead"] == pytest.approx(0.09312)
    with pytest.raises(ValueError, match="step_overhead_s must be a finite number >= 0"):
        replace(COST.hardware, step_overhead_s=-1.0)


def test_engine_overhead_is_the_same_term_for_every_policy():
    """Every policy's run is timed by the one function: its overhead is exactly steps that ran x
    step_overhead_s + decoded requests x request_overhead_s + prompt tokens computed x
    prefill_token_overhead_s + KV tokens held in decoding steps x kv_token_overhead_s, and the
    time grows by that much."""
    recs = mixed_workload(300, seed=4)
    engine = EngineConfig.for_cost(COST, kv_gb=4, max_running=64, chunked_prefill=512)
    plain, charged = Workload(recs, COST), Workload(recs, OVERHEAD)
    for policy in ("fcfs", "sglang-lpm", "sglang-dfs-weight", "dfs", "balance", "blend"):
        a = simulate(plain, policy, RunSpec(COST, engine))
        b = simulate(charged, policy, RunSpec(OVERHEAD, engine))
        assert b.steps == a.steps and list(b.series["decode"]) == list(a.series["decode"])  # same schedule
        ran = int(((a.series["prefill"] + a.series["decode"]) > 0).sum())
        expect = 0.01 * ran + 0.001 * int(a.series["decode"].sum()) + 1e-5 * int(a.series["prefill"].sum()) \
            + 1e-7 * float(a.series["kv_active"][a.series["decode"] > 0].sum())
        assert float(np.sum(b.ops.overhead)) == pytest.approx(expect)
        seq = ExecModel("sequential")
        assert b.time(seq) - a.time(seq) == pytest.approx(expect)
        assert a.retimed(OVERHEAD).time(seq) == pytest.approx(b.time(seq))
