"""The streaming pass over the input: read, validate, tokenize, store compactly.

Lines go to worker processes in batches (one tokenizer per worker, every core by default);
results come back in file order and land in a `TokenStore`. Bad lines become `LineError`s
in `errors` (the same checks and messages as `requests.py` and
`prompts.py`; the first line that uses a custom_id owns it).

Chat prompts are encoded in pieces: the rendered template is cut before each special token
(`<|im_start|>` ...), every piece before the last message is encoded once per worker and
stored once (by content digest), the rest is the request's tail. Tokenizers split special
tokens out before anything else, so the pieces concatenate to exactly the ids of encoding
the whole text; each worker checks this against the whole-text encode (`prompts.prepare`) on
its first requests and every `VERIFY_EVERY`-th one after, and encodes whole texts from then on
if they ever differ. Completion and token-id prompts are one tail.

Every valid request is stored, also those already in the results file (`mark_done` flags
them): the plan is made over the whole input, so a resumed run continues the same order.
`index` lists every line's key and request digest for `results.reconcile`.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .prompts import check_context, prepare, render, tokenizer_failure
from .requests import BOM, LineError, check_readable, parse_line, repeated_id
from .store import TokenStore

BATCH_LINES = 2000  # lines per task sent to a worker
VERIFY_FIRST, VERIFY_EVERY = 32, 997
PIECE_CACHE = 4096  # encoded pieces a worker remembers
SMALL_INPUT_BYTES = 8 << 20  # smaller inputs are read in the driver (starting workers costs more)


class LineKey(NamedTuple):
    """What `results.reconcile` needs of an input line."""

    line: int
    custom_id: str | None  # None: the record is keyed by its line
    digest: str


@dataclass
class ReadResult:
    store: TokenStore
    index: list = field(default_factory=list)  # LineKey of every non-blank line, in file order
    errors: list = field(default_factory=list)  # LineError of each bad line, in file order
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per stored request (`mark_done`)
    skipped: int = 0  # lines whose key is done (`mark_done`)
    whole_text_fallback: bool = False  # a worker found pieces that did not match whole-text encoding

    @property
    def lines(self) -> int:
        return len(self.index)

    def mark_done(self, keys) -> None:
        """Flag the stored requests (and count the lines) whose key is in `keys`."""
        s = self.store
        self.done = np.fromiter((s.custom_id(i) in keys for i in range(len(s))), bool, len(s))
        self.skipped = sum((k.custom_id if k.custom_id is not None else ("line", k.line)) in keys for k in self.index)


class PieceEncoder:
    """Encodes one request into (pieces, tail) as the module docstring describes."""

    def __init__(self, tokenizer, context_len: int, default_max_tokens: int, source: str):
        self.tok = tokenizer
        self.ctx, self.default_max_tokens, self.source = context_len, default_max_tokens, source
        specials = sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}, key=len, reverse=True)
        self.cut = re.compile("(?=" + "|".join(map(re.escape, specials)) + ")") if specials else None
        self.cache: dict[str, tuple[int, np.ndarray]] = {}
        self.sent: set[int] = set()
        self.seen = 0
        self.exact = True

    def encode(self, req):
        """-> (digests, new_pieces {digest: ids}, tail ids int32, max_tokens) or LineError."""
        rendered = render(req, self.tok, self.source)
        if isinstance(rendered, LineError):
            return rendered
        text, what = rendered
        digests, new, ids, tail = [], {}, [], None
        if text is None:
            tail = np.asarray(req.prompt, dtype=np.int32)
        elif req.kind != "chat" or self.cut is None or not self.exact:
            tail = np.asarray(self.tok.encode(text, add_special_tokens=req.kind != "chat"), dtype=np.int32)
        else:
            last = req.messages[-1]["content"]
            at = text.rfind(last) if last else -1
            parts = [p for p in self.cut.split(text) if p]
            start, pos = len(parts), 0
            for k, p in enumerate(parts):
                if at >= 0 and pos + len(p) > at:
                    start = k
                    break
                pos += len(p)
            for p in parts[:start]:
                hit = self.cache.get(p)
                if hit is None:
                    if len(self.cache) >= PIECE_CACHE:
                        self.cache.clear()
                    d = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little", signed=True)
                    hit = self.cache[p] = (d, np.asarray(self.tok.encode(p, add_special_tokens=False), np.int32))
                d, piece = hit
                digests.append(d)
                ids.append(piece)
                if d not in self.sent:
                    self.sent.add(d)
                    new[d] = piece
            rest = "".join(parts[start:])
            tail = np.asarray(self.tok.encode(rest, add_special_tokens=False) if rest else [], np.int32)
            self.seen += 1
            if self.seen <= VERIFY_FIRST or self.seen % VERIFY_EVERY == 0:
                whole = prepare(req, self.tok, 1 << 62, 1, self.source)
                if np.concatenate(ids + [tail]).tolist() != whole.input_ids:
                    self.exact = False
                    self.sent.difference_update(new)
                    digests, new, ids = [], {}, []
                    tail = np.asarray(whole.input_ids, np.int32)
        n = len(tail) + sum(len(p) for p in ids)
        max_tokens = check_context(req, n, what, self.ctx, self.default_max_tokens, self.source)
        if isinstance(max_tokens, LineError):
            self.sent.difference_update(new)  # not handed over: send them with the next request using them
            return max_tokens
        return digests, new, tail, max_tokens


# ---------------------------------------------------------------------- worker side
_encoder: PieceEncoder | None = None
_init_error = ""


class WorkerError(RuntimeError):
    """A worker could not load the tokenizer."""


def _init_worker(model_dir: str, context_len: int, default_max_tokens: int, source: str) -> None:
    global _encoder, _init_error
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        from transformers import AutoTokenizer

        _encoder = PieceEncoder(AutoTokenizer.from_pretrained(model_dir), context_len, default_max_tokens, source)
    except Exception as exc:  # noqa: BLE001 (reported by the first task; the driver reads in-process)
        _init_error = f"{type(exc).__name__}: {exc}"


def _work(batch: list[tuple[int, bytes]]) -> tuple[list, dict, np.ndarray, bool]:
    """Lines -> (items in line order, new pieces, tails back to back, exact). An item is a
    LineError or (line, custom_id, kind, model, sampling, max_tokens, digests, tail_len, digest)."""
    enc = _encoder
    if enc is None:
        raise WorkerError(_init_error)
    items, new, tails = [], {}, []
    for number, raw in batch:
        req = parse_line(raw, number, enc.source)
        try:
            out = req if isinstance(req, LineError) else enc.encode(req)
        except Exception as exc:  # noqa: BLE001 (the tokenizer failed on this request: its own error record)
            enc.sent.clear()  # pieces it marked sent may not have been handed over: send again when used
            out = tokenizer_failure(req, enc.source, exc)
        if isinstance(out, LineError):
            items.append(out if out.digest or isinstance(req, LineError) else replace(out, digest=req.digest))
            continue
        digests, fresh, tail, max_tokens = out
        new.update(fresh)
        tails.append(tail)
        items.append((number, req.custom_id, req.kind, req.model, req.sampling, max_tokens, digests, len(tail),
                      req.digest))
    joined = np.concatenate(tails) if tails else np.zeros(0, np.int32)
    return items, new, joined, enc.exact


# ---------------------------------------------------------------------- driver side
def read_store(path: str | os.PathLike[str], tokenizer, context_len: int, default_max_tokens: int, *,
               model_dir: str | Path | None = None, workers: int | None = None,
               tick: Callable[[int], None] | None = None, batch_lines: int = BATCH_LINES) -> ReadResult:
    """Read `path` (once: a pipe works) into a `TokenStore` (see module doc). `workers`
    processes, each loading the tokenizer from `model_dir` (default: every core for a regular
    file over `SMALL_INPUT_BYTES`, else 0); 0 reads in this process with `tokenizer`, as does a
    pool whose workers cannot load it. `tick(lines_read)` after each batch."""
    p = check_readable(path)
    if workers is None:
        big = stat.S_ISREG(os.stat(p).st_mode) and os.stat(p).st_size > SMALL_INPUT_BYTES
        workers = (os.cpu_count() or 1) if big else 0
    if model_dir is None or not stat.S_ISREG(os.stat(p).st_mode):
        workers = 0  # a stream cannot be read a second time if the pool fails
    if workers > 0:
        try:
            return _read(p, tokenizer, context_len, default_max_tokens, model_dir, workers, tick, batch_lines)
        except WorkerError:
            pass
    return _read(p, tokenizer, context_len, default_max_tokens, model_dir, 0, tick, batch_lines)


def _read(p: Path, tokenizer, context_len, default_max_tokens, model_dir, workers, tick, batch_lines) -> ReadResult:
    out = ReadResult(TokenStore())
    owner: dict[str, int] = {}
    errors, index = out.errors, out.index

    def take(result) -> None:
        items, new, tails, exact = result
        store = out.store
        for d, ids in new.items():
            store.add_piece(d, ids)
        out.whole_text_fallback |= not exact
        at = 0
        for item in items:
            if isinstance(item, LineError):
                cid = item.custom_id
                if cid is not None and cid in owner:
                    item = repeated_id(item.line, cid, owner[cid], p.name, item.digest)
                elif cid is not None:
                    owner[cid] = item.line
                errors.append(item)
                index.append(LineKey(item.line, item.custom_id, item.digest))
                continue
            line, cid, kind, model, sampling, max_tokens, digests, n, digest = item
            tail, at = tails[at:at + n], at + n
            if cid in owner:
                errors.append(repeated_id(line, cid, owner[cid], p.name, digest))
                index.append(LineKey(line, None, digest))
                continue
            owner[cid] = line
            index.append(LineKey(line, cid, digest))
            store.add(line=line, custom_id=cid, kind=kind, model=model, sampling=sampling, max_tokens=max_tokens,
                      piece_digests=digests, tail=tail, digest=digest)
        if tick is not None:
            tick(len(index))

    global _encoder
    batches = _batches(p, batch_lines)
    if workers <= 0:
        _encoder = PieceEncoder(tokenizer, context_len, default_max_tokens, p.name)
        for b in batches:
            take(_work(b))
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(workers, _init_worker,
                                          (str(model_dir), context_len, default_max_tokens, p.name)) as pool:
            pending: deque = deque()
            for b in batches:
                pending.append(pool.apply_async(_work, (b,)))
                while len(pending) > 2 * workers:
                    take(pending.popleft().get())
            while pending:
                take(pending.popleft().get())
    out.done = np.zeros(len(out.store), bool)
    return out


def _batches(path: Path, size: int):
    batch = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if number == 1 and raw.startswith(BOM):
                raw = raw[len(BOM):]
            if raw.strip():
                batch.append((number, raw))
                if len(batch) >= size:
                    yield batch
                    batch = []
    if batch:
        yield batch
