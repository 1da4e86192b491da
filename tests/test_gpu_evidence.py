"""bench/gpu_evidence.py --tiny on the CPU: every part runs, the JSON carries its fields, and the
fit's arithmetic holds on the CPU figures; the `h200-measured` preset and interference settings."""

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from blendserve_sgl.core import CostModel, HardwareSpec, ModelSpec
from blendserve_sgl.core.specs import (ASSUMED_INTERFERENCE, MEASURED, hardware, hardware_names, interference,
                                       measured_hardware)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.gpu_evidence import (TINY_CONFIG, Fit, Point, errors, evenly, fit, fitted_hardware,  # noqa: E402
                                 nonneg_lstsq, predict, regime)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_evidence")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_evidence.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (out / "gpu_evidence_tiny.log").read_text().strip().endswith("gpu_evidence_tiny.json")
    return json.loads((out / "gpu_evidence_tiny.json").read_text())


def test_tiny_run_fields(tiny):
    for key in ("device", "command", "cost_model_max_error", "step_prediction_median_error", "interference",
                "preset", "operators", "steps", "overlap"):
        assert key in tiny, key
    assert tiny["tiny"] is True and tiny["device"].startswith("cpu")
    assert "--tiny" in tiny["command"]
    assert {"median", "p25", "p75", "min", "max", "n"} <= set(tiny["interference"])
    assert {r["operator"] for r in tiny["operators"]} == {"gemm", "attention"}
    shapes = {r["shape"].split()[0] for r in tiny["operators"] if r["operator"] == "gemm"}
    assert shapes == {"qkv", "o", "gate_up", "down", "lm_head"}
    assert {r["policy"] for r in tiny["steps"]} == {"blend", "dfs"}
    assert any(r["prefill"] > 0 for r in tiny["steps"]) and all(r["decode"] > 0 for r in tiny["steps"])
    assert len(tiny["overlap"]["points"]) >= 2
    rep = tiny["schedule_replay"]["policies"]  # part 5: whole runs by systematic sampling
    assert set(rep) == {"blend", "sglang-lpm", "dfs"}
    for pol, r in rep.items():
        assert 0 < r["sampled"] <= r["steps"] and r["measured_s"] > 0 and r["predicted_run_s"] > 0
        assert r["measured_speedup_of_blend"] == pytest.approx(r["measured_s"] / rep["blend"]["measured_s"])
        assert r["predicted_speedup_of_blend"] == pytest.approx(r["predicted_run_s"] / rep["blend"]["predicted_run_s"])
    assert "do not overlap on a CPU" in tiny["note"]
    assert tiny["failures"] == []
    assert tiny["foreign_modules"] == []  # torch only: nothing from sglang, flashinfer or sgl_kernel was imported


def test_tiny_fit_arithmetic(tiny):
    """The fitted factors and every model time recomputed by hand from the JSON's own figures."""
    peak_f, peak_b = tiny["base_preset"]["flops"], tiny["base_preset"]["mem_bandwidth"]
    ridge = peak_f / peak_b
    ops = tiny["operators"]
    assert {r["operator"] for r in ops} == {"gemm", "attention"}  # no "sdpa" reference on a CPU
    secs = {id(r): r["measured_ms"] / 1e3 for r in ops}
    comp = [r for r in ops if r["operator"] == "gemm" and r["flops"] / r["bytes"] >= 8 * ridge]
    mem = [r for r in ops if r["operator"] == "attention" or r["flops"] / r["bytes"] <= ridge / 8]
    att = [r for r in ops if r["operator"] == "attention"]
    assert comp and att and {r["regime"] for r in comp} == {"gemm, compute-bound"}
    # the paper's roofline fit: medians
    paper = tiny["fit_without_latency"]
    assert paper["flops_efficiency"] == pytest.approx(statistics.median(r["flops"] / peak_f / secs[id(r)] for r in comp))
    assert paper["bandwidth_efficiency"] == pytest.approx(statistics.median(r["bytes"] / peak_b / secs[id(r)] for r in att))
    # the model: latency per operator kind + roofline; e_f the median over compute-bound GEMMs net of the latency
    f = tiny["fit"]
    c = {"gemm": f["gemm_latency_s"], "attention": f["attention_latency_s"]}
    e_f, e_b = f["flops_efficiency"], f["bandwidth_efficiency"]
    assert min(c.values()) >= 0 and e_b > 0
    assert e_f == pytest.approx(statistics.median(r["flops"] / peak_f / (secs[id(r)] - c["gemm"]) for r in comp))
    model = {}
    for r in ops:
        m = r["bytes"] / (peak_b * e_b)
        model[id(r)] = c[r["operator"]] + (max(r["flops"] / (peak_f * e_f), m) if r["operator"] == "gemm" else m)
        assert r["model_ms"] / 1e3 == pytest.approx(model[id(r)])
        assert r["error"] == pytest.approx(model[id(r)] / secs[id(r)] - 1)
    # least squares in relative error over the memory-bound points: the gradient vanishes along
    # every free unknown (the bandwidth term, and each latency the fit did not hold at 0)
    resid = [(model[id(r)] / secs[id(r)] - 1, r) for r in mem]
    scale = sum(abs(e) for e, _ in resid) + 1e-12
    assert abs(sum(e * r["bytes"] / secs[id(r)] for e, r in resid)) / max(r["bytes"] / secs[id(r)] for r in mem) \
        <= 1e-6 * scale
    for kind, lat in c.items():
        if lat > 0:
            assert abs(sum(e / secs[id(r)] for e, r in resid if r["operator"] == kind)) \
                <= 1e-6 * scale * max(1 / secs[id(r)] for r in mem)
    assert tiny["cost_model_max_error"] == pytest.approx(max(abs(r["error"]) for r in ops), abs=1e-4)
    # the preset: efficiencies capped at 1, the excess folded into the peak; effective rates are the fitted ones
    p = tiny["preset"]
    assert 0 < p["flops_efficiency"] <= 1 and 0 < p["bandwidth_efficiency"] <= 1
    assert p["flops"] * p["flops_efficiency"] == pytest.approx(peak_f * e_f)
    assert p["mem_bandwidth"] * p["bandwidth_efficiency"] == pytest.approx(peak_b * e_b)


