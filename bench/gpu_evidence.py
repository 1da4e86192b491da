"""GPU evidence: the cost model and the simulator's step times against measured kernels (torch only).

1. Operator calibration: GEMMs at the model's shapes (QKV, O, gate-up, down, LM head) over token
   counts, and decode attention (one query per request, contiguous K/V) over batch sizes and KV
   lengths. The cost model predicts

       GEMM       max(2 M K N / (FLOPS e_f), (K N + M K + M N) b / (BW e_b))     (roofline)
       attention  2 B H_kv L D b / (BW e_b)                                     (KV read)

   e_f is the median over GEMMs far above the ridge (compute-bound beyond doubt), e_b the median
   over the attention points; the fitted preset (`h200-measured` on an H200) and the model's
   error per operator and shape are reported.
2. Whole steps: a decoder stack of the model's shape with random weights runs steps sampled
   from the simulator's own schedules (blend and dfs on a Trace analog: prefill tokens, decode
   batch, KV read), timed end to end, against the simulator's sequential step time on the fitted
   preset and the bandwidth-consistent bound max(compute, weights + KV reads).
3. Overlap: a compute-bound GEMM nano-batch and a memory-bound decode-attention nano-batch on two
   CUDA streams, against each alone and back to back, over a range of balances: interference
   = (concurrent - max(A, B)) / min(A, B), the simulator's overlapped-mode parameter.

CUDA: bf16, Llama-3.1-8B shapes, CUDA events after warm-up with the L2 cache flushed before each
timed run (median). `--tiny`: CPU, float32, a small Llama-shaped model, small shapes (best of
repeats); every code path runs, the figures describe this CPU only, and two "streams" on a CPU
run one after the other (interference near 1 by construction).

    bash bench/gpu_run.sh                          # on the H200: JSON + log under $OUT
    python bench/gpu_evidence.py --out DIR         # CUDA -> DIR/gpu_evidence.json, DIR/gpu_evidence.log
    python bench/gpu_evidence.py --tiny --out DIR  # CPU  -> DIR/gpu_evidence_tiny.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, command, machine, table  # noqa: E402
from blendserve_sgl.core import CostModel, HardwareSpec, ModelSpec, hardware  # noqa: E402
from blendserve_sgl.core.specs import MEASURED, model_config  # noqa: E402

TINY_CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=2048, torch_dtype="float32", max_position_embeddings=4096,
                   tie_word_embeddings=False, model_type="llama")
GPU_PRESETS = {"H200": "h200", "H100": "h100", "A100": "a100"}


class Point(NamedTuple):
    op: str  # "gemm" or "attention"
    shape: str
    seconds: float  # measured
    flops: float
    nbytes: float  # bytes the operator must move at least


class Fit(NamedTuple):
    flops_efficiency: float  # achieved / peak FLOP/s, median over compute-bound GEMMs
    bandwidth_efficiency: float  # achieved / peak bytes/s, median over attention


# --- timing -------------------------------------------------------------------------------------


def timed(fn, sync, repeats: int, budget_s: float) -> float:
    """Best of `repeats` runs (at most `budget_s` seconds of trying): noise only adds time (CPU)."""
    fn()
    sync()
    best = float("inf")
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return best


def cuda_timer(torch, repeats: int = 10, warmup: int = 3, flush_bytes: int = 256 * 2**20):
    """Median of CUDA-event times after warm-up, the L2 cache flushed before each timed run."""
    flush = torch.empty(flush_bytes, dtype=torch.int8, device="cuda")

    def measure(fn) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        return statistics.median(times)

    return measure


# --- the fit (one implementation: bench/calibrate.py uses it too) ------------------------------


def ridge(hw: HardwareSpec) -> float:
    return hw.flops / hw.mem_bandwidth  # FLOP per byte


def compute_bound(p: Point, hw: HardwareSpec) -> bool:
    """A GEMM far above the ridge point (8x): compute-bound beyond doubt."""
    return p.op == "gemm" and p.flops / p.nbytes >= 8 * ridge(hw)


def regime(p: Point, hw: HardwareSpec) -> str:
    if p.op != "gemm":
        return "attention"
    return "gemm, compute-bound" if compute_bound(p, hw) else "gemm, near the ridge or below"


def fit(points: list[Point], hw: HardwareSpec) -> Fit:
    comp = [p for p in points if compute_bound(p, hw)]
    mem = [p for p in points if p.op == "attention"]
    e_f = statistics.median(p.flops / hw.flops / p.seconds for p in comp) if comp else 1.0
    e_b = statistics.median(p.nbytes / hw.mem_bandwidth / p.seconds for p in mem) if mem else 1.0
    return Fit(e_f, e_b)


def predict(p: Point, hw: HardwareSpec, f: Fit) -> float:
    mem = p.nbytes / (hw.mem_bandwidth * f.bandwidth_efficiency)
    return max(p.flops / (hw.flops * f.flops_efficiency), mem) if p.op == "gemm" else mem


def errors(points: list[Point], hw: HardwareSpec, f: Fit) -> list[float]:
    """Signed relative error of the calibrated model per point: predicted / measured - 1."""
    return [predict(p, hw, f) / p.seconds - 1 for p in points]


def fitted_hardware(hw: HardwareSpec, f: Fit, name: str) -> HardwareSpec:
    """`hw` with the fitted efficiencies; a factor above 1 (the preset's peak was beaten) moves into the peak."""
    flops, bw = hw.flops * max(1.0, f.flops_efficiency), hw.mem_bandwidth * max(1.0, f.bandwidth_efficiency)
    return HardwareSpec(name, flops=flops, mem_bandwidth=bw, mem_capacity=hw.mem_capacity,
                        flops_efficiency=min(1.0, f.flops_efficiency),
                        bandwidth_efficiency=min(1.0, f.bandwidth_efficiency))


# --- part 1: operators --------------------------------------------------------------------------


def gemm_shapes(cfg: dict) -> dict:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    return {"qkv": (h, (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd),
            "o": (cfg["num_attention_heads"] * hd, h), "gate_up": (h, 2 * i), "down": (i, h),
            "lm_head": (h, cfg["vocab_size"])}


def decode_attention(torch, q, k, v):
    """One query per request, grouped-query: q (B, H, D) over k, v (B, H_kv, L, D) -> (B, H, D).
    The H / H_kv query heads of a group are the group's query rows (no mask: exact)."""
    b, heads, d = q.shape
    kvh = k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(q.view(b, kvh, heads // kvh, d), k, v)
    return out.reshape(b, heads, d)


def operator_points(torch, dev, dtype, cfg, tokens, batches, lengths, measure, log, kv_limit_bytes) -> list[Point]:
    b = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device=dev).manual_seed(0)
    points = []
    for name, (k, n) in gemm_shapes(cfg).items():
        w = torch.randn(k, n, generator=gen, device=dev, dtype=dtype)
        for m in tokens:
            x = torch.randn(m, k, generator=gen, device=dev, dtype=dtype)
            points.append(Point("gemm", f"{name} {m}x{k}@{k}x{n}", measure(lambda: x @ w), 2.0 * m * k * n,
                                (k * n + m * k + m * n) * b))
        del w, x
        log(f"  gemm {name} done")
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    for bs in batches:
        for length in lengths:
            kv = 2 * bs * kvh * length * d * b
            if kv > kv_limit_bytes:
                continue
            try:
                q = torch.randn(bs, heads, d, generator=gen, device=dev, dtype=dtype)
                kc = torch.randn(bs, kvh, length, d, generator=gen, device=dev, dtype=dtype)
                vc = torch.randn(bs, kvh, length, d, generator=gen, device=dev, dtype=dtype)
                points.append(Point("attention", f"B{bs} L{length}",
                                    measure(lambda: decode_attention(torch, q, kc, vc)),
                                    4.0 * bs * heads * length * d, kv))
            except RuntimeError as e:  # out of memory at the largest shapes: skip the point, keep the run
                log(f"  attention B{bs} L{length} skipped: {str(e).splitlines()[0]}")
            q = kc = vc = None
        log(f"  attention B{bs} done")
    return points


# --- part 2: whole steps ------------------------------------------------------------------------


class StepSample(NamedTuple):
    policy: str
    step: int
    prefill: int  # prefill tokens in the step
    decode: int  # decoding requests (one token each)
    kv_read: int  # KV tokens decode attention reads (all requests)


def sample_steps(trace_name: str, requests: int, per_policy: int, seed: int = 0) -> list[StepSample]:
    """Steps evenly spaced over blend's and dfs's simulated runs (Llama-3.1-8B on the h200 preset)."""
    from blendserve_sgl.sim import EngineConfig, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import trace

    cost = CostModel.from_names("llama-3.1-8b", "h200")
    records, _ = trace(trace_name, requests, cost, seed)
    wl = Workload(records, cost)
    spec = RunSpec(cost, EngineConfig.trace_engine(cost, pace=False), seed=seed)
    out = []
    for policy in ("blend", "dfs"):
        s = simulate(wl, policy, spec).series
        mixed = [i for i in range(len(s["decode"])) if s["decode"][i] > 0 and s["prefill"][i] > 0]
        decode_only = [i for i in range(len(s["decode"])) if s["decode"][i] > 0 and s["prefill"][i] == 0]
        half = per_policy // 2 if decode_only else per_policy
        picks = evenly(mixed, half) + evenly(decode_only, per_policy - min(half, len(mixed)))
        for i in sorted(picks):
            out.append(StepSample(policy, i, int(s["prefill"][i]), int(s["decode"][i]), int(s["kv_read"][i])))
    return out


def evenly(items: list, k: int) -> list:
    """k items spread evenly over `items` (the middle of k equal stretches); all when fewer."""
    if k >= len(items):
        return list(items)
    return [items[(2 * j + 1) * len(items) // (2 * k)] for j in range(k)]


def shrink(step: StepSample, prefill: int, decode: int, kv_len: int) -> StepSample:
    """A step scaled into the tiny model's range (same policy and index; caps on each dimension)."""
    dec = min(step.decode, decode)
    per = min(kv_len, max(1, step.kv_read // max(1, step.decode)))
    return StepSample(step.policy, step.step, min(step.prefill, prefill), dec, dec * per)


class Stack:
    """A Llama-shaped decoder stack with random weights: RMSNorm, QKV, attention (prefill causal
    over the step's prefill tokens as one sequence, decode over a contiguous KV cache), O, SwiGLU
    MLP, the LM head on the decode tokens and the last prefill token. RoPE and the KV write are
    left out (elementwise, small)."""

    def __init__(self, torch, cfg: dict, dev, dtype, kv_pool_tokens: int):
        self.t, self.cfg = torch, cfg
        h, i = cfg["hidden_size"], cfg["intermediate_size"]
        self.heads, self.kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.d = h // self.heads
        gen = torch.Generator(device=dev).manual_seed(1)
        rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dtype) * 0.02  # noqa: E731
        self.layers = [dict(qkv=rnd(h, (self.heads + 2 * self.kvh) * self.d), o=rnd(self.heads * self.d, h),
                            gate_up=rnd(h, 2 * i), down=rnd(i, h), n1=torch.ones(h, device=dev, dtype=dtype),
                            n2=torch.ones(h, device=dev, dtype=dtype)) for _ in range(cfg["num_hidden_layers"])]
        self.lm_head = rnd(h, cfg["vocab_size"])
        # One pool of K/V slots; a layer takes slot (layer mod slots), so a step's reads leave the cache.
        self.pool = torch.randn(kv_pool_tokens * self.kvh * self.d * 2, generator=gen, device=dev, dtype=dtype)
        self.dev, self.dtype = dev, dtype

    def rms(self, x, w):
        return x * self.t.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w

    def kv_views(self, batch: int, length: int):
        n = batch * self.kvh * length * self.d
        slots = min(len(self.layers), self.pool.numel() // (2 * n))
        if slots == 0:
            raise ValueError(f"KV pool of {self.pool.numel()} elements cannot hold a step of {batch} x {length} tokens")
        return [(self.pool[2 * n * s:2 * n * s + n].view(batch, self.kvh, length, self.d),
                 self.pool[2 * n * s + n:2 * n * (s + 1)].view(batch, self.kvh, length, self.d)) for s in range(slots)]

    def step_fn(self, step: StepSample):
        t, h = self.t, self.cfg["hidden_size"]
        p, b = step.prefill, step.decode
        length = max(1, step.kv_read // max(1, b))
        x0 = t.randn(p + b, h, device=self.dev, dtype=self.dtype)
        views = self.kv_views(b, length) if b else []
        hq, kq = self.heads * self.d, self.kvh * self.d
        group = self.heads // self.kvh

        def run():
            x = x0
            for li, w in enumerate(self.layers):
                qkv = self.rms(x, w["n1"]) @ w["qkv"]
                q, k, v = qkv[:, :hq], qkv[:, hq:hq + kq], qkv[:, hq + kq:]
                parts = []
                if p:
                    qp = q[:p].view(1, p, self.heads, self.d).transpose(1, 2)
                    kp = k[:p].view(1, p, self.kvh, self.d).transpose(1, 2).repeat_interleave(group, 1)
                    vp = v[:p].view(1, p, self.kvh, self.d).transpose(1, 2).repeat_interleave(group, 1)
                    parts.append(t.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True)
                                 .transpose(1, 2).reshape(p, hq))
                if b:
                    kc, vc = views[li % len(views)]
                    parts.append(decode_attention(t, q[p:].view(b, self.heads, self.d), kc, vc).reshape(b, hq))
                x = x + (parts[0] if len(parts) == 1 else t.cat(parts)) @ w["o"]
                gu = self.rms(x, w["n2"]) @ w["gate_up"]
                g, u = gu.chunk(2, dim=-1)
                x = x + (t.nn.functional.silu(g) * u) @ w["down"]
            last = x[max(0, p - 1):] if p else x
            return last @ self.lm_head

        return run


def step_predictions(cost: CostModel, step: StepSample) -> tuple[float, float]:
    """(simulator's sequential step time, bandwidth-consistent bound) for a step on `cost`."""
    from blendserve_sgl.sim.timing import ExecModel, operator_seconds, step_seconds

    ops = operator_seconds(cost, [step.prefill + step.decode], [step.kv_read])
    seq = float(step_seconds(ops, ExecModel("sequential"))[0])
    bound = float(step_seconds(ops, ExecModel("overlapped", interference=0.0))[0])  # max(comp, w + attn)
    return seq, bound


# --- part 3: overlap ----------------------------------------------------------------------------


def overlap_points(torch, dev, dtype, cfg, gemm_tokens, attn_batch, attn_len, reps, measure) -> list[dict]:
    """Per GEMM size: GEMM nano-batch alone (A), attention nano-batch alone (B), back to back,
    and on two streams; interference = (concurrent - max(A, B)) / min(A, B)."""
    gen = torch.Generator(device=dev).manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    k, n = gemm_shapes(cfg)["gate_up"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    w = rnd(k, n)
    q = rnd(attn_batch, heads, d)
    kv = [(rnd(attn_batch, kvh, attn_len, d), rnd(attn_batch, kvh, attn_len, d)) for _ in range(2)]
    cuda = dev == "cuda"
    s1 = torch.cuda.Stream() if cuda else None
    s2 = torch.cuda.Stream() if cuda else None
    attn = lambda: [decode_attention(torch, q, *kv[r % 2]) for r in range(reps)]  # noqa: E731
    out = []
    for m in gemm_tokens:
        x = rnd(m, k)
        gemm = lambda: [x @ w for _ in range(reps)]  # noqa: E731

        def both():
            if not cuda:
                gemm(), attn()
                return
            main = torch.cuda.current_stream()
            s1.wait_stream(main)
            s2.wait_stream(main)
            with torch.cuda.stream(s1):
                gemm()
            with torch.cuda.stream(s2):
                attn()
            main.wait_stream(s1)
            main.wait_stream(s2)

        a, b = measure(gemm), measure(attn)
        serial = measure(lambda: (gemm(), attn()))
        conc = measure(both)
        out.append({"gemm_tokens": m, "gemm_ms": round(1e3 * a, 4), "attention_ms": round(1e3 * b, 4),
                    "back_to_back_ms": round(1e3 * serial, 4), "concurrent_ms": round(1e3 * conc, 4),
                    "balance": round(a / b, 4), "interference": round((conc - max(a, b)) / min(a, b), 4)})
    return out


# --- the run ------------------------------------------------------------------------------------


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": round(statistics.median(xs), 4), "p25": round(q[0], 4), "p75": round(q[2], 4),
            "min": round(xs[0], 4), "max": round(xs[-1], 4), "n": len(xs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU, float32, a small model and small shapes (tests)")
    ap.add_argument("--out", default=str(RESULTS), help="folder for the JSON and the log")
    ap.add_argument("--trace", default="trace1", help="Trace analog whose blend and dfs steps part 2 runs")
    ap.add_argument("--requests", type=int, default=5000, help="requests in that analog")
    ap.add_argument("--steps", type=int, default=16, help="steps sampled per policy")
    args = ap.parse_args(argv)
    try:
        import torch
    except ImportError:
        print("bench/gpu_evidence.py needs torch", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_evidence_tiny" if args.tiny else "gpu_evidence"
    logf = (out / f"{stem}.log").open("w")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        line = f"[{time.perf_counter() - t_start:7.1f} s] {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    if args.tiny:
        dev, dtype, cfg, key = "cpu", torch.float32, dict(TINY_CONFIG), None
        torch.set_num_threads(1)
        base = hardware("cpu")
        measure = lambda fn: timed(fn, lambda: None, 5, 0.3)  # noqa: E731
        tokens, batches, lengths = [1, 16, 256], [1, 8], [128, 1024]
        kv_limit, n_steps, requests = 2**30, min(args.steps, 3), min(args.requests, 1000)
        gemm_tokens, attn_batch, attn_len, reps, pool_tokens = [64, 256], 8, 1024, 2, 64 * 1024
        device_name = f"cpu ({machine()['cpu']})"
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --tiny on a CPU", file=sys.stderr)
            return 2
        dev, dtype, cfg = "cuda", torch.bfloat16, model_config("llama-3.1-8b")
        device_name = torch.cuda.get_device_name()
        key = next((v for k, v in GPU_PRESETS.items() if k in device_name), None)
        if key is None:
            print(f"no hardware preset for {device_name!r} (known: {sorted(GPU_PRESETS)})", file=sys.stderr)
            return 2
        base = hardware(key)
        measure = cuda_timer(torch)
        tokens = [1, 4, 16, 64, 256, 1024, 4096, 16384]
        batches, lengths = [1, 8, 64, 512], [128, 1024, 4096, 16384, 32768]
        kv_limit, n_steps, requests = 80 * 2**30, args.steps, args.requests
        gemm_tokens, attn_batch, attn_len, reps = [256, 512, 1024, 2048, 4096, 8192], 64, 8192, 4
        pool_tokens = 8 * 2**20  # 8M tokens x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 32 GiB
    spec = ModelSpec.from_hf_config(cfg, name="tiny-llama" if args.tiny else "llama-3.1-8b")
    log(f"device {device_name}, {dtype}, model {spec.name}; preset {base.name}: {base.flops / 1e12:.2f} TFLOP/s, "
        f"{base.mem_bandwidth / 1e9:.1f} GB/s")

    log(f"steps: sampling blend and dfs on {args.trace} ({requests} requests) in the simulator")
    steps = sample_steps(args.trace, requests, n_steps)  # first: a data problem stops the run before any timing
    if args.tiny:
        steps = [shrink(s, prefill=128, decode=8, kv_len=256) for s in steps]
    path = out / f"{stem}.json"
    payload = {
        "command": command(), "machine": machine(), "device": device_name, "tiny": args.tiny,
        "dtype": str(dtype).replace("torch.", ""), "model": spec.name,
        "model_spec": {k: getattr(spec, k) for k in spec.__slots__},
        "note": ("CPU run of the code paths (--tiny): the figures describe this CPU, not a GPU; two streams do not "
                 "overlap on a CPU, so interference is ~1 by construction") if args.tiny else
                "CUDA events after warm-up, L2 flushed before each timed run, median of 10",
        "attention_layout": "contiguous K/V (torch SDPA); a paged layout needs a paged kernel (FlashInfer), not in a "
                            "torch-only run",
        "targets": {"cost_model_max_error": 0.06, "step_prediction_median_error": 0.10},
        "failures": [],
    }

    def save() -> None:
        payload["seconds"] = round(time.perf_counter() - t_start, 1)
        payload["foreign_modules"] = sorted(m for m in sys.modules
                                            if m.split(".")[0] in ("sglang", "flashinfer", "sgl_kernel"))
        path.write_text(json.dumps(payload, indent=2) + "\n")

    log("part 1: operators")
    points = operator_points(torch, dev, dtype, cfg, tokens, batches, lengths, measure, log, kv_limit)
    f = fit(points, base)
    errs = errors(points, base, f)
    fitted = fitted_hardware(base, f, MEASURED if key == "h200" else f"{base.name}-fitted")
    op_rows = [{"operator": p.op, "shape": p.shape, "regime": regime(p, base), "measured_ms": 1e3 * p.seconds,
                "model_ms": 1e3 * predict(p, base, f), "error": e, "flops": p.flops, "bytes": p.nbytes}
               for p, e in zip(points, errs)]
    print(table([(r["operator"], r["shape"], r["regime"], f"{r['measured_ms']:.4f}", f"{r['model_ms']:.4f}",
                  f"{100 * r['error']:+.1f}%") for r in op_rows],
                ("operator", "shape", "regime", "measured ms", "model ms", "error")))
    by_regime = {}
    for r in op_rows:
        by_regime.setdefault(r["regime"], []).append(abs(r["error"]))
    payload.update({
        "cost_model_max_error": round(max(abs(e) for e in errs), 4),
        "cost_model_max_error_by_regime": {k: round(max(v), 4) for k, v in by_regime.items()},
        "cost_model_mean_error_by_regime": {k: round(statistics.mean(v), 4) for k, v in by_regime.items()},
        "fit": f._asdict(),
        "base_preset": {"name": base.name, "flops": base.flops, "mem_bandwidth": base.mem_bandwidth},
        "preset": {"name": fitted.name, "flops": fitted.flops, "mem_bandwidth": fitted.mem_bandwidth,
                   "mem_capacity": fitted.mem_capacity, "flops_efficiency": fitted.flops_efficiency,
                   "bandwidth_efficiency": fitted.bandwidth_efficiency},
        "operators": op_rows,
    })
    save()
    log(f"fit: flops efficiency {f.flops_efficiency:.4f}, bandwidth efficiency {f.bandwidth_efficiency:.4f}, "
        f"cost model max error {payload['cost_model_max_error']:.3f}")

    log("part 2: whole steps")
    try:
        cost = CostModel(spec, fitted)
        biggest = max(s.decode * max(1, s.kv_read // max(1, s.decode)) for s in steps)
        stack = Stack(torch, cfg, dev, dtype, max(pool_tokens, 2 * biggest))
        step_rows = []
        for s in steps:
            measured = measure(stack.step_fn(s))
            seq, bound = step_predictions(cost, s)
            step_rows.append({**s._asdict(), "measured_ms": 1e3 * measured, "sequential_model_ms": 1e3 * seq,
                              "sequential_error": seq / measured - 1, "bandwidth_consistent_bound_ms": 1e3 * bound,
                              "measured_over_bound": measured / bound})
        del stack
        print(table([tuple(f"{v:.4g}" if isinstance(v, float) else v for v in r.values()) for r in step_rows],
                    tuple(step_rows[0])))
        payload.update({
            "step_prediction_median_error": round(statistics.median(abs(r["sequential_error"]) for r in step_rows), 4),
            "step_prediction_error": quantiles([r["sequential_error"] for r in step_rows]),
            "measured_over_bandwidth_consistent_bound": quantiles([r["measured_over_bound"] for r in step_rows]),
            "steps_source": {"trace": args.trace, "requests": requests, "per_policy": n_steps,
                             "scaled_to_tiny": args.tiny},
            "steps": step_rows,
        })
        log(f"step median error {payload['step_prediction_median_error']:.3f}")
    except Exception as e:  # keep part 1 and try part 3: GPU time is short
        payload["failures"].append(f"part 2: {type(e).__name__}: {e}")
        log(traceback.format_exc())
    save()
    if dev == "cuda":
        torch.cuda.empty_cache()

    log("part 3: overlap")
    try:
        ovl = overlap_points(torch, dev, dtype, cfg, gemm_tokens, attn_batch, attn_len, reps, measure)
        print(table([tuple(r.values()) for r in ovl], tuple(ovl[0])))
        payload["interference"] = quantiles([r["interference"] for r in ovl])
        payload["overlap"] = {"gemm": "gate_up", "attention_batch": attn_batch, "attention_kv_len": attn_len,
                              "reps": reps, "points": ovl}
        log(f"interference median {payload['interference']['median']:.3f}")
    except Exception as e:
        payload["failures"].append(f"part 3: {type(e).__name__}: {e}")
        log(traceback.format_exc())
    save()
    log(f"wrote {path}" + (f"; failures: {payload['failures']}" if payload["failures"] else ""))
    logf.close()
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
