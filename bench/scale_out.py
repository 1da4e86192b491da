"""Scale-out: one central plan cut into shards, against round-robin and block dealing.

Simulator part: the four trace analogs (`workloads/recipes.py`), Llama-3.1-8B on the A100 preset as
in `paper_traces.py`; N = 2, 4, 8 engines each running `blend` on what it was dealt (the shard
planner's shards as `--dp`/`--ray` make them, from max_tokens; its earlier cuts, over max_tokens and
told the true lengths; round-robin, Ray-Data-style blocks of 256); scaling = one engine's time over
the slowest engine's (overlapped mode), sharing = prefix hits of all engines over one engine's.

Engine part (`--engine`): the real SGLang engine on CPU, tiny random Llama, a shared-prefix batch
through `blendserve run`: one engine, `--dp 2` and `--ray --replicas 2` (when ray is installed);
`engine_cached_vs_one` = each 2-replica run's cached-token ratio over one engine's, round-robin
dealing beside it, `engine_work_imbalance` = largest relative difference of the replicas' work
(prompt - cached + output tokens; the plan's measure of it beside each replica's).

    python bench/scale_out.py                    # 40,000 requests per trace -> results/scale_out.json
    python bench/scale_out.py --requests 10000   # smaller
    python bench/scale_out.py --engine           # adds the engine part (minutes on 2 cores)
    python bench/scale_out.py --engine-only --engine-trace /tmp/so  # with per-request rows and step traces
    python bench/scale_out.py --requests 100000 --only trace1:8:blend   # one row measured again
    python bench/scale_out.py --requests 100000 --diagnose trace4:4      # inside each engine of one row
    python bench/scale_out.py --requests 100000 --only trace3:4:blend-fed-8  # the last 8 pieces fed on demand

`--diagnose TRACE:N[:DEAL],...` (alone, -> results/scale_out_diagnosis.json): the dealing of each
case (blend unless named), every engine profiled (`sim.scale_out.shard_profiles`) under the shipped rules and with one
rule changed per row (the engines told the true output lengths; paced prefill off): the same
shards each time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import RESULTS, command, peak_rss_mb, table, write  # noqa: E402
from blendserve_sgl.core import CostModel  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.core.shard import MAX_STRIPES, PIECE_MIN, STRATUM_ATOM  # noqa: E402
from blendserve_sgl.sim import EngineConfig, ExecModel, RunSpec, Workload, simulate  # noqa: E402
from blendserve_sgl.sim.scale_out import (CUTS, CUTS_TOLD, DEALS, EVEN_PIECES, FED, LONG_QUANTILE,  # noqa: E402
                                          LOW_KV, deal, diagnose, fed, floor_seconds, scale_out, shard_profiles)
from blendserve_sgl.workloads import TRACES, trace  # noqa: E402

MODE = ExecModel("overlapped", 0.1)
LOSS_NOTE = ("per row (sim.rows) and as means over the traces: bound = one engine's time / max(one's time / N, floor_s), "
             "floor_s = the longest request's own steps at their least time (weights + its KV per step); "
             "balanced_scaling = N x one engine's time / the engines' summed time (the same work spread evenly: no "
             "rebalancing beats it); time_max_over_mean = slowest engine over the mean (time imbalance); "
             "work_sum_over_one = the engines' "
             "summed time over one engine's (extra steps: weights read every step, each engine needs its longest "
             "output's steps); slowest_tail_share = the slowest engine's time after its last prefill (decode only); "
             "engines_weight_bound_s = the largest engine T_w; density_drift_max = largest |engine density / "
             "workload density - 1|")
SIZES = (2, 4, 8)
TARGETS = {"sim_scaling": {"2": 1.95, "4": 3.9, "8": 7.6}, "sim_sharing_vs_one": 0.97, "engine_cached_vs_one": 0.97,
           "engine_work_imbalance": 0.05}


def _spec(seed: int) -> RunSpec:
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    engine = EngineConfig.trace_engine(cost, pace=PRESET.pacing)  # blend as shipped
    return RunSpec(cost, engine, seed=seed)


def sim_rows(n: int, seed: int, traces: list[str], only: set | None = None) -> list[dict]:
    """One row per trace x N x dealing (`only`: those (trace, N, deal) keys alone)."""
    spec = _spec(seed)
    cost = spec.cost
    rows = []
    for name in traces:
        wanted = only if only is not None else {(name, k, how) for k in SIZES for how in (*DEALS, CUTS, CUTS_TOLD)}
        keys = sorted({(size, how) for t, size, how in wanted if t == name},
                      key=lambda k: (k[0], [*DEALS, CUTS, CUTS_TOLD, EVEN_PIECES, k[1]].index(k[1])))
        if not keys:
            continue
        records, _ = trace(name, n, cost, seed)
        t0 = time.perf_counter()
        whole = Workload(records, cost)
        one = simulate(whole, "blend", spec)
        floor_s = floor_seconds(records, cost)
        for size, how in keys:
            run = fed(records, size, spec, MODE, int(how[len(FED) + 1:])) if how.startswith(FED) else \
                scale_out(records, size, how, spec)
            rows.append({"trace": name, "engines": size, "deal": how,
                         "scaling": round(run.scaling(one, MODE), 4),
                         "sharing_vs_one": round(run.sharing_vs_one(one), 4),
                         "engine_time_imbalance": round(run.work_imbalance(MODE), 4),
                         **({"plan_compute_imbalance": round(run.plan.compute_imbalance, 4),
                             "plan_memory_imbalance": round(run.plan.memory_imbalance, 4)} if run.plan else {}),
                         **diagnose(run, one, floor_s, whole.density, MODE)})
            r = rows[-1]
            print(f"{name} N={size} {how:<12} scaling {r['scaling']:.3f} (bound {r['bound']:.2f}) "
                  f"sharing/one {r['sharing_vs_one']:.4f} max/mean {r['time_max_over_mean']:.3f} "
                  f"sum/one {r['work_sum_over_one']:.3f} tail {r['slowest_tail_share']:.2f} "
                  f"density drift {r['density_drift_max']:.3f}", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def variants(spec: RunSpec) -> dict:
    """The rules `--diagnose` runs each case's engines under: as shipped, and one change per row."""
    return {"shipped": spec, "known lengths": dataclasses.replace(spec, known_lengths=True),
            "pacing off": dataclasses.replace(spec, engine=dataclasses.replace(spec.engine, pace=False))}


