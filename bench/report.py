"""Fill the README's results section from bench/results/*.json (never typed by hand).

    python bench/report.py          # rewrite the section between the markers in README.md
    python bench/report.py --check  # exit 1 if README.md is out of date
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- results:begin (bench/report.py) -->", "<!-- results:end -->"

# Per result file: a title and the scalar fields to show, in order (others stay in the JSON).
LAYOUT = {
    "tree_scale": ("Tree at paper scale (`bench/tree_scale.py`)",
                   ["requests", "build_seconds", "sort_split_seconds", "build_sort_split_seconds", "scan_seconds",
                    "planning_ms_per_step", "peak_rss_mb", "load_average_before", "splits", "split_spent_tokens",
                    "split_budget_tokens"]),
    "paper_traces": ("Trace#1-#4 analogs x all policies in the simulator, equal rules, estimated lengths "
                     "(`bench/paper_traces.py`)",
                     ["requests_per_trace", "blend_mean_fraction_of_optimal", "blend_mean_fraction_of_weight_bound",
                      "blend_speedup_vs_best_other", "blend_speedup_vs_best_other_min", "blend_speedup_vs_dfs",
                      "blend_sharing_vs_dfs", "blend_sharing_vs_best", "estimated_vs_known_min",
                      "blend_speedup_vs_best_other_sequential", "blend_mean_fraction_of_optimal_sequential",
                      "blend_as_shipped.blend_speedup_vs_best_other", "blend_as_shipped.blend_speedup_vs_best_other_min",
                      "blend_as_shipped.blend_mean_fraction_of_optimal",
                      "blend_as_shipped.blend_speedup_vs_best_other_sequential",
                      "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other",
                      "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other_min",
                      "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other_sequential",
                      "blend_with_kv_projection.blend_speedup_vs_best_other",
                      "blend_known_lengths.blend_speedup_vs_best_other", "total_seconds"]),
    "paper_traces_h200_measured": ("The same on the H200 as measured (`bench/paper_traces.py --requests 20000 "
                                   "--hardware h200-measured --interference h200-measured --out "
                                   "paper_traces_h200_measured`)",
                                   ["requests_per_trace", "hardware", "blend_speedup_vs_best_other",
                                    "blend_speedup_vs_best_other_min", "blend_speedup_vs_best_other_sequential",
                                    "estimated_vs_known_min",
                                    "blend_as_shipped.blend_speedup_vs_best_other_sequential",
                                    "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other_sequential",
                                    "blend_known_lengths.blend_speedup_vs_best_other_sequential", "total_seconds"]),
    "paper_traces_100k": ("Trace#1-#4 analogs x all policies, equal rules, estimated lengths, 100,000 requests per trace "
                          "(`bench/paper_traces.py --lean --requests 100000 --out paper_traces_100k`)",
                          ["requests_per_trace", "blend_mean_fraction_of_optimal", "blend_mean_fraction_of_weight_bound",
                           "blend_speedup_vs_best_other", "blend_speedup_vs_best_other_min", "blend_speedup_vs_dfs",
                           "blend_sharing_vs_dfs", "blend_sharing_vs_best", "estimated_vs_known_min",
                           "blend_speedup_vs_best_other_sequential", "blend_mean_fraction_of_optimal_sequential",
                           "blend_as_shipped.blend_speedup_vs_best_other",
                           "blend_as_shipped.blend_speedup_vs_best_other_min",
                           "blend_as_shipped.blend_speedup_vs_best_other_sequential",
                           "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other",
                           "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other_sequential", "total_seconds"]),
    "paper_traces_conversation": ("Multi-turn conversations (ShareGPT V3) x all policies, equal rules, estimated lengths "
                                  "(`bench/paper_traces.py --traces conversation`)",
                                  ["requests_per_trace", "blend_mean_fraction_of_optimal", "blend_speedup_vs_best_other",
                                   "blend_sharing_vs_best", "estimated_vs_known_min",
                                   "blend_speedup_vs_best_other_sequential",
                                   "blend_as_shipped.blend_speedup_vs_best_other",
                                   "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other", "total_seconds"]),
    "real_traces": ("Real traces (Azure code and conversation, arXiv summarization, Mooncake synthetic and "
                    "conversation) x all policies, equal rules, estimated lengths (`bench/paper_traces.py --traces "
                    "FILES --out real_traces`)",
                    ["blend_mean_fraction_of_optimal", "blend_speedup_vs_best_other", "blend_speedup_vs_best_other_min",
                     "estimated_vs_known_min", "blend_speedup_vs_best_other_sequential",
                     "blend_as_shipped.blend_speedup_vs_best_other", "blend_as_shipped.blend_speedup_vs_best_other_min",
                     "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other",
                     "blend_as_shipped_mixed_steps.blend_speedup_vs_best_other_min", "total_seconds"]),
    "pacing_ablation": ("Pacing under estimated lengths, blend over the best other policy per engine variant, "
                        "Trace#1-#4 analogs (`bench/pacing_ablation.py --requests 20000`)",
                        ["rules.requests_per_trace", "blend_vs_best_other_mean.shipped",
                         "blend_vs_best_other_mean.not_paced", "blend_vs_best_other_mean.oracle",
                         "blend_vs_best_other_min.oracle", "blend_vs_best_other_mean.oracle_thin",
                         "blend_vs_best_other_min.oracle_thin", "blend_vs_best_other_mean.known",
                         "blend_vs_best_other_mean.known_thin", "blend_vs_best_other_mean.known_not_paced",
                         "blend_vs_best_other_mean.kv", "blend_vs_best_other_mean.known_kv",
                         "blend_vs_best_other_min.known_kv", "wall_seconds"]),
    "pacing_ablation_100k": ("Pacing under estimated lengths at 100,000 requests a trace, blend over the best other "
                             "policy (balance, fcfs) per engine variant (`bench/pacing_ablation.py --requests 100000 "
                             "--policies blend,balance,fcfs --variants shipped,spread,oracle,known --out "
                             "pacing_ablation_100k`)",
                             ["blend_vs_best_other_mean.shipped", "blend_vs_best_other_min.shipped",
                              "blend_vs_best_other_mean.spread", "blend_vs_best_other_min.spread",
                              "blend_vs_best_other_mean.oracle", "blend_vs_best_other_min.oracle",
                              "blend_vs_best_other_mean.known", "blend_vs_best_other_min.known"]),
    "pacing_ablation_real_traces": ("Pacing on five real traces, blend over the best other policy per engine variant "
                                    "(`bench/pacing_ablation.py --requests 100000 --traces FILES --out "
                                    "pacing_ablation_real_traces`)",
                                    ["blend_vs_best_other_mean.shipped", "blend_vs_best_other_min.shipped",
                                     "blend_vs_best_other_mean.not_paced", "blend_vs_best_other_mean.kv",
                                     "blend_vs_best_other_min.kv", "blend_vs_best_other_mean.known",
                                     "blend_vs_best_other_mean.known_kv", "blend_vs_best_other_min.known_kv",
                                     "wall_seconds"]),
    "sweep": ("Density x sharing sweep, blend over the best other policy, equal rules (`bench/sweep.py`)",
              ["requests_per_cell", "min_speedup_vs_best_other", "mean_speedup_vs_best_other",
               "max_speedup_vs_best_other", "conversation.speedup_vs_best_other", "conversation.sharing_vs_best",
               "min_sharing_vs_dfs", "min_sharing_vs_best"]),
    "sim_scale": ("Simulator speed at paper scale, per policy under the equal rules (`bench/sim_scale.py`)",
                  ["requests", "workload_build_seconds", "blend_seconds", "blend_steps", "blend_us_per_step",
                   "dfs_seconds", "fcfs_seconds", "sglang-dfs-weight_seconds", "dfs_weight_over_fcfs_seconds",
                   "blend_check_requests", "blend_check_seconds", "peak_rss_mb", "load_average_before",
                   "load_average_after"]),
    "sim_scale_quick": ("Simulator speed per policy under the equal rules, 40,000 requests (`bench/sim_scale.py --quick`)",
                        ["requests", "fcfs_seconds", "sglang-dfs-weight_seconds", "dfs_weight_over_fcfs_seconds",
                         "blend_seconds", "dfs_seconds", "blend_check_requests", "blend_check_seconds",
                         "load_average_before", "load_average_after"]),
    "planning_overhead": ("Planning cost in the real engine with 100,000 waiting requests (`bench/planning_overhead.py`)",
                          ["requests", "planning_fraction", "target_planning_fraction", "target_met",
                           "planning_ms_per_step", "wall_ms_per_step"]),
    "engine_cpu": ("Real engine on CPU, policies side by side, 1,600 requests (`bench/engine_cpu.py`)", "policies"),
    "engine_cpu_plain_recheck": ("Real engine on CPU, blend vs lpm and dfs-weight, plain, one run each, after "
                                 "`engine_cpu`'s first repeat (`bench/engine_cpu.py --variants plain --policies "
                                 "blend,dfs-weight,lpm --repeats 1 --out engine_cpu_plain_recheck`)", "policies"),
    "engine_cpu_plain_focus": ("Real engine on CPU, blend vs the two fastest stock policies, plain, repeats 2 "
                               "(`bench/engine_cpu.py --variants plain --policies blend,dfs-weight,fcfs`)", "policies"),
    "engine_cpu_mixed_focus": ("Real engine on CPU, blend vs dfs-weight with --enable-mixed-chunk, repeats 2 "
                               "(`bench/engine_cpu.py --variants mixed --policies blend,dfs-weight`)", "policies"),
    "engine_cpu_quick": ("Real engine on CPU, policies side by side, quick run (`bench/engine_cpu.py --quick`)",
                         "policies"),
    "offline_throughput_blend": ("SGLang's offline_throughput with --schedule-policy blend "
                                 "(`bench/offline_throughput_blend.py`)", ["result"]),
    "batch_cli": ("`blendserve run` on examples/requests.jsonl (`bench/batch_cli.py`)", "policies"),
    "cascade_cpu": ("Cascade decode attention vs per-request attention on CPU (`bench/cascade_cpu.py`)",
                    ["speedup_2048x64", "target_met", "e2e_ratio"]),
    "final_wave": ("Final wave on/off in the simulator, steps on/off (`bench/final_wave.py`)",
                   ["steps_ratio_min", "steps_ratio_mean", "steps_ratio_max", "overlapped_s_ratio_mean",
                    "same_prefix_hits"]),
    "plan_file": ("`blendserve plan` on a user's file: speed and prediction error on CPU (`bench/plan_file.py`)",
                  ["requests", "input_mb", "plan_seconds", "plan_cpu_seconds", "plan_peak_rss_mb", "tokenize_seconds",
                   "simulate_seconds", "big_plan.simulated_requests", "cpu_requests", "overhead_fit.step_overhead_s",
                   "overhead_fit.request_overhead_s", "overhead_fit.fit_error_mean", "cpu_checks.tiny.policies.blend.error",
                   "cpu_checks.tiny.policies.fcfs.error", "cpu_prediction_error",
                   "cpu_checks.SmolLM2-135M-Instruct-f32.policies.blend.error",
                   "cpu_checks.SmolLM2-135M-Instruct-f32.policies.fcfs.error"]),
    "million": ("Large batches through `blendserve run`: streaming read + plan, bounded feed, resume (`bench/million.py`)",
                ["planned_requests", "plan_seconds", "read_seconds", "plan_only_seconds", "cpu_seconds.read_workers",
                 "cpu_seconds.read_driver", "cpu_seconds.plan", "loadavg_before", "driver_rss_mb", "store_bytes",
                 "model", "engine_model_comparison.speedup", "engine_requests", "rss_by_n", "engine_rss_mb_over_model",
                 "first_result_seconds", "curve_n", "cached_ratio_by_window", "cached_ratio_vs_all_at_once",
                 "resume_exactly_once"]),
    "completion_prefixes": ("Shared prefixes in completion prompts: the same texts as chats and completions "
                            "through `blendserve run` (`bench/completion_prefixes.py`)",
                            ["requests", "chat_cache_hit_ratio", "completion_cache_hit_ratio",
                             "completion_over_chat_cache_hits", "baseline_commit", "runs.completion_baseline.cache_hit_ratio",
                             "completion_over_baseline_cache_hits", "completion_over_baseline_generation_seconds"]),
    "store_heads": ("Completion prompts behind few-shot headers: the token store with and without shared heads "
                    "(`bench/store_heads.py`)",
                    ["requests", "headers", "prompt_tokens", "stores.shared heads.store_mb", "stores.whole tails.store_mb",
                     "store_shared_over_whole", "stores.shared heads.fill_peak_mb", "stores.whole tails.fill_peak_mb",
                     "fill_seconds_shared_over_whole", "tail_segments_seconds_shared_over_whole",
                     "prompts_checked_equal", "tail_segments_equal"]),
    "resume_memory": ("A rerun over a million records: driver memory and time (`bench/resume_memory.py`)",
                      ["requests", "runs.this.first.results_mb", "runs.this.first.driver_peak_rss_mb",
                       "runs.this.rerun.driver_peak_rss_mb", "runs.this.retry.driver_peak_rss_mb",
                       "runs.this.rerun.wall_seconds", "runs.this.retry.wall_seconds",
                       "runs.3756e70.rerun.driver_peak_rss_mb", "runs.3756e70.rerun.wall_seconds",
                       "runs.3756e70.retry.wall_seconds", "runs.f997c7e.rerun.wall_seconds",
                       "runs.f997c7e.retry.wall_seconds"]),
    "rerun_finished": ("A finished job run again: parsed, not tokenized (`bench/resume_memory.py --valid`)",
                       ["requests", "runs.this.first.wall_seconds", "runs.this.rerun.wall_seconds",
                        "runs.668adad.rerun.wall_seconds", "wall_this_over.668adad.rerun",
                        "runs.this.missing.wall_seconds", "runs.668adad.missing.wall_seconds",
                        "runs.this.rerun.driver_peak_rss_mb", "runs.668adad.rerun.driver_peak_rss_mb"]),
    "tree_children": ("A child found among many: the final wave and edge-cutting arrivals under one node "
                      "(`bench/tree_children.py`)",
                      ["seconds.this.final_wave.40000", "seconds.b2d5ae4.final_wave.40000",
                       "seconds.this.adjacent_cuts.40000", "seconds.b2d5ae4.adjacent_cuts.40000",
                       "seconds.this.far_cuts.40000", "seconds.b2d5ae4.far_cuts.40000",
                       "baseline_over_this.b2d5ae4.final_wave.20000", "baseline_over_this.b2d5ae4.final_wave.40000"]),
    "server_batches_memory": ("The plugin's memory on a server, batch after batch (`bench/server_batches_memory.py`)",
                              ["batches", "requests_per_batch", "results.this.drain/0.checkpoints.-1.traced_mb",
                               "results.8ac3be1.drain/0.checkpoints.-1.traced_mb",
                               "results.this.drain/0.checkpoints.-1.pruned_nodes_kept",
                               "results.8ac3be1.drain/0.checkpoints.-1.pruned_nodes_kept",
                               "results.this.drain/0.growth_kb_per_batch", "results.8ac3be1.drain/0.growth_kb_per_batch",
                               "memory_vs_this.8ac3be1.drain/0", "memory_vs_this.8ac3be1.drain/1",
                               "memory_vs_this.8ac3be1.drain/2", "results.this.stream/0.growth_kb_per_batch",
                               "memory_vs_this.8ac3be1.stream/0"]),
    "ray_stop": ("A `--ray` run stopped while its engines start (`bench/ray_stop.py`)",
                 ["start_seconds", "interrupt_after_seconds", "results.this.in_flight_0.stop_seconds",
                  "results.4f930ac.in_flight_0.stop_seconds", "results.this.in_flight_2.stop_seconds",
                  "results.4f930ac.in_flight_2.stop_seconds"]),
    "server_rss": ("The real scheduler's memory on a server, batch after batch (`bench/server_rss.py`)",
                   ["batches", "size", "policies.blend.rss_slope_mb_per_batch", "policies.lpm.rss_slope_mb_per_batch",
                    "policies.fcfs.rss_slope_mb_per_batch", "policies.blend.rss_mb.start", "policies.blend.rss_mb.end",
                    "policies.lpm.rss_mb.start", "policies.lpm.rss_mb.end", "policies.fcfs.rss_mb.start",
                    "policies.fcfs.rss_mb.end", "blend_rss_slope_minus_highest_stock"]),
    "long_prompts_memory": ("Long distinct prompts: the reader's and `blendserve plan`'s memory "
                            "(`bench/long_prompts_memory.py`)",
                            ["requests", "input_mb", "runs.this.plan.peak_rss_mb", "runs.82c321b.plan.peak_rss_mb",
                             "runs.this.plan.wall_seconds", "runs.82c321b.plan.wall_seconds",
                             "runs.this.read.driver_peak_rss_mb", "runs.82c321b.read.driver_peak_rss_mb",
                             "runs.this.read.largest_worker_peak_rss_mb", "runs.82c321b.read.largest_worker_peak_rss_mb",
                             "runs.this.read.wall_seconds", "runs.82c321b.read.wall_seconds"]),
    "long_prompts_memory_plan50k": ("Long distinct prompts at 50,000 lines: `blendserve plan`'s memory "
                                    "(`bench/long_prompts_memory.py --parts plan`)",
                                    ["requests", "input_mb", "runs.this.plan.peak_rss_mb", "runs.82c321b.plan.peak_rss_mb",
                                     "runs.this.plan.wall_seconds", "runs.82c321b.plan.wall_seconds",
                                     "this_over.82c321b.plan_peak_rss"]),
    "scale_out": ("Scale-out: one plan cut into shards, simulator and real engines (`bench/scale_out.py`)",
                  ["sim.requests_per_trace", "sim_scaling.2", "sim_scaling.4", "sim_scaling.8",
                   "sim_scaling_round_robin.2", "sim_scaling_round_robin.4", "sim_scaling_round_robin.8",
                   "sim_sharing_vs_one", "sim_sharing_vs_one_round_robin", "engine_cached_vs_one",
                   "engine_cached_vs_one_round_robin", "engine_work_imbalance"]),
    "calibrate": ("Cost model vs measured operators on this machine (`bench/calibrate.py`)",
                  ["device", "threads", "peak_gflops", "peak_gbps", "flops_efficiency", "bandwidth_efficiency",
                   "gemm_compute_bound_max_abs_error", "gemm_near_ridge_max_abs_error", "gemm_max_abs_error",
                   "attention_mean_abs_error", "attention_max_abs_error"]),
}


def _get(data: dict, field: str):
    """`field` of `data`; a dotted name reaches into a nested object (a number: a list's item, -1
    the last). None when absent."""
    for part in field.split("."):
        if isinstance(data, list) and part.lstrip("-").isdigit() and -len(data) <= int(part) < len(data):
            data = data[int(part)]
        elif isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return None
    return data


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.5g}" if abs(v) < 1e6 else f"{v:.3e}"
    return str(v)


def _other_commands(data: dict) -> str:
    """The commands of a file's parts that a later partial run did not write (`X_command`, a part's
    own `command` and its `reruns`): the top-level command is only the last run's."""
    said = [f"{k[:-len('_command')]}: `{v}`" for k, v in data.items() if k.endswith("_command") and isinstance(v, str)]
    for k, v in data.items():
        if isinstance(v, dict) and isinstance(v.get("command"), str) and v["command"] != data.get("command"):
            reruns = v.get("reruns") or []
            said.append(f"{k}: `{v['command']}`" + (f" and {len(reruns)} reruns of some rows (their commands in "
                                                     f"`{k}.reruns`)" if reruns else ""))
    return (" Parts written by other runs: " + "; ".join(said) + ".") if said else ""


