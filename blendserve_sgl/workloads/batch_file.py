"""A user's OpenAI batch file (`blendserve run`'s input) as workload records.

The file goes through `batch.reader.read_store`, the reader of `blendserve run` itself:
validated, rendered, tokenized and checked against the context exactly as the run does it;
bad lines come back as the same `LineError`s, with the same messages.

Without a tokenizer (a preset model name), `ByteTokenizer` stands in: one token per 4 bytes of
UTF-8 (the `approx_tokens` rule, folded into 31 bits), equal text giving equal tokens, so
shared prefixes stay shared.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from ..batch.reader import read_store
from ..batch.requests import LineError
from ..batch.store import KINDS
from .data import Record


class BatchFile(NamedTuple):
    records: list[Record]  # valid requests in file order; output_len = max_tokens
    errors: list[LineError]  # bad lines, named as `blendserve run` names them
    lines: int  # non-blank lines read


class ByteTokenizer:
    """Approximate tokens: one per 4 bytes of UTF-8; a plain role-tagged chat template."""

    chat_template = "role-tagged"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        b = text.encode("utf-8")
        return [int.from_bytes(b[i:i + 4], "little") & 0x7FFFFFFF for i in range(0, len(b), 4)] or [0]

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def __len__(self) -> int:
        return 1 << 31


def load_batch_file(path: str | os.PathLike, tokenizer, context_len: int, default_max_tokens: int,
                    model_dir: str | os.PathLike | None = None) -> BatchFile:
    """Records of the valid lines of `path` (rid = custom_id, token prompts, output_len and
    max_tokens = the request's max_tokens or the run's default capped to the context) and the
    bad lines. `model_dir` (default: the directory the tokenizer was loaded from) lets a large
    file be read by worker processes, as `blendserve run` reads it. Raises
    `batch.requests.InputError` when the file cannot be read at all."""
    if model_dir is None:
        src = getattr(tokenizer, "name_or_path", None)
        model_dir = src if isinstance(src, str) and os.path.isdir(src) else None
    read = read_store(path, tokenizer, context_len, default_max_tokens, model_dir=model_dir)
    s = read.store
    exact = [json.loads(t).get("ignore_eos") is True for t in s.sampling_table]  # per interned sampling
    records = [Record(s.custom_id(i), int(n), (), int(m), KINDS[k], tuple(s.input_ids(i)), int(m), exact[g])
               for i, (n, m, k, g) in enumerate(zip(s.prompt_lengths(), s.max_tokens.view, s.kind.view,
                                                     s.sampling.view))]
    return BatchFile(records, read.errors, read.lines)


def compress(records: list[Record]) -> list[Record]:
    """The same prompts as prefix groups: each token prompt cut at the depths where the prefix
    tree of all prompts branches on its path, every segment a `Group` named by the first prompt
    (in sorted order) that holds it. The prefix tree, its aggregates and every shared prefix are
    unchanged (`tests/test_plan.py` checks it), while the tree and the simulator handle a few
    atoms per request instead of every token. Records without tokens pass through."""
    tok = [i for i, r in enumerate(records) if r.tokens is not None]
    arrays = {i: np.asarray(records[i].tokens, dtype=np.int64) for i in tok}
    if any(len(a) and (a.min() < 0 or a.max() >= 1 << 32) for a in arrays.values()):
        raise ValueError("compress: token ids must be in [0, 2**32)")
    # big-endian bytes sort as the id sequences do (a prefix first), compared by memcmp
    keys = {i: a.astype(">u4").tobytes() for i, a in arrays.items()}
    order = sorted(tok, key=keys.__getitem__)
    n = len(order)
    arrays = [arrays[i] for i in order]
    lcp = [0] * n  # lcp[k]: common prefix of sorted prompts k-1 and k
    for k in range(1, n):
        a, b = arrays[k - 1], arrays[k]
        m = min(len(a), len(b))
        diff = np.flatnonzero(a[:m] != b[:m])
        lcp[k] = int(diff[0]) if len(diff) else m
    # The branch depths on prompt k's path are its common prefixes with the others: the running
    # minima of lcp to its left and to its right (monotonic stacks). A prefix of depth d is held
    # by a contiguous run of sorted prompts; its first one names it.
    left: list[list[tuple[int, int]]] = []  # per k: (depth, first sorted index sharing it), depths increasing
    stack: list[tuple[int, int]] = []
    for k in range(n):
        if k:
            first = k - 1
            while stack and stack[-1][0] >= lcp[k]:
                first = min(first, stack.pop()[1])
            if lcp[k]:
                stack.append((lcp[k], first))
        left.append(list(stack))
    cuts: list[dict[int, int]] = [{} for _ in range(n)]
    right: list[int] = []
    for k in range(n - 1, -1, -1):
        nxt = lcp[k + 1] if k + 1 < n else 0
        while right and right[-1] >= nxt:
            right.pop()
        if nxt:
            right.append(nxt)
        for depth in {d for d, _ in left[k]} | set(right):
            cuts[k][depth] = next((f for d, f in left[k] if d >= depth), k)
    out = list(records)
    for k, i in enumerate(order):
        r = records[i]
        prefix, prev = [], 0
        for depth in sorted(cuts[k]):
            prefix.append((f"p{cuts[k][depth]}:{depth}", depth - prev))
            prev = depth
        out[i] = r._replace(prefix=tuple(prefix), tokens=None)
    return out
