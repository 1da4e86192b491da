"""`blendserve plan` on a user's batch file: how long planning takes at 100,000 lines, and how
close its prediction comes to the real engine on CPU.

    python bench/plan_file.py --phases calibrate     # fit the cpu preset's engine overheads
    python bench/plan_file.py --phases speed,check --cpu-model DIR   # plan speed; prediction error

1. calibrate: two small files (seed 1 of `examples/make_requests.py`: 48 requests with short
   outputs, 24 with long ones, every request `ignore_eos`) run by `blendserve run` with each of
   `--calibration-policies` on each of `--calibration-models` (the tiny random-weight Llama;
   model directories), SGLang logging every batch. The CPU's GEMM FLOP/s and copy bandwidth are
   measured before every run (`measure_cpu`) and the best is kept; the engine overheads are fitted
   by least squares over the logged batches (`fit_overheads`): per logged gap, measured seconds
   minus the cost model's operator seconds = step_overhead_s x steps + request_overhead_s x
   decoding requests + prefill_token_overhead_s x prompt tokens + kv_token_overhead_s x KV
   tokens held in a decode batch (SGLang's #token). `overhead_fit` records the fit,
   the logged steps, and per run the logged vs simulated step counts and the simulated time vs
   the measured one; copy its figures to `CPU_PRESET` in `blendserve_sgl/core/specs.py` (the
   `cpu` preset). `refit`: the fit again over the recorded steps.
2. speed: `examples/make_requests.py`'s batch scaled to `--lines` lines, planned (the policies
   `blendserve run` runs, the plan's default) for Llama-3.1-8B on an H100 (`--tokenizer TINY`: the tiny model's fast tokenizer, so
   tokenization runs for real). `plan_seconds` is the command's wall time, interpreter start and
   tokenizer load included; `plan_cpu_seconds` its CPU time (the machine is shared: the load
   averages are recorded).
3. check: a fresh small file (seed 0, not a calibration file) run by `blendserve run` with each
   policy of `--cpu-policies` and planned with `--hardware cpu` (the preset with its overheads)
   under the same engine limits. `cpu_prediction_error` = |predicted - measured| / measured of the
   generation wall time (engine start excluded; measured: the best of `--repeats` runs, each run
   recorded with the load average), per policy and the mean, for the tiny model; `--cpu-model
   DIR` adds others (SmolLM2-135M); `--check-models NAME` checks only those again, the others'
   records kept.
Each run merges its phases into bench/results/plan_file.json (with `profiles`, the names the
planner accepts).
"""

from __future__ import annotations

import argparse
import json
import os
import re
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