def shard_diagnosis(n: int, seed: int, cases: str) -> dict:
    """`--diagnose`: per case (TRACE:N[:DEAL], blend by default) and rule variant, each engine's profile."""
    spec = _spec(seed)
    out = []
    for item in cases.split(","):
        name, size, how = (item + ":blend").split(":")[:3]
        records, _ = trace(name, n, spec.cost, seed)
        parts = deal(records, int(size), how, spec)
        for label, rules in variants(spec).items():
            shards = shard_profiles(parts, rules, MODE)
            times = [s["time_s"] for s in shards if s is not None]
            out.append({"trace": name, "engines": int(size), "deal": how, "variant": label,
                        "time_max_over_mean": round(max(times) / (sum(times) / len(shards)), 4), "shards": shards})
            print(f"{name} N={size} {how} {label}: slowest over mean {out[-1]['time_max_over_mean']:.3f}", flush=True)
            keys = ("time_s", "steps", "mean_kv", "low_kv_time_share", "retractions", "tail_share", "long_start",
                    "long_requests", "long_output_tokens", "compute_tokens", "memory_units", "density",
                    "weights_s", "compute_only_s", "memory_only_s")
            print(table([(i, *(json.dumps(s[k]) for k in keys)) for i, s in enumerate(shards) if s is not None],
                        ("shard", *keys)))
    return {"sim_shard_diagnosis": {
        "requests_per_trace": n, "deal": "per case (the same shards in every variant)",
        "note": f"per engine: long_* = requests whose output is at least the batch's {LONG_QUANTILE} quantile "
                "(the planner sees the true lengths in the simulator; the engines see them only in the 'known "
                "lengths' variant); long_start = the first, median and last of them to be admitted, as fractions "
                f"of the engine's time; low_kv_time_share = the engine's time in steps holding under {LOW_KV} of "
                "the KV pool; compute_tokens / memory_units = the shard's work totals (every shared prefix once); "
                "*_s = the engine's time split (SimResult.time_split)",
        "cases": out}}


