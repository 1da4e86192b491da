"""Why blend's KV pool runs part-empty: one trace analog, blend next to fcfs, step by step.

Per policy: overlapped time, steps, mean KV use, retractions, the time split, the steps in which
the engine asked the policy for admissions (`planning_steps`: in the others, prompts already being
prefilled in chunks took the whole step's prefill budget), the mean chunk size (paced) and decode
batch; for blend also why each side stopped in every planning step (`DualScanner.last_step["stop"]`: counts per (left, right)
pair; the final wave counts as one reason) and a sampled series of KV use, waiting requests,
decoding requests, prefill tokens, each side's reserved KV and share (tokens). Variants of the
preset with `--set leaf=value` (e.g. `--set lend_idle_share=False`).

    python bench/scan_trace.py --trace trace2 --requests 100000   # -> results/scan_trace.json
    python bench/scan_trace.py --policies fcfs,balance,blend     # the policies beside each other
"""

from __future__ import annotations

import argparse
import ast
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import write  # noqa: E402
from bench.paper_traces import COST, MODES  # noqa: E402
from blendserve_sgl.core.preset import PRESET  # noqa: E402
from blendserve_sgl.sim import EngineConfig, Workload  # noqa: E402
from blendserve_sgl.sim.engine import Engine  # noqa: E402
from blendserve_sgl.sim.metrics import result_from_engine  # noqa: E402
from blendserve_sgl.sim.policies import make_picker  # noqa: E402
from blendserve_sgl.sim.request import from_records  # noqa: E402
from blendserve_sgl.workloads.trace_file import trace_or_file  # noqa: E402


def run(wl: Workload, policy: str, preset, every: int) -> dict:
    config = EngineConfig.trace_engine(COST)
    reqs = from_records(wl.records, known=False)
    picker = make_picker(policy, reqs, COST, preset=preset, reference=wl.reference)
    stops: collections.Counter = collections.Counter()
    series = []
    planned = [0, False]  # planning steps; whether this step planned
    chunk = [0, 0]  # sum of chunk sizes, sum of decode batches
    pick = picker.pick

    def counted(view):
        planned[0] += 1
        planned[1] = True
        return pick(view)

    picker.pick = counted

    def on_step(e: Engine) -> None:
        chunk[0] += e.chunk
        chunk[1] += e.n_dec
        last = picker.scanner.last_step if policy == "blend" and planned[1] else {}
        planned[1] = False
        if last:
            stop = last.get("stop")
            stops["wave" if "final_wave" in last else f"{stop['left']}/{stop['right']}"] += 1
        if e.steps % every == 0:
            row = {"step": e.steps, "kv_use": round(e.series["kv_active"][-1] / config.kv_tokens, 3),
                   "waiting": e.waiting, "decoding": e.n_dec, "prefill": e.series["prefill"][-1]}
            if last and "share" in last:
                row.update(reserved=last["used"], share=last["share"], stop=last["stop"])
            series.append(row)

    t0 = time.perf_counter()
    engine = Engine(COST, config, picker, reqs).run(on_step=on_step)
    res = result_from_engine(engine, policy, wl.optimal_s, time.perf_counter() - t0,
                             wl.weight_bound_s(COST, config.max_running))
    model = MODES["overlapped"]
    return {"policy": policy, "overlapped_time_s": round(res.time(model), 1), "steps": res.steps,
            "mean_kv": round(res.mean_kv, 3), "retractions": res.retractions, "sharing": round(res.sharing, 4),
            "planning_steps": planned[0], "mean_chunk": round(chunk[0] / max(1, res.steps), 1),
            "mean_decode_batch": round(chunk[1] / max(1, res.steps), 1),
            "time_split_overlapped_s": res.time_split(model),
            "stops": dict(stops.most_common()), "series": series}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="trace2", help="a trace analog's name or a trace file (CSV, Mooncake JSONL)")
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--every", type=int, default=10_000, help="series: one row every this many steps")
    ap.add_argument("--set", action="append", default=[], metavar="LEAF=VALUE", help="blend preset change")
    ap.add_argument("--policies", default="fcfs,blend", help="comma-separated; blend's stops are counted")
    ap.add_argument("--out", default="scan_trace")
    args = ap.parse_args()
    changes = {}
    for item in args.set:
        leaf, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set {item!r}: expected LEAF=VALUE, e.g. lend_idle_share=False")
        changes[leaf] = ast.literal_eval(value)
    preset = PRESET.replace(**changes)
    _name, records, _counts = trace_or_file(args.trace, args.requests, COST)
    wl = Workload(records, COST)
    runs = [run(wl, p.strip(), preset, args.every) for p in args.policies.split(",")]
    for r in runs:
        print(f"{r['policy']:<8} {r['overlapped_time_s']:>9.1f} s  steps {r['steps']}  planning {r['planning_steps']}  "
              f"chunk {r['mean_chunk']}  decode batch {r['mean_decode_batch']}  mean KV {r['mean_kv']}  "
              f"retractions {r['retractions']}  split {r['time_split_overlapped_s']}")
        if r["stops"]:
            print(f"{r['policy']} stops (left/right):", dict(list(r["stops"].items())[:12]))
    path = write(args.out, {"trace": args.trace, "requests": args.requests, "preset_changes": changes, "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
