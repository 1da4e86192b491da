"""A user's OpenAI batch file (`blendserve run`'s input) as workload records.

Lines are read and validated by `batch.requests.read_requests` and tokenized and checked
against the context by `batch.prompts.prepare`, exactly as `blendserve run` does; bad lines
come back as the same `LineError`s, with the same messages. Tokenization is batched: chat
templates are rendered first, then every text goes through one call of the (fast) tokenizer,
and `prepare` reads the ids from that table.

Without a tokenizer (a preset model name), `ByteTokenizer` stands in: one token per 4 bytes of
UTF-8 (the `approx_tokens` rule), equal text giving equal tokens, so shared prefixes stay shared.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from ..batch.prompts import Prepared, prepare
from ..batch.requests import BatchRequest, LineError, read_requests
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
        return [int.from_bytes(b[i:i + 4], "little") for i in range(0, len(b), 4)] or [0]

    def apply_chat_template(self, messages, tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages)
        return text + ("<|assistant|>\n" if add_generation_prompt else "")

    def __len__(self) -> int:
        return 1 << 32

    def __call__(self, texts: list[str], add_special_tokens: bool = True) -> dict:
        return {"input_ids": [self.encode(t, add_special_tokens) for t in texts]}


class _Batched:
    """`tokenizer` with every text of `requests` encoded by one batched call up front."""

    def __init__(self, tokenizer, requests: list[BatchRequest]):
        self.tokenizer = tokenizer
        self.chat_template = getattr(tokenizer, "chat_template", None)
        self._chat: dict[tuple, str] = {}
        texts: dict[tuple[str, bool], None] = {}
        for r in requests:
            if r.kind == "chat":
                if not self.chat_template:
                    continue
                try:
                    text = tokenizer.apply_chat_template(list(r.messages), tokenize=False, add_generation_prompt=True)
                except Exception:  # noqa: BLE001 (prepare calls it again and names the line)
                    continue
                self._chat[tuple(map(id, r.messages))] = text
                texts[(text, False)] = None
            elif isinstance(r.prompt, str):
                texts[(r.prompt, True)] = None
        self._ids: dict[tuple[str, bool], list[int]] = {}
        for special in (False, True):
            batch = [t for t, s in texts if s is special]
            if batch:
                for t, ids in zip(batch, tokenizer(batch, add_special_tokens=special)["input_ids"]):
                    self._ids[(t, special)] = ids

    def apply_chat_template(self, messages, **kwargs) -> str:
        text = self._chat.get(tuple(map(id, messages)))
        return text if text is not None else self.tokenizer.apply_chat_template(messages, **kwargs)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._ids.get((text, add_special_tokens))
        return ids if ids is not None else self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def __len__(self) -> int:
        return len(self.tokenizer)


def load_batch_file(path: str | os.PathLike, tokenizer, context_len: int, default_max_tokens: int) -> BatchFile:
    """Records of the valid lines of `path` (rid = custom_id, token prompts, output_len and
    max_tokens = the request's max_tokens or the run's default capped to the context) and the
    bad lines. Raises `batch.requests.InputError` when the file cannot be read at all."""
    items = list(read_requests(path))
    valid = [i for i in items if not isinstance(i, LineError)]
    batched = _Batched(tokenizer, valid)
    source = os.path.basename(path)
    records, errors = [], []
    for item in items:
        if not isinstance(item, LineError):
            item = prepare(item, batched, context_len, default_max_tokens, source)
        if isinstance(item, Prepared):
            records.append(Record(item.request.custom_id, len(item.input_ids), (), item.max_tokens, item.request.kind,
                                  tuple(item.input_ids), item.max_tokens))
        else:
            errors.append(item)
    return BatchFile(records, errors, len(items))


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