def sim_summary(rows: list[dict], n: int, traces: list[str]) -> dict:
    def mean(deal: str, field: str = "scaling") -> dict:
        return {str(k): round(statistics.mean(r[field] for r in rows if r["engines"] == k and r["deal"] == deal), 4)
                for k in SIZES}

    dealt = [how for how in (*DEALS, CUTS, CUTS_TOLD, EVEN_PIECES)  # dealings with a row for every trace and N
             if all(any(r["trace"] == t and r["engines"] == k and r["deal"] == how for r in rows)
                    for t in traces for k in SIZES)]
    loss = {how: {field: mean(how, field) for field in ("scaling_over_bound", "balanced_scaling", "time_max_over_mean",
                                                          "work_sum_over_one",
                                                          "slowest_tail_share", "density_drift_max", "sharing_vs_one")}
            for how in dealt}
    extra = {f"sim_scaling_{how.replace('-', '_')}": mean(how) for how in (CUTS, CUTS_TOLD, EVEN_PIECES)
             if how in dealt}
    lap = {str(k): [r["scaling"] for r in rows if r["engines"] == k and r["deal"] == f"{FED}-{k}"] for k in SIZES}
    if all(len(v) == len(traces) for v in lap.values()):  # the last lap (N pieces) fed on demand, every row
        extra["sim_scaling_fed_last_lap"] = {k: round(statistics.mean(v), 4) for k, v in lap.items()}
    return {"sim_scaling": mean("blend"), "sim_scaling_round_robin": mean("round-robin"),
            "sim_scaling_blocks": mean("blocks"), **extra,
            "sim_sharing_vs_one": min(r["sharing_vs_one"] for r in rows if r["deal"] == "blend"),
            "sim_sharing_vs_one_round_robin": min(r["sharing_vs_one"] for r in rows if r["deal"] == "round-robin"),
            "sim_scaling_bound": mean("blend", "bound"), "sim_scaling_if_balanced": mean("blend", "balanced_scaling"),
            "sim_loss": {"note": LOSS_NOTE, "mean_over_traces": loss},
            "sim": {"requests_per_trace": n, "traces": traces, "model": "llama-3.1-8b", "hardware": "a100",
                    "mode": "overlapped, interference 0.1", "policy_per_engine": "blend",
                    "planner_lengths": "each request's max_tokens, as blendserve run --dp/--ray plans (blend: "
                                       "core.shard.plan_strata, what ships; blend-cuts: plan_shards' cuts over the "
                                       "same tree, what shipped before); blend-cuts-told and blend-even-pieces: the "
                                       "cuts told the true output lengths (an oracle no run has)",
                    "stripes": f"cuts: requests // ({PIECE_MIN} x N), 1 to {MAX_STRIPES} (core.shard.stripes_for); "
                               f"strata: subtrees of at most {STRATUM_ATOM} requests kept whole",
                    "rows": rows}}


