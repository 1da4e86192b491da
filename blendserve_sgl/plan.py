"""`blendserve plan`: predicted time of a batch before it runs, every policy, from the simulator.

    blendserve plan requests.jsonl --model DIR|NAME --hardware h100 [--gpus N] [--json]
    blendserve plan --workload trace1 --requests 20000      # a built-in mix instead of a file
    blendserve plan --workload my_trace.csv                 # a trace file's token counts

A file is read, validated and tokenized as `blendserve run` does it (`workloads.batch_file`);
bad lines are counted and named with `run`'s messages; the token prompts are then held as their
prefix groups: the whole file in the view `blendserve run` plans with (`batch.order.store_prefixes`:
each request's pieces and the shared 32-token blocks of its tail, no token of a shared prompt held
per request), which chooses the sample; the simulated sample cut exactly where its prompts branch
(`BatchFile.exact`, `batch_file.prefix_segments`). Output lengths are not known before the
run: each request is simulated twice, once generating its `max_tokens` (the upper bound) and
once generating an estimate, and every figure is given as the range over the two. The estimate
is `--output-fraction` of max_tokens (an assumption, default 0.5), or, with `--generate-sample N`
and a model directory, measured: N requests of the file (a seeded uniform sample) run on this
machine through the engine as `blendserve run` runs them (`generate_here`), and each simulated
request generates round(max_tokens x a fraction drawn, seeded, from the sampled generated /
max_tokens), which keeps the spread of output lengths a mean would hide. The output says which.
Each policy runs in the simulator (`sim.run.simulate`: SGLang's admission, chunked prefill,
radix prefix cache, retraction) under the same rules, output lengths
unknown to the scheduler (blend samples and estimates, as the plugin does). The plan is this
view of `simulate`'s results, nothing else: predicted wall time (step times of the cost model,
`--timing` sequential as SGLang runs operators, or overlapped), GPU-hours, throughput, prefix
cache hits, peak KV per policy; a PNG of per-step compute and memory time for blend and the best
other policy; `--json` for scripts. `--gpus N` assumes N data-parallel replicas that split the
file evenly (wall time / N, but at least the longest request's own steps; GPU-hours unchanged).
A file of more than `--sim-requests` requests (default 5,000) is simulated on a sample of about
that many, whole prefix groups drawn at random (`sample`), its time scaled to the file; the first policy runs again on a second sample and
the gap is reported as the sampling error.
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import random
import re
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from .cli import engine_seed, fraction, positive_float, positive_int
from .core import CostModel
from .core.preset import PRESET
from .core.tree import Node
from .core.specs import ModelSpec, hardware, hardware_names, model, model_names, vocab_size
from .sim.engine import EngineConfig
from .sim.metrics import SimResult, plot_steps
from .sim.policies import POLICIES
from .sim.run import RunSpec, Workload, simulate
from .sim.timing import ExecModel
from .workloads import Record

SCENARIOS = ("max_tokens", "estimate")
SIM_REQUESTS = 5_000  # default sample size; the plan reports the spread between two samples
BAD_LINES_NAMED = 20  # bad lines the plan names with their messages (the rest are counted)
GPU_CHUNKED_PREFILL = 8192  # SGLang's default chunked-prefill size for 80 GB GPUs
CPU_CHUNKED_PREFILL = 4096  # SGLang 0.5.23's chunked-prefill size on the CPU engine (its server-args log line):
# `run --plan-only` on CPU plans with it; with 8,192 a 20-request shared-prefix batch was planned with
# fcfs's prefix hits at 0.147 where the engine measured 0.441
# What `blendserve run --policy` runs (SGLang's fcfs, lpm, dfs-weight, the plugin's blend): the
# default; the simulator's orderings `dfs` and `balance` are planned on request.
RUNNABLE = ("fcfs", "sglang-lpm", "sglang-dfs-weight", "blend")


def scenario_records(records: list[Record], output_fraction: float, fractions: list[float] | None = None,
                     seed: int = 0) -> dict[str, list[Record]]:
    """Per scenario the records with their output lengths: `max_tokens` (each request generates
    its limit) and `estimate` (`output_fraction` of it or, given sampled `fractions`, a fraction
    drawn from them per record with `seed`; at least 1 token). A request that ignores EOS
    (`Record.exact`) generates its limit in both."""
    if fractions:
        rng = random.Random(seed)
        frac = [rng.choice(fractions) for _ in records]
    else:
        frac = [output_fraction] * len(records)
    return {"max_tokens": list(records),
            "estimate": [r if r.exact else r._replace(output_len=max(1, round(f * r.output_len)))
                         for r, f in zip(records, frac)]}


def sampled_fractions(records: list[Record], n: int, seed: int, run) -> list[float]:
    """Generated tokens / max_tokens of a seeded uniform sample of `n` records (all when fewer)
    of those that stop at EOS (`Record.exact` ones generate their limit: they tell nothing about
    the others): `run(chosen)` generates the chosen records and returns each one's generated token
    count, or None for a request that failed (left out)."""
    open_ended = [r for r in records if not r.exact]
    if not open_ended:
        return [1.0]  # every request generates its limit: the fraction is not used
    chosen = sample(open_ended, n, seed)
    counts = run(chosen)
    fractions = [c / r.output_len for r, c in zip(chosen, counts, strict=True) if c is not None]
    if not fractions:
        raise ValueError(f"--generate-sample: none of the {len(chosen)} sampled requests finished on this machine; "
                         "plan with an assumed --output-fraction instead")
    return fractions


def generate_here(path, model_dir, tokenizer, context_len: int, default_max_tokens: int, device: str, seed: int = 0):
    """The `run` function of `sampled_fractions` for the engine on this machine: the chosen
    requests read and prepared from `path` as `blendserve run` prepares them (their own sampling
    parameters), generated by SGLang (`batch.runner`, policy fcfs: the order does not change what
    a request generates); `completion_tokens` of each, None where the engine failed or aborted it."""
    from .batch import runner
    from .batch.prompts import Prepared, id_limit, prepare
    from .batch.requests import LineError, read_requests

    limit = id_limit(tokenizer, model_dir)

    def run(chosen: list[Record]) -> list[int | None]:
        want = {r.rid for r in chosen}
        items = [prepare(q, tokenizer, context_len, default_max_tokens, Path(path).name, limit)
                 for q in read_requests(path)
                 if not isinstance(q, LineError) and q.custom_id in want]
        items = [p for p in items if isinstance(p, Prepared)]
        cfg = runner.EngineConfig(model_path=str(model_dir), policy="fcfs", device=device, context_length=context_len,
                                  seed=seed)
        try:
            engine = runner.start_engine(cfg)
        except (Exception, runner.EngineFailed) as exc:  # noqa: BLE001 (SGLang raises many kinds)
            why = "one of its processes failed: its error is above" if isinstance(exc, runner.EngineFailed) else \
                f"{type(exc).__name__}: {exc}"
            raise ValueError(f"--generate-sample: SGLang did not start on this machine ({why}); "
                             "plan without --generate-sample, with an assumed --output-fraction") from None
        got: dict = {}

        def done(p: Prepared, out: dict) -> None:  # an aborted request reaches the error callback (runner.deliver)
            got[p.request.custom_id] = out["meta_info"]["completion_tokens"]

        try:
            runner.generate(engine, items, done, lambda p, exc: None)
        except runner.EngineFailed:
            raise ValueError("--generate-sample: an SGLang process failed while the sample ran (its error is above); "
                             "plan without --generate-sample, with an assumed --output-fraction") from None
        finally:
            engine.shutdown()
        return [got.get(r.rid) for r in chosen]

    return run


def _describe(fractions: list[float], model_name: str) -> str:
    import numpy as np

    lo, hi = np.percentile(fractions, [10, 90])
    return (f"generated: {len(fractions)} requests of this file ran on this machine (model {model_name}): mean "
            f"fraction {float(np.mean(fractions)):.3f}, p10-p90 {lo:.3f}-{hi:.3f}; each request generates its "
            "max_tokens x a fraction drawn from them (seeded)")


GROUPS_PER_SAMPLE = 64  # a sample of whole prefix groups holds at least about this many of them


def sample(records: list[Record], n: int | None, seed: int = 0, cost: CostModel | None = None) -> list[Record]:
    """The records of `sample_indices`."""
    return [records[i] for i in sample_indices(records, n, seed, cost)]


def sample_indices(records: list[Record], n: int | None, seed: int = 0, cost: CostModel | None = None) -> list[int]:
    """The positions of a seeded sample of about `n` records, ascending (all of them when n is
    None or more): uniform, or given `cost` whole prefix groups (`prefix_groups`) drawn in a
    seeded order until `n` are taken. A uniform sample keeps a pair of requests sharing a document
    only when both are drawn (1% of pairs at a tenth of the file): the plan of a file whose prompts
    share in small groups read its sharing as 4.5% for 44.6% and its time 49% long (a probe)."""
    if n is None or n >= len(records):
        return list(range(len(records)))
    rng = random.Random(seed)
    if cost is None:
        return sorted(rng.sample(range(len(records)), n))
    groups = prefix_groups(records, cost, max(1, n // GROUPS_PER_SAMPLE))
    rng.shuffle(groups)
    keep, taken = [], 0
    for g in groups:
        if taken >= n:
            break
        keep += g
        taken += len(g)
    return sorted(keep)


def prefix_groups(records: list[Record], cost: CostModel, cap: int) -> list[list[int]]:
    """The records' indices in groups of at most `cap` that keep each shared prefix below the
    largest subtrees whole: the prefix tree's subtrees of at most `cap` requests, each whole; the
    requests that end at a larger node, in runs of `cap`."""
    from .workloads.tree import build_tree

    index = {r.rid: i for i, r in enumerate(records)}
    tree = build_tree(records, cost)
    groups, stack = [], [tree.root]
    while stack:
        node, loose = stack.pop(), []
        for kid in node.kids:
            if type(kid) is not Node:  # a request ending here
                loose.append(index[kid.rid])
            elif kid.count <= cap:
                groups.append([index[r.rid] for r in _subtree_requests(kid)])
            else:
                stack.append(kid)
        groups += [loose[i:i + cap] for i in range(0, len(loose), cap)]
    return groups


def _subtree_requests(node):
    stack = [node]
    while stack:
        for kid in stack.pop().kids:
            if type(kid) is Node:
                stack.append(kid)
            else:
                yield kid


def product_spec(policy: str, cost: CostModel, engine: EngineConfig, seed: int = 0) -> RunSpec:
    """What a user runs: SGLang's stock policies as SGLang ships them, blend as the plugin ships it
    (its preset, with paced prefill when the preset paces); output lengths unknown."""
    if policy == "blend":
        engine = replace(engine, pace=PRESET.pacing)
    return RunSpec(cost, engine, known_lengths=False, seed=seed)


def plan(records: list[Record], cost: CostModel, engine: EngineConfig, policies=RUNNABLE, *, gpus: int = 1,
         output_fraction: float = 0.5, timing: ExecModel = ExecModel("sequential"), seed: int = 0,
         sim_requests: int | None = None, workers: int = 1,
         fractions: list[float] | None = None, exact=None) -> tuple[dict, dict[str, dict[str, SimResult]]]:
    """(the plan as a JSON-ready dict, the simulator's results per scenario and policy). Given
    `fractions` (`sampled_fractions`), the estimate scenario draws from them. With
    more records than `sim_requests`, a sample of about that many (whole prefix groups) is simulated and its time and
    token counts are scaled by records / sample (the batch runs at the sample's throughput). The
    runs are independent: `workers` processes run them (`run_jobs`), with the same results.
    `exact(indices)`: the records at those positions with their prompts cut as exactly as the
    simulator should see them (`BatchFile.exact`), where `records` hold a coarser view that
    only chooses the sample."""
    take = exact or (lambda idx: [records[i] for i in idx])
    simulated = take(sample_indices(records, sim_requests, seed, cost))
    scale = len(records) / len(simulated)
    scenarios = scenario_records(simulated, output_fraction, fractions, seed)
    workloads = {name: Workload(recs, cost) for name, recs in scenarios.items()}
    # N replicas split the batch, but none finishes before its longest request run alone
    floors = {name: alone_seconds(recs, cost, engine, timing, seed) if gpus > 1 else 0.0
              for name, recs in scenarios.items()}
    jobs = [(workloads[name], p, product_spec(p, cost, engine, seed)) for name in SCENARIOS for p in policies]
    if len(simulated) < len(records):  # the sampling error: the first policy on a second sample
        other = scenario_records(take(sample_indices(records, sim_requests, seed + 1, cost)),
                                 output_fraction)["max_tokens"]
        scale_other = len(records) / len(other)  # whole groups: not quite the first sample's size
        jobs.append((Workload(other, cost), policies[0], product_spec(policies[0], cost, engine, seed)))
    done = run_jobs(jobs, workers)
    results = {name: dict(zip(policies, done[i * len(policies):(i + 1) * len(policies)]))
               for i, name in enumerate(SCENARIOS)}
    spread = None
    if len(done) > len(SCENARIOS) * len(policies):
        p0 = policies[0]
        again, first = done[-1].time(timing) * scale_other, results["max_tokens"][p0].time(timing) * scale
        floor = floors["max_tokens"]
        spread = {"policy": p0, "seeds": [seed, seed + 1], "wall_s": [round(max(first / gpus, floor), 4),
                                                                      round(max(again / gpus, floor), 4)],
                  "relative": round(abs(again - first) / first, 4)}
    rows = []
    for p in policies:
        per = {s: _figures(results[s][p], timing, gpus, engine, cost, scale, floors[s]) for s in results}
        row = {"policy": p}
        for key in per[SCENARIOS[0]]:
            vals = [per[s][key] for s in SCENARIOS]
            row[key] = {"low": min(vals), "high": max(vals), **dict(zip(SCENARIOS, vals))}
        rows.append(row)
    summary = {}
    if "blend" in policies and len(policies) > 1:
        # from the unrounded times: a small batch on a fast GPU rounds to 0.0 s
        t = {s: {p: results[s][p].time(timing) for p in policies} for s in SCENARIOS}
        others = {s: min((p for p in policies if p != "blend"), key=lambda p: t[s][p]) for s in SCENARIOS}
        summary = {"best_other": others,
                   "blend_speedup_vs_best_other": {s: round(t[s][others[s]] / t[s]["blend"], 4) if t[s]["blend"] else 1.0
                                                   for s in SCENARIOS}}
    wl = workloads[SCENARIOS[0]]
    out = {
        "requests": len(records), "simulated_requests": len(simulated), "scale": round(scale, 6),
        "sampling_spread": spread,
        "prompt_tokens": sum(r.prompt_len for r in records),
        "max_output_tokens": sum(r.output_len for r in records),
        "model": cost.model.name, "hardware": cost.hardware.name, "gpus": gpus,
        "hardware_spec": {k: getattr(cost.hardware, k) for k in cost.hardware.__slots__},
        "engine": {k: getattr(engine, k) for k in engine.__slots__},
        "timing": {"mode": timing.mode, "interference": timing.interference},
        "output_lengths": {"max_tokens": "each request generates its max_tokens (upper bound)",
                           "estimate": "each request generates its recorded output length (the workload's), "
                           "its max_tokens that length, so SGLang's check reserves no more (`blendserve simulate` "
                           "gives a workload's requests 4 x its longest output as max_tokens)"
                           if all(r.exact for r in records) else _describe(fractions, cost.model.name) if fractions
                           else f"each request generates {output_fraction:g} x its max_tokens (assumed)",
                           "scheduler": "unknown to every policy (blend samples 1% first and estimates)"},
        "density": round(wl.density, 4), "sharing_dfs_unbounded": round(wl.sharing, 4),
        "density_and_sharing_of": "the batch" if len(simulated) == len(records) else
        f"the simulated sample of {len(simulated)} requests",
        "policies": rows, **summary,
    }
    if fractions:
        out["generated_sample"] = {"requests": len(fractions), "fractions": [round(f, 6) for f in fractions]}
    return out, results


def alone_seconds(records: list[Record], cost: CostModel, engine: EngineConfig, timing: ExecModel,
                  seed: int = 0) -> float:
    """The least time of a replica holding the batch's longest request: that request simulated
    alone (its prefill, its decode steps, the engine's overheads), for the request of the longest
    output and for the one of the longest prompt."""
    if not records:
        return 0.0
    longest = {max(records, key=lambda r: (r.output_len, r.prompt_len)),
               max(records, key=lambda r: (r.prompt_len, r.output_len))}
    return max(simulate(Workload([r], cost), "fcfs", product_spec("fcfs", cost, engine, seed)).time(timing)
               for r in longest)


_JOBS: list = []  # the jobs of `run_jobs`, inherited by its forked workers


def _run_job(i: int) -> SimResult:
    return _simulate_told(*_JOBS[i])


def _simulate_told(workload: Workload, policy: str, spec: RunSpec) -> SimResult:
    """`simulate`, telling stderr how far it is every 30 s (`sim.cli.progress`): a batch of long
    outputs planned for many minutes without a word (a probe)."""
    from .sim.cli import progress

    return simulate(workload, policy, spec, on_step=progress(f"planning {policy}", len(workload.records)))


def run_jobs(jobs: list, workers: int = 1) -> list[SimResult]:
    """`simulate(workload, policy, spec)` of each job, in order; with `workers` > 1 (and fork
    available) in that many forked processes. Each run is deterministic: the results equal the
    serial ones."""
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [_simulate_told(*job) for job in jobs]
    _JOBS[:] = jobs
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # a forked child tokenizes nothing
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            order = sorted(range(len(jobs)), key=lambda i: jobs[i][1] != "blend")  # the longest runs first
            futures = {i: pool.submit(_run_job, i) for i in order}
            return [futures[i].result() for i in range(len(jobs))]
    finally:
        _JOBS.clear()


def _figures(res: SimResult, timing: ExecModel, gpus: int, engine: EngineConfig, cost: CostModel,
             scale: float = 1.0, floor_s: float = 0.0) -> dict:
    """One policy's figures; with `gpus` replicas the wall time is an even split of one engine's,
    but at least `floor_s` (the longest request's own steps: no replica finishes before it)."""
    t = res.time(timing) * scale
    wall = max(t / gpus, floor_s)
    return {"wall_s": round(wall, 4), "gpu_hours": round(t * cost.hardware.devices / 3600, 8),
            "throughput_tok_s": round(res.throughput(timing) * (t / wall if wall > 0 else gpus), 1),
            "prefix_hit_ratio": round(res.sharing, 4), "prefix_hit_tokens": round(res.first_hit_tokens * scale),
            "peak_kv_gb": round(res.peak_kv * engine.kv_tokens * cost.kv_bytes_per_token / 1e9, 3),
            "retractions": res.retractions}


# ---------------------------------------------------------------- the command
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="blendserve plan", description=__doc__.split("\n")[0])
    ap.add_argument("input", nargs="?", help="requests.jsonl (OpenAI batch format, as for `blendserve run`)")
    ap.add_argument("--workload", help="plan a built-in mix instead of a file: trace1..trace4, mixed, mix:D,S, or a "
                                       "trace file's token counts (PATH.csv, Mooncake PATH.jsonl)")
    ap.add_argument("--requests", type=positive_int, default=None,
                    help="with --workload: its size (default 20,000; a trace file: all its rows, else its first N)")
    ap.add_argument("--model", default="llama-3.1-8b",
                    help=f"a model directory (config.json + tokenizer) or a preset: {', '.join(model_names())}")
    ap.add_argument("--tokenizer", help="with a preset --model: a directory holding its tokenizer "
                                        "(default: token counts approximated as UTF-8 bytes / 4)")
    ap.add_argument("--hardware", default="h100",
                    help=", ".join(hardware_names()) + "; NxNAME: N of them as one tensor-parallel engine; or an "
                    "accelerator's figures, flops=F,bandwidth=B,memory=M (dense BF16 FLOP/s, bytes/s, bytes)")
    ap.add_argument("--gpus", type=positive_int, default=1,
                    help="data-parallel replicas (even split assumed; the wall time is at least the longest request's "
                    "own steps)")
    ap.add_argument("--policies", default=",".join(RUNNABLE),
                    help=f"default: the policies `blendserve run --policy` runs; any of {', '.join(POLICIES)}")
    ap.add_argument("--kv-gb", type=positive_float,
                    help="KV pool per engine (default: 88%% of its memory minus the weights; --hardware cpu: the "
                         "pool `blendserve run` gives the CPU engine)")
    ap.add_argument("--max-running", type=positive_int, default=1024)
    ap.add_argument("--chunk", type=positive_int, help="chunked-prefill size (default: SGLang's for 80 GB GPUs, 8,192; "
                                                       "--hardware cpu: the CPU engine's, 4,096)")
    ap.add_argument("--mixed-chunk", action="store_true", help="prefill and decode share steps (--enable-mixed-chunk)")
    ap.add_argument("--timing", choices=("sequential", "overlapped"), default="sequential",
                    help="sequential: operators one after another, as SGLang runs them")
    ap.add_argument("--output-fraction", type=fraction, default=None,
                    help="the estimate scenario: outputs of this fraction of max_tokens (default 0.5)")
    ap.add_argument("--generate-sample", type=_sample_size, default=0, metavar="N",
                    help="with --model DIR: run N requests of the file (seeded uniform sample) on this machine and "
                         "draw the estimate scenario's outputs from their generated / max_tokens (default 0: the "
                         "assumed --output-fraction)")
    ap.add_argument("--default-max-tokens", type=positive_int, default=None,
                    help="for requests without max_tokens (as run; default 256)")
    ap.add_argument("--context-length", type=positive_int, help="override the model's context")
    ap.add_argument("--sim-requests", type=positive_int, default=SIM_REQUESTS,
                    help="simulate a sample of about this many requests (whole prefix groups), times scaled to the file (the "
                         "first policy also runs on a second sample: the spread is reported)")
    ap.add_argument("--seed", type=engine_seed, default=0, help="sample and engine seed, 0 to 2**32 - 1")
    ap.add_argument("--block-size", type=positive_int, default=None,
                    help="with --workload: tokens per hash id of a Mooncake-format JSONL trace (default 512, the "
                         "published traces')")
    ap.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                    help="processes that run the simulations (default: the CPU count; the results do not depend on it)")
    ap.add_argument("--plot", help="PNG of per-step compute and memory time (default: next to --out, or plan.png)")
    ap.add_argument("--no-plot", action="store_true", help="write no plot (`blendserve run --plan-only` writes none)")
    ap.add_argument("--out", help="also write the plan as JSON here")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON only")
    return ap


def _plot_path(args) -> str | None:
    """--plot, else next to --out (none beside a device or pipe), else plan.png; None with --no-plot."""
    if args.no_plot:
        return None
    if args.plot:
        return args.plot
    from .batch.cli import plot_beside

    return plot_beside(args.out) if args.out else "plan.png"


def _check_plot_format(path: str) -> None:
    """The plot's file type is matplotlib's to write: one it does not know fails here, before the
    simulation, not after it."""
    suffix = Path(path).suffix.lower().lstrip(".")
    if not suffix:
        return  # matplotlib's default (PNG)
    from matplotlib.backend_bases import FigureCanvasBase

    kinds = FigureCanvasBase.get_supported_filetypes()
    if suffix not in kinds:
        raise ValueError(f"--plot {path}: matplotlib cannot write .{suffix} files; name a .png, or one of "
                         f"{', '.join('.' + k for k in sorted(kinds))}")


def _sample_size(text: str) -> int:
    return 0 if text.strip() == "0" else positive_int(text)


def _cost_and_tokenizer(args):
    """(cost model, tokenizer, context length, what the token counts are). A model directory
    gives all three; a preset name its shape and context, the tokenizer of `--tokenizer DIR`
    or the byte approximation."""
    from .batch.cli import _load_tokenizer
    from .batch.prompts import context_length
    from .workloads.batch_file import ByteTokenizer

    path = Path(args.model)
    if path.is_dir():
        ctx = context_length(path)  # first: a config.json that is not JSON is named here
        spec, tok_dir = ModelSpec.from_config_file(path), path
    else:
        spec = model(args.model)  # a config.json that is not JSON: ModelSpec.from_config_file names it
        tok_dir = Path(args.tokenizer) if args.tokenizer else None
        if tok_dir is not None and not tok_dir.is_dir():
            raise ValueError(f"--tokenizer {tok_dir}: no such directory; pass the folder holding the model's tokenizer "
                             "files (tokenizer.json or tokenizer_config.json)")
        ctx = spec.max_context
    cost = CostModel(spec, hardware(args.hardware))
    if tok_dir is None:
        return cost, ByteTokenizer(vocab_size(args.model)), args.context_length or ctx, \
            "approximated as UTF-8 bytes / 4 (pass a model directory or --tokenizer for exact counts)"
    return cost, _load_tokenizer(tok_dir), args.context_length or ctx, f"the tokenizer of {tok_dir}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .batch.requests import InputError
    from .models import ModelError

    say = (lambda *_a, **_k: None) if args.json else print
    try:
        if args.input is not None and not args.input.strip():  # an empty --workload: load_workload says so
            raise ValueError("the requests file is an empty name; pass a file path")
        if args.input is not None and args.workload is not None:
            raise ValueError(f"pass either a requests file ({args.input}) or --workload ({args.workload}), not both")
        if args.input is None and args.workload is None:
            raise ValueError("pass a requests.jsonl file, or --workload NAME for a built-in mix")
        if args.input is not None and args.block_size is not None:
            raise ValueError("--block-size is the hash-id block of a Mooncake-format trace (--workload PATH); a "
                             f"requests file ({args.input}) is tokenized: drop it")
        if args.input is not None and args.requests is not None:
            raise ValueError(f"--requests takes the first N requests of a --workload; a requests file ({args.input}) "
                             "is planned whole (--sim-requests sets how many of it are simulated): drop --requests")
        if args.workload is not None:  # a workload's rows are token counts with their output lengths (a probe)
            given = next((flag for flag, value in (("--output-fraction", args.output_fraction),
                                                   ("--default-max-tokens", args.default_max_tokens),
                                                   ("--tokenizer", args.tokenizer)) if value is not None), None)
            if given:
                raise ValueError(f"{given} applies to a requests file; the rows of --workload {args.workload} are token "
                                 "counts with their output lengths: drop it")
        args.output_fraction = 0.5 if args.output_fraction is None else args.output_fraction
        args.default_max_tokens = 256 if args.default_max_tokens is None else args.default_max_tokens
        from .batch.cli import check_apart, check_output, check_replaceable, is_png, made_by

        for flag, path in (("--out", args.out), ("--plot", args.plot)):
            check_output(flag, path)
        check_apart("--out", args.out, [("the input", args.input), ("the --workload file", args.workload)])
        check_replaceable("--out", args.out, made_by("plan"), "a plan of `blendserve plan`")
        if args.plot and args.no_plot:
            raise ValueError("--plot names the plot that --no-plot would not write: give one of them")
        if _plot_path(args):
            check_apart("--plot", _plot_path(args), [("the input", args.input), ("the --workload file", args.workload),
                                                     ("the --out file", args.out)])
            _check_plot_format(_plot_path(args))
            check_replaceable("--plot", _plot_path(args), is_png, "a PNG image")
        from .sim.cli import parse_policies

        policies = parse_policies(args.policies, "--policies")
        device = None
        if args.generate_sample:
            if args.input is None or not Path(args.model).is_dir():
                raise ValueError("--generate-sample runs requests of the file on this machine: it needs a requests "
                                 "file and --model DIR (a model directory with weights); or drop it and plan with "
                                 "an assumed --output-fraction")
            if args.input == "-" or not os.path.isfile(args.input):
                raise ValueError(f"--generate-sample reads {args.input} a second time for its sample: pass a regular "
                                 "file, not a pipe or standard input")
            from .batch.runner import prepare_environment
            from .models import check_model_dir

            try:
                check_model_dir(args.model)
            except ModelError as exc:
                raise ValueError(f"--generate-sample needs a model that runs here: {exc}; or drop --generate-sample "
                                 "and plan with an assumed --output-fraction") from None
            device = prepare_environment("auto")  # before torch loads (with the tokenizer), as run does
        t0 = time.perf_counter()
        errors, lines, fractions, gen_s, exact = [], None, None, 0.0, None
        if args.input:
            from .workloads.batch_file import load_batch_file

            cost, tokenizer, ctx, counted = _cost_and_tokenizer(args)
            gc.disable()  # a record and its prefix tuples per request: no collector passes while building
            try:
                loaded = load_batch_file(args.input, tokenizer, ctx, args.default_max_tokens, tokens=False)
                records, errors, lines, exact = loaded.records, loaded.errors, loaded.lines, loaded.exact
                del loaded
            finally:
                gc.enable()
            if not lines:
                raise ValueError(f"{args.input} holds no requests (it is empty or has only blank lines); pass the "
                                 "JSONL file of requests, one JSON object per line")
            if not records:
                from .workloads.trace_file import looks_like_trace

                hint = (f"; it reads as a trace of token counts: plan it with --workload {args.input}"
                        if args.input != "-" and looks_like_trace(args.input) else "")
                named = "".join(f"\n  {e.message}" for e in errors[:BAD_LINES_NAMED])
                more = f"\n  ... and {len(errors) - BAD_LINES_NAMED:,} more" if len(errors) > BAD_LINES_NAMED else ""
                raise ValueError(f"{args.input}: no valid request to plan ({len(errors)} bad lines){hint}{named}{more}")
            if args.generate_sample:
                say(f"generating a sample of {min(args.generate_sample, len(records))} requests on this machine "
                    f"({device}) ...")
                t_gen = time.perf_counter()
                fractions = sampled_fractions(records, args.generate_sample, args.seed, generate_here(
                    args.input, args.model, tokenizer, ctx, args.default_max_tokens, device, args.seed))
                gen_s = time.perf_counter() - t_gen
        else:
            from .sim.cli import load_workload
            from .workloads.trace_file import is_trace_file, within_context

            cost = CostModel(model(args.model), hardware(args.hardware))
            EngineConfig.for_cost(cost, kv_gb=args.kv_gb)  # the model fits before its workload is built
            counted = ("the trace file's token counts" if is_trace_file(args.workload)
                       else "the built-in workload's lengths")
            records = [r._replace(max_tokens=r.output_len, exact=True)  # a workload's lengths are what it generates
                       for r in load_workload(args.workload, args.requests, cost, args.seed, args.block_size)]
            records, errors = within_context(records, args.context_length or cost.model.max_context, args.workload,
                                             args.model)
        read_s = time.perf_counter() - t0 - gen_s
        if cost.hardware.name == "cpu":  # the engine `blendserve run` starts on a CPU, not one sized to its RAM
            from .batch.runner import CPU_MAX_TOTAL_TOKENS

            args.kv_gb = args.kv_gb or CPU_MAX_TOTAL_TOKENS * cost.kv_bytes_per_token / 1e9
            args.chunk = args.chunk or CPU_CHUNKED_PREFILL
        engine = EngineConfig.for_cost(cost, kv_gb=args.kv_gb, max_running=args.max_running,
                                       chunked_prefill=args.chunk or GPU_CHUNKED_PREFILL, mixed_chunk=args.mixed_chunk)
        engine.check_fits(records, "pass a larger --kv-gb or a smaller max_tokens" if args.input is not None else
                          f"pass a larger --kv-gb or leave that row out of {args.workload}", known=False)
    except (InputError, ModelError, ValueError, FileNotFoundError) as exc:
        print(f"blendserve plan: error: {exc}", file=sys.stderr)
        return 2
    t1 = time.perf_counter()
    out, results = plan(records, cost, engine, policies, gpus=args.gpus, output_fraction=args.output_fraction,
                        timing=ExecModel(args.timing), seed=args.seed, sim_requests=args.sim_requests,
                        workers=args.workers, fractions=fractions, exact=exact)
    sim_s = time.perf_counter() - t1
    out = {"command": "blendserve plan " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[2:])),
           "input": args.input or args.workload, "lines": lines, "bad_lines": len(errors),
           "bad_line_messages": [e.message for e in errors[:BAD_LINES_NAMED]], "token_counts": counted,
           **out, "read_seconds": round(read_s, 2), "generate_seconds": round(gen_s, 2), "simulate_seconds": round(sim_s, 2),
           "plan_seconds": round(time.perf_counter() - t0, 2)}
    plot = _plot_path(args)
    best = out.get("best_other", {}).get("max_tokens")
    shown = [results["max_tokens"][p] for p in ("blend", best) if p in results["max_tokens"]]
    out["plot"] = plot
    for flag, path, write in (
            ("--plot", plot, lambda: plot_steps(shown or list(results["max_tokens"].values())[:2], plot,
                                                ExecModel(args.timing), title=f"{out['input']}: predicted per-step "
                                                "compute and memory time (outputs at max_tokens)")),
            ("--out", args.out, lambda: Path(args.out).write_text(json.dumps(out, indent=2) + "\n"))):
        if path:
            try:
                write()
            except OSError as exc:
                print(f"blendserve plan: error: cannot write {flag} {path}: {exc.strerror or exc}; choose another "
                      f"{flag}", file=sys.stderr)
                return 2
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    _print(out, say)
    return 0


