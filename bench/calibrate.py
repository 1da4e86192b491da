"""Calibrate the cost model against measured operator times on the machine at hand.

Times dense GEMMs (tokens x hidden @ hidden x out) over a range of token counts, and decode
attention (one query per sequence over a KV cache) over a range of batch sizes and context
lengths, with torch (float32 on a CPU, bfloat16 on a GPU). The cost model predicts

    GEMM       max(2 M K N / (FLOPS x e_f), (K N + M K + M N) x b / (BW x e_b))     (roofline)
    attention  2 x B x H_kv x L x D x b / (BW x e_b)                              (KV read)

from the hardware preset's peaks (`cpu`: NumPy GEMM and a streaming copy measured here). The
efficiency factors are fitted (e_f: median over GEMMs far above the ridge point, e_b: median
over the attention points) and the calibrated model's error is reported per operator and per
GEMM regime. The paper's model errs <= 6% (GPU kernels). The fit is `bench/gpu_evidence.py`'s (one
implementation); that script also runs whole steps and the overlap check on a GPU.

    .venv-sgl/bin/python bench/calibrate.py          # any Python with torch; writes results/calibrate.json
    .venv-sgl/bin/python bench/calibrate.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import table, write  # noqa: E402
from bench.gpu_evidence import Point, errors, fit, predict, regime, timed  # noqa: E402
from blendserve_sgl.core import hardware  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ap.add_argument("--threads", type=int, default=1, help="CPU: torch threads (1 keeps a shared machine's noise down)")
    args = ap.parse_args()
    try:
        import torch
    except ImportError:
        print("bench/calibrate.py needs torch: run it with a Python that has it, e.g. .venv-sgl/bin/python "
              "(pip install torch==2.13.0 picks the CPU build)", file=sys.stderr)
        return 2
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda":
        name = {"H100": "h100", "H200": "h200", "A100": "a100"}
        gpu = torch.cuda.get_device_name()
        preset = next((v for k, v in name.items() if k in gpu), None)
        if preset is None:
            print(f"no hardware preset for {gpu!r}", file=sys.stderr)
            return 2
        hw, dtype, sync = hardware(preset), torch.bfloat16, torch.cuda.synchronize
    else:
        hw, dtype, sync = hardware("cpu"), torch.float32, (lambda: None)
        torch.set_num_threads(args.threads)
    b = torch.finfo(dtype).bits // 8
    repeats, budget = (5, 0.5) if args.quick else (15, 2.0)
    gen = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=device, dtype=dtype)  # noqa: E731

    # Weights of 64 MiB: beyond the 32 MiB L3 here, so a weight read is a memory read.
    gemm_shapes = [(4096, 4096), (2048, 8192)]
    tokens = [1, 2, 4, 8, 16, 32, 64, 128, 256] if not args.quick else [1, 8, 64, 256]
    if device == "cuda":
        gemm_shapes = [(4096, 4096), (4096, 14336)]
        tokens = [1, 16, 64, 256, 1024, 4096, 8192]
    points = []
    for k, n in gemm_shapes:
        w = rnd(k, n)
        for m in tokens:
            x = rnd(m, k)
            t = timed(lambda: x @ w, sync, repeats, budget)
            points.append(Point("gemm", f"{m}x{k}@{k}x{n}", t, 2.0 * m * k * n, (k * n + m * k + m * n) * b))
    heads, dim = 8, 64
    batches = [1, 4, 16] if not args.quick else [1, 8]
    lengths = [2048, 8192, 16384] if not args.quick else [8192, 16384]
    for bs in batches:
        for length in lengths:
            kv = 2 * bs * heads * length * dim * b
            if kv < 64 * 2**20 and device == "cpu":
                continue  # keep the KV beyond the 32 MiB L3: a cache-resident read is not a memory read
            q = rnd(bs, heads, 1, dim)
            kc, vc = rnd(bs, heads, length, dim), rnd(bs, heads, length, dim)

            def attn():
                s = (q @ kc.transpose(-1, -2)) * dim ** -0.5
                return torch.softmax(s, dim=-1) @ vc

            t = timed(attn, sync, repeats, budget)
            points.append(Point("attention", f"B{bs} L{length}", t, 4.0 * bs * heads * length * dim, kv))

    # The fit (bench/gpu_evidence.py): e_f from GEMMs far above the ridge, e_b from attention.
    f = fit(points, hw)
    e_f, e_b = f.flops_efficiency, f.bandwidth_efficiency
    rows, abs_err = [], {"gemm": [], "attention": [], "gemm, compute-bound": [], "gemm, below compute-bound": []}
    for p, err in zip(points, errors(points, hw, f)):
        abs_err[p.op].append(abs(err))
        if p.op == "gemm":
            abs_err["gemm, compute-bound" if regime(p, hw) == "gemm, compute-bound"
                    else "gemm, below compute-bound"].append(abs(err))
        rows.append((p.op, p.shape, regime(p, hw), f"{1e3 * p.seconds:.3f}", f"{1e3 * predict(p, hw, f):.3f}",
                     f"{100 * err:+.1f}%"))
    print(f"{hw.name}: peak {hw.flops / 1e9:.1f} GFLOP/s, {hw.mem_bandwidth / 1e9:.1f} GB/s ({device}, {dtype})")
    print(table(rows, ("operator", "shape", "regime", "measured ms", "model ms", "error")))
    summary = {
        "device": device,
        "threads": torch.get_num_threads() if device == "cpu" else None,
        "dtype": str(dtype).replace("torch.", ""),
        "preset": hw.name,
        "peak_gflops": round(hw.flops / 1e9, 2),
        "peak_gbps": round(hw.mem_bandwidth / 1e9, 2),
        "flops_efficiency": round(e_f, 4),
        "bandwidth_efficiency": round(e_b, 4),
        "gemm_mean_abs_error": round(statistics.mean(abs_err["gemm"]), 4),
        "gemm_max_abs_error": round(max(abs_err["gemm"]), 4),
        "gemm_compute_bound_max_abs_error": round(max(abs_err["gemm, compute-bound"], default=0.0), 4),
        "gemm_near_ridge_max_abs_error": round(max(abs_err["gemm, below compute-bound"], default=0.0), 4),
        "attention_mean_abs_error": round(statistics.mean(abs_err["attention"]), 4),
        "attention_max_abs_error": round(max(abs_err["attention"]), 4),
    }
    print()
    print(table(list(summary.items()), ("metric", "value")))
    note = ("efficiency factors above 1 mean torch beats the preset's peak measurement (NumPy GEMM / "
            "streaming copy); HardwareSpec caps them at 1") if e_f > 1 or e_b > 1 else ""
    path = write("calibrate_quick" if args.quick else "calibrate",
                 {**summary, "note": note, "points": [dict(zip(("operator", "shape", "regime", "measured_ms", "model_ms",
                                                                "error"), r)) for r in rows],
                  "targets": {"gemm_max_abs_error": 0.06, "gemm_compute_bound_max_abs_error": 0.06,
                              "attention_max_abs_error": 0.06}})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
