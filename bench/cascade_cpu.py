#!/usr/bin/env python3
"""Cascade decode attention on CPU versus per-request attention: one layer's kernel over a grid,
and the real engine end to end. Writes bench/results/cascade_cpu.json and prints both tables.

1. Kernel grid. One decode step of one attention layer with Llama-3.1-8B's heads (32 query / 8
   KV heads x 128, float32, the dtype of the CPU engine's models here): G requests share a
   P-token prefix (P = 512 .. 8,192, G = 8 .. 256), each with its own suffix of 32-160 tokens
   (question + generated tokens, seeded). The KV pool is token-major like SGLang's with slots in
   a shuffled order (a long-running radix cache is fragmented). Per-request attention is SGLang
   0.5.23's own `torch_native` decode loop (`TorchNativeAttnBackend._run_sdpa_forward_decode`:
   gather each request's KV, one SDPA call per request); the cascade is `kernels.cascade.cpu`
   with the plan built from the slot table. Times are the best of `--repeats` calls (the
   machine is shared); `plan_ms` is the host work per decode step (built once, used by every
   layer), reported apart from the per-layer time. Every cell also records the largest
   difference between the two outputs. A cell whose estimated memory exceeds half of the
   available memory is skipped with the reason. `speedup_2048x64` is per-request time over
   cascade time at P = 2,048, G = 64.

2. End to end. `sglang.Engine(attention_backend="cascade")` versus `"torch_native"`, each in its
   own process (group killed afterwards), in the order A B B A (`--e2e-repeats` 2), same batch:
   an MMLU-style offline batch, `--subjects` subjects x `--per-subject` questions: a 64-token
   system prompt, the subject's 5-shot prefix and one of its questions (lengths from the real
   MMLU text in shared/data), random token ids behind the shared prefixes, `--output-len`
   greedy tokens each with ignore_eos (MMLU answers are one token; the longer output gives
   decode, where the cascade works, a real share). Model: SmolLM2-135M-Instruct in float32
   (30 layers, 9 query / 3 KV heads x 64; `--model tiny` for the random 2-layer Llama). After a
   warm-up batch of unrelated tokens the radix cache is flushed, then the batch is timed:
   tokens/s = (prompt + output tokens) / wall time of `Engine.generate`. The figure reported is
   `e2e_ratio` = median cascade tokens/s over median torch_native tokens/s; wall time on a shared
   machine is noisy, so the CPU seconds the engine's processes used during `generate` are
   recorded too (`e2e_ratio_cpu_seconds` = torch_native's over cascade's, medians).

    python bench/cascade_cpu.py                     # everything (25-40 min on 2 shared cores)
    python bench/cascade_cpu.py --quick             # 2 x 2 grid, tiny model, 1 repeat (a smoke run)
    python bench/cascade_cpu.py --no-e2e --prefixes 2048 --groups 64
"""

from __future__ import annotations

import os

os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.harness import engine_cpu_seconds, run as run_in_group  # noqa: E402
from blendserve_sgl.workloads.engine_batches import mmlu_batch  # noqa: E402

PREFIXES = (512, 1024, 2048, 4096, 8192)
GROUPS = (8, 16, 32, 64, 128, 256)
HEADS = {"num_qo_heads": 32, "num_kv_heads": 8, "head_dim": 128, "dtype": "float32", "model": "Llama-3.1-8B"}
SUFFIX_TOKENS = (32, 160)


# ---------------------------------------------------------------------- 1. kernel grid
def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def cell_bytes(prefix: int, group: int) -> int:
    """Peak memory of one cell, estimated: the pool, one request's gathered KV (per-request), the
    gathered prefix, the score matrices and the suffix buckets (cascade), float32."""
    from kernels.cascade.cpu import SCORES_MAX_FLOATS

    per_token = HEADS["num_kv_heads"] * HEADS["head_dim"] * 4 * 2
    tokens = prefix + group * SUFFIX_TOKENS[1]
    scores = min(SCORES_MAX_FLOATS, group * HEADS["num_qo_heads"] * prefix) * 4 * 2
    return tokens * per_token + 2 * (prefix + SUFFIX_TOKENS[1]) * per_token + prefix * per_token + scores \
        + group * SUFFIX_TOKENS[1] * per_token * 2


