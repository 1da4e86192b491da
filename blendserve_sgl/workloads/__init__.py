"""Workloads: loaders for `shared/data` (`data`), one generator per request class (`classes`),
multi-turn conversations from ShareGPT V3 (`conversation`), the recipes that mix them (`recipes`), the tree builder (`tree`) and the user's own OpenAI batch
file as records (`batch_file`)."""

from .classes import CLASSES, class_records, synthetic_mix, three_tier, token_prompts
from .data import (SOURCES, SYSTEM_PROMPT_TOKENS, Record, approx_tokens, data_dir, load_arxiv, load_azure,
                   load_mmlu)
from .recipes import DEFAULT_MIX, MIX_CLASSES, TRACES, WORKLOADS, MixReport, mix, mixed_workload, trace
from .tree import build_tree

__all__ = ["CLASSES", "DEFAULT_MIX", "MIX_CLASSES", "SOURCES", "SYSTEM_PROMPT_TOKENS", "TRACES", "WORKLOADS", "MixReport", "Record",
           "approx_tokens", "build_tree", "class_records", "data_dir", "load_arxiv", "load_azure", "load_mmlu", "mix",
           "mixed_workload", "synthetic_mix", "three_tier", "token_prompts", "trace"]