def _print(out: dict, say) -> None:
    if out["bad_lines"] and out["lines"] is None:  # a workload's requests beyond the model's context
        say(f"{out['input']}: {out['bad_lines']:,} request{'s' if out['bad_lines'] != 1 else ''} not planned (they do "
            "not fit the model's context)")
        for msg in out["bad_line_messages"]:
            say(f"  {msg}")
        if out["bad_lines"] > len(out["bad_line_messages"]):
            say(f"  ... and {out['bad_lines'] - len(out['bad_line_messages']):,} more")
    if out["lines"] is not None:
        say(f"{out['input']}: {out['lines']:,} lines, {out['requests']:,} planned, {out['bad_lines']:,} bad "
            f"(run writes them as error records)")
        for msg in out["bad_line_messages"]:
            say(f"  {msg}")
        if out["bad_lines"] > len(out["bad_line_messages"]):
            say(f"  ... and {out['bad_lines'] - len(out['bad_line_messages']):,} more")
    say(f"{out['requests']:,} requests, {out['prompt_tokens']:,} prompt tokens (token counts: {out['token_counts']}), "
        f"up to {out['max_output_tokens']:,} output tokens; {out['model']} on {out['gpus']} x {out['hardware']}, "
        f"KV pool {out['engine']['kv_tokens']:,} tokens per engine; density {out['density']}, "
        f"prefix sharing {out['sharing_dfs_unbounded']:.1%} of prompt and output tokens (DFS order, unbounded "
        "cache; the prefix hits below are of prompt tokens)"
        + ("" if out["density_and_sharing_of"] == "the batch" else f"; density and sharing of {out['density_and_sharing_of']}"))
    if out["simulated_requests"] < out["requests"]:
        sp = out["sampling_spread"]
        say(f"simulated: a sample of {out['simulated_requests']:,} requests (whole prefix groups), times and token counts scaled by "
            f"{out['scale']:.3f}; another sample gives {sp['policy']} a wall time {sp['relative']:.1%} apart "
            f"(sampling error; a larger --sim-requests narrows it)")
    say(f"output lengths: {out['output_lengths']['estimate']} .. {out['output_lengths']['max_tokens']}; "
        f"timing: {out['timing']['mode']}. Each figure is low..high over the two.")
    head = f"{'policy':<18} {'wall time':>20} {'GPU-hours':>18} {'tokens/s':>22} {'prefix hits':>14} {'peak KV GB':>14}"
    say(head)
    say("-" * len(head))

    def rng(v, fmt):
        return f"{fmt.format(v['low'])}..{fmt.format(v['high'])}"

    for r in out["policies"]:
        say(f"{r['policy']:<18} {rng(r['wall_s'], '{:.4g}') + ' s':>20} {rng(r['gpu_hours'], '{:.3g}'):>18} "
            f"{rng(r['throughput_tok_s'], '{:.0f}'):>22} {rng(r['prefix_hit_ratio'], '{:.3f}'):>14} "
            f"{rng(r['peak_kv_gb'], '{:.1f}'):>14}")
    if "best_other" in out:
        s = out["blend_speedup_vs_best_other"]
        say(f"blend vs the best other policy: {s['estimate']:.3f}x ({out['best_other']['estimate']}, estimate) .. "
            f"{s['max_tokens']:.3f}x ({out['best_other']['max_tokens']}, max_tokens)")
    gen = f", generating the sample {out['generate_seconds']:.1f} s" if out.get("generated_sample") else ""
    say(f"planned in {out['plan_seconds']:.1f} s (reading and tokenizing {out['read_seconds']:.1f} s{gen})"
        + (f"; plot: {out['plot']}" if out.get("plot") else ""))