def render(results_dir: Path = ROOT / "bench" / "results") -> str:
    parts = []
    for name, (title, fields) in LAYOUT.items():
        path = results_dir / f"{name}.json"
        if not path.exists():
            parts.append(f"### {title}\n\nNot run yet: `{name}.json` is missing.\n")
            continue
        data = json.loads(path.read_text())
        targets = data.get("targets", {})
        if fields == "policies":  # one row per policy, scalar figures as columns
            pols = data.get("policies", {})
            cols = [c for c in ("total_tokens_per_s", "output_tokens_per_s", "cached_token_ratio", "cache_hit_ratio",
                                "wall_seconds", "total_tokens_per_cpu_s", "planning_ms_per_step", "requests", "failed")
                    if any(isinstance(v, dict) and c in v for v in pols.values())]
            rows = ["| policy | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
            rows += [f"| {name} | " + " | ".join(_fmt(v.get(c)) for c in cols) + " |" for name, v in pols.items()]
        elif fields == ["result"]:
            rows = ["| metric | value |", "|---|---|"]
            rows += [f"| {k} | {_fmt(v)} |" for k, v in data.get("result", {}).items()]
        else:
            rows = ["| metric | value | target |", "|---|---|---|"]
            rows += [f"| {f} | {_fmt(_get(data, f))} | {_fmt(targets[f]) if f in targets else ''} |"
                     for f in fields if _get(data, f) is not None]
        m = data.get("machine", {})
        parts.append(f"### {title}\n\n" + "\n".join(rows) +
                     f"\n\nCommand: `{data['command']}` ({m.get('cpu', 'this machine')}, {m.get('cores', '?')} cores)."
                     + _other_commands(data) + "\n")
    return "\n".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        print(f"README.md lacks the markers {BEGIN} ... {END}", file=sys.stderr)
        return 1
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{render()}{END}{tail}"
    if args.check:
        if new != text:
            print("README.md results are out of date: run `python bench/report.py`", file=sys.stderr)
            return 1
        return 0
    readme.write_text(new)
    print("README.md results updated")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
