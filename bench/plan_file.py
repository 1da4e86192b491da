"""`blendserve plan` on a user's batch file: how long planning takes at 100,000 lines, and how
close its prediction comes to the real engine on CPU.

    python bench/plan_file.py --phases calibrate     # fit the cpu preset's engine overheads
    python bench/plan_file.py --phases speed,check --cpu-model DIR   # plan speed; prediction error

1. calibrate: four small files (seed 1 of `examples/make_requests.py`, different sizes and output
   lengths, every request `ignore_eos`) run by `blendserve run` on the tiny random-weight Llama
   with each of `--calibration-policies`; per run, the measured generation time minus the
   simulator's operator time is fitted by least squares as `step_overhead_s` x steps +
   `request_overhead_s` x decoding requests (`overhead_fit`; copy it to `CPU_OVERHEADS` in
   `blendserve_sgl/core/specs.py`, the `cpu` preset).
2. speed: `examples/make_requests.py`'s batch scaled to `--lines` lines, planned with every policy
   for Llama-3.1-8B on an H100 (`--tokenizer TINY`: the tiny model's fast tokenizer, so
   tokenization runs for real). `plan_seconds` is the command's wall time, interpreter start and
   tokenizer load included; `plan_cpu_seconds` its CPU time (the machine is shared: the load
   averages are recorded).
3. check: a fresh small file (seed 0, not a calibration file) run by `blendserve run` with each
   policy of `--cpu-policies` and planned with `--hardware cpu` (the preset with its overheads)
   under the same engine limits. `cpu_prediction_error` = |predicted - measured| / measured of the
   generation wall time (engine start excluded), per policy and the mean, for the tiny model;
   `--cpu-model DIR` adds others (SmolLM2-135M).
Each run merges its phases into bench/results/plan_file.json (with `profiles`, the names the
planner accepts).
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


def write_file(path: Path, lines: int, ignore_eos: bool = False, scale_max_tokens: float = 1.0, seed: int = 0) -> Path:
    from make_requests import build

    rows = build(scale=-(-lines // 300), seed=seed)[:lines]
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


LIMITS = {"kv_tokens": 16384, "chunk": 512, "max_running": 64}


def engine_limits() -> list[str]:
    return ["--max-total-tokens", str(LIMITS["kv_tokens"]), "--engine-arg", f"chunked_prefill_size={LIMITS['chunk']}",
            "--engine-arg", f"max_running_requests={LIMITS['max_running']}"]


def measured_run(model_dir: Path, path: Path, policy: str, work: Path) -> dict:
    """`blendserve run` of `path` on the real engine on CPU under LIMITS; its summary."""
    summary = work / f"{path.stem}.{policy}.summary.json"
    blendserve(["run", str(path), "-o", str(work / f"{path.stem}.{policy}.results.jsonl"), "--model", str(model_dir),
                "--policy", policy, "--quiet", "--overwrite", "--summary-json", str(summary), *engine_limits()],
               work / f"{path.stem}.{policy}.run.log", timeout=1800)
    return json.loads(summary.read_text())


def simulated_run(model_dir: Path, path: Path, policy: str):
    """The simulator's run of `path` with `policy` as `blendserve plan --hardware cpu` does it, with
    the engine overheads set to 0 (outputs at max_tokens): the SimResult."""
    from dataclasses import replace

    from blendserve_sgl.core import CostModel
    from blendserve_sgl.plan import _cost_and_tokenizer, build_parser, plan
    from blendserve_sgl.sim.engine import EngineConfig
    from blendserve_sgl.workloads.batch_file import compress, load_batch_file

    args = build_parser().parse_args([str(path), "--model", str(model_dir), "--hardware", "cpu"])
    cost, tokenizer, ctx, _ = _cost_and_tokenizer(args)
    cost = CostModel(cost.model, replace(cost.hardware, step_overhead_s=0.0, request_overhead_s=0.0))
    records = compress(load_batch_file(path, tokenizer, ctx, args.default_max_tokens).records)
    engine = EngineConfig.for_cost(cost, kv_gb=LIMITS["kv_tokens"] * cost.kv_bytes_per_token / 1e9,
                                   max_running=LIMITS["max_running"], chunked_prefill=LIMITS["chunk"],
                                   mixed_chunk=False)  # as `blendserve plan` without --mixed-chunk
    sim = {"blend": "blend", "fcfs": "fcfs", "lpm": "sglang-lpm", "dfs-weight": "sglang-dfs-weight"}[policy]
    _, results = plan(records, cost, engine, [sim])
    return results["max_tokens"][sim]


CALIBRATION = ((32, 0.5), (64, 0.1), (24, 1.0), (48, 0.25))  # (requests, max_tokens scale): steps and batch sizes vary


def calibrate(model_dir: Path, work: Path, policies: list[str]) -> list[dict]:
    """Every calibration file (seed 1, not the check file) run by the real engine with each policy:
    the measured generation times."""
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, scale in CALIBRATION:
        path = write_file(work / f"calib-{n}-{scale:g}.jsonl", n, ignore_eos=True, scale_max_tokens=scale, seed=1)
        for policy in policies:
            s = measured_run(model_dir, path, policy, work)
            rows.append({"requests": n, "max_tokens_scale": scale, "policy": policy,
                         "measured_s": s["generate_seconds"], "output_tokens": s["output_tokens"]})
            print(rows[-1], flush=True)
    return rows


def fit_overheads(model_dir: Path, runs: list[dict], work: Path) -> dict:
    """Per run, measured generation time minus the simulator's operator time (overheads 0) =
    step_overhead_s x steps that ran + request_overhead_s x decoding requests summed over the
    steps; least squares over the runs, coefficients kept >= 0 (a negative one: the other alone)."""
    import numpy as np

    from blendserve_sgl.sim.timing import ExecModel

    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for run in runs:
        path = write_file(work / f"calib-{run['requests']}-{run['max_tokens_scale']:g}.jsonl", run["requests"],
                          ignore_eos=True, scale_max_tokens=run["max_tokens_scale"], seed=1)
        res = simulated_run(model_dir, path, run["policy"])
        ran = int(((res.series["prefill"] + res.series["decode"]) > 0).sum())
        rows.append({**run, "operator_s": round(res.time(ExecModel("sequential")), 4), "steps": ran,
                     "decode_requests": int(res.series["decode"].sum())})
    a = np.array([[r["steps"], r["decode_requests"]] for r in rows], dtype=np.float64)
    y = np.array([r["measured_s"] - r["operator_s"] for r in rows])
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    if (coef < 0).any():
        best = None
        for j in (0, 1):
            c = max(float(np.linalg.lstsq(a[:, [j]], y, rcond=None)[0][0]), 0.0)
            sse = float(np.sum((a[:, j] * c - y) ** 2))
            if best is None or sse < best[0]:
                best = (sse, j, c)
        coef = np.zeros(2)
        coef[best[1]] = best[2]
    pred = a @ coef + np.array([r["operator_s"] for r in rows])
    for r, p in zip(rows, pred):
        r["fitted_s"] = round(float(p), 4)
        r["error"] = round(abs(float(p) - r["measured_s"]) / r["measured_s"], 4)
    return {"model": model_dir.name, "step_overhead_s": round(float(coef[0]), 6),
            "request_overhead_s": round(float(coef[1]), 7), "runs": rows,
            "fit_error_mean": round(float(np.mean([r["error"] for r in rows])), 4),
            "method": "least squares over the runs: measured - operator time = a x steps + b x decoding requests "
                      "(steps and decoding requests counted in the simulator's schedule of each run)"}


def engine_check(model_dir: Path, small: Path, policies: list[str], work: Path) -> dict:
    """`small` run by the real engine on CPU with each policy and planned with `--hardware cpu`
    (the preset, its fitted overheads included) under the same limits; predicted vs measured
    generation wall time."""
    from blendserve_sgl.core.specs import ModelSpec

    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_config_file(model_dir)
    sim_name = {"blend": "blend", "fcfs": "fcfs", "lpm": "sglang-lpm", "dfs-weight": "sglang-dfs-weight"}
    pjson = work / "small.plan.json"
    blendserve(["plan", str(small), "--model", str(model_dir), "--hardware", "cpu", "--kv-gb",
                str(LIMITS["kv_tokens"] * spec.kv_bytes_per_token / 1e9), "--chunk", str(LIMITS["chunk"]),
                "--max-running", str(LIMITS["max_running"]), "--policies", ",".join(sim_name[p] for p in policies),
                "--out", str(pjson)], work / "small.plan.log", timeout=600)
    predicted = {row["policy"]: row["wall_s"]["max_tokens"] for row in json.loads(pjson.read_text())["policies"]}
    rows, per = [], {}
    for p in policies:
        s = measured_run(model_dir, small, p, work)
        measured, pred = s["generate_seconds"], predicted[sim_name[p]]
        per[p] = {"predicted_s": pred, "measured_s": measured, "error": round(abs(pred - measured) / measured, 4),
                  "completed": s["completed"], "output_tokens": s["output_tokens"],
                  "cache_hit_ratio": s["cache_hit_ratio"]}
        rows.append((p, pred, measured, per[p]["error"]))
    print(f"{model_dir.name}:")
    print(table(rows, ("policy", "predicted s", "measured s", "error")))
    return {"model": model_dir.name, "params": spec.num_params, **LIMITS, "policies": per,
            "error": round(sum(v["error"] for v in per.values()) / len(per), 4)}


def plan_speed(tiny: Path, lines: int, tmp: Path) -> dict:
    big = write_file(tmp / "big.jsonl", lines)
    plan_json = tmp / "big.plan.json"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall = blendserve(["plan", str(big), "--model", "llama-3.1-8b", "--tokenizer", str(tiny), "--hardware", "h100",
                       "--out", str(plan_json)], tmp / "big.log", timeout=1800)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    plan_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    big_plan = json.loads(plan_json.read_text())
    print((tmp / "big.log").read_text())
    return {"requests": big_plan["requests"], "lines": big_plan["lines"], "plan_seconds": round(wall, 2),
            "plan_cpu_seconds": round(plan_cpu, 2),
            "tokenize_seconds": big_plan["read_seconds"], "simulate_seconds": big_plan["simulate_seconds"],
            "plan_target_seconds": 30, "big_plan": {k: big_plan[k] for k in (
                "model", "hardware", "token_counts", "density", "sharing_dfs_unbounded", "simulated_requests",
                "policies", "best_other", "blend_speedup_vs_best_other") if k in big_plan}}


PHASES = ("calibrate", "refit", "speed", "check")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, default=100_000)
    ap.add_argument("--phases", default=",".join(PHASES),
                    help="calibrate: measure and fit the cpu preset's overheads; refit: the fit again over the "
                         "recorded measurements; speed: plan --lines lines; check: prediction "
                         "vs the engine. Fields of phases not run are kept from the existing results file")
    ap.add_argument("--cpu-requests", type=int, default=48)
    ap.add_argument("--cpu-policies", default="blend,fcfs")
    ap.add_argument("--calibration-policies", default="fcfs,blend")
    ap.add_argument("--cpu-max-tokens-scale", type=float, default=0.25, help="shorter outputs for the CPU engine")
    ap.add_argument("--cpu-model", help="also check with these model directories (comma-separated), e.g. SmolLM2")
    args = ap.parse_args(argv)
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    if not phases or set(phases) - set(PHASES):
        ap.error(f"--phases: choose from {', '.join(PHASES)}")
    from blendserve_sgl.core import specs
    from cpu_smoke import write_tiny_llama
    from blendserve_sgl.core.profiles import profile_names

    path = ROOT / "bench" / "results" / "plan_file.json"
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.pop("machine", None)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="plan-file-"))
    tiny = write_tiny_llama(tmp / "tiny")
    if "calibrate" in phases or "refit" in phases:
        if "calibrate" in phases:
            runs = calibrate(tiny, tmp / "calibrate", [p.strip() for p in args.calibration_policies.split(",")
                                                        if p.strip()])
        else:  # the recorded measurements, the simulator's side again
            runs = [{k: r[k] for k in ("requests", "max_tokens_scale", "policy", "measured_s", "output_tokens")}
                    for r in result["overhead_fit"]["runs"]]
        fit = result["overhead_fit"] = fit_overheads(tiny, runs, tmp / "calibrate")
        print(json.dumps({k: v for k, v in fit.items() if k != "runs"}, indent=2))
    if "speed" in phases:
        result.update(plan_speed(tiny, args.lines, tmp))
    if "check" in phases:
        small = write_file(tmp / "small.jsonl", args.cpu_requests, ignore_eos=True,
                           scale_max_tokens=args.cpu_max_tokens_scale, seed=0)
        policies = [p.strip() for p in args.cpu_policies.split(",") if p.strip()]
        checks = {"tiny": engine_check(tiny, small, policies, tmp / "tiny-check")}
        for extra in filter(None, (args.cpu_model or "").split(",")):
            checks[Path(extra).name] = engine_check(Path(extra), small, policies, tmp / f"{Path(extra).name}-check")
        tiny_check = checks["tiny"]
        result.update(cpu_requests=args.cpu_requests, cpu_checks=checks,
                      cpu_predicted_s=tiny_check["policies"][policies[0]]["predicted_s"],
                      cpu_measured_s=tiny_check["policies"][policies[0]]["measured_s"],
                      cpu_prediction_error=tiny_check["error"], cpu_prediction_target=0.25,
                      cpu_overheads_used=dict(specs.CPU_OVERHEADS),
                      cpu_note="cpu_prediction_error: the tiny random Llama, mean over the policies; the check file "
                               "(seed 0) is not a calibration file (seed 1)")
    fit = result.get("overhead_fit")
    if fit and any(abs(specs.CPU_OVERHEADS[k] - fit[k]) > 1e-12 for k in specs.CPU_OVERHEADS):
        print(f"note: CPU_OVERHEADS in blendserve_sgl/core/specs.py differ from the fit "
              f"({fit['step_overhead_s']}, {fit['request_overhead_s']}): copy the fit there, then rerun --phases check")
    result["profiles"] = profile_names()
    result.setdefault("load_average", {})
    result["load_average"][",".join(phases)] = {"before": [round(x, 2) for x in load_before],
                                                "after": [round(x, 2) for x in os.getloadavg()]}
    for old in ("load_average_before", "load_average_after"):
        result.pop(old, None)
    result.setdefault("phase_commands", {}).update(
        {p: "python bench/plan_file.py " + " ".join(argv if argv is not None else sys.argv[1:]) for p in phases})
    done = result["phase_commands"]
    result["command"] = " && ".join(dict.fromkeys(done[p] for p in PHASES if p in done))  # what made these figures
    out = write("plan_file", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("big_plan", "cpu_checks", "overhead_fit")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
