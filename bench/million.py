"""A million prompts through `blendserve run`: read + plan at 1M, the engine at growing N.

1. Writes a real-shaped OpenAI batch file to /tmp (never the repository): MMLU 5-shot chats
   (a system prompt, the subject's five dev questions as user/assistant turns, one test
   question), Azure-conversation and Azure-code chats behind their own system prompts, whose
   unique message length is the trace's context length / `--length-scale` words and whose
   max_tokens is the trace's output length (capped); every 50th line is a plain completion.
2. Read + validate + tokenize + plan of `--plan-n` requests in a fresh process (the driver's
   peak RSS is that process's; the tokenizer workers are separate processes), with the tiny
   Llama's tokenizer or `--plan-model DIR` (tokenizer files + config.json; the recorded run used
   SmolLM2-135M-Instruct's tokenizer files with the `smollm2-135m` config of `core/specs.py`).
3. `blendserve run` on a tiny random Llama (CPU; `--engine-hidden` x `--engine-layers`, default
   hidden 64, one layer: SGLang's `torch_native` prefill computes attention over the whole
   context of every request, so the engine's work per request grows with the model; the
   figures measured here are the driver's, the feed's and the cache's, which do not depend on
   the width) for each N of `--engine-n` with max_tokens `--engine-max-tokens`, window auto:
   peak RSS of the process tree, RSS of each process sampled every `--rss-every` seconds with
   the records written so far (growth per 1,000 records), the first result after the engine is
   up, the cached-token ratio; a baseline run of `--baseline-n` requests gives the model + KV
   pool RSS. `--compare-n N`: requests/s of the reference tiny Llama (hidden 256, two layers)
   and the engine model on the same N requests, side by side.
4. The cached-token ratio over window sizes (`--windows`, 0 = all at once) at `--curve-n`.
5. The resume drill: `--drill-n` requests, killed (SIGKILL, whole process group) `--kills`
   times, each once the results file holds a random number of records (rising, between 5% and
   95% of N), then run to the end: every custom_id exactly once.

Writes `bench/results/million.json`.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench._common import table, write  # noqa: E402
from blendserve_sgl.harness import cpu_engine_env  # noqa: E402
from blendserve_sgl.workloads import data_dir  # noqa: E402

ENV = cpu_engine_env()


def shared_data() -> Path:
    d = data_dir()
    if (d / "traces").is_dir():
        return d
    sys.exit("shared/data not found: set BLENDSERVE_DATA to the directory with traces/ and mmlu/")


def write_corpus(path: Path, n: int, seed: int, length_scale: float, max_tokens_cap: int,
                 fixed_max_tokens: int | None) -> None:
    data = shared_data()
    r = random.Random(seed)
    conv = [(int(c), int(g)) for _, c, g in list(csv.reader(open(data / "traces/AzureLLMInferenceTrace_conv.csv")))[1:]]
    code = [(int(c), int(g)) for _, c, g in list(csv.reader(open(data / "traces/AzureLLMInferenceTrace_code.csv")))[1:]]
    subjects = {}
    for f in sorted((data / "mmlu/dev").glob("*_dev.csv")):
        rows = list(csv.reader(open(f)))
        subjects[f.name[:-len("_dev.csv")]] = rows
    questions = []
    for f in sorted((data / "mmlu/test").glob("*_test.csv")):
        questions += [(f.name[:-len("_test.csv")], row) for row in csv.reader(open(f))]
    words = " ".join(q[1][0] for q in questions[:3000]).split()
    systems = {"mmlu": "The following are multiple choice questions. Answer with the letter only.",
               "conv": "You are a helpful, careful assistant. Answer the user's question clearly and concisely.",
               "code": "You are an expert programmer. Complete or fix the code the user sends; reply with code only."}

    def qa(row):
        return f"{row[0]}\nA. {row[1]}\nB. {row[2]}\nC. {row[3]}\nD. {row[4]}\nAnswer:"

    with open(path, "w") as out:
        for i in range(n):
            u = r.random()
            if i % 50 == 49:
                body = {"prompt": " ".join(r.choices(words, k=r.randint(5, 60))), "max_tokens": 4}
                url = "/v1/completions"
            elif u < 0.4:
                subject, row = questions[r.randrange(len(questions))]
                msgs = [{"role": "system", "content": systems["mmlu"]}]
                for shot in subjects[subject]:
                    msgs += [{"role": "user", "content": qa(shot)}, {"role": "assistant", "content": shot[5]}]
                msgs.append({"role": "user", "content": qa(row)})
                body = {"messages": msgs, "max_tokens": 1}
                url = "/v1/chat/completions"
            else:
                kind = "conv" if u < 0.75 else "code"
                ctx, gen = r.choice(conv if kind == "conv" else code)
                k = max(3, int(ctx / length_scale))
                msgs = [{"role": "system", "content": systems[kind]},
                        {"role": "user", "content": " ".join(r.choices(words, k=k))}]
                body = {"messages": msgs, "max_tokens": max(1, min(gen, max_tokens_cap))}
                url = "/v1/chat/completions"
            if fixed_max_tokens:
                body["max_tokens"] = fixed_max_tokens
            body["temperature"] = 0
            out.write(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}) + "\n")


REFERENCE_MODEL = (256, 2)  # scripts/cpu_smoke.py's default tiny Llama: hidden size, layers


def tiny_model(hidden: int = REFERENCE_MODEL[0], layers: int = REFERENCE_MODEL[1]) -> Path:
    """A tiny random Llama (the cpu_smoke tokenizer; intermediate size 2 x hidden, 4 heads, 2 KV heads)."""
    d = Path("/tmp/blendserve-million-tiny") if (hidden, layers) == REFERENCE_MODEL else \
        Path(f"/tmp/blendserve-million-tiny-h{hidden}-l{layers}")
    if not (d / "config.json").exists():
        sys.path.insert(0, str(ROOT / "scripts"))
        from cpu_smoke import write_tiny_llama

        write_tiny_llama(d, hidden_size=hidden, intermediate_size=2 * hidden, num_layers=layers)
    return d


def model_label(hidden: int, layers: int) -> str:
    return f"tiny random Llama, hidden {hidden}, {layers} layer{'s' if layers > 1 else ''} (scripts/cpu_smoke.py), CPU"


ROLES = {"sglang::scheduler": "scheduler", "sglang::detokenizer": "detokenizer"}


class Records:
    """Lines of a results file being appended to, counted incrementally."""

    def __init__(self, path: Path):
        self.path, self._offset, self._n = path, 0, 0

    def count(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except OSError:
            return self._n
        self._offset += len(chunk)
        self._n += chunk.count(b"\n")
        return self._n


class RssSampler(threading.Thread):
    """RSS of every process of a run (the driver, SGLang's scheduler and detokenizer, others) and
    the records written so far, every `every` seconds, until `stop()`."""

    def __init__(self, pid: int, output: Path, every: float):
        super().__init__(daemon=True)
        self.pid, self.output, self.every = pid, output, every
        self.rows: list[list] = []
        self._halt = threading.Event()
        self._t0 = time.perf_counter()
        self.records = Records(output)

    def run(self) -> None:
        while not self._halt.wait(self.every):
            self.sample()

    def stop(self) -> dict:
        self._halt.set()
        self.join()
        return {"every_seconds": self.every, "columns": ["seconds", "records", "driver", "scheduler", "detokenizer",
                                                          "other"],
                "rows": self.rows, "growth_mb_per_1000_records": growth(self.rows)}

    def sample(self) -> None:
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        mb = {"driver": 0.0, "scheduler": 0.0, "detokenizer": 0.0, "other": 0.0}
        for p in procs:
            try:
                role = "driver" if p.pid == self.pid else ROLES.get(p.cmdline()[0] if p.cmdline() else "", "other")
                mb[role] += p.memory_info().rss / 2**20
            except psutil.Error:
                pass
        self.rows.append([round(time.perf_counter() - self._t0, 1), self.records.count(),
                          *(round(mb[k], 1) for k in ("driver", "scheduler", "detokenizer", "other"))])


def growth(rows: list[list]) -> dict:
    """Least-squares MB per 1,000 records of each process over the samples once results flow
    (from a tenth of the records on: the engine is up and its pool in use): the slope of RSS
    against records written."""
    rows = [r for r in rows if rows and r[1] >= 0.1 * rows[-1][1] and r[3] > 0]
    if len(rows) < 3 or rows[-1][1] == rows[0][1]:
        return {}
    x = np.array([r[1] for r in rows], dtype=float)
    out = {}
    for j, name in enumerate(("driver", "scheduler", "detokenizer", "other"), start=2):
        y = np.array([r[j] for r in rows], dtype=float)
        out[name] = round(float(np.polyfit(x, y, 1)[0]) * 1000, 2)
    return out


def plan_phase(path: Path, model: Path) -> dict:
    """Runs in its own process: read + plan; prints its figures as JSON."""
    from transformers import AutoTokenizer

    from blendserve_sgl.batch.order import cost_for, plan
    from blendserve_sgl.batch.progress import peak_rss_mb
    from blendserve_sgl.batch.prompts import context_length
    from blendserve_sgl.batch.reader import read_store

    tok = AutoTokenizer.from_pretrained(str(model))
    load_before = os.getloadavg()
    c0, t0 = os.times(), time.perf_counter()
    read = read_store(path, tok, context_length(model), 256, model_dir=model)
    c1, t1 = os.times(), time.perf_counter()
    order = plan(read.store, cost_for(model))
    c2, t2 = os.times(), time.perf_counter()
    s = read.store
    def cpu(a, b):
        return round(b.user + b.system - a.user - a.system, 1)

    def workers(a, b):  # the pool's processes, once they are reaped
        return round(b.children_user + b.children_system - a.children_user - a.children_system, 1)

    return {"planned_requests": len(order), "lines": read.lines, "invalid": len(read.errors),
            "read_seconds": round(t1 - t0, 2), "plan_only_seconds": round(t2 - t1, 2),
            "plan_seconds": round(t2 - t0, 2), "driver_rss_mb": round(peak_rss_mb(), 1),
            "cpu_seconds": {"read_driver": cpu(c0, c1), "read_workers": workers(c0, c1), "plan": cpu(c1, c2)},
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
            "workers": os.cpu_count(), "store_bytes": s.nbytes(), "store_pieces": s.pieces,
            "prompt_tokens": int(s.prompt_lengths().sum()), "stored_tokens": s.piece_tokens.n + s.tail_tokens.n,
            "whole_text_fallback": read.whole_text_fallback}


def run_cli(path: Path, model: Path, out: Path, window: str, extra=(), kill_at_records: int | None = None,
            rss_every: float = 0.0) -> dict:
    """`blendserve run`; returns its summary JSON, with `rss_samples` when `rss_every` > 0; with
    `kill_at_records`, its process group is killed once `out` holds that many records
    ({'killed': True, 'records': ...}; the summary if it finished first)."""
    summary = out.with_suffix(".summary.json")
    summary.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "blendserve_sgl.cli", "run", str(path), "-o", str(out), "--model", str(model),
           "--window", window, "--summary-json", str(summary), "--quiet", *extra]
    proc = subprocess.Popen(cmd, env=ENV, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    sampler = None
    if rss_every > 0:
        sampler = RssSampler(proc.pid, out, rss_every)
        sampler.start()
    if kill_at_records is not None:
        written = Records(out)
        while proc.poll() is None:
            records = written.count()
            if records >= kill_at_records:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                time.sleep(1.0)  # the engine processes die with the group
                return {"killed": True, "records": records}
            time.sleep(0.2)
    text, _ = proc.communicate()
    samples = sampler.stop() if sampler is not None else None
    if proc.returncode != 0:
        raise SystemExit(f"blendserve run failed ({proc.returncode}):\n{text[-3000:]}")
    s = json.loads(summary.read_text())
    if samples is not None:
        s["rss_samples"] = samples
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan-n", type=int, default=1_000_000)
    ap.add_argument("--engine-n", default="25000,50000,100000", help="comma-separated request counts")
    ap.add_argument("--baseline-n", type=int, default=200)
    ap.add_argument("--curve-n", type=int, default=0, help="0: the largest engine N (runs also with --engine-n '')")
    ap.add_argument("--windows", default="0,256,1024,auto", help="empty: no curve")
    ap.add_argument("--drill-n", type=int, default=0, help="0: the largest engine N; -1: no drill")
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--engine-max-tokens", type=int, default=2)
    ap.add_argument("--length-scale", type=float, default=16.0)
    ap.add_argument("--max-tokens-cap", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tmp", default="/tmp/blendserve-million")
    ap.add_argument("--skip-plan", action="store_true")
    ap.add_argument("--skip-engine", action="store_true")
    ap.add_argument("--plan-model", help="model directory (tokenizer + config.json) for the plan phase "
                                         "(default: the tiny Llama the engine runs use)")
    ap.add_argument("--update", action="store_true", help="keep the figures of results/million.json that this "
                                                          "run does not measure")
    ap.add_argument("--merge-runs", action="store_true", help="with --update: add this command's engine runs to "
                                                                 "those of results/million.json")
    ap.add_argument("--engine-hidden", type=int, default=64, help="hidden size of the engine runs' tiny Llama")
    ap.add_argument("--engine-layers", type=int, default=1, help="layers of the engine runs' tiny Llama")
    ap.add_argument("--rss-every", type=float, default=5.0, help="seconds between RSS samples of each process")
    ap.add_argument("--compare-n", type=int, default=0,
                    help="requests/s of the reference tiny Llama (hidden 256, 2 layers) and the engine model on N "
                         "requests, side by side (0: skip)")
    ap.add_argument("--plan-phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plan_phase:
        print(json.dumps(plan_phase(Path(args.plan_phase), Path(args.plan_model) if args.plan_model else tiny_model())))
        return
    model = tiny_model(args.engine_hidden, args.engine_layers)
    tmp = Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    result: dict = {"model": model_label(args.engine_hidden, args.engine_layers),
                    "corpus": f"MMLU 5-shot chats 40%, Azure conv 35% / code 25% (unique text = context / "
                              f"{args.length_scale:g} words), 1 in 50 completions; seed {args.seed}"}
    if not args.skip_plan:
        big = tmp / f"plan-{args.plan_n}.jsonl"
        if not big.exists():
            write_corpus(big, args.plan_n, args.seed, args.length_scale, args.max_tokens_cap, None)
        extra = ["--plan-model", args.plan_model] if args.plan_model else []
        proc = subprocess.run([sys.executable, __file__, "--plan-phase", str(big), *extra], env=ENV,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        result.update(json.loads(proc.stdout.strip().splitlines()[-1]))
        result["input_bytes"] = big.stat().st_size
        result["plan_model"] = str(args.plan_model or model)
        result["plan_command"] = " ".join(sys.argv)
        print(table([(k, result[k]) for k in ("planned_requests", "read_seconds", "plan_only_seconds", "plan_seconds",
                                              "driver_rss_mb", "store_bytes", "prompt_tokens", "stored_tokens")],
                    ("plan phase", "value")))

    sizes = [int(x) for x in args.engine_n.split(",") if x] if not args.skip_engine else []

    def corpus(n):
        p = tmp / f"engine-{n}.jsonl"
        if not p.exists():
            write_corpus(p, n, args.seed, args.length_scale, args.max_tokens_cap, args.engine_max_tokens)
        return p

    if args.compare_n:
        rows = []
        for hidden, layers in (REFERENCE_MODEL, (args.engine_hidden, args.engine_layers)):
            s = run_cli(corpus(args.compare_n), tiny_model(hidden, layers), tmp / f"compare-{hidden}-{layers}.jsonl",
                        "auto", ["--overwrite"])
            rows.append({"model": model_label(hidden, layers), "requests": args.compare_n,
                         "completed": s["completed"], "requests_per_s": s["requests_per_s"],
                         "total_tokens_per_s": s["total_tokens_per_s"], "generate_seconds": s["generate_seconds"],
                         "cache_hit_ratio": s["cache_hit_ratio"], "window": s["window"]})
        print(table([(r["model"], r["requests_per_s"], r["generate_seconds"], r["cache_hit_ratio"]) for r in rows],
                    ("model", "requests/s", "gen s", "cached")), flush=True)
        result["engine_model_comparison"] = {"command": " ".join(sys.argv), "runs": rows,
                                             "speedup": round(rows[1]["requests_per_s"] / rows[0]["requests_per_s"], 2)}
        save(result, args.update, args.merge_runs)

    if sizes:
        result["engine_command"] = " ".join(sys.argv)
        rows, rss = [], {}
        result["engine_runs"] = []
        for n in [args.baseline_n] + sizes:
            load = os.getloadavg()
            s = run_cli(corpus(n), model, tmp / f"out-{n}.jsonl", "auto", ["--overwrite"], rss_every=args.rss_every)
            s["engine_model"] = result["model"]
            s["loadavg_before_after"] = [round(load[0], 2), round(os.getloadavg()[0], 2)]
            rss[n] = s["tree_peak_rss_mb"]
            rows.append((n, s["window"], s["tree_peak_rss_mb"], s["driver_peak_rss_mb"], s["first_result_seconds"],
                         s["cache_hit_ratio"], s["generate_seconds"], s["completed"]))
            print(table(rows[-1:], ("N", "window", "tree MB", "driver MB", "first s", "cached", "gen s", "done")),
                  flush=True)
            result["engine_runs"].append(s)
            if n != args.baseline_n:
                result["engine_requests"] = n
                result["rss_by_n"] = {str(k): v for k, v in rss.items()}
                result["engine_rss_mb_over_model"] = round(rss[n] - rss[args.baseline_n], 1)
                result["first_result_seconds"] = rows[-1][4]
                result["first_result_seconds_by_n"] = {str(r[0]): r[4] for r in rows}
                result["rss_growth_mb_per_1000_by_n"] = {str(r["requests"]): r["rss_samples"]["growth_mb_per_1000_records"]
                                                         for r in result["engine_runs"]}
                save(result, args.update, args.merge_runs)
    top = sizes[-1] if sizes else 0
    curve_n = args.curve_n or top
    windows = [x for x in args.windows.split(",") if x] if curve_n else []
    if windows:
        result["curve_command"] = " ".join(sys.argv)
        curve, curve_runs = {}, {}
        for w in windows:
            done = [r for r in result.get("engine_runs", []) + (saved_runs() if args.update else [])
                    if r["requests"] == curve_n and r.get("engine_model") == result["model"]]
            s = (done[-1] if w == "auto" and done else
                 run_cli(corpus(curve_n), model, tmp / f"curve-{w}.jsonl", w, ["--overwrite"], rss_every=args.rss_every))
            key = w if w != "auto" else f"auto ({s['window']})"
            curve[key] = s["cache_hit_ratio"]
            curve_runs[key] = {k: s.get(k) for k in ("window", "cache_hit_ratio", "cached_tokens", "input_tokens",
                                                     "requests_per_s", "tree_peak_rss_mb", "first_result_seconds")}
            print(f"window {w}: cached {s['cache_hit_ratio']}", flush=True)
        result["curve_n"] = curve_n
        result["curve_model"] = result["model"]
        result["cached_ratio_by_window"] = curve
        result["curve_runs"] = curve_runs
        all_at_once = curve.get("0")
        auto = next((v for k, v in curve.items() if k.startswith("auto")), None)
        if all_at_once and auto:
            result["cached_ratio_vs_all_at_once"] = round(auto / all_at_once, 4)
        save(result, args.update, args.merge_runs)

    drill_n = args.drill_n or top
    if drill_n > 0:
        result["drill_command"] = " ".join(sys.argv)
        out = tmp / "drill.jsonl"
        out.unlink(missing_ok=True)
        r = random.Random(args.seed)
        kills = []
        for target in sorted(int(r.uniform(0.05, 0.95) * drill_n) for _ in range(args.kills)):
            kills.append(run_cli(corpus(drill_n), model, out, "auto", kill_at_records=target).get("records"))
        run_cli(corpus(drill_n), model, out, "auto")
        ids = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]  # error records included
        want = {f"req-{i}" for i in range(drill_n)}
        result["resume_drill"] = {"requests": drill_n, "killed_at_records": kills, "records": len(ids),
                                  "model": result["model"]}
        result["resume_exactly_once"] = len(ids) == len(set(ids)) and set(ids) == want
        print(f"resume drill: {len(ids)} records for {drill_n} requests, exactly once: "
              f"{result['resume_exactly_once']}")
    print(f"wrote {save(result, args.update, args.merge_runs)}")


def saved_runs() -> list[dict]:
    old = ROOT / "bench" / "results" / "million.json"
    return json.loads(old.read_text()).get("engine_runs", []) if old.exists() else []


def save(result: dict, update: bool, merge_runs: bool = False) -> Path:
    """Write results/million.json; with `update`, over the figures of the file there; with
    `merge_runs`, this command's engine runs added to the file's runs on the same engine model
    (same N replaced; runs on another model dropped), the per-N figures rebuilt from them."""
    old = ROOT / "bench" / "results" / "million.json"
    if update and old.exists():
        kept = json.loads(old.read_text())
        for k in ("command", "machine"):
            kept.pop(k, None)
        merged = {**kept, **result}
        if merge_runs and "engine_runs" in result:
            ns = {r["requests"] for r in result["engine_runs"]}
            same_model = [r for r in kept.get("engine_runs", [])
                          if r.get("engine_model") == result["model"] and r["requests"] not in ns]
            runs = merged["engine_runs"] = same_model + result["engine_runs"]
            merged["rss_by_n"] = {str(r["requests"]): r["tree_peak_rss_mb"] for r in runs}
            merged["first_result_seconds_by_n"] = {str(r["requests"]): r["first_result_seconds"] for r in runs}
            merged["rss_growth_mb_per_1000_by_n"] = {str(r["requests"]): r["rss_samples"]["growth_mb_per_1000_records"]
                                                     for r in runs if "rss_samples" in r}
            before = kept.get("engine_command") or "" if same_model else ""
            if not before.endswith(result["engine_command"]):  # saved once per engine run
                merged["engine_command"] = f"{before} && {result['engine_command']}" if before else result["engine_command"]
            else:
                merged["engine_command"] = before
        result = merged
    return write("million", result)


if __name__ == "__main__":
    main()
