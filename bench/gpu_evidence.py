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
4. (CUDA) The same on two disjoint SM partitions (CUDA green contexts), for three splits.
5. Whole runs: blend's, sglang-lpm's and dfs's simulated runs of a Trace analog replayed on the
   stack by systematic sampling (every k-th step timed): the policies' measured ratios against
   the simulator's predicted ones.

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
    flops_efficiency: float  # achieved / peak FLOP/s, compute-bound GEMMs
    bandwidth_efficiency: float  # achieved / peak bytes/s, memory-bound GEMMs and attention
    gemm_latency_s: float = 0.0  # fixed time per GEMM launch (0 in the latency-free fit)
    attention_latency_s: float = 0.0  # fixed time per attention launch


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


def memory_bound(p: Point, hw: HardwareSpec) -> bool:
    """Decode attention, or a GEMM far below the ridge point (1/8): memory-bound beyond doubt."""
    return p.op == "attention" or p.flops / p.nbytes <= ridge(hw) / 8


def regime(p: Point, hw: HardwareSpec) -> str:
    if p.op != "gemm":
        return "attention"
    if compute_bound(p, hw):
        return "gemm, compute-bound"
    return "gemm, memory-bound" if memory_bound(p, hw) else "gemm, near the ridge"


def latency(p: Point, f: Fit) -> float:
    return f.gemm_latency_s if p.op == "gemm" else f.attention_latency_s


def fit(points: list[Point], hw: HardwareSpec, with_latency: bool = False) -> Fit:
    """Latency-free (the paper's roofline): e_f the median over compute-bound GEMMs, e_b the
    median over attention. `with_latency`: a fixed launch time per operator kind and one bandwidth
    for every memory-bound operator (weights and KV share one HBM), from a least-squares fit of
    t = c_op + bytes / (BW e_b) in relative error over the memory-bound points; then e_f the median
    over compute-bound GEMMs of FLOPs / (t - c_gemm)."""
    comp = [p for p in points if compute_bound(p, hw)]
    if not with_latency:
        mem = [p for p in points if p.op == "attention"]
        e_f = statistics.median(p.flops / hw.flops / p.seconds for p in comp) if comp else 1.0
        e_b = statistics.median(p.nbytes / hw.mem_bandwidth / p.seconds for p in mem) if mem else 1.0
        return Fit(e_f, e_b)
    mem = [p for p in points if memory_bound(p, hw)]
    if not mem:
        return fit(points, hw)
    kinds = sorted({p.op for p in mem})  # latency columns; a kind absent from the points keeps 0
    c, sec_per_byte = _latency_lstsq(mem, kinds)
    e_b = 1.0 / (sec_per_byte * hw.mem_bandwidth)
    c_gemm = c.get("gemm", 0.0)
    e_f = statistics.median(p.flops / hw.flops / max(p.seconds - c_gemm, 1e-12) for p in comp) if comp else 1.0
    return Fit(e_f, e_b, c_gemm, c.get("attention", 0.0))


def _latency_lstsq(points: list[Point], kinds: list[str]) -> tuple[dict, float]:
    """min sum ((c_op + x bytes) / t - 1)^2 over c_op >= 0, x > 0."""
    rows = [[(1.0 if p.op == k else 0.0) for k in kinds] + [p.nbytes] for p in points]
    sol = nonneg_lstsq(rows, [p.seconds for p in points], required=(len(kinds),))
    if sol is None or sol[-1] <= 0:
        raise ValueError("latency fit: no solution with a positive bandwidth (are the memory-bound points timed?)")
    return dict(zip(kinds, sol[:-1])), sol[-1]


