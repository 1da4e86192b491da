"""Engine scenarios run in their own process by the end-to-end tests (SGLang kills its parent
when a scheduler dies, so tests never start an engine in the pytest process).

    python tests/engine_scenarios.py generate SPEC.json OUT.json
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def shared_prefix_batch(n: int, seed: int = 0) -> tuple[list[str], list[dict]]:
    """Shared system prompts and few-shot prefixes, short and long answers, some fixed-length."""
    import random

    rng = random.Random(seed)
    prefixes = [
        "You are a careful assistant. Answer briefly and precisely. " * 6,
        "The following are questions about astronomy with answers. Q: What orbits the Earth? A: The Moon. " * 4,
        "Translate the sentence into French, keeping the tone formal and polite. " * 5,
    ]
    prompts, params = [], []
    for i in range(n):
        prompts.append(prefixes[i % len(prefixes)] + f"Question {i}: what is {rng.randint(1, 99)} plus {i}?")
        params.append({"temperature": 0.0, "max_new_tokens": rng.choice([2, 8, 24, 48]),
                       "ignore_eos": i % 3 == 0})
    return prompts, params


def generate(spec: dict) -> dict:
    import sglang

    os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    stats_path = spec.get("stats_path")
    if stats_path:
        os.environ["BLENDSERVE_STATS_PATH"] = stats_path
    prompts, params = shared_prefix_batch(spec["n"], spec.get("seed", 0))
    t0 = time.perf_counter()
    engine = sglang.Engine(model_path=spec["model_path"], device="cpu", attention_backend=spec.get("backend", "torch_native"),
                           schedule_policy=spec["policy"], max_total_tokens=spec.get("max_total_tokens", 8192),
                           random_seed=0, log_level="error", **spec.get("engine_kwargs", {}))
    started = time.perf_counter() - t0
    try:
        t1 = time.perf_counter()
        outs = engine.generate(prompt=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=2)
        wall = time.perf_counter() - t1
    finally:
        engine.shutdown()
    result = {
        "policy": spec["policy"], "start_seconds": started, "wall_seconds": wall,
        "texts": [o["text"] for o in outs],
        "completion_tokens": [o["meta_info"]["completion_tokens"] for o in outs],
        "prompt_tokens": [o["meta_info"]["prompt_tokens"] for o in outs],
        "cached_tokens": [o["meta_info"].get("cached_tokens", 0) for o in outs],
        "finish_reasons": [str(o["meta_info"].get("finish_reason")) for o in outs],
        "token_ids": [[t[1] for t in o["meta_info"]["output_token_logprobs"]] for o in outs],
        # log-probability gap between the best and second-best token at every output position
        "top2_gap": [[top[0][0] - top[1][0] if len(top) > 1 else float("inf") for top in o["meta_info"]["output_top_logprobs"]]
                     for o in outs],
        "max_new_tokens": [p["max_new_tokens"] for p in params],
        "ignore_eos": [p["ignore_eos"] for p in params],
    }
    if stats_path and os.path.exists(stats_path):
        result["policy_stats"] = json.loads(Path(stats_path).read_text())
    return result


def main() -> int:
    scenario, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    result = {"generate": generate}[scenario](spec)
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