def rerun_rows(payload: dict, n: int, seed: int, only: str) -> dict:
    """The results file's simulator part with the rows `only` names ("trace1:8:blend,...")
    measured again (after a change that alters only their dealing); the summary recomputed."""
    sim = payload.get("sim") or {}
    if sim.get("requests_per_trace") != n:
        raise SystemExit(f"--only: the results file holds {sim.get('requests_per_trace')} requests per trace, "
                         f"not {n}; run the whole simulator part instead")
    keys = set()
    for item in only.split(","):
        name, size, how = item.split(":")
        keys.add((name, int(size), how))
    fresh = {(r["trace"], r["engines"], r["deal"]): r for r in sim_rows(n, seed, sim["traces"], keys)}
    old = {(r["trace"], r["engines"], r["deal"]) for r in sim["rows"]}
    rows = [fresh.get((r["trace"], r["engines"], r["deal"]), r) for r in sim["rows"]]
    rows += [r for key, r in fresh.items() if key not in old]  # rows of a dealing not measured before
    out = sim_summary(rows, n, sim["traces"])
    out["sim"]["command"] = sim["command"]
    earlier = sim.get("reruns", [sim["rerun"]] if "rerun" in sim else [])
    out["sim"]["reruns"] = [*earlier, {"command": command(), "rows": sorted(f"{t}:{k}:{d}" for t, k, d in fresh)}]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=40_000, help="requests per trace (simulator)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--engine", action="store_true", help="also run the real-engine part")
    ap.add_argument("--engine-only", action="store_true", help="only the real-engine part (the simulator's figures "
                                                               "already in the results file are kept)")
    ap.add_argument("--engine-trace", type=Path, default=None, metavar="DIR",
                    help="engine part: keep each run's per-request rows and the blend policy's step trace in DIR")
    ap.add_argument("--diagnose", default="", help="TRACE:N[:DEAL],...: profile every engine of these rows "
                                                   "(alone; results/scale_out_diagnosis.json)")
    ap.add_argument("--only", default="", help="TRACE:N:DEAL,...: measure these simulator rows again in the results "
                                               "file (same --requests), the rest kept")
    args = ap.parse_args()
    if args.diagnose:
        write("scale_out_diagnosis", shard_diagnosis(args.requests, args.seed, args.diagnose))
        return
    path = RESULTS / "scale_out.json"
    payload = json.loads(path.read_text()) if path.exists() else {}  # each part replaces its own figures
    payload.pop("command", None)  # the last run's; each part keeps its own under sim/engine
    payload.pop("machine", None)
    if args.only:
        payload.update(rerun_rows(payload, args.requests, args.seed, args.only))
    elif not args.engine_only:
        traces = args.traces.split(",")
        for key in [k for k in payload if k.startswith("sim")]:  # no figure of the earlier rows survives
            del payload[key]
        payload.update(sim_summary(sim_rows(args.requests, args.seed, traces), args.requests, traces))
        payload["sim"]["command"] = command()
    if not args.engine_only:
        rows = payload["sim"]["rows"]
        keys = list(dict.fromkeys(k for r in rows for k in r))
        print(table([tuple(r.get(k, "") for k in keys) for r in rows], tuple(keys)))
    if args.engine or args.engine_only:
        from bench.scale_out_engine import engine_part

        payload.update(engine_part(args.engine_trace))
        payload["engine"]["command"] = command()
    elif "engine" in payload:
        payload["engine"]["kept"] = "engine figures from the earlier run of engine.command (this run: simulator only)"
    payload["targets"] = TARGETS
    payload["peak_rss_mb"] = peak_rss_mb()
    print(table([(k, json.dumps(payload.get(k)), json.dumps(TARGETS.get(k, ""))) for k in
                 ("sim_scaling", "sim_scaling_round_robin", "sim_scaling_blocks", "sim_scaling_fed_last_lap",
                  "sim_scaling_if_balanced", "sim_sharing_vs_one",
                  "engine_cached_vs_one", "engine_work_imbalance", "engine_work_imbalance_round_robin")],
                ("figure", "value", "target")))
    write("scale_out", payload)


if __name__ == "__main__":
    main()