def nonneg_lstsq(rows: list[list[float]], targets: list[float], required: tuple = (),
                 scale: list[float] | None = None) -> list[float] | None:
    """min sum ((a_i . x - y_i) / s_i)^2 over x >= 0, s_i = `scale` (default y_i: relative
    error), the columns in `required` always free: exact for the few unknowns here, by solving
    the normal equations over every subset of the other columns held at 0 and keeping the best
    feasible solution."""
    n = len(rows[0])
    scale = targets if scale is None else scale
    optional = [j for j in range(n) if j not in required]
    scaled = [[a / c for a in r] for r, c in zip(rows, scale)]
    ys = [y / c for y, c in zip(targets, scale)]
    norm = [max(abs(r[j]) for r in scaled) or 1.0 for j in range(n)]  # columns over their largest entry
    scaled = [[a / c for a, c in zip(r, norm)] for r in scaled]
    best = None
    for mask in range(1 << len(optional)):
        free = sorted([*required, *(j for i, j in enumerate(optional) if mask >> i & 1)])
        if not free:
            continue
        ata = [[sum(r[i] * r[j] for r in scaled) for j in free] for i in free]
        atb = [sum(r[i] * y for r, y in zip(scaled, ys)) for i in free]
        sol = _solve(ata, atb)
        if sol is None or any(v < 0 for v in sol):
            continue
        x = [0.0] * n
        for j, v in zip(free, sol):
            x[j] = v
        loss = sum((sum(a * v for a, v in zip(r, x)) - y) ** 2 for r, y in zip(scaled, ys))
        if best is None or loss < best[0]:
            best = (loss, x)
    if best is None:
        return [0.0] * n if not required else None
    return [v / c for v, c in zip(best[1], norm)]


def _solve(a: list[list[float]], b: list[float]) -> list[float] | None:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for col in range(n):
        piv = max(range(col, n), key=lambda r: abs(m[r][col]))
        if abs(m[piv][col]) < 1e-12:
            return None
        m[col], m[piv] = m[piv], m[col]
        for r in range(n):
            if r != col:
                factor = m[r][col] / m[col][col]
                m[r] = [x - factor * y for x, y in zip(m[r], m[col])]
    return [m[i][n] / m[i][i] for i in range(n)]


def predict(p: Point, hw: HardwareSpec, f: Fit) -> float:
    mem = p.nbytes / (hw.mem_bandwidth * f.bandwidth_efficiency)
    roof = max(p.flops / (hw.flops * f.flops_efficiency), mem) if p.op == "gemm" else mem
    return latency(p, f) + roof


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


PAGE = 16  # tokens per KV page in the paged layout