def make_cell(prefix: int, group: int, seed: int = 0):
    import numpy as np
    import torch

    rng = np.random.default_rng(seed + 7919 * prefix + group)
    suffix = rng.integers(SUFFIX_TOKENS[0], SUFFIX_TOKENS[1] + 1, group)
    total = prefix + int(suffix.sum())
    slots = rng.permutation(total)
    tab = np.zeros((group, prefix + SUFFIX_TOKENS[1]), dtype=np.int32)
    at = prefix
    for i, s in enumerate(suffix):
        tab[i, :prefix] = slots[:prefix]
        tab[i, prefix:prefix + s] = slots[at:at + s]
        at += s
    g = torch.Generator().manual_seed(seed)
    hkv, hq, d = HEADS["num_kv_heads"], HEADS["num_qo_heads"], HEADS["head_dim"]
    k = torch.randn(total, hkv, d, generator=g)
    v = torch.randn(total, hkv, d, generator=g)
    q = torch.randn(group, hq, d, generator=g)
    return q, k, v, torch.from_numpy(tab), torch.from_numpy(prefix + suffix)


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run_cell(prefix: int, group: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    from blendserve_sgl.sglang_plugin.cascade_backend import CascadeSettings, plan_decode_batch
    from kernels.cascade.cpu import CpuCascade

    need, avail = cell_bytes(prefix, group), _available_bytes()
    row = {"prefix_tokens": prefix, "group_size": group, "estimated_gib": round(need / 2**30, 2)}
    if need > avail // 2:
        row["skipped"] = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available (limit: half)"
        return row
    q, k, v, tab, lens = make_cell(prefix, group)
    hq, hkv, d = HEADS["num_qo_heads"], HEADS["num_kv_heads"], HEADS["head_dim"]
    scale = d ** -0.5
    per_request_backend = object.__new__(TorchNativeAttnBackend)  # the decode loop uses none of its state
    rows = torch.arange(group)
    out_plain = torch.empty(group, hq, d)

    def per_request():
        per_request_backend._run_sdpa_forward_decode(q, out_plain, k, v, tab, rows, lens, scaling=scale,
                                                     enable_gqa=True, causal=False)

    kernel = CpuCascade()
    settings = CascadeSettings()

    def plan_step():
        plan, plain = plan_decode_batch(tab, np.arange(group), lens.numpy(), 1, settings, restrict=True)
        kernel.plan(plan, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, sm_scale=scale)
        return plan, plain

    plan, plain = plan_step()
    assert len(plain) == 0 and plan.levels[0].num_groups == 1
    out_cascade = torch.empty(group, hq, d)

    def cascade():
        kernel.run(q, k, v, out=out_cascade)

    t_plain = best_of(per_request, repeats)
    t_casc = best_of(cascade, repeats)
    t_plan = best_of(plan_step, repeats)
    row.update(per_request_ms=round(t_plain * 1e3, 2), cascade_ms=round(t_casc * 1e3, 2),
               plan_ms=round(t_plan * 1e3, 2), speedup=round(t_plain / t_casc, 2),
               max_abs_diff=float((out_plain - out_cascade).abs().max()),
               kv_tokens_per_request=int(lens.sum()), kv_tokens_cascade=plan.tokens_read())
    return row


def kernel_grid(prefixes, groups, repeats: int) -> list[dict]:
    import torch

    rows = []
    print(f"kernel grid: {HEADS['model']} heads ({HEADS['num_qo_heads']} q / {HEADS['num_kv_heads']} kv x "
          f"{HEADS['head_dim']}, {HEADS['dtype']}), torch {torch.__version__}, {torch.get_num_threads()} threads",
          flush=True)
    for p in prefixes:
        for g in groups:
            row = run_cell(p, g, repeats)
            rows.append(row)
            print("  " + (f"P={p} G={g}: skipped ({row['skipped']})" if "skipped" in row else
                          f"P={p} G={g}: per-request {row['per_request_ms']} ms, cascade {row['cascade_ms']} ms, "
                          f"x{row['speedup']}, plan {row['plan_ms']} ms"), flush=True)
    return rows


# ---------------------------------------------------------------------- 2. end to end
def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    batch = json.loads(Path(spec["batch_path"]).read_text())
    import sglang

    t0 = time.perf_counter()
    engine = sglang.Engine(model_path=spec["model_path"], device="cpu", attention_backend=spec["backend"],
                           max_total_tokens=spec["max_total_tokens"], random_seed=0, log_level="error")
    result = {"engine_start_s": round(time.perf_counter() - t0, 2)}
    try:
        warm = [[2 + (i % 8)] * 48 + [3 + i] * 16 for i in range(8)]
        engine.generate(input_ids=warm, sampling_params={"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True})
        engine.flush_cache()
        time.sleep(0.5)
        params = {"temperature": 0.0, "max_new_tokens": batch["output_len"], "ignore_eos": True}
        cpu0 = engine_cpu_seconds()
        t1 = time.perf_counter()
        outs = engine.generate(input_ids=batch["input_ids"], sampling_params=params)
        wall = time.perf_counter() - t1
        cpu = engine_cpu_seconds() - cpu0
    finally:
        engine.shutdown()
    meta = [o["meta_info"] for o in outs]
    result.update(wall_seconds=wall, cpu_seconds=cpu, prompt_tokens=sum(m["prompt_tokens"] for m in meta),
                  output_tokens=sum(m["completion_tokens"] for m in meta),
                  cached_tokens=sum(m.get("cached_tokens", 0) for m in meta),
                  output_ids=[o.get("output_ids") for o in outs])
    Path(spec["out_path"]).write_text(json.dumps(result))
    return 0


def run_engine(spec: dict, tmp: Path, name: str, timeout: float) -> dict:
    spec_path, out_path, log_path = tmp / f"{name}.json", tmp / f"{name}.out.json", tmp / f"{name}.log"
    spec_path.write_text(json.dumps({**spec, "out_path": str(out_path)}))
    env = dict(os.environ)
    if spec["backend"] == "cascade":
        env["BLENDSERVE_CASCADE_STATS_PATH"] = str(tmp / f"{name}.stats.json")
    rc = run_in_group([sys.executable, __file__, "--worker", str(spec_path)], timeout, log_path, env=env)
    if rc != 0 or not out_path.exists():
        raise RuntimeError(f"engine run {name} failed (rc {rc}); log:\n{log_path.read_text()[-3000:]}")
    result = json.loads(out_path.read_text())
    stats = tmp / f"{name}.stats.json"
    if stats.exists():
        result["cascade_stats"] = json.loads(stats.read_text())
    return result


def end_to_end(args) -> dict:
    from blendserve_sgl.models import cache_dir, convert_smollm2

    if args.model == "smollm2":
        model = convert_smollm2(cache_dir(None))
    else:
        sys.path.insert(0, str(ROOT / "scripts"))
        from cpu_smoke import write_tiny_llama

        model = write_tiny_llama(Path(tempfile.mkdtemp(prefix="tiny-llama-")))
    config = json.loads((Path(model) / "config.json").read_text())
    batch = mmlu_batch(config["vocab_size"], args.subjects, args.per_subject, args.output_len,
                       max_prompt=config["max_position_embeddings"] - args.output_len - 16)
    tmp = Path(tempfile.mkdtemp(prefix="cascade-e2e-"))
    (tmp / "batch.json").write_text(json.dumps(batch))
    spec = {"model_path": str(model), "batch_path": str(tmp / "batch.json"), "max_total_tokens": args.max_total_tokens}
    order = []
    for r in range(args.e2e_repeats):
        order += ["torch_native", "cascade"] if r % 2 == 0 else ["cascade", "torch_native"]
    runs: dict[str, list] = {"torch_native": [], "cascade": []}
    for i, backend in enumerate(order):
        res = run_engine({**spec, "backend": backend}, tmp, f"{i}-{backend}", args.timeout)
        runs[backend].append(res)
        print(f"  e2e {backend}: {res['wall_seconds']:.2f} s, start {res['engine_start_s']} s", flush=True)
    out = {"model": args.model, "model_path": str(model), "batch": {k: v for k, v in batch.items() if k != "input_ids"},
           "order": order, "max_total_tokens": args.max_total_tokens}
    for backend, rs in runs.items():
        wall = statistics.median(r["wall_seconds"] for r in rs)
        tokens = rs[0]["prompt_tokens"] + rs[0]["output_tokens"]
        out[backend] = {"total_tokens_per_s": round(tokens / wall, 1),
                        "output_tokens_per_s": round(rs[0]["output_tokens"] / wall, 1),
                        "wall_seconds": round(wall, 2), "wall_seconds_runs": [round(r["wall_seconds"], 2) for r in rs],
                        "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in rs), 2),
                        "cpu_seconds_runs": [round(r["cpu_seconds"], 2) for r in rs],
                        "prompt_tokens": rs[0]["prompt_tokens"], "output_tokens": rs[0]["output_tokens"],
                        "cached_tokens": rs[0]["cached_tokens"], "engine_start_s": [r["engine_start_s"] for r in rs]}
        if rs[0].get("cascade_stats"):
            out[backend]["cascade_stats_last_run"] = rs[-1]["cascade_stats"]
    a, b = runs["cascade"][0]["output_ids"], runs["torch_native"][0]["output_ids"]
    out["requests_with_different_tokens"] = sum(x != y for x, y in zip(a, b))
    out["e2e_ratio"] = round(out["cascade"]["total_tokens_per_s"] / out["torch_native"]["total_tokens_per_s"], 3)
    out["e2e_ratio_cpu_seconds"] = round(out["torch_native"]["cpu_seconds"] / out["cascade"]["cpu_seconds"], 3)
    out["e2e_ratio_pairs"] = [round(n["wall_seconds"] / c["wall_seconds"], 3)
                              for n, c in zip(runs["torch_native"], runs["cascade"])]
    return out


# ---------------------------------------------------------------------- driver
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prefixes", default=",".join(map(str, PREFIXES)))
    ap.add_argument("--groups", default=",".join(map(str, GROUPS)))
    ap.add_argument("--repeats", type=int, default=3, help="kernel timings: best of this many calls")
    ap.add_argument("--no-grid", action="store_true")
    ap.add_argument("--no-e2e", action="store_true")
    ap.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--per-subject", type=int, default=16)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--max-total-tokens", type=int, default=32768)
    ap.add_argument("--e2e-repeats", type=int, default=2, help="engine runs per backend (order A B B A ...)")
    ap.add_argument("--timeout", type=float, default=1200.0, help="seconds per engine run")
    ap.add_argument("--quick", action="store_true", help="2 x 2 grid, tiny model, one engine run each")
    ap.add_argument("--out", help="result name under bench/results (default cascade_cpu, cascade_cpu_quick)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    if args.quick:
        args.prefixes, args.groups, args.repeats = "512,2048", "8,64", 1
        args.model, args.e2e_repeats, args.per_subject = "tiny", 1, 8
    prefixes = [int(x) for x in args.prefixes.split(",")]
    groups = [int(x) for x in args.groups.split(",")]

    payload: dict = {"heads": HEADS, "suffix_tokens": list(SUFFIX_TOKENS), "repeats": args.repeats}
    if not args.no_grid:
        grid = kernel_grid(prefixes, groups, args.repeats)
        payload["grid"] = grid
        hit = [r for r in grid if r["prefix_tokens"] == 2048 and r["group_size"] == 64 and "speedup" in r]
        payload["speedup_2048x64"] = hit[0]["speedup"] if hit else None
        payload["target_met"] = bool(hit) and hit[0]["speedup"] >= 3.0
        print()
        print(table([(r["prefix_tokens"], r["group_size"], r.get("per_request_ms", "-"), r.get("cascade_ms", "-"),
                      r.get("speedup", r.get("skipped")), r.get("plan_ms", "-"), f"{r.get('max_abs_diff', math.nan):.1e}")
                     for r in grid],
                    ("prefix", "group", "per-request ms", "cascade ms", "speedup", "plan ms/step", "max |diff|")))
        print(f"\nspeedup_2048x64 = {payload['speedup_2048x64']} (target >= 3)")
    if not args.no_e2e:
        e2e = end_to_end(args)
        payload["e2e"] = e2e
        payload["e2e_ratio"] = e2e["e2e_ratio"]
        print()
        print(table([(b, e2e[b]["total_tokens_per_s"], e2e[b]["output_tokens_per_s"], e2e[b]["wall_seconds"],
                      e2e[b]["wall_seconds_runs"], e2e[b]["cpu_seconds_runs"]) for b in ("torch_native", "cascade")],
                    ("backend", "total tok/s", "output tok/s", "wall s (median)", "wall s runs", "engine CPU s runs")))
        print(f"\ne2e_ratio (cascade / torch_native tokens/s) = {e2e['e2e_ratio']} (per pair: {e2e['e2e_ratio_pairs']}); "
              f"by engine CPU seconds: {e2e['e2e_ratio_cpu_seconds']}; requests with different tokens: "
              f"{e2e['requests_with_different_tokens']} of {e2e['batch']['requests']}")
    name = args.out or ("cascade_cpu_quick" if args.quick else "cascade_cpu")
    print(f"\nwrote {write(name, payload)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
