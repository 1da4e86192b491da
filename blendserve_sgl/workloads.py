"""Seeded workloads from the real traces in `shared/data` (length-only records).

- Azure LLM inference traces (code, conversation): prompt and output token counts.
- arXiv summarization (Llama-2 token counts).
- MMLU 5-shot prompts: one shared prefix per subject (instruction + the 5 dev examples), the
  test question as the unshared tail. Token counts use the approximation `approx_tokens`
  (UTF-8 bytes / 4, rounded up), since no tokenizer is needed by the core.
- A long-output class standing in for the paper's video-generation trace (outputs of
  thousands of tokens), synthetic: log-normal output lengths.

Every trace gets its own system prompt (a shared prefix group), as in the paper. The data
directory is `$BLENDSERVE_DATA`, else `shared/data` next to the project checkout.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

SOURCES = {
    "traces/AzureLLMInferenceTrace_code.csv": "Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_code.csv",
    "traces/AzureLLMInferenceTrace_conv.csv": "Azure/AzurePublicDataset, data/AzureLLMInferenceTrace_conv.csv",
    "traces/arxiv_summarization_llama2_tokens.csv":
        "microsoft/vidur, data/processed_traces/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv",
    "mmlu": "hendrycks/test, data/{dev,test}/",
}


class Record(NamedTuple):
    rid: str
    prompt_len: int
    prefix: tuple  # ((group_id, n_tokens), ...), outermost first
    output_len: int
    kind: str


def data_dir() -> Path:
    env = os.environ.get("BLENDSERVE_DATA")
    if env:
        return Path(env)
    beside_checkout = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    beside_cwd = Path.cwd().parent / "shared" / "data"
    return beside_checkout if beside_checkout.exists() or not beside_cwd.exists() else beside_cwd


def _path(rel: str) -> Path:
    path = data_dir() / rel
    if not path.exists():
        src = next((v for k, v in SOURCES.items() if rel.startswith(k)), "see shared/data/README.md")
        raise FileNotFoundError(f"data file {path} is missing; it comes from {src}. "
                                f"Set BLENDSERVE_DATA to the folder that holds traces/ and mmlu/.")
    return path


def approx_tokens(text: str) -> int:
    """Token count approximation: UTF-8 bytes / 4, rounded up (at least 1)."""
    return max(1, math.ceil(len(text.encode("utf-8")) / 4))


def load_azure(kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt_lens, output_lens) of the Azure `code` or `conv` trace."""
    if kind not in ("code", "conv"):
        raise ValueError(f"Azure trace kind must be 'code' or 'conv', got {kind!r}")
    with open(_path(f"traces/AzureLLMInferenceTrace_{kind}.csv"), newline="") as f:
        rows = [(int(r["ContextTokens"]), int(r["GeneratedTokens"])) for r in csv.DictReader(f)]
    arr = np.array(rows, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def load_arxiv() -> tuple[np.ndarray, np.ndarray]:
    with open(_path("traces/arxiv_summarization_llama2_tokens.csv"), newline="") as f:
        rows = [(int(r["num_prefill_tokens"]), int(r["num_decode_tokens"])) for r in csv.DictReader(f)]
    arr = np.array(rows, dtype=np.int64)
    return arr[:, 0], arr[:, 1]


def _mmlu_example(row: list[str], with_answer: bool) -> str:
    q, a, b, c, d = row[:5]
    text = f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer:"
    return text + (f" {row[5]}\n\n" if with_answer else "")


def load_mmlu() -> dict[str, tuple[int, list[int]]]:
    """subject -> (5-shot prefix tokens, [tokens of each test question])."""
    root = _path("mmlu")
    out = {}
    for dev in sorted((root / "dev").glob("*_dev.csv")):
        subject = dev.name[: -len("_dev.csv")]
        with open(dev, newline="") as f:
            shots = list(csv.reader(f))
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        prefix = approx_tokens(header + "".join(_mmlu_example(r, True) for r in shots))
        test = root / "test" / f"{subject}_test.csv"
        with open(test, newline="") as f:
            questions = [approx_tokens(_mmlu_example(r, False)) for r in csv.reader(f)]
        out[subject] = (prefix, questions)
    if not out:
        raise FileNotFoundError(f"no MMLU dev files under {root / 'dev'}")
    return out


DEFAULT_MIX = {"mmlu": 0.3, "azure-code": 0.25, "azure-conv": 0.35, "long-output": 0.1}
SYSTEM_PROMPT_TOKENS = 64


def mixed_workload(n: int, seed: int = 0, mix: dict[str, float] | None = None,
                   long_output_median: int = 4000) -> list[Record]:
    """n length-only records mixing the classes of `mix` (fractions), shuffled with `seed`.

    Classes: `mmlu` (system prompt + per-subject 5-shot prefix + question, 1-2 output tokens),
    `azure-code`, `azure-conv`, `arxiv` (trace lengths behind a per-trace system prompt), and
    `long-output` (conversation-trace prompts with log-normal outputs around
    `long_output_median`, the analog of the paper's video generation).
    """
    if n < 1:
        raise ValueError(f"workload size must be >= 1, got {n}")
    mix = dict(DEFAULT_MIX if mix is None else mix)
    unknown = set(mix) - {"mmlu", "azure-code", "azure-conv", "arxiv", "long-output"}
    if unknown or any(not (v >= 0) for v in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"bad mix {mix}: fractions >= 0 over mmlu, azure-code, azure-conv, arxiv, long-output")
    rng = np.random.default_rng(seed)
    total = sum(mix.values())
    counts = {k: int(round(n * v / total)) for k, v in mix.items()}
    counts[max(counts, key=counts.get)] += n - sum(counts.values())
    records: list[Record] = []
    sys_group = lambda kind: (f"system:{kind}", SYSTEM_PROMPT_TOKENS)  # noqa: E731

    if counts.get("mmlu"):
        mmlu = load_mmlu()
        subjects = sorted(mmlu)
        picks = rng.integers(0, len(subjects), counts["mmlu"])
        for i, s in enumerate(picks):
            prefix_len, questions = mmlu[subjects[s]]
            q = questions[int(rng.integers(0, len(questions)))]
            records.append(Record(f"mmlu-{i}", SYSTEM_PROMPT_TOKENS + prefix_len + q,
                                  (sys_group("mmlu"), (f"mmlu:{subjects[s]}", prefix_len)),
                                  int(rng.integers(1, 3)), "mmlu"))
    for kind, loader in (("azure-code", lambda: load_azure("code")), ("azure-conv", lambda: load_azure("conv")),
                         ("arxiv", load_arxiv)):
        if not counts.get(kind):
            continue
        prompts, outputs = loader()
        idx = rng.integers(0, len(prompts), counts[kind])
        for i, j in enumerate(idx):
            records.append(Record(f"{kind}-{i}", SYSTEM_PROMPT_TOKENS + int(prompts[j]), (sys_group(kind),),
                                  max(1, int(outputs[j])), kind))
    if counts.get("long-output"):
        prompts, _ = load_azure("conv")
        idx = rng.integers(0, len(prompts), counts["long-output"])
        outs = np.maximum(256, rng.lognormal(math.log(long_output_median), 0.5, len(idx))).astype(np.int64)
        for i, (j, d) in enumerate(zip(idx, outs)):
            records.append(Record(f"long-{i}", SYSTEM_PROMPT_TOKENS + min(int(prompts[j]), 1024),
                                  (sys_group("long-output"),), int(d), "long-output"))
    order = rng.permutation(len(records))
    return [records[i] for i in order]


def build_tree(records, cost, known_lengths: bool = True, estimator=None, max_tokens: int | None = None):
    """A ResourceTree holding the records (output lengths known, or left to the estimator)."""
    from .core.tree import ResourceTree

    tree = ResourceTree(cost, estimator)
    for r in records:
        tree.add(r.rid, prompt_len=r.prompt_len, prefix=r.prefix,
                 output_len=r.output_len if known_lengths else None, max_tokens=max_tokens)
    return tree
