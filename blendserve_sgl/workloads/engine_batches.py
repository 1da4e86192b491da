"""Token-id batches for the real engine on CPU (`bench/engine_cpu.py`, `bench/cascade_cpu.py`,
`bench/planning_overhead.py`): the trace classes of `data.py`, scaled to what a CPU runs, as
random token ids (ids from 16 up, clear of the special tokens of small vocabularies); each
shared prefix is one fixed id sequence, so the engine's prefix cache sees the sharing."""

from __future__ import annotations

import math
import random

import numpy as np

from .data import SYSTEM_PROMPT_TOKENS, load_azure, load_mmlu


def build_workload(n: int, *, vocab: int, seed: int = 0, subjects: int = 12, mmlu_scale: float = 2.0,
                   prompt_scale: float = 8.0, output_cap: int = 256, max_prompt: int = 1536,
                   mix: dict | None = None) -> dict:
    """`n` requests as token ids: MMLU 5-shot prefixes + Azure code/conversation shapes (scaled)."""
    mix = mix or {"mmlu": 0.4, "azure-code": 0.25, "azure-conv": 0.35}
    rng = np.random.default_rng(seed)
    lo, hi = 16, vocab - 1  # clear of the special tokens at the start of small vocabularies

    def ids(k: int) -> list[int]:
        return [int(t) for t in rng.integers(lo, hi, k)]

    total = sum(mix.values())
    counts = {k: int(round(n * v / total)) for k, v in mix.items()}
    counts[max(counts, key=counts.get)] += n - sum(counts.values())
    system = {k: ids(SYSTEM_PROMPT_TOKENS) for k in mix}
    reqs = []  # (kind, input_ids, max_new_tokens)
    picked = []
    if counts.get("mmlu"):
        mmlu = load_mmlu()
        names = sorted(mmlu)
        picked = sorted(str(s) for s in rng.choice(names, size=min(subjects, len(names)), replace=False))
        prefix = {s: ids(max(1, math.ceil(mmlu[s][0] / mmlu_scale))) for s in picked}
        for _ in range(counts["mmlu"]):
            s = picked[int(rng.integers(0, len(picked)))]
            questions = mmlu[s][1]
            q = max(4, math.ceil(questions[int(rng.integers(0, len(questions)))] / mmlu_scale))
            head = system["mmlu"] + prefix[s]
            q = max(1, min(q, max_prompt - len(head)))
            reqs.append(("mmlu", head + ids(q), int(rng.integers(1, 3))))
    for kind, trace in (("azure-code", "code"), ("azure-conv", "conv")):
        if not counts.get(kind):
            continue
        prompts, outputs = load_azure(trace)
        for j in rng.integers(0, len(prompts), counts[kind]):
            p = max(4, min(int(round(prompts[j] / prompt_scale)), max_prompt - SYSTEM_PROMPT_TOKENS))
            d = max(1, min(int(outputs[j]), output_cap))
            reqs.append((kind, system[kind] + ids(p), d))
    order = rng.permutation(len(reqs))
    reqs = [reqs[i] for i in order]
    kinds = {}
    for kind, tokens, d in reqs:
        k = kinds.setdefault(kind, {"requests": 0, "prompt_tokens": 0, "output_tokens": 0})
        k["requests"] += 1
        k["prompt_tokens"] += len(tokens)
        k["output_tokens"] += d
    return {
        "input_ids": [r[1] for r in reqs],
        "max_new_tokens": [r[2] for r in reqs],
        "kinds": [r[0] for r in reqs],
        "summary": {
            "requests": len(reqs), "seed": seed, "mix": mix, "by_kind": kinds,
            "prompt_tokens": sum(len(r[1]) for r in reqs), "output_tokens": sum(r[2] for r in reqs),
            "mmlu_subjects": picked, "mmlu_scale": mmlu_scale, "prompt_scale": prompt_scale,
            "output_cap": output_cap, "max_prompt": max_prompt, "system_prompt_tokens": SYSTEM_PROMPT_TOKENS,
        },
    }


def mmlu_batch(vocab: int, subjects: int, per_subject: int, output_len: int, max_prompt: int, seed: int = 0) -> dict:
    """Prompts are cut to `max_prompt` tokens (the model's context less the output)."""
    rng = np.random.default_rng(seed)
    mmlu = load_mmlu()
    names = sorted(str(s) for s in rng.choice(sorted(mmlu), size=subjects, replace=False))

    def ids(n):
        return [int(t) for t in rng.integers(16, vocab - 1, n)]

    system = ids(SYSTEM_PROMPT_TOKENS)
    prompts = []
    for s in names:
        prefix = system + ids(mmlu[s][0])
        for qlen in rng.choice(mmlu[s][1], size=per_subject):
            prompts.append((prefix + ids(int(qlen)))[:max_prompt])
    order = rng.permutation(len(prompts))
    prompts = [prompts[i] for i in order]
    return {"input_ids": prompts, "output_len": output_len, "subjects": names,
            "prefix_tokens": {s: SYSTEM_PROMPT_TOKENS + mmlu[s][0] for s in names},
            "prompt_tokens": sum(map(len, prompts)), "requests": len(prompts)}


def build_requests(n: int, vocab: int, systems: int = 4, docs: int = 50, seed: int = 0):
    """n prompts (token ids) over systems x docs shared prefixes, and their output lengths."""
    rng = np.random.default_rng(seed)
    lo, hi = 16, vocab - 1
    sys_ids = [rng.integers(lo, hi, 32).tolist() for _ in range(systems)]
    doc_ids = [[rng.integers(lo, hi, 48).tolist() for _ in range(docs)] for _ in range(systems)]
    s = rng.integers(0, systems, n)
    d = rng.integers(0, docs, n)
    tails = rng.integers(8, 41, n)
    kind = rng.random(n)
    outs = np.where(kind < 0.5, rng.integers(1, 5, n), np.where(kind < 0.9, rng.integers(8, 33, n),
                                                                 rng.integers(64, 129, n)))
    prompts = [sys_ids[a] + doc_ids[a][b] + rng.integers(lo, hi, int(t)).tolist() for a, b, t in zip(s, d, tails)]
    return prompts, [int(o) for o in outs]


SHAREGPT_WORDS = ("the of and to in is was for on that with as by it at from this be are or an prefix tree batch request "
         "token cache memory compute decode prefill model server city river village time colors water first "
         "second function value number answer question please explain write code list data table result").split()


def sharegpt_rows(num: int = 1000, seed: int = 0, scale: float = 4.0) -> list[dict]:
    """ShareGPT-format conversations (text of `SHAREGPT_WORDS`) with the Azure conversation
    trace's lengths: prompts / `scale` within [4, 900] words, answers within [4, 512]
    (`bench/offline_throughput_blend.py`)."""
    prompts, outputs = load_azure("conv")
    rng = random.Random(seed)
    rows = []
    for i in range(num):
        j = rng.randrange(len(prompts))
        p = max(4, min(int(prompts[j] / scale), 900))  # ShareGPT's filter drops > 1024 / > 2048 total
        d = max(4, min(int(outputs[j]), 512))
        human = " ".join(rng.choice(SHAREGPT_WORDS) for _ in range(p))
        gpt = " ".join(rng.choice(SHAREGPT_WORDS) for _ in range(d))
        rows.append({"id": f"azure-conv-{i}", "conversations": [{"from": "human", "value": human},
                                                                 {"from": "gpt", "value": gpt}]})
    return rows