def kv_region_elements(batch: int, length: int, kvh: int, d: int) -> int:
    """Elements of one K (or V) region for `batch` requests of `length` tokens (whole pages)."""
    return batch * -(-length // PAGE) * PAGE * kvh * d


def attention_over(torch, region, batch: int, length: int, kvh: int, d: int, paged: bool, seed: int = 0):
    """Decode attention for `batch` requests of `length` tokens whose K and V lie in `region`
    (2 x kv_region_elements): `paged` reads pages in shuffled order through a page table
    (`kernels.paged_decode`, CUDA), else contiguous (B, H_kv, L, D) K/V through torch SDPA.
    Returns fn(q (B, H, D)) -> (B, H, D)."""
    n = kv_region_elements(batch, length, kvh, d)
    if not paged:
        k = region[:batch * kvh * length * d].view(batch, kvh, length, d)
        v = region[n:n + batch * kvh * length * d].view(batch, kvh, length, d)
        return lambda q: decode_attention(torch, q, k, v)
    from kernels.paged_decode import paged_decode_attention

    pages = -(-length // PAGE)
    kc, vc = region[:n].view(batch * pages, PAGE, kvh, d), region[n:2 * n].view(batch * pages, PAGE, kvh, d)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    table = torch.randperm(batch * pages, generator=gen).to(torch.int32).view(batch, pages).to(region.device)
    lens = torch.full((batch,), length, dtype=torch.int32, device=region.device)
    return lambda q: paged_decode_attention(q, kc, vc, table, lens, d ** -0.5, max_len=length)


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
    # the engine's kernel ("attention", in the fit): paged split-KV on CUDA, SDPA on a CPU; on CUDA
    # torch SDPA over contiguous K/V is timed beside it ("sdpa", a reference outside the fit)
    layouts = [("attention", dev == "cuda")] + ([("sdpa", False)] if dev == "cuda" else [])
    for bs in batches:
        for length in lengths:
            kv = 2 * bs * kvh * length * d * b
            if kv > kv_limit_bytes:
                continue
            try:
                q = torch.randn(bs, heads, d, generator=gen, device=dev, dtype=dtype)
                region = torch.randn(2 * kv_region_elements(bs, length, kvh, d), generator=gen, device=dev,
                                     dtype=dtype)
                for op, paged in layouts:
                    fn = attention_over(torch, region, bs, length, kvh, d, paged)
                    # on CUDA replayed from a graph, as a decode engine runs it: no host launch gaps
                    run = graphed(torch, lambda: fn(q)).replay if dev == "cuda" else (lambda: fn(q))
                    points.append(Point(op, f"B{bs} L{length}", measure(run), 4.0 * bs * heads * length * d, kv))
                    run = None
            except Exception as e:  # out of memory at the largest shapes, a kernel that fails: skip, keep the run
                log(f"  attention B{bs} L{length} skipped: {type(e).__name__}: {(str(e) or '?').splitlines()[0]}")
            q = region = None
        log(f"  attention B{bs} done")
    return points


# --- part 2: whole steps ------------------------------------------------------------------------


class StepSample(NamedTuple):
    policy: str
    step: int
    prefill: int  # prefill tokens in the step
    decode: int  # decoding requests (one token each)
    kv_read: int  # KV tokens decode attention reads (all requests)


def simulate_runs(trace_name: str, requests: int, policies: tuple, pace: bool, seed: int = 0) -> dict:
    """Whole simulated runs of `policies` on a Trace analog (Llama-3.1-8B on the h200 preset, the
    trace engine, paced prefill or not): policy -> SimResult."""
    from blendserve_sgl.sim import EngineConfig, RunSpec, Workload, simulate
    from blendserve_sgl.workloads import trace

    cost = CostModel.from_names("llama-3.1-8b", "h200")
    records, _ = trace(trace_name, requests, cost, seed)
    wl = Workload(records, cost)
    spec = RunSpec(cost, EngineConfig.trace_engine(cost, pace=pace), seed=seed)
    return {p: simulate(wl, p, spec) for p in policies}


def sample_steps(trace_name: str, requests: int, per_policy: int, seed: int = 0) -> list[StepSample]:
    """Steps evenly spaced over blend's and dfs's simulated runs (Llama-3.1-8B on the h200 preset)."""
    runs = simulate_runs(trace_name, requests, ("blend", "dfs"), pace=False, seed=seed)
    out = []
    for policy, res in runs.items():
        s = res.series
        mixed = [i for i in range(len(s["decode"])) if s["decode"][i] > 0 and s["prefill"][i] > 0]
        decode_only = [i for i in range(len(s["decode"])) if s["decode"][i] > 0 and s["prefill"][i] == 0]
        half = per_policy // 2 if decode_only else per_policy
        picks = evenly(mixed, half) + evenly(decode_only, per_policy - min(half, len(mixed)))
        for i in sorted(picks):
            out.append(StepSample(policy, i, int(s["prefill"][i]), int(s["decode"][i]), int(s["kv_read"][i])))
    return out


REPLAY_POLICIES = ("blend", "sglang-lpm", "dfs")  # part 5, on the method group's engine (paced, mixed steps)


def replay_schedules(schedules: dict, cost: CostModel, stack, measure, per_policy: int, tiny: bool) -> dict:
    """Each policy's whole run timed on the GPU by systematic sampling: `per_policy` steps evenly
    spaced over the run, each measured, the run's time estimated as (steps / sampled) x their sum;
    beside it the simulator's sequential time of the whole run on `cost` (the fitted preset) and
    of the same sample. The policies' ratios, measured against predicted, test the simulator's
    ranking on the hardware."""
    from blendserve_sgl.sim.timing import ExecModel

    out = {}
    for pol, res in schedules.items():
        s = res.series
        n = len(s["decode"])
        picks = evenly(list(range(n)), per_policy)
        measured = predicted = 0.0
        for i in picks:
            step = StepSample(pol, i, int(s["prefill"][i]), int(s["decode"][i]), int(s["kv_read"][i]))
            if tiny:
                step = shrink(step, prefill=128, decode=8, kv_len=256)
            measured += measure(stack.step_fn(step))
            predicted += step_predictions(cost, step)[0]
        scale = n / len(picks)
        out[pol] = {"steps": n, "sampled": len(picks), "measured_s": measured * scale,
                    "predicted_sample_s": predicted * scale,
                    "predicted_run_s": float(res.retimed(cost).time(ExecModel("sequential")))}
    base = out["blend"]
    for pol, row in out.items():
        row["measured_speedup_of_blend"] = row["measured_s"] / base["measured_s"]
        row["predicted_speedup_of_blend"] = row["predicted_run_s"] / base["predicted_run_s"]
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
    over the step's prefill tokens as one sequence, decode over the KV cache in the engine's
    layout: paged on CUDA), O, SwiGLU MLP, the LM head on the decode tokens and the last prefill
    token. RoPE and the KV write are left out (elementwise, small)."""

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
        # One pool of K/V regions; a layer takes region (layer mod regions), so a step's reads leave the cache.
        self.pool = torch.randn(kv_pool_tokens * self.kvh * self.d * 2, generator=gen, device=dev, dtype=dtype)
        self.dev, self.dtype = dev, dtype

    def rms(self, x, w):
        return self.t.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-5)

    def attention_fns(self, batch: int, length: int) -> list:
        n = 2 * kv_region_elements(batch, length, self.kvh, self.d)
        regions = min(len(self.layers), self.pool.numel() // n)
        if regions == 0:
            raise ValueError(f"KV pool of {self.pool.numel()} elements cannot hold a step of {batch} x {length} tokens")
        return [attention_over(self.t, self.pool[n * r:n * (r + 1)], batch, length, self.kvh, self.d,
                               paged=self.dev == "cuda", seed=r) for r in range(regions)]

    def step_fn(self, step: StepSample):
        t, h = self.t, self.cfg["hidden_size"]
        p, b = step.prefill, step.decode
        length = max(1, step.kv_read // max(1, b))
        x0 = t.randn(p + b, h, device=self.dev, dtype=self.dtype)
        attend = self.attention_fns(b, length) if b else []
        hq, kq = self.heads * self.d, self.kvh * self.d

        def run():
            x = x0
            for li, w in enumerate(self.layers):
                qkv = self.rms(x, w["n1"]) @ w["qkv"]
                q, k, v = qkv[:, :hq], qkv[:, hq:hq + kq], qkv[:, hq + kq:]
                parts = []
                if p:
                    qp = q[:p].view(1, p, self.heads, self.d).transpose(1, 2)
                    kp = k[:p].view(1, p, self.kvh, self.d).transpose(1, 2)
                    vp = v[:p].view(1, p, self.kvh, self.d).transpose(1, 2)
                    parts.append(t.nn.functional.scaled_dot_product_attention(qp, kp, vp, is_causal=True,
                                                                              enable_gqa=True)
                                 .transpose(1, 2).reshape(p, hq))
                if b:
                    parts.append(attend[li % len(attend)](q[p:].reshape(b, self.heads, self.d)).reshape(b, hq))
                x = x + (parts[0] if len(parts) == 1 else t.cat(parts)) @ w["o"]
                gu = self.rms(x, w["n2"]) @ w["gate_up"]
                g, u = gu.chunk(2, dim=-1)
                x = x + (t.nn.functional.silu(g) * u) @ w["down"]
            last = x[max(0, p - 1):] if p else x
            return last @ self.lm_head

        return run


def graphed(torch, fn):
    """`fn` captured in a CUDA graph with its own memory pool (warm-up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def step_predictions(cost: CostModel, step: StepSample) -> tuple[float, float]:
    """(simulator's sequential step time, bandwidth-consistent bound) for a step on `cost`, as
    the simulator charges it: the LM head for the decoding requests, the preset's overheads."""
    from blendserve_sgl.sim.timing import ExecModel, operator_seconds, step_seconds

    ops = operator_seconds(cost, [step.prefill + step.decode], [step.kv_read], decode_requests=[step.decode])
    seq = float(step_seconds(ops, ExecModel("sequential"))[0])
    bound = float(step_seconds(ops, ExecModel("overlapped", interference=0.0))[0])  # max(comp, w + attn) + over
    return seq, bound


OVERHEAD_FIELDS = ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s")


def overhead_features(step: StepSample) -> list[float]:
    """What `sim.timing.overhead_seconds` multiplies the three overheads by."""
    return [1.0, float(step.decode), float(step.prefill)]


def fit_overheads(steps: list[StepSample], measured: list[float], operator_only: list[float]) -> dict:
    """The work no operator term covers (norms, activations, residuals, prefill attention, the
    merge of split attention), fitted to measured - operator model per step (>= 0 each,
    relative least squares)."""
    x = nonneg_lstsq([overhead_features(s) for s in steps], [m - o for m, o in zip(measured, operator_only)],
                     scale=measured)
    return dict(zip(OVERHEAD_FIELDS, x))


def with_overheads(hw: HardwareSpec, over: dict) -> HardwareSpec:
    return HardwareSpec(hw.name, flops=hw.flops, mem_bandwidth=hw.mem_bandwidth, mem_capacity=hw.mem_capacity,
                        flops_efficiency=hw.flops_efficiency, bandwidth_efficiency=hw.bandwidth_efficiency, **over)


# --- part 3: overlap ----------------------------------------------------------------------------


def on_stream(torch, stream, fn):
    """Run `fn` on `stream`, ordered after the current stream's work and before its next."""
    main = torch.cuda.current_stream()
    stream.wait_stream(main)
    with torch.cuda.stream(stream):
        fn()
    main.wait_stream(stream)


def overlap_points(torch, dev, dtype, cfg, gemm_tokens, attn_batch, attn_len, reps, measure,
                   streams=None, alone=None) -> list[dict]:
    """Per GEMM size: GEMM nano-batch alone (A), attention nano-batch alone (B), back to back,
    and concurrently on two streams (`streams`: a pair, e.g. of SM partitions; default two plain
    streams); interference = (concurrent - max(A, B)) / min(A, B), A and B on the whole GPU.
    With `streams`, each nano-batch is also timed alone on its own stream (its partition).
    `alone` maps GEMM size to (A, B) already measured, to reuse."""
    gen = torch.Generator(device=dev).manual_seed(2)
    rnd = lambda *s: torch.randn(*s, generator=gen, device=dev, dtype=dtype)  # noqa: E731
    k, n = gemm_shapes(cfg)["gate_up"]
    heads, kvh = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    w = rnd(k, n)
    q = rnd(attn_batch, heads, d)
    cuda = dev == "cuda"
    kv = [attention_over(torch, rnd(2 * kv_region_elements(attn_batch, attn_len, kvh, d)), attn_batch, attn_len, kvh,
                         d, paged=cuda, seed=r) for r in range(2)]
    partitioned = streams is not None
    if cuda and streams is None:
        streams = (torch.cuda.Stream(), torch.cuda.Stream())
    attn = lambda: [kv[r % 2](q) for r in range(reps)]  # noqa: E731
    out = []
    for m in gemm_tokens:
        x = rnd(m, k)
        gemm = lambda: [x @ w for _ in range(reps)]  # noqa: E731

        def both():
            if not cuda:
                gemm(), attn()
                return
            main = torch.cuda.current_stream()
            for st in streams:
                st.wait_stream(main)
            with torch.cuda.stream(streams[0]):
                gemm()
            with torch.cuda.stream(streams[1]):
                attn()
            for st in streams:
                main.wait_stream(st)

        a, b = alone[m] if alone and m in alone else (measure(gemm), measure(attn))
        serial = measure(lambda: (gemm(), attn()))
        conc = measure(both)
        row = {"gemm_tokens": m, "gemm_ms": round(1e3 * a, 4), "attention_ms": round(1e3 * b, 4),
               "back_to_back_ms": round(1e3 * serial, 4), "concurrent_ms": round(1e3 * conc, 4),
               "balance": round(a / b, 4), "interference": round((conc - max(a, b)) / min(a, b), 4)}
        if partitioned:
            row["gemm_on_partition_ms"] = round(1e3 * measure(lambda: on_stream(torch, streams[0], gemm)), 4)
            row["attention_on_partition_ms"] = round(1e3 * measure(lambda: on_stream(torch, streams[1], attn)), 4)
        out.append(row)
    return out


def green_streams(torch, gemm_sms: int, attn_sms: int):
    """Two streams on disjoint SM partitions (CUDA green contexts through torch), and the
    contexts (keep them alive while the streams run); raises where torch or the driver lacks them."""
    from torch.cuda.green_contexts import GreenContext

    ctxs = [GreenContext.create(num_sms=n, device_id=torch.cuda.current_device()) for n in (gemm_sms, attn_sms)]
    if not hasattr(ctxs[0], "Stream"):
        raise RuntimeError(f"torch {torch.__version__}: GreenContext has no Stream()")
    return tuple(c.Stream() for c in ctxs), ctxs


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
    ap.add_argument("--steps", type=int, default=24, help="steps sampled per policy")
    ap.add_argument("--replay-requests", type=int, default=2000,
                    help="part 5: requests in the analog whose whole runs are replayed by sampling")
    ap.add_argument("--replay-steps", type=int, default=150, help="part 5: steps timed per policy (0: skip part 5)")
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
        tokens = [1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 16384]
        batches, lengths = [1, 8, 64, 512], [128, 1024, 4096, 16384, 32768]
        kv_limit, n_steps, requests = 80 * 2**30, args.steps, args.requests
        gemm_tokens, attn_batch, attn_len, reps = [128, 256, 512, 1024, 2048, 4096, 8192], 64, 8192, 4
        pool_tokens = 8 * 2**20  # 8M tokens x 8 KV heads x 128 x 2 (K, V) x 2 bytes = 32 GiB
    spec = ModelSpec.from_hf_config(cfg, name="tiny-llama" if args.tiny else "llama-3.1-8b")
    log(f"device {device_name}, {dtype}, model {spec.name}; preset {base.name}: {base.flops / 1e12:.2f} TFLOP/s, "
        f"{base.mem_bandwidth / 1e9:.1f} GB/s")

    log(f"steps: sampling blend and dfs on {args.trace} ({requests} requests) in the simulator")
    steps = sample_steps(args.trace, requests, n_steps)  # first: a data problem stops the run before any timing
    replay_requests, replay_steps = (300, 3) if args.tiny else (args.replay_requests, args.replay_steps)
    schedules = simulate_runs(args.trace, replay_requests, REPLAY_POLICIES, pace=True) if replay_steps else {}
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
    f = fit([p for p in points if p.op != "sdpa"], base, with_latency=True)
    paper = fit([p for p in points if p.op != "sdpa"], base)  # the paper's roofline, no launch latency
    errs = errors(points, base, f)
    fitted = fitted_hardware(base, f, MEASURED if key == "h200" else f"{base.name}-fitted")
    op_rows = [{"operator": p.op, "shape": p.shape, "regime": regime(p, base), "measured_ms": 1e3 * p.seconds,
                "model_ms": 1e3 * predict(p, base, f), "error": e, "roofline_error": predict(p, base, paper) / p.seconds - 1,
                "flops": p.flops, "bytes": p.nbytes}
               for p, e in zip(points, errs)]
    print(table([(r["operator"], r["shape"], r["regime"], f"{r['measured_ms']:.4f}", f"{r['model_ms']:.4f}",
                  f"{100 * r['error']:+.1f}%", f"{100 * r['roofline_error']:+.1f}%") for r in op_rows],
                ("operator", "shape", "regime", "measured ms", "model ms", "error", "error, no latency")))
    by_regime, roof_regime = {}, {}
    for r in op_rows:
        by_regime.setdefault(r["regime"] if r["operator"] != "sdpa" else "sdpa (reference)", []).append(abs(r["error"]))
        roof_regime.setdefault(r["regime"] if r["operator"] != "sdpa" else "sdpa (reference)", []).append(
            abs(r["roofline_error"]))
    fitted_rows = [r for r in op_rows if r["operator"] != "sdpa"]
    payload.update({
        "cost_model": "t = c_op + max(FLOPs / (F e_f), bytes / (BW e_b)): a launch latency per operator kind, "
                      "one bandwidth for weights and KV",
        "cost_model_max_error": round(max(abs(r["error"]) for r in fitted_rows), 4),
        "cost_model_max_error_by_regime": {k: round(max(v), 4) for k, v in by_regime.items()},
        "cost_model_mean_error_by_regime": {k: round(statistics.mean(v), 4) for k, v in by_regime.items()},
        "roofline_max_error_by_regime": {k: round(max(v), 4) for k, v in roof_regime.items()},
        "fit": f._asdict(), "fit_without_latency": paper._asdict(),
        "attention_kernel": ("Triton paged split-KV decode (kernels/paged_decode.py), pages of 16 in shuffled order; "
                             "torch SDPA over contiguous K/V as the 'sdpa' reference" if dev == "cuda"
                             else "torch SDPA over contiguous K/V"),
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
        cost = CostModel(spec, fitted)  # operators only: the preset's overheads are 0 until fitted below
        biggest = max(s.decode * max(1, s.kv_read // max(1, s.decode)) for s in steps)
        stack = Stack(torch, cfg, dev, dtype, max(pool_tokens, 2 * biggest))
        measured, eager = [], []
        for s in steps:
            run = stack.step_fn(s)
            eager.append(measure(run))
            if dev == "cuda":  # a decode engine replays CUDA graphs: no launch gaps
                g = graphed(torch, run)
                measured.append(measure(g.replay))
                del g
            else:
                measured.append(eager[-1])
        operator_only = [step_predictions(cost, s)[0] for s in steps]
        over = fit_overheads(steps, measured, operator_only)
        held_out = {}  # each policy's steps predicted with the overheads fitted on the other's
        for pol in ("blend", "dfs"):
            idx = [i for i, s in enumerate(steps) if s.policy != pol]
            if idx:
                held_out[pol] = fit_overheads([steps[i] for i in idx], [measured[i] for i in idx],
                                              [operator_only[i] for i in idx])
        fitted = with_overheads(fitted, over)
        cost = CostModel(spec, fitted)
        step_rows = []
        for s, m, e, o in zip(steps, measured, eager, operator_only):
            seq, bound = step_predictions(cost, s)
            cv = step_predictions(CostModel(spec, with_overheads(fitted, held_out.get(s.policy, over))), s)[0]
            step_rows.append({**s._asdict(), "measured_ms": 1e3 * m, "eager_ms": 1e3 * e,
                              "operator_model_ms": 1e3 * o, "operator_error": o / m - 1,
                              "sequential_model_ms": 1e3 * seq, "sequential_error": seq / m - 1,
                              "held_out_model_ms": 1e3 * cv, "held_out_error": cv / m - 1,
                              "bandwidth_consistent_bound_ms": 1e3 * bound, "measured_over_bound": m / bound})
        cols = ("policy", "step", "prefill", "decode", "kv_read", "eager_ms", "measured_ms", "operator_model_ms",
                "sequential_model_ms", "held_out_error", "measured_over_bound")
        print(table([tuple(f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in cols) for r in step_rows], cols))
        payload["preset"].update({k: v for k, v in over.items()})
        payload.update({
            "step_timing": ("CUDA graph replay (what a decode engine runs), eager beside it" if dev == "cuda"
                            else "eager"),
            "step_overheads": over, "step_overheads_held_out": held_out,
            "step_prediction_median_error": round(statistics.median(abs(r["held_out_error"]) for r in step_rows), 4),
            "step_prediction_median_error_in_sample": round(
                statistics.median(abs(r["sequential_error"]) for r in step_rows), 4),
            "step_prediction_median_error_operators_only": round(
                statistics.median(abs(r["operator_error"]) for r in step_rows), 4),
            "step_prediction_error": quantiles([r["held_out_error"] for r in step_rows]),
            "measured_over_bandwidth_consistent_bound": quantiles([r["measured_over_bound"] for r in step_rows]),
            "steps_source": {"trace": args.trace, "requests": requests, "per_policy": n_steps,
                             "scaled_to_tiny": args.tiny},
            "steps": step_rows,
        })
        log(f"overheads {over}; step median error {payload['step_prediction_median_error']:.3f} held out, "
            f"{payload['step_prediction_median_error_in_sample']:.3f} in sample, "
            f"{payload['step_prediction_median_error_operators_only']:.3f} operators only")
    except Exception as e:  # keep part 1 and try part 3: GPU time is short
        payload["failures"].append(f"part 2: {type(e).__name__}: {e}")
        log(traceback.format_exc())
    save()

    if schedules and "step_overheads" in payload:
        log(f"part 5: whole runs of {', '.join(schedules)} on {args.trace} ({replay_requests} requests), "
            f"{replay_steps} steps each")
        try:
            light = cuda_timer(torch, repeats=3, warmup=1) if dev == "cuda" else measure
            timer = (lambda fn: light(graphed(torch, fn).replay)) if dev == "cuda" else light
            rep = replay_schedules(schedules, CostModel(spec, fitted), stack, timer, replay_steps, args.tiny)
            cols = ("steps", "sampled", "measured_s", "predicted_sample_s", "predicted_run_s",
                    "measured_speedup_of_blend", "predicted_speedup_of_blend")
            print(table([(p, *(f"{r[c]:.4g}" if isinstance(r[c], float) else r[c] for c in cols)) for p, r in rep.items()],
                        ("policy", *cols)))
            payload["schedule_replay"] = {
                "trace": args.trace, "requests": replay_requests, "engine": "method group: paced prefill, mixed steps",
                "timing": "each sampled step replayed from a CUDA graph, median of 3; run time = steps / sampled x sum",
                "policies": rep}
            log("replayed: " + ", ".join(f"{p} {r['measured_speedup_of_blend']:.3f} measured vs "
                                         f"{r['predicted_speedup_of_blend']:.3f} predicted" for p, r in rep.items()))
        except Exception as e:
            payload["failures"].append(f"part 5: {type(e).__name__}: {e}")
            log(traceback.format_exc())
        save()
    stack = None
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

    if dev == "cuda" and "overlap" in payload:
        log("part 4: overlap on disjoint SM partitions (green contexts)")
        alone = {r["gemm_tokens"]: (r["gemm_ms"] / 1e3, r["attention_ms"] / 1e3) for r in payload["overlap"]["points"]}
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        part = {"sms": sms, "splits": [], "note": "interference against each nano-batch alone on the whole GPU; "
                "a row per split of the SMs between the GEMM and the attention; not the overlapped mode's setting"}
        try:
            for attn_sms in (32, 66, 100):
                streams, ctxs = green_streams(torch, sms - attn_sms, attn_sms)
                pts = overlap_points(torch, dev, dtype, cfg, [512, 2048, 8192], attn_batch, attn_len, reps, measure,
                                     streams=streams, alone=alone)
                torch.cuda.synchronize()
                del streams, ctxs
                part["splits"].append({"gemm_sms": sms - attn_sms, "attention_sms": attn_sms, "points": pts})
                print(table([tuple(r.values()) for r in pts], tuple(pts[0])))
            best = {}
            for sp in part["splits"]:
                for r in sp["points"]:
                    best[r["gemm_tokens"]] = min(best.get(r["gemm_tokens"], float("inf")), r["interference"])
            part["best_interference_by_gemm_tokens"] = best
            part["available"] = True
            log(f"partitioned: best interference by GEMM tokens {best}")
        except Exception as e:  # the plain-stream figures stand; this part is an extra
            part.update(available=False, error=f"{type(e).__name__}: {e}")
            log(f"partitioned overlap unavailable: {type(e).__name__}: {e}")
        payload["partitioned_overlap"] = part
        save()
    log(f"wrote {path}" + (f"; failures: {payload['failures']}" if payload["failures"] else ""))
    logf.close()
    return 1 if payload["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