def plan_for_run(run_args) -> int:
    """`blendserve run FILE ... --plan-only [HARDWARE]`: `blendserve plan` on the same file with
    the run's model, max_tokens default, context and engine limits (`--max-total-tokens`,
    `--engine-arg chunked_prefill_size=`/`max_running_requests=`/`enable_mixed_chunk=`); prints
    the plan and exits. HARDWARE `auto`: the `cpu` preset when the run would use the CPU."""
    from .batch.cli import check_scale_out, engine_args
    from .batch.runner import CPU_MAX_TOTAL_TOKENS, check_engine_args, chunk_problem
    from .models import ModelError, check_model_dir, default_model

    try:  # what `run` refuses is refused here too, before anything is planned
        check_engine_args(engine_args(run_args.engine_arg))
        check_scale_out(run_args)
        model_dir = check_model_dir(run_args.model) if run_args.model else default_model(run_args.model_cache, log=print)
        spec = ModelSpec.from_config_file(model_dir)
    except (ModelError, ValueError, OSError) as exc:
        print(f"blendserve run --plan-only: error: {exc}", file=sys.stderr)
        return 2
    hw = run_args.plan_only
    if hw == "auto":
        if run_args.device == "cuda" or (run_args.device == "auto" and _cuda_visible()):
            print("blendserve run --plan-only: error: name the GPU to plan for, e.g. --plan-only h100 "
                  f"(one of {', '.join(hardware_names())})", file=sys.stderr)
            return 2
        hw = "cpu"
    argv = [run_args.input, "--model", str(model_dir), "--hardware", hw,  # prints only: no plot.png over a file here
            "--default-max-tokens", str(run_args.default_max_tokens), "--no-plot"]
    if run_args.context_length:
        argv += ["--context-length", str(run_args.context_length)]
    kv_tokens = run_args.max_total_tokens or (CPU_MAX_TOTAL_TOKENS if hw == "cpu" else None)
    if kv_tokens:
        argv += ["--kv-gb", repr(kv_tokens * spec.kv_bytes_per_token / 1e9)]
    flags = {"chunked_prefill_size": "--chunk", "max_running_requests": "--max-running"}
    if hw == "cpu" and not any(p.partition("=")[0].replace("-", "_") == "chunked_prefill_size"
                               for p in run_args.engine_arg):
        argv += ["--chunk", str(CPU_CHUNKED_PREFILL)]  # the CPU engine's, not a GPU's 8,192
    for pair in run_args.engine_arg:
        key, _, value = pair.partition("=")
        key = key.replace("-", "_")
        if key in ("tp_size", "tp", "dp_size", "dp"):
            if not (value.strip().isascii() and value.strip().isdigit() and int(value) >= 1):  # "²" is a digit int() refuses
                print(f"blendserve run --plan-only: error: --engine-arg {pair}: {key} must be a whole number of at "
                      "least 1", file=sys.stderr)
                return 2
            if key.startswith("dp"):  # data-parallel ranks: replicas of the engine
                argv += ["--gpus", str(int(value))]
            elif re.match(r"\s*\d+\s*x", hw, flags=re.IGNORECASE):
                print(f"blendserve run --plan-only: error: --engine-arg {pair} and --plan-only {hw} both name a "
                      f"tensor-parallel group; give it once (--plan-only {int(value)}x{hw.split('x', 1)[-1].strip()})",
                      file=sys.stderr)
                return 2
            else:  # one engine on a tensor-parallel group: NxHARDWARE
                argv[argv.index("--hardware") + 1] = f"{int(value)}x{hw}"
        elif key == "chunked_prefill_size":
            chunk = engine_args([pair])[key]  # the value the engine would get
            problem = chunk_problem(chunk, "cpu" if hw == "cpu" else "cuda")
            if problem:
                print(f"blendserve run --plan-only: error: {problem}", file=sys.stderr)
                return 2
            # -1: no chunked prefill, a whole prompt a step (at most the context)
            argv += ["--chunk", str((run_args.context_length or spec.max_context) if chunk == -1 else chunk)]
        elif key in flags:
            if not (value.strip().isascii() and value.strip().isdigit() and int(value) >= 1):  # "²" is a digit int() refuses
                print(f"blendserve run --plan-only: error: --engine-arg {pair}: {key} must be a whole number of at "
                      "least 1", file=sys.stderr)
                return 2
            argv += [flags[key], value.strip()]
        elif key == "enable_mixed_chunk" and value.lower() in ("true", "1"):
            argv.append("--mixed-chunk")
    if getattr(run_args, "dp", 1) > 1:
        argv += ["--gpus", str(run_args.dp)]
    if getattr(run_args, "ray", False):  # replicas of the engine, each on --gpus-per-replica devices
        argv += ["--gpus", str(run_args.replicas)]
        per = run_args.gpus_per_replica
        if per is not None and per > 1:
            if per != int(per) or re.match(r"\s*\d+\s*x", hw, flags=re.IGNORECASE):
                print(f"blendserve run --plan-only: error: --gpus-per-replica {per:g} with --plan-only {hw}: plan a "
                      "whole number of GPUs per replica, named once (--plan-only NxGPU or --gpus-per-replica N)",
                      file=sys.stderr)
                return 2
            argv[argv.index("--hardware") + 1] = f"{int(per)}x{hw}"
    if run_args.generate_sample:
        argv += ["--generate-sample", str(run_args.generate_sample)]
    return main(argv)


def _cuda_visible() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


if __name__ == "__main__":
    raise SystemExit(main())
