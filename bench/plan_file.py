"""`blendserve plan` on a user's batch file: how long planning takes at 100,000 lines, and how
close its prediction comes to the real engine on CPU.

    python bench/plan_file.py                       # 100,000 lines; 48-request engine check
    python bench/plan_file.py --skip-engine         # planning speed only

1. Speed: `examples/make_requests.py`'s batch scaled to `--lines` lines (chat and completion
   requests behind shared system prompts and few-shot prefixes), planned with every policy for
   Llama-3.1-8B on an H100 (`--model llama-3.1-8b --tokenizer TINY`: the tiny model's fast
   tokenizer, so tokenization runs for real). `plan_seconds` is the command's wall time,
   interpreter start and tokenizer load included; `plan_cpu_seconds` its CPU time (the machine
   is shared: the load averages are recorded).
2. Prediction on CPU: a small file of the same mix (every request with `ignore_eos`, so outputs
   are exactly `max_tokens`, the plan's upper scenario) run by `blendserve run` on the tiny
   random-weight Llama with each policy of `--cpu-policies`, and planned with `--hardware cpu`
   (this machine measured) and the same engine limits. `cpu_prediction_error` = |predicted -
   measured| / measured of the generation wall time (engine start excluded), per policy and the
   mean (the tiny model; `--cpu-model DIR` adds others, e.g. SmolLM2-135M). Writes
   bench/results/plan_file.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "examples"))

from bench._common import table, write  # noqa: E402
from blendserve_sgl import harness  # noqa: E402

ENV = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


def write_file(path: Path, lines: int, ignore_eos: bool = False, scale_max_tokens: float = 1.0) -> Path:
    from make_requests import build

    rows = build(scale=-(-lines // 300))[:lines]
    with open(path, "w") as f:
        for r in rows:
            body = r["body"]
            body["max_tokens"] = max(1, round(body["max_tokens"] * scale_max_tokens))
            if ignore_eos:
                body["ignore_eos"] = True
                body.pop("stop", None)
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def blendserve(args: list[str], log: Path, timeout: float) -> float:
    """Runs `blendserve ARGS` in its own process group; its wall time."""
    t0 = time.perf_counter()
    proc = harness.start([sys.executable, "-m", "blendserve_sgl.cli", *args], log_path=log, env=ENV)
    try:
        rc = proc.wait(timeout=timeout)
    finally:
        harness.kill_group(proc)
    if rc != 0:
        raise RuntimeError(f"blendserve {' '.join(args[:2])} failed ({rc}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def engine_check(model_dir: Path, small: Path, policies: list[str], work: Path) -> dict:
    """`small` run by the real engine on CPU with each policy and planned with `--hardware cpu`
    under the same limits; predicted vs measured generation wall time."""
    from blendserve_sgl.core.specs import ModelSpec

    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_config_file(model_dir)
    kv_tokens, chunk, running = 16384, 512, 64
    limits = ["--max-total-tokens", str(kv_tokens), "--engine-arg", f"chunked_prefill_size={chunk}",
              "--engine-arg", f"max_running_requests={running}"]
    sim_name = {"blend": "blend", "fcfs": "fcfs", "lpm": "sglang-lpm", "dfs-weight": "sglang-dfs-weight"}
    pjson = work / "small.plan.json"
    blendserve(["plan", str(small), "--model", str(model_dir), "--hardware", "cpu", "--kv-gb",
                str(kv_tokens * spec.kv_bytes_per_token / 1e9), "--chunk", str(chunk), "--max-running", str(running),
                "--policies", ",".join(sim_name[p] for p in policies), "--out", str(pjson)],
               work / "small.plan.log", timeout=600)
    predicted = {row["policy"]: row["wall_s"]["max_tokens"] for row in json.loads(pjson.read_text())["policies"]}
    rows, per = [], {}
    for p in policies:
        summary = work / f"{p}.summary.json"
        blendserve(["run", str(small), "-o", str(work / f"{p}.results.jsonl"), "--model", str(model_dir), "--policy", p,
                    "--quiet", "--overwrite", "--summary-json", str(summary), *limits], work / f"{p}.run.log",
                   timeout=1800)
        s = json.loads(summary.read_text())
        measured, pred = s["generate_seconds"], predicted[sim_name[p]]
        per[p] = {"predicted_s": pred, "measured_s": measured, "error": round(abs(pred - measured) / measured, 4),
                  "completed": s["completed"], "output_tokens": s["output_tokens"],
                  "cache_hit_ratio": s["cache_hit_ratio"]}
        rows.append((p, pred, measured, per[p]["error"]))
    print(f"{model_dir.name}:")
    print(table(rows, ("policy", "predicted s", "measured s", "error")))
    return {"model": model_dir.name, "params": spec.num_params, "kv_tokens": kv_tokens, "chunk": chunk,
            "max_running": running, "policies": per, "error": round(sum(v["error"] for v in per.values()) / len(per), 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--cpu-requests", type=int, default=48)
    ap.add_argument("--cpu-policies", default="blend,fcfs")
    ap.add_argument("--cpu-max-tokens-scale", type=float, default=0.25, help="shorter outputs for the CPU engine")
    ap.add_argument("--cpu-model", help="also check with these model directories (comma-separated), e.g. SmolLM2")
    ap.add_argument("--skip-engine", action="store_true")
    args = ap.parse_args(argv)
    from cpu_smoke import write_tiny_llama

    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="plan-file-"))
    tiny = write_tiny_llama(tmp / "tiny")
    big = write_file(tmp / "big.jsonl", args.lines)
    plan_json = tmp / "big.plan.json"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = blendserve(["plan", str(big), "--model", "llama-3.1-8b", "--tokenizer", str(tiny), "--hardware", "h100",
                       "--out", str(plan_json)], tmp / "big.log", timeout=1800)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    plan_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    big_plan = json.loads(plan_json.read_text())
    print((tmp / "big.log").read_text())
    result = {"requests": big_plan["requests"], "lines": big_plan["lines"], "plan_seconds": round(wall, 2),
              "plan_cpu_seconds": round(plan_cpu, 2),
              "tokenize_seconds": big_plan["read_seconds"], "simulate_seconds": big_plan["simulate_seconds"],
              "plan_target_seconds": 30, "big_plan": {k: big_plan[k] for k in (
                  "model", "hardware", "token_counts", "density", "sharing_dfs_unbounded", "policies", "best_other",
                  "blend_speedup_vs_best_other")}}
    if args.skip_engine:
        result["cpu_prediction_error"] = None
        result["cpu_note"] = "engine check skipped (--skip-engine)"
    else:
        small = write_file(tmp / "small.jsonl", args.cpu_requests, ignore_eos=True,
                           scale_max_tokens=args.cpu_max_tokens_scale)
        policies = [p.strip() for p in args.cpu_policies.split(",") if p.strip()]
        checks = {"tiny": engine_check(tiny, small, policies, tmp / "tiny-check")}
        for extra in filter(None, (args.cpu_model or "").split(",")):
            checks[Path(extra).name] = engine_check(Path(extra), small, policies, tmp / f"{Path(extra).name}-check")
        tiny_check = checks["tiny"]
        result.update(cpu_requests=args.cpu_requests, cpu_checks=checks,
                      cpu_predicted_s=tiny_check["policies"][policies[0]]["predicted_s"],
                      cpu_measured_s=tiny_check["policies"][policies[0]]["measured_s"],
                      cpu_prediction_error=tiny_check["error"], cpu_prediction_target=0.25,
                      cpu_note="cpu_prediction_error: the tiny random Llama, mean over the policies")
    result["load_average_before"] = [round(x, 2) for x in load_before]
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    path = write("plan_file", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("big_plan", "cpu_checks")}, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