def blendserve(args: list[str], log: Path, timeout: float, usage: dict | None = None) -> float:
    """Runs `blendserve ARGS` in its own process group; its wall time. `usage` gets the peak RSS
    (MB) of the command's own process (its reader workers are apart), from its wait."""
    t0 = time.perf_counter()
    proc = harness.start([sys.executable, "-m", "blendserve_sgl.cli", *args], log_path=log, env=ENV)
    try:
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = rc = os.waitstatus_to_exitcode(status)
                break
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"blendserve {' '.join(args[:2])} ran past {timeout} s")
            time.sleep(0.2)
    finally:
        harness.kill_group(proc)
    if usage is not None:
        usage["peak_rss_mb"] = round(ru.ru_maxrss / 1024, 1)  # kB on Linux
    if rc != 0:
        raise RuntimeError(f"blendserve {' '.join(args[:2])} failed ({rc}):\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


LIMITS = {"kv_tokens": 16384, "chunk": 512, "max_running": 64}


def engine_limits() -> list[str]:
    return ["--max-total-tokens", str(LIMITS["kv_tokens"]), "--engine-arg", f"chunked_prefill_size={LIMITS['chunk']}",
            "--engine-arg", f"max_running_requests={LIMITS['max_running']}"]


LOGGED = ["--log-level", "info", "--engine-arg", "decode_log_interval=1"]  # every batch in SGLang's log


def measured_run(model_dir: Path, path: Path, policy: str, work: Path, log_steps: bool = False) -> dict:
    """`blendserve run` of `path` on the real engine on CPU under LIMITS; its summary (with
    `log_steps`: SGLang logs every batch, `steps` holds them parsed)."""
    stem = f"{path.stem}.{model_dir.name}.{policy}"
    summary, log = work / f"{stem}.summary.json", work / f"{stem}.run.log"
    blendserve(["run", str(path), "-o", str(work / f"{stem}.results.jsonl"), "--model", str(model_dir),
                "--policy", policy, "--quiet", "--overwrite", "--summary-json", str(summary), *engine_limits(),
                *(LOGGED if log_steps else [])], log, timeout=1800)
    out = json.loads(summary.read_text())
    if log_steps:
        out["steps"] = parse_engine_log(log.read_text())
    return out


_PREFILL = re.compile(r"Prefill batch(?: \[\d+\])?, #new-seq: (\d+), #new-token: (\d+), #cached-token: (\d+),.*"
                      r"#running-req: (\d+),.*input throughput \(token/s\): ([\d.]+)")
_DECODE = re.compile(r"Decode batch(?: \[\d+\])?, #running-req: (\d+), #token: (\d+),.*gen throughput \(token/s\): ([\d.]+)")


def parse_engine_log(text: str) -> list[list]:
    """SGLang's per-batch log (log level info, decode_log_interval 1) as steps in order:
    ["P", new sequences, new tokens, cached tokens, gap s] or ["D", decoding requests, KV tokens,
    gap s]. Both kinds are logged when the batch's result is processed; `gap` is the time since
    the previous batch of the same kind was logged (SGLang logs new tokens / gap as the input
    throughput of a prefill batch and generated tokens (one per request) / gap as the gen
    throughput of a decode batch); the first batch of each kind: None (since the engine started)."""
    steps, seen = [], set()
    for line in text.splitlines():
        if m := _PREFILL.search(line):
            seqs, new, cached, thr = int(m[1]), int(m[2]), int(m[3]), float(m[5])
            gap = new / thr if "P" in seen and thr > 0 else None
            steps.append(["P", seqs, new, cached, None if gap is None else round(gap, 6)])
            seen.add("P")
        elif m := _DECODE.search(line):
            running, kv, thr = int(m[1]), int(m[2]), float(m[3])
            gap = running / thr if "D" in seen and thr > 0 else None
            steps.append(["D", running, kv, None if gap is None else round(gap, 6)])
            seen.add("D")
    return steps


def step_features(cost, steps: list[list]):
    """Per logged step: (operator seconds of the cost model with no overheads, [1, decoding
    requests, prompt tokens, KV tokens held]): the terms the overhead fit weighs (a decode batch's
    KV tokens held: SGLang's logged #token, the pool's tokens in use, as the simulator's
    `kv_active`)."""
    from dataclasses import replace

    import numpy as np

    from blendserve_sgl.core import CostModel
    from blendserve_sgl.sim.timing import ExecModel, operator_seconds, step_seconds

    cost = CostModel(cost.model, replace(cost.hardware, **dict.fromkeys(OVERHEAD_TERMS, 0.0)))
    gemm = np.array([s[2] if s[0] == "P" else s[1] for s in steps], dtype=np.float64)
    dec = np.array([0 if s[0] == "P" else s[1] for s in steps], dtype=np.float64)
    kv = np.array([0 if s[0] == "P" else s[2] for s in steps], dtype=np.float64)
    ops = step_seconds(operator_seconds(cost, gemm, kv, None, dec), ExecModel("sequential"))  # overheads 0
    return ops, np.stack([np.ones_like(gemm), dec, gemm - dec, kv], axis=1)


def step_intervals(steps: list[list]) -> list[tuple[int, int, float]]:
    """(first step, last step + 1, seconds): each logged gap covers the steps since the previous
    batch of its kind was logged, itself included."""
    out, last = [], {}
    for j, s in enumerate(steps):
        gap = s[-1]
        if gap is not None and s[0] in last:
            out.append((last[s[0]] + 1, j + 1, gap))
        last[s[0]] = j
    return out


OVERHEAD_TERMS = ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s", "kv_token_overhead_s")


def nonnegative_lstsq(a, y):
    """Least squares with every coefficient >= 0: the best of the unconstrained fits over each
    subset of the columns whose coefficients all come out >= 0 (four columns: fifteen fits)."""
    import itertools

    import numpy as np

    best = (float(np.sum(y ** 2)), np.zeros(a.shape[1]))
    for k in range(1, a.shape[1] + 1):
        for cols in itertools.combinations(range(a.shape[1]), k):
            c = np.linalg.lstsq(a[:, cols], y, rcond=None)[0]
            if (c < 0).any():
                continue
            sse = float(np.sum((a[:, cols] @ c - y) ** 2))
            if sse < best[0] - 1e-15:
                full = np.zeros(a.shape[1])
                full[list(cols)] = c
                best = (sse, full)
    return best[1]


def simulated_run(model_dir: Path, path: Path, policy: str, hw):
    """The simulator's run of `path` with `policy` as `blendserve plan` does it on hardware `hw`
    under LIMITS (outputs at max_tokens): the SimResult."""
    from blendserve_sgl.core import CostModel
    from blendserve_sgl.plan import _cost_and_tokenizer, build_parser, plan
    from blendserve_sgl.sim.engine import EngineConfig
    from blendserve_sgl.workloads.batch_file import load_batch_file

    args = build_parser().parse_args([str(path), "--model", str(model_dir), "--hardware", "a100"])
    cost, tokenizer, ctx, _ = _cost_and_tokenizer(args)
    cost = CostModel(cost.model, hw)
    records = load_batch_file(path, tokenizer, ctx, args.default_max_tokens, tokens=False).records
    engine = EngineConfig.for_cost(cost, kv_gb=LIMITS["kv_tokens"] * cost.kv_bytes_per_token / 1e9,
                                   max_running=LIMITS["max_running"], chunked_prefill=LIMITS["chunk"],
                                   mixed_chunk=False)  # as `blendserve plan` without --mixed-chunk
    _, results = plan(records, cost, engine, [SIM_NAME[policy]])
    return results["max_tokens"][SIM_NAME[policy]]


SIM_NAME = {"blend": "blend", "fcfs": "fcfs", "lpm": "sglang-lpm", "dfs-weight": "sglang-dfs-weight"}
CALIBRATION = ((48, 0.25), (24, 1.0))  # (requests, max_tokens scale) of the seed-1 files: prefill- and decode-heavy


def calibration_file(work: Path, n: int, scale: float) -> Path:
    return write_file(work / f"calib-{n}-{scale:g}.jsonl", n, ignore_eos=True, scale_max_tokens=scale, seed=1)


def calibrate(model_dirs: list[Path], work: Path, policies: list[str]):
    """Every calibration file (seed 1, not the check file) run by the real engine with each policy
    and model, SGLang logging every batch: (the CPU's figures, the measured runs with their logged
    steps). The CPU is measured (`measure_cpu`) before every run; its figures are the best of
    those measurements (the least loaded)."""
    from blendserve_sgl.core.specs import HardwareSpec, measure_cpu

    work.mkdir(parents=True, exist_ok=True)
    rows, seen = [], []
    for model_dir in model_dirs:
        for n, scale in CALIBRATION:
            path = calibration_file(work, n, scale)
            for policy in policies:
                seen.append(measure_cpu.__wrapped__(seconds=1.0))
                s = measured_run(model_dir, path, policy, work, log_steps=True)
                rows.append({"model": model_dir.name, "requests": n, "max_tokens_scale": scale, "policy": policy,
                             "measured_s": s["generate_seconds"], "output_tokens": s["output_tokens"],
                             "load_average": [round(x, 2) for x in os.getloadavg()], "steps": s["steps"]})
                print({k: v for k, v in rows[-1].items() if k != "steps"}, flush=True)
    hw = HardwareSpec("cpu", flops=max(h.flops for h in seen), mem_bandwidth=max(h.mem_bandwidth for h in seen),
                      mem_capacity=seen[0].mem_capacity)
    return hw, rows


def fit_overheads(hw, model_dirs: dict[str, Path], runs: list[dict], work: Path) -> dict:
    """The `cpu` preset's overhead terms by least squares over SGLang's logged steps: each logged
    gap (the steps since the previous batch of its kind) minus the cost model's operator time of
    those steps = step_overhead_s x steps + request_overhead_s x decoding requests +
    prefill_token_overhead_s x prompt tokens + kv_token_overhead_s x KV tokens held in a decode batch,
    coefficients >= 0. Per run, the logged and the
    simulated step counts side by side, and the run's time predicted with the fit."""
    from dataclasses import replace

    import numpy as np

    from blendserve_sgl.core import CostModel
    from blendserve_sgl.core.specs import ModelSpec
    from blendserve_sgl.sim.timing import ExecModel

    work.mkdir(parents=True, exist_ok=True)
    xs, ys, per_run = [], [], []
    hw = replace(hw, **dict.fromkeys(OVERHEAD_TERMS, 0.0))
    specs = {name: ModelSpec.from_config_file(model_dirs[name]) for name in sorted({r["model"] for r in runs})}
    for run in runs:
        cost = CostModel(specs[run["model"]], hw)
        ops, feats = step_features(cost, run["steps"])
        spans = step_intervals(run["steps"])
        per_run.append((ops, feats, spans))
        for a, b, gap in spans:
            xs.append(feats[a:b].sum(axis=0))
            ys.append(gap - ops[a:b].sum())
    coef = nonnegative_lstsq(np.array(xs), np.array(ys))
    fit = dict(zip(OVERHEAD_TERMS, (round(float(c), 7) for c in coef)))
    fitted = replace(hw, **fit)
    rows = []
    for run, (ops, feats, spans) in zip(runs, per_run):
        covered = sorted({i for a, b, _ in spans for i in range(a, b)})
        res = simulated_run(model_dirs[run["model"]], calibration_file(work, run["requests"], run["max_tokens_scale"]),
                            run["policy"], fitted)
        pre, dec = res.series["prefill"], res.series["decode"]
        kinds = [s[0] for s in run["steps"]]
        simulated = res.time(ExecModel("sequential"))
        logged = float(sum(g for _, _, g in spans))
        rows.append({k: run[k] for k in ("model", "requests", "max_tokens_scale", "policy", "measured_s",
                                         "output_tokens", "load_average")}
                    | {"logged_steps": {"prefill": kinds.count("P"), "decode": kinds.count("D")},
                       "simulated_steps": {"prefill": int(np.count_nonzero(pre)),
                                           "decode": int(np.count_nonzero((dec > 0) & (pre == 0)))},
                       "logged_step_s": round(logged, 4),
                       "logged_step_s_fitted": round(float((ops + feats @ coef)[covered].sum()), 4),
                       "simulated_s": round(simulated, 4),
                       "error": round(abs(simulated - run["measured_s"]) / run["measured_s"], 4),
                       "error_vs_logged_steps": round(abs(simulated - logged) / logged, 4),
                       "steps": run["steps"]})
    resid = np.array(xs) @ coef - np.array(ys)
    return {"flops": hw.flops, "mem_bandwidth": hw.mem_bandwidth, **fit,
            "model_specs": {name: {k: getattr(m, k) for k in m.__slots__} for name, m in specs.items()},
            "intervals": len(ys),
            "interval_residual_rms_s": round(float(np.sqrt(np.mean(resid ** 2))), 6),
            "fit_error_mean": round(float(np.mean([r["error"] for r in rows])), 4), "runs": rows,
            "method": "least squares (coefficients >= 0) over SGLang's logged batches (log level info, "
                      "decode_log_interval 1): per logged gap, measured seconds - the cost model's operator "
                      "seconds of its steps = a x steps + b x decoding requests + c x prompt tokens + "
                      "d x KV tokens held in a decode batch (logged #token); "
                      "error per run: the simulator's schedule of the calibration file timed with the fit "
                      "vs the measured generation time (`error`) and vs the logged batches' time "
                      "(`error_vs_logged_steps`: the engine's own steps, without the time it waited between them)"}


def engine_check(model_dir: Path, small: Path, policies: list[str], work: Path, repeats: int = 1) -> dict:
    """`small` run by the real engine on CPU with each policy (`repeats` times, the policies
    interleaved) and planned with `--hardware cpu` (the preset, its fitted overheads included)
    under the same limits; predicted vs measured generation wall time, the measured time the
    best of the repeats (the least disturbed by the machine's other jobs; every run recorded with
    the load average at its end)."""
    from blendserve_sgl.core.specs import ModelSpec

    work.mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.from_config_file(model_dir)
    pjson = work / "small.plan.json"
    blendserve(["plan", str(small), "--model", str(model_dir), "--hardware", "cpu", "--kv-gb",
                str(LIMITS["kv_tokens"] * spec.kv_bytes_per_token / 1e9), "--chunk", str(LIMITS["chunk"]),
                "--max-running", str(LIMITS["max_running"]), "--policies", ",".join(SIM_NAME[p] for p in policies),
                "--out", str(pjson)], work / "small.plan.log", timeout=600)
    predicted = {row["policy"]: row["wall_s"]["max_tokens"] for row in json.loads(pjson.read_text())["policies"]}
    runs = {p: [] for p in policies}
    for _ in range(repeats):
        for p in policies:
            s = measured_run(model_dir, small, p, work)
            runs[p].append({"measured_s": s["generate_seconds"], "load_average": [round(x, 2) for x in os.getloadavg()],
                            "completed": s["completed"], "output_tokens": s["output_tokens"],
                            "cache_hit_ratio": s["cache_hit_ratio"]})
    rows, per = [], {}
    for p in policies:
        best = min(runs[p], key=lambda r: r["measured_s"])
        measured, pred = best["measured_s"], predicted[SIM_NAME[p]]
        per[p] = {"predicted_s": pred, "measured_s": measured, "error": round(abs(pred - measured) / measured, 4),
                  **{k: best[k] for k in ("completed", "output_tokens", "cache_hit_ratio")}, "runs": runs[p]}
        rows.append((p, pred, measured, per[p]["error"]))
    print(f"{model_dir.name}:")
    print(table(rows, ("policy", "predicted s", "measured s", "error")))
    return {"model": model_dir.name, "params": spec.num_params, **LIMITS, "repeats": repeats, "policies": per,
            "error": round(sum(v["error"] for v in per.values()) / len(per), 4)}


def plan_speed(tiny: Path, lines: int, tmp: Path) -> dict:
    big = write_file(tmp / "big.jsonl", lines)
    plan_json = tmp / "big.plan.json"
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    usage = {}
    wall = blendserve(["plan", str(big), "--model", "llama-3.1-8b", "--tokenizer", str(tiny), "--hardware", "h100",
                       "--out", str(plan_json)], tmp / "big.log", timeout=1800, usage=usage)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    plan_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    big_plan = json.loads(plan_json.read_text())
    print((tmp / "big.log").read_text())
    return {"requests": big_plan["requests"], "lines": big_plan["lines"], "plan_seconds": round(wall, 2),
            "plan_cpu_seconds": round(plan_cpu, 2), "plan_peak_rss_mb": usage["peak_rss_mb"],
            "input_mb": round(big.stat().st_size / 2**20, 1),
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
    ap.add_argument("--calibration-models", default="tiny",
                    help="models the calibration runs (comma-separated: `tiny` or model directories)")
    ap.add_argument("--cpu-max-tokens-scale", type=float, default=0.25, help="shorter outputs for the CPU engine")
    ap.add_argument("--cpu-model", help="also check with these model directories (comma-separated), e.g. SmolLM2")
    ap.add_argument("--check-models", default="all",
                    help="check: `all` (tiny and --cpu-model), or the names to check again (the others' records kept)")
    ap.add_argument("--repeats", type=int, default=1, help="check: runs per policy, the best kept")
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
    extra_models = [Path(m) for m in filter(None, (args.cpu_model or "").split(","))]
    model_dirs = {"tiny": tiny, **{m.name: m for m in extra_models}}
    if "calibrate" in phases or "refit" in phases:
        if "calibrate" in phases:
            calib_models = [model_dirs[m] if m in model_dirs else Path(m)
                            for m in filter(None, args.calibration_models.split(","))]
            model_dirs.update({m.name: m for m in calib_models})
            hw, runs = calibrate(calib_models, tmp / "calibrate",
                                 [p.strip() for p in args.calibration_policies.split(",") if p.strip()])
        else:  # the recorded measurements and CPU figures, fitted again
            old = result["overhead_fit"]
            hw = specs.HardwareSpec("cpu", flops=old["flops"], mem_bandwidth=old["mem_bandwidth"],
                                    mem_capacity=specs.cpu_preset().mem_capacity)
            runs = [{k: r[k] for k in ("model", "requests", "max_tokens_scale", "policy", "measured_s",
                                       "output_tokens", "load_average", "steps")} for r in old["runs"]]
            missing = {r["model"] for r in runs} - set(model_dirs)
            if missing:
                ap.error(f"refit: pass the directories of {sorted(missing)} with --cpu-model")
        fit = result["overhead_fit"] = fit_overheads(hw, model_dirs, runs, tmp / "calibrate")
        if "calibrate" in phases:
            result.get("phase_commands", {}).pop("refit", None)
        print(json.dumps({k: v for k, v in fit.items() if k != "runs"}, indent=2))
    if "speed" in phases:
        result.update(plan_speed(tiny, args.lines, tmp))
    if "check" in phases:
        small = write_file(tmp / "small.jsonl", args.cpu_requests, ignore_eos=True,
                           scale_max_tokens=args.cpu_max_tokens_scale, seed=0)
        policies = [p.strip() for p in args.cpu_policies.split(",") if p.strip()]
        checks = result.get("cpu_checks", {}) if args.check_models != "all" else {}
        for name in (["tiny", *[m.name for m in extra_models]] if args.check_models == "all"
                     else args.check_models.split(",")):
            checks[name] = engine_check(model_dirs[name], small, policies, tmp / f"{name}-check", args.repeats)
            checks[name]["command"] = "python bench/plan_file.py " + " ".join(argv if argv is not None else sys.argv[1:])
        checks = {k: checks[k] for k in sorted(checks, key=lambda k: k != "tiny")}
        tiny_check = checks["tiny"]
        result.update(cpu_requests=args.cpu_requests, cpu_checks=checks,
                      cpu_predicted_s=tiny_check["policies"][policies[0]]["predicted_s"],
                      cpu_measured_s=tiny_check["policies"][policies[0]]["measured_s"],
                      cpu_prediction_error=tiny_check["error"], cpu_prediction_target=0.25,
                      cpu_preset_used=dict(specs.CPU_PRESET),
                      cpu_note="cpu_prediction_error = |predicted - measured| / measured generation wall time "
                               "(first submission to last result; engine start excluded; the best of `repeats` runs), "
                               "the tiny random Llama, mean over the policies; the check file (seed 0) is not a calibration file (seed 1); "
                               "the machine is shared: load averages per phase in load_average")
    result.pop("cpu_overheads_used", None)
    fit = result.get("overhead_fit")
    if fit and any(abs(specs.CPU_PRESET[k] - fit[k]) > 1e-12 * max(1.0, abs(fit[k])) for k in specs.CPU_PRESET):
        print("note: CPU_PRESET in blendserve_sgl/core/specs.py differs from the fit: copy "
              f"{ {k: fit[k] for k in specs.CPU_PRESET} } there, then rerun --phases check")
    result["profiles"] = profile_names()
    result.setdefault("load_average", {})
    result["load_average"][",".join(phases)] = {"before": [round(x, 2) for x in load_before],
                                                "after": [round(x, 2) for x in os.getloadavg()]}
    for old in ("load_average_before", "load_average_after"):
        result.pop(old, None)
    result.setdefault("phase_commands", {}).update(
        {p: "python bench/plan_file.py " + " ".join(argv if argv is not None else sys.argv[1:]) for p in phases})
    per_model = [c["command"] for c in result.get("cpu_checks", {}).values() if "command" in c]
    if per_model:  # the check's records may come from several commands (--check-models)
        result["phase_commands"]["check"] = " && ".join(dict.fromkeys(per_model))
    done = result["phase_commands"]
    result["command"] = " && ".join(dict.fromkeys(done[p] for p in PHASES if p in done))  # what made these figures
    out = write("plan_file", result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("big_plan", "cpu_checks", "overhead_fit")}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
