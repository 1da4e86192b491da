"""One generator per request class: `n` seeded `Record`s of that class.

From the traces in `shared/data` (`data.py`), each class behind its own system prompt:

- `mmlu`: the subject's 5-shot prompt (a shared prefix) + a test question, 1-2 output tokens;
- `azure-code`, `azure-conv`, `arxiv`: the traces' prompt and output lengths;
- `base`: azure-conv and azure-code, half each (the stand-in for the paper's BurstGPT);
- `long-output`: conversation-trace prompts (at most 1,024 tokens) with log-normal outputs
  around `median` (default 4,000), at least 256;
- `video`: the analog of the paper's video-generation trace: prompts of 20-400 tokens,
  log-normal outputs around 10,000 within [2,048, 16,384] (synthetic; the paper's have ~16K).

Synthetic classes, no data files (tests and small benchmarks): `synthetic_mix` (MMLU-like,
compute-dense and memory-dense requests behind a few prefixes), `three_tier` (compute-dense,
memory-dense and in-between thirds behind eight prefixes) and `token_prompts` (token-id
prompts over shared system prompts and subjects).
"""

from __future__ import annotations

import math
import random

import numpy as np

from .data import SYSTEM_PROMPT_TOKENS, Record, load_arxiv, load_azure, load_mmlu

CLASSES = ("mmlu", "azure-code", "azure-conv", "arxiv", "base", "long-output", "video", "conversation")


def _sys(kind: str) -> tuple:
    return (f"system:{kind}", SYSTEM_PROMPT_TOKENS)


def mmlu(n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    data = load_mmlu()
    subjects = sorted(data)
    out = []
    for i in range(n):
        s = subjects[int(rng.integers(0, len(subjects)))]
        prefix_len, questions = data[s]
        q = questions[int(rng.integers(0, len(questions)))]
        out.append(Record(f"mmlu-{start + i}", SYSTEM_PROMPT_TOKENS + prefix_len + q,
                          (_sys("mmlu"), (f"mmlu:{s}", prefix_len)), int(rng.integers(1, 3)), "mmlu"))
    return out


def azure(kind: str, n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    prompts, outputs = load_azure(kind)
    idx = rng.integers(0, len(prompts), n)
    return [Record(f"azure-{kind}-{start + i}", SYSTEM_PROMPT_TOKENS + int(prompts[j]), (_sys(f"azure-{kind}"),),
                   max(1, int(outputs[j])), f"azure-{kind}") for i, j in enumerate(idx)]


def arxiv(n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    prompts, outputs = load_arxiv()
    idx = rng.integers(0, len(prompts), n)
    return [Record(f"arxiv-{start + i}", SYSTEM_PROMPT_TOKENS + int(prompts[j]), (_sys("arxiv"),),
                   max(1, int(outputs[j])), "arxiv") for i, j in enumerate(idx)]


def long_output(n: int, rng: np.random.Generator, start: int = 0, median: int = 4000) -> list[Record]:
    prompts, _ = load_azure("conv")
    idx = rng.integers(0, len(prompts), n)
    outs = np.maximum(256, rng.lognormal(math.log(median), 0.5, n)).astype(np.int64)
    return [Record(f"long-{start + i}", SYSTEM_PROMPT_TOKENS + min(int(prompts[j]), 1024), (_sys("long-output"),),
                   int(d), "long-output") for i, (j, d) in enumerate(zip(idx, outs))]


def video(n: int, rng: np.random.Generator, start: int = 0, median: int = 10_000, sigma: float = 0.3,
          bounds: tuple[int, int] = (2048, 16_384)) -> list[Record]:
    tails = np.clip(rng.lognormal(math.log(100), 0.4, n), 20, 400).astype(np.int64)
    outs = np.clip(rng.lognormal(math.log(median), sigma, n), *bounds).astype(np.int64)
    return [Record(f"video-{start + i}", SYSTEM_PROMPT_TOKENS + int(t), (_sys("video"),), int(d), "video")
            for i, (t, d) in enumerate(zip(tails, outs))]


def class_records(kind: str, n: int, rng: np.random.Generator, start: int = 0) -> list[Record]:
    """`n` records of the class `kind` (one of `CLASSES`)."""
    if kind == "mmlu":
        return mmlu(n, rng, start)
    if kind in ("azure-code", "azure-conv"):
        return azure(kind[len("azure-"):], n, rng, start)
    if kind == "arxiv":
        return arxiv(n, rng, start)
    if kind == "base":
        half = n // 2
        return azure("conv", n - half, rng, start) + azure("code", half, rng, start)
    if kind == "long-output":
        return long_output(n, rng, start)
    if kind == "video":
        return video(n, rng, start)
    if kind == "conversation":
        from .conversation import conversation_records

        return conversation_records(n, rng, start)
    raise ValueError(f"unknown request class {kind!r}; choose one of {list(CLASSES)}")


# ---------------------------------------------------------------- synthetic (no data files)
def synthetic_mix(n: int, seed: int = 0, *, fractions=(0.30, 0.45), compute_prompt=(1000, 4000),
                  compute_output=(5, 40), memory_output=(2000, 8000), n_subjects: int = 10) -> list[Record]:
    """Default: 30% MMLU-like (shared system prompt + subject, 1-2 output tokens), 45%
    compute-dense (long prompt, short output), 25% memory-dense (short prompt, long output);
    rids are 0..n-1."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        if u < fractions[0]:
            k = rng.randrange(n_subjects)
            out.append(Record(i, rng.randint(700, 800), (("sys", 50), (f"subj{k}", 600)), rng.randint(1, 2), "mmlu"))
        elif u < fractions[0] + fractions[1]:
            out.append(Record(i, rng.randint(*compute_prompt), (("sysc", 40),), rng.randint(*compute_output), "compute"))
        else:
            out.append(Record(i, rng.randint(50, 200), (("sysv", 40),), rng.randint(*memory_output), "memory"))
    return out


def three_tier(n: int, seed: int = 0) -> list[Record]:
    """A third compute-dense (long prompts, short outputs), a third memory-dense (short prompts,
    long outputs), a third in between, each behind one of eight shared prefixes of 64-512 tokens."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 3
        g = rnd.randrange(8)
        prefix = ((f"g{g}", (64, 256, 512)[g % 3]),)
        if kind == 0:
            p, d = rnd.randint(200, 800), rnd.randint(2, 40)
        elif kind == 1:
            p, d = rnd.randint(20, 120), rnd.randint(100, 400)
        else:
            p, d = rnd.randint(100, 400), rnd.randint(20, 150)
        out.append(Record(f"r{i}", prefix[0][1] + p, prefix, d, ("compute", "memory", "between")[kind]))
    return out


def token_prompts(seed: int, n: int) -> list[Record]:
    """Token-id prompts built from three shared system prompts and six subjects, half short and
    half long outputs; rids r0..r{n-1}."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(rng.randint(20, 200))] for _ in range(3)]
    subjects = [[rng.randrange(1000) for _ in range(rng.randint(10, 300))] for _ in range(6)]
    out = []
    for i in range(n):
        toks = list(systems[rng.randrange(3)])
        if rng.random() < 0.7:
            toks += subjects[rng.randrange(6)]
        toks += [rng.randrange(1000) for _ in range(rng.randint(1, 300))]
        d = rng.randint(1, 20) if rng.random() < 0.5 else rng.randint(200, 3000)
        out.append(Record(f"r{i}", len(toks), (), d, "tokens", tuple(toks)))
    return out
