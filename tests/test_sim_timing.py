"""Step time in the two execution modes, and the run metrics built on it."""

import numpy as np
import pytest

from blendserve_sgl.core import CostModel
from blendserve_sgl.sim import ExecModel
from blendserve_sgl.sim.metrics import optimal_seconds
from blendserve_sgl.sim.run import RunSpec, Workload, simulate
from blendserve_sgl.sim.engine import EngineConfig
from blendserve_sgl.sim.request import from_records
from blendserve_sgl.sim.timing import operator_seconds, step_seconds, weight_seconds
from blendserve_sgl.workloads import mixed_workload

COST = CostModel.from_names("llama-3.1-8b", "a100")


def test_operator_times_by_hand():
    """A100: 312 TFLOP/s, 2.039 TB/s. Llama-3.1-8B: 2 x 7.5e9 FLOP per token (GEMM weights with
    the LM head), 128 KiB of KV per token, 16.06 GB of weights."""
    gemm, attn = operator_seconds(COST, [0, 100, 10_000], [1_000_000, 0, 0])
    w = COST.model.num_params * 2 / 2.039e12
    assert w == pytest.approx(weight_seconds(COST)) and 7.8e-3 < w < 8.0e-3
    assert gemm[0] == 0 and gemm[1] == pytest.approx(w)  # below the ridge the weight read rules
    assert gemm[2] == pytest.approx(10_000 * 2 * COST.model.gemm_params / 312e12)
    assert attn[0] == pytest.approx(1_000_000 * 131072 / 2.039e12)


def test_modes():
    g, a = np.array([3.0, 1.0, 0.0]), np.array([1.0, 2.0, 5.0])
    assert list(step_seconds(g, a, ExecModel("sequential"))) == [4.0, 3.0, 5.0]
    assert list(step_seconds(g, a, ExecModel("overlapped", 0.0))) == [3.0, 2.0, 5.0]
    assert list(step_seconds(g, a, ExecModel("overlapped", 0.5))) == [3.5, 2.5, 5.0]
    assert list(step_seconds(g, a, ExecModel("overlapped", 1.0))) == [4.0, 3.0, 5.0]  # no overlap at all
    with pytest.raises(ValueError, match="unknown execution mode 'fast'"):
        ExecModel("fast")
    with pytest.raises(ValueError, match="interference"):
        ExecModel("overlapped", 1.5)


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
        assert 0 < res.fraction_of_optimal(ovl) <= 1.0
        assert res.time(ovl) <= res.time(seq)
        assert res.throughput(seq) == pytest.approx((res.prompt_tokens + res.output_tokens) / res.time(seq))
        assert res.sharing == pytest.approx(res.first_hit_tokens / res.prompt_tokens) and res.sharing > 0
        assert 0 < res.mean_kv <= res.peak_kv <= 1
