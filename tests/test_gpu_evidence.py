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

from bench.gpu_evidence import TINY_CONFIG, Point, evenly, fit, fitted_hardware, predict  # noqa: E402


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
    assert "do not overlap on a CPU" in tiny["note"]
    assert tiny["failures"] == []
    assert tiny["foreign_modules"] == []  # torch only: nothing from sglang, flashinfer or sgl_kernel was imported


def test_tiny_fit_arithmetic(tiny):
    """The fitted factors and every model time recomputed by hand from the JSON's own figures."""
    peak_f, peak_b = tiny["base_preset"]["flops"], tiny["base_preset"]["mem_bandwidth"]
    ridge = peak_f / peak_b
    ops = tiny["operators"]
    comp = [r for r in ops if r["operator"] == "gemm" and r["flops"] / r["bytes"] >= 8 * ridge]
    att = [r for r in ops if r["operator"] == "attention"]
    assert comp and att
    assert {r["regime"] for r in comp} == {"gemm, compute-bound"}
    e_f = statistics.median(r["flops"] / peak_f / (r["measured_ms"] / 1e3) for r in comp)
    e_b = statistics.median(r["bytes"] / peak_b / (r["measured_ms"] / 1e3) for r in att)
    assert tiny["fit"]["flops_efficiency"] == pytest.approx(e_f)
    assert tiny["fit"]["bandwidth_efficiency"] == pytest.approx(e_b)
    for r in ops:
        mem = r["bytes"] / (peak_b * e_b)
        model = max(r["flops"] / (peak_f * e_f), mem) if r["operator"] == "gemm" else mem
        assert r["model_ms"] / 1e3 == pytest.approx(model)
        assert r["error"] == pytest.approx(model / (r["measured_ms"] / 1e3) - 1)
    assert tiny["cost_model_max_error"] == pytest.approx(max(abs(r["error"]) for r in ops), abs=1e-4)
    # the preset: efficiencies capped at 1, the excess folded into the peak; effective rates are the fitted ones
    p = tiny["preset"]
    assert 0 < p["flops_efficiency"] <= 1 and 0 < p["bandwidth_efficiency"] <= 1
    assert p["flops"] * p["flops_efficiency"] == pytest.approx(peak_f * e_f)
    assert p["mem_bandwidth"] * p["bandwidth_efficiency"] == pytest.approx(peak_b * e_b)


def test_tiny_step_predictions(tiny):
    """The simulator's sequential step time by hand: max(2 P tokens / F, weights / BW) + KV / BW."""
    spec = ModelSpec.from_hf_config(TINY_CONFIG, name="tiny-llama")
    assert tiny["model_spec"]["gemm_params"] == spec.gemm_params
    p = tiny["preset"]
    flops, bw = p["flops"] * p["flops_efficiency"], p["mem_bandwidth"] * p["bandwidth_efficiency"]
    for s in tiny["steps"]:
        tokens = s["prefill"] + s["decode"]
        gemm = max(2 * spec.gemm_params * tokens / flops, spec.num_params * spec.dtype_bytes / bw)
        attn = s["kv_read"] * spec.kv_bytes_per_token / bw
        assert s["sequential_model_ms"] / 1e3 == pytest.approx(gemm + attn)
        bound = max(2 * spec.gemm_params * tokens / flops, spec.num_params * spec.dtype_bytes / bw + attn)
        assert s["bandwidth_consistent_bound_ms"] / 1e3 == pytest.approx(bound)
        assert s["sequential_error"] == pytest.approx((gemm + attn) / (s["measured_ms"] / 1e3) - 1)
    errs = sorted(abs(s["sequential_error"]) for s in tiny["steps"])
    assert tiny["step_prediction_median_error"] == pytest.approx(statistics.median(errs), abs=1e-4)
    for o in tiny["overlap"]["points"]:
        a, b, c = o["gemm_ms"], o["attention_ms"], o["concurrent_ms"]
        assert o["interference"] == pytest.approx((c - max(a, b)) / min(a, b), abs=2e-3)


def test_fit_on_hand_made_points():
    hw = HardwareSpec("x", flops=100e12, mem_bandwidth=1e12, mem_capacity=1e9)  # ridge 100 FLOP/byte
    pts = [Point("gemm", "big", 2e12 / 80e12, 2e12, 1e9),  # 2,000 FLOP/byte: compute-bound, at 80% of peak
           Point("gemm", "small", 1e-3, 1e9, 1e9),  # 1 FLOP/byte: below the ridge, not in the fit
           Point("attention", "a", 1e9 / 0.5e12, 0, 1e9), Point("attention", "b", 2e9 / 0.7e12, 0, 2e9),
           Point("attention", "c", 1e9 / 0.9e12, 0, 1e9)]
    f = fit(pts, hw)
    assert f.flops_efficiency == pytest.approx(0.8) and f.bandwidth_efficiency == pytest.approx(0.7)
    assert predict(pts[1], hw, f) == pytest.approx(1e9 / 0.7e12)  # weight-read bound
    assert predict(pts[0], hw, f) == pytest.approx(pts[0].seconds)
    over = fitted_hardware(hw, f._replace(flops_efficiency=1.25), "y")
    assert (over.flops, over.flops_efficiency) == (125e12, 1.0)
    assert evenly(list(range(10)), 2) == [2, 7] and evenly([1, 2], 5) == [1, 2]


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
    assert hw.name == MEASURED and hw.effective_flops == pytest.approx(720e12)
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