def test_tiny_step_predictions(tiny):
    """The simulator's sequential step time by hand: max(GEMMs, weights / BW) + KV / BW + the
    fitted overheads; the held-out rows use the other policy's overheads."""
    spec = ModelSpec.from_hf_config(TINY_CONFIG, name="tiny-llama")
    assert tiny["model_spec"]["gemm_params"] == spec.gemm_params
    p = tiny["preset"]
    flops, bw = p["flops"] * p["flops_efficiency"], p["mem_bandwidth"] * p["bandwidth_efficiency"]

    def model(s, over):
        tokens = s["prefill"] + s["decode"]
        gemm = max(2 * ((spec.gemm_params - spec.lm_head_params) * tokens + spec.lm_head_params * s["decode"]) / flops,
                   spec.num_params * spec.dtype_bytes / bw)
        return (gemm + s["kv_read"] * spec.kv_bytes_per_token / bw, over["step_overhead_s"]
                + over["request_overhead_s"] * s["decode"] + over["prefill_token_overhead_s"] * s["prefill"])

    assert tiny["step_overheads"] == {k: p[k] for k in ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s")}
    for s in tiny["steps"]:
        ops, over = model(s, tiny["step_overheads"])
        assert s["operator_model_ms"] / 1e3 == pytest.approx(ops)
        assert s["sequential_model_ms"] / 1e3 == pytest.approx(ops + over)
        assert s["sequential_error"] == pytest.approx((ops + over) / (s["measured_ms"] / 1e3) - 1)
        # keyed by the policy predicted: the overheads fitted on the other policy's steps
        assert s["held_out_model_ms"] / 1e3 == pytest.approx(sum(model(s, tiny["step_overheads_held_out"][s["policy"]])))
    errs = sorted(abs(s["held_out_error"]) for s in tiny["steps"])
    assert tiny["step_prediction_median_error"] == pytest.approx(statistics.median(errs), abs=1e-4)
    for o in tiny["overlap"]["points"]:
        a, b, c = o["gemm_ms"], o["attention_ms"], o["concurrent_ms"]
        assert o["interference"] == pytest.approx((c - max(a, b)) / min(a, b), abs=2e-3)


def test_fit_on_hand_made_points():
    hw = HardwareSpec("x", flops=100e12, mem_bandwidth=1e12, mem_capacity=1e9)  # ridge 100 FLOP/byte
    pts = [Point("gemm", "big", 2e12 / 80e12, 2e12, 1e9),  # 2,000 FLOP/byte: compute-bound, at 80% of peak
           Point("gemm", "small", 1e-3, 1e9, 1e9),  # 1 FLOP/byte: below the ridge
           Point("attention", "a", 1e9 / 0.5e12, 0, 1e9), Point("attention", "b", 2e9 / 0.7e12, 0, 2e9),
           Point("attention", "c", 1e9 / 0.9e12, 0, 1e9)]
    f = fit(pts, hw)
    assert f.flops_efficiency == pytest.approx(0.8) and f.bandwidth_efficiency == pytest.approx(0.7)
    assert predict(pts[1], hw, f) == pytest.approx(1e9 / 0.7e12)  # weight-read bound
    assert predict(pts[0], hw, f) == pytest.approx(pts[0].seconds)
    over = fitted_hardware(hw, f._replace(flops_efficiency=1.25), "y")
    assert (over.flops, over.flops_efficiency) == (125e12, 1.0)
    assert evenly(list(range(10)), 2) == [2, 7] and evenly([1, 2], 5) == [1, 2]


def test_latency_fit_recovers_a_made_up_machine():
    """Points timed exactly as t = c_op + max(FLOPs / (F e_f), bytes / (BW e_b)): the fit returns
    c_gemm, c_attention, e_f and e_b, and every error is 0."""
    hw = HardwareSpec("x", flops=100e12, mem_bandwidth=1e12, mem_capacity=1e9)
    truth = Fit(0.8, 0.6, 12e-6, 5e-6)
    shapes = [("gemm", 1e6 * m, 1e6 + 1e3 * m) for m in (1, 4, 16, 64, 256, 4096, 16384, 65536)]
    shapes += [("attention", 0, b) for b in (1e4, 1e6, 1e8, 3e9)]
    pts = [Point(op, str(i), 0.0, fl, by) for i, (op, fl, by) in enumerate(shapes)]
    pts = [p._replace(seconds=predict(p, hw, truth)) for p in pts]
    f = fit(pts, hw, with_latency=True)
    for got, want in zip(f, truth):
        assert got == pytest.approx(want, rel=1e-6)
    assert max(abs(e) for e in errors(pts, hw, f)) < 1e-6
    assert regime(pts[0], hw) == "gemm, memory-bound" and regime(pts[-5], hw) == "gemm, compute-bound"


def test_nonneg_lstsq_against_brute_force():
    """The subset solver against a grid search on a problem whose free optimum is negative in one
    unknown (so the constraint binds), and the unconstrained optimum when it is feasible."""
    rows = [[1.0, x, x * x] for x in (0.0, 1.0, 2.0, 3.0, 4.0)]
    ys = [1.0, 0.5, 0.4, 0.6, 1.4]  # a parabola that wants a negative slope
    sol = nonneg_lstsq(rows, ys, scale=[1.0] * 5)

    def loss(x):
        return sum((sum(a * v for a, v in zip(r, x)) - y) ** 2 for r, y in zip(rows, ys))

    grid = [i / 100 for i in range(0, 101)]
    best = min(((a, b, c) for a in grid for b in grid[:21] for c in grid[:41]), key=loss)
    assert min(sol) >= 0 and loss(sol) <= loss(best) + 1e-9
    assert sol[1] == 0.0  # the slope is held at 0
    exact = [[1.0, x] for x in (1.0, 2.0, 3.0)]
    assert nonneg_lstsq(exact, [3.0, 5.0, 7.0]) == pytest.approx([1.0, 2.0])
    assert nonneg_lstsq([[1.0], [1.0]], [-1.0, -2.0], scale=[1.0, 1.0]) == [0.0]


def test_measured_preset_and_interference(tmp_path, monkeypatch):
    assert MEASURED in hardware_names()
    assert interference("assumed") == ASSUMED_INTERFERENCE == 0.1 and interference(0.25) == 0.25
    with pytest.raises(ValueError, match="unknown interference 'huge'"):
        interference("huge")
    with pytest.raises(FileNotFoundError, match="gpu_evidence.json is missing.*gpu_run.sh"):
        measured_hardware(tmp_path / "gpu_evidence.json")
    preset = {"flops": 800e12, "mem_bandwidth": 4.8e12, "mem_capacity": 141e9, "flops_efficiency": 0.9,
              "bandwidth_efficiency": 0.85}
    doc = {"device": "cpu (AMD EPYC)", "tiny": True, "preset": preset, "interference": {"median": 0.2}}
    (tmp_path / "gpu_evidence.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="not an H200"):
        measured_hardware(tmp_path / "gpu_evidence.json")
    doc.update(device="NVIDIA H200", tiny=False)
    (tmp_path / "gpu_evidence.json").write_text(json.dumps(doc))
    hw = measured_hardware(tmp_path / "gpu_evidence.json")
    assert hw.name == MEASURED and hw.effective_flops == pytest.approx(720e12) and hw.step_overhead_s == 0.0
    doc["preset"] = {**preset, "step_overhead_s": 1e-3, "request_overhead_s": 2e-5, "prefill_token_overhead_s": 5e-6}
    (tmp_path / "gpu_evidence.json").write_text(json.dumps(doc))
    hw = measured_hardware(tmp_path / "gpu_evidence.json")
    assert (hw.step_overhead_s, hw.request_overhead_s, hw.prefill_token_overhead_s) == (1e-3, 2e-5, 5e-6)
    assert CostModel(CostModel.from_names("llama-3.1-8b", "h200").model, hw).hardware is hw
    from blendserve_sgl.core import specs

    doc["interference"] = {"median": -0.03}  # measured below max(A, B): clipped into the overlapped mode's range
    (tmp_path / "gpu_evidence.json").write_text(json.dumps(doc))
    monkeypatch.setattr(specs, "GPU_EVIDENCE", tmp_path / "gpu_evidence.json")
    assert interference(MEASURED) == 0.0 and hardware(MEASURED) == hw
    monkeypatch.undo()
    if not (ROOT / "bench" / "results" / "gpu_evidence.json").exists():  # no GPU run committed yet
        with pytest.raises(FileNotFoundError, match="gpu_run.sh"):
            hardware(MEASURED)
        with pytest.raises(FileNotFoundError):
            interference(MEASURED)
    else:  # the committed H200 run: the preset and the interference read from it
        committed = json.loads((ROOT / "bench" / "results" / "gpu_evidence.json").read_text())
        assert hardware(MEASURED).effective_flops == pytest.approx(
            committed["preset"]["flops"] * committed["preset"]["flops_efficiency"])
        assert interference(MEASURED) == min(1.0, max(0.0, committed["interference"]["median"]))
