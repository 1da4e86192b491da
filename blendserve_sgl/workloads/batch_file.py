"""A user's OpenAI batch file (`blendserve run`'s input) as workload records.

The file goes through `batch.reader.read_store`, the reader of `blendserve run` itself:
validated, rendered, tokenized and checked against the context exactly as the run does it;
bad lines come back as the same `LineError`s, with the same messages.

Without a tokenizer (a preset model name), `ByteTokenizer` stands in: one token per 4 bytes of
UTF-8 (the `approx_tokens` rule, folded into 31 bits), equal text giving equal tokens, so
shared prefixes stay shared.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import NamedTuple

import numpy as np

from ..batch.order import store_prefixes
from ..batch.reader import read_store
from ..batch.requests import LineError
from ..batch.store import KINDS, TokenStore, common_prefix
from .data import Record


class BatchFile(NamedTuple):
    records: list[Record]  # valid requests in file order; output_len = max_tokens
    errors: list[LineError]  # bad lines, named as `blendserve run` names them
    lines: int  # non-blank lines read
    store: TokenStore | None = None  # the reader's store (record i is its request i); `exact` reads it

    def exact(self, indices: list[int]) -> list[Record]:
        """Records `indices` (positions in `records`) with their prompts as exact prefix groups,
        among themselves: `compress` of their token prompts, built from the store's bytes. What
        `blendserve plan` simulates: the whole file is held in the store's view (`tokens=False`),
        and only the simulated sample is cut at every token where its prompts branch."""
        if self.store is None:
            raise ValueError("exact prefixes need the reader's store: load the file with tokens=False")
        prefixes = prefix_segments(list(self.store.prompt_keys(indices)))
        return [self.records[i]._replace(prefix=p) for i, p in zip(indices, prefixes)]


class ByteTokenizer:
    """Approximate tokens: one per 4 bytes of UTF-8; a plain role-tagged chat template. `vocab`:
    the model's vocabulary size when known (a preset's), which token-id prompts are checked
    against as the model's own tokenizer checks them."""

    chat_template = "role-tagged"

    def __init__(self, vocab: int | None = None):
        self.vocab = vocab

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Each 4 bytes of UTF-8 as a little-endian integer folded into 31 bits (a short last run
        read as if padded with zeros), [0] for no text: `encode_reference`, in NumPy."""
        b = text.encode("utf-8")
        if not b:
            return [0]
        b += b"\0" * (-len(b) % 4)
        return (np.frombuffer(b, "<u4") & np.uint32(0x7FFFFFFF)).tolist()

    @staticmethod
    def encode_reference(text: str) -> list[int]:
        b = text.encode("utf-8")
        return [int.from_bytes(b[i:i + 4], "little") & 0x7FFFFFFF for i in range(0, len(b), 4)] or [0]

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def __len__(self) -> int:
        return self.vocab or 1 << 31


def load_batch_file(path: str | os.PathLike, tokenizer, context_len: int, default_max_tokens: int,
                    model_dir: str | os.PathLike | None = None, *, tokens: bool = True) -> BatchFile:
    """Records of the valid lines of `path` (rid = custom_id, output_len and max_tokens = the
    request's max_tokens or the run's default capped to the context) and the bad lines. With
    `tokens`, each record holds its token prompt; without, its prompt as prefix groups
    (`compress`'s groups, built from the store's bytes: no token ids as Python objects, which held
    about 36 bytes per token). `model_dir` (default: the directory the tokenizer was loaded from)
    lets a large file be read by worker processes, as `blendserve run` reads it. Raises
    `batch.requests.InputError` when the file cannot be read at all.

    Without `tokens`, the groups are the store's view of each prompt, the one `blendserve run`
    plans with (`batch.order.store_prefixes`: its pieces, then the 32-token blocks of its tail that
    others share), which holds no token of a shared prompt per request; `BatchFile.exact` gives
    chosen records their exact groups (`prefix_segments`)."""
    if model_dir is None:
        src = getattr(tokenizer, "name_or_path", None)
        model_dir = src if isinstance(src, str) and os.path.isdir(src) else None
    read = read_store(path, tokenizer, context_len, default_max_tokens, model_dir=model_dir)
    s = read.store
    exact = [json.loads(t).get("ignore_eos") is True for t in s.sampling_table]  # per interned sampling
    prefixes = (tuple(g) for g in store_prefixes(s)) if not tokens else itertools.repeat(())
    records = [Record(s.custom_id(i), int(n), prefix, int(m), KINDS[k],
                      tuple(s.input_ids(i)) if tokens else None, int(m), exact[g])
               for i, (n, m, k, g, prefix) in enumerate(zip(s.prompt_lengths().tolist(), s.max_tokens.view.tolist(),
                                                             s.kind.view.tolist(), s.sampling.view.tolist(), prefixes))]
    return BatchFile(records, read.errors, read.lines, None if tokens else s)


def compress(records: list[Record]) -> list[Record]:
    """The same prompts as prefix groups (`prefix_segments`); records without tokens pass
    through. The prefix tree, its aggregates and every shared prefix are unchanged
    (`tests/test_plan.py` checks it), while the tree and the simulator handle a few atoms per
    request instead of every token."""
    tok = [i for i, r in enumerate(records) if r.tokens is not None]
    keys = []
    for i in tok:
        a = np.asarray(records[i].tokens, dtype=np.int64)
        if len(a) and (a.min() < 0 or a.max() >= 1 << 32):
            raise ValueError("compress: token ids must be in [0, 2**32)")
        keys.append(a.astype(">u4").tobytes())
    out = list(records)
    for i, prefix in zip(tok, prefix_segments(keys)):
        out[i] = records[i]._replace(prefix=prefix, tokens=None)
    return out


def prefix_segments(keys: list[bytes]) -> list[tuple]:
    """Each prompt (`keys`: its token ids as big-endian uint32 bytes, which sort as the id
    sequences do, a prefix first) cut at the depths where the prefix tree of all prompts branches
    on its path: its `prefix`, every segment a `Group` (name, tokens) named by the first prompt in
    sorted order that holds it; names are shared objects, one per segment."""
    n = len(keys)
    order = sorted(range(n), key=keys.__getitem__)
    lcp = [0] * n  # lcp[k]: common prefix (tokens) of sorted prompts k-1 and k
    prev = np.frombuffer(keys[order[0]], dtype=">u4") if n else None
    for k in range(1, n):
        cur = np.frombuffer(keys[order[k]], dtype=">u4")
        lcp[k] = common_prefix(prev, cur)
        prev = cur
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
    names: dict[tuple[int, int], str] = {}
    out: list[tuple] = [()] * n
    right: list[int] = []
    for k in range(n - 1, -1, -1):
        nxt = lcp[k + 1] if k + 1 < n else 0
        while right and right[-1] >= nxt:
            right.pop()
        if nxt:
            right.append(nxt)
        prefix, prev_depth, here, j = [], 0, left[k], 0
        for depth in sorted({d for d, _ in here} | set(right)):
            while j < len(here) and here[j][0] < depth:  # both ascend: one pass over the left stack
                j += 1
            first = here[j][1] if j < len(here) else k  # the first prompt sharing `depth` tokens
            name = names.get((first, depth))
            if name is None:
                name = names[(first, depth)] = f"p{first}:{depth}"
            prefix.append((name, depth - prev_depth))
            prev_depth = depth
        left[k] = None  # done with it
        out[order[k]] = tuple(prefix)
    return out
