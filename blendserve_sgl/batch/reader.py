"""The streaming pass over the input: read, validate, tokenize, store compactly.

Lines go to worker processes in batches (one tokenizer per worker, every core by default);
results come back in file order and land in a `TokenStore`. Bad lines become `LineError`s
in `errors` (the same checks and messages as `requests.py` and
`prompts.py`; the first line that uses a custom_id owns it).

A worker renders a chat template once per shape of conversation and fills in the contents
where that is exact (`TemplateShapes`). The text before the last message is cut before each
special token (`<|im_start|>` ...); its pieces are encoded once per worker and stored once (by
content digest), the rest is the request's tail, and a batch's tails are encoded together, each
distinct text once. Tokenizers split added tokens out before anything else, so the pieces
concatenate to exactly the ids of encoding the whole text; each worker checks this (and the
filled-in template) against `prompts.encode` on its first requests and every
`VERIFY_EVERY`-th one after, and renders and encodes whole texts from then on if they ever
differ. Completion and token-id prompts are one tail.

Every valid request is stored, also those already in the results file (`mark_done` flags
them): the plan is made over the whole input, so a resumed run continues the same order.
`index` lists every line's key and request digest for `results.reconcile`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .. import lifetime
from .prompts import (beyond_context, check_context, encode, id_limit, iterates_content, outside_model, render,
                      text_limit, tokenizer_failure)
from .requests import BatchRequest, LineError, check_readable, iter_lines, parse_line, repeated_id
from .store import KINDS, TokenStore

BATCH_LINES = 2000  # lines per task sent to a worker, ...
BATCH_BYTES = 16 << 20  # ... or fewer once they hold this many bytes (500 lines of 2 MB held 2.3 GB in the driver)
VERIFY_FIRST, VERIFY_EVERY = 32, 997
CHAT_WHAT = "the prompt (after the chat template)"  # how `prompts.render` names a chat prompt
PIECE_CACHE = 4096  # encoded pieces a worker remembers
TAIL_CACHE = 1 << 15  # encoded tails a worker remembers (a text asked again is encoded once)
CACHE_BYTES = 32 << 20  # ... and each of its caches at most this many bytes of text and ids
ENCODE_CHARS = 1 << 20  # characters given to the fast tokenizer in one call
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
    defaulted: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # per stored request: no max_tokens

    @property
    def lines(self) -> int:
        return len(self.index)

    def mark_done(self, keys) -> None:
        """Flag the stored requests (and count the lines) whose key is in `keys`."""
        s = self.store
        self.done = np.fromiter((s.custom_id(i) in keys for i in range(len(s))), bool, len(s))
        self.skipped = sum((k.custom_id if k.custom_id is not None else ("line", k.line)) in keys for k in self.index)


class TemplateShapes:
    """The chat template rendered once per shape (the roles in order) and filled by substitution.

    Used for the tokenizers of `transformers`, whose `apply_chat_template` renders the Jinja
    template `chat_template`. Exact when the template treats message content as opaque text: every use of `content` is
    output as is (alone or concatenated with `+` / `~`), never tested, filtered, sliced or
    assigned. `opaque(source)` proves that on the template's syntax tree; other templates (and
    shapes the template rejects) render through `prompts.render` every time."""

    LIMIT = 4096  # shapes remembered
    MARK = re.compile("\ue000(\\d+)\ue001")

    def __init__(self, tokenizer):
        self.tok = tokenizer
        method = getattr(type(tokenizer), "apply_chat_template", None)
        jinja = getattr(method, "__module__", "").startswith("transformers.")
        self.on = jinja and self.opaque(getattr(tokenizer, "chat_template", None))
        self.takes_lists = iterates_content(getattr(tokenizer, "chat_template", None))  # content parts as lists
        self.shapes: dict[tuple, list | None] = {}

    @staticmethod
    def opaque(source) -> bool:
        if not isinstance(source, str):
            return False
        try:
            from jinja2 import nodes
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            tree = ImmutableSandboxedEnvironment(extensions=[loopcontrols]).parse(source)
        except Exception:  # noqa: BLE001 (no jinja2 or a template it cannot parse: render every time)
            return False

        def ok(node, chain) -> bool:
            uses = (isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const)
                    and node.arg.value == "content") or (isinstance(node, nodes.Getattr) and node.attr == "content")
            if uses:
                k = len(chain) - 1
                while k >= 0 and isinstance(chain[k], (nodes.Add, nodes.Concat)):
                    k -= 1
                if k < 0 or not isinstance(chain[k], nodes.Output):
                    return False
                arg = getattr(node, "arg", None)  # the subscript's own "content" constant
                return all(ok(c, chain + [node]) for c in node.iter_child_nodes() if c is not arg)
            if isinstance(node, nodes.Const) and node.value == "content":
                return False
            return all(ok(c, chain + [node]) for c in node.iter_child_nodes())

        return ok(tree, [])

    def render(self, req, source: str):
        """Like `prompts.render` for a chat request (a message with a name, or content parts for a
        template that iterates them, renders whole: the shapes hold only roles and text contents)."""
        if not self.on or (req.parts is not None and self.takes_lists) or any("name" in m for m in req.messages):
            return render(req, self.tok, source)
        key = tuple(m["role"] for m in req.messages)
        parts = self.shapes.get(key, False)
        if parts is False:
            marked = [{"role": m["role"], "content": f"\ue000{i}\ue001"} for i, m in enumerate(req.messages)]
            try:
                text = self.tok.apply_chat_template(marked, tokenize=False, add_generation_prompt=True)
                parts = self.MARK.split(text)
                parts[1::2] = [int(i) for i in parts[1::2]]
            except Exception:  # noqa: BLE001 (the template rejects this shape: `render` says why)
                parts = None
            if len(self.shapes) >= self.LIMIT:
                self.shapes.clear()
            self.shapes[key] = parts
        if parts is None:
            return render(req, self.tok, source)
        msgs = req.messages
        return "".join(p if type(p) is str else msgs[p]["content"] for p in parts), CHAT_WHAT


class Staged(NamedTuple):
    """A request between its pieces and its tail: `text` still to encode (None: `tail` is set)."""

    req: BatchRequest
    digests: list  # the pieces' content digests
    ids: list  # the pieces' ids
    text: str | None
    special: bool  # encode `text` with the tokenizer's special tokens (completion prompts)
    tail: np.ndarray | None
    fast: bool  # rendered by substitution and/or cut in pieces: checked against `prompts.encode` on a sample


class _Cache(dict):
    """A dict emptied when it would hold more than `entries` keys or `limit` bytes (text and
    ids, as `add` is told). Counting entries alone let a worker keep 32,768 tails of a file whose
    prompts are all distinct: 2.5 GB of text and ids at 10,000 tokens a prompt."""

    def __init__(self, entries: int, limit: int | None = None):
        super().__init__()
        self.entries, self.limit, self.held = entries, CACHE_BYTES if limit is None else limit, 0

    def add(self, key, value, size: int):
        if len(self) >= self.entries or self.held + size > self.limit:
            self.clear()
            self.held = 0
        if size <= self.limit:  # a text larger than the whole cache is not kept
            self[key] = value
            self.held += size
        return value


def _text_bytes(text: str) -> int:
    return len(text) * (1 if text.isascii() else 4)  # what the str holds, at most (UTF-32 for non-ASCII)


class PieceEncoder:
    """Encodes requests into (pieces, tail) as the module docstring describes: `stage` each
    request, then `finish` them together (their tails encoded in one batch)."""

    def __init__(self, tokenizer, context_len: int, default_max_tokens: int, source: str, model_dir=None):
        self.tok = tokenizer
        self.limit = id_limit(tokenizer, model_dir)  # the ids the model has
        self.text_limit = text_limit(tokenizer, self.limit)  # None: text ids are the tokenizer's own
        self.ctx, self.default_max_tokens, self.source = context_len, default_max_tokens, source
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        specials = sorted((str(t) for t in added.values() if not getattr(t, "lstrip", False)), key=len, reverse=True)
        if not specials:
            specials = sorted(getattr(tokenizer, "added_tokens_encoder", {}) or {}, key=len, reverse=True)
        self.cut = re.compile("(?=" + "|".join(map(re.escape, specials)) + ")") if specials else None
        backend = getattr(tokenizer, "_tokenizer", None)
        self.fast = backend if hasattr(backend, "encode_batch") else None
        self.shapes = TemplateShapes(tokenizer)
        self.cache = _Cache(PIECE_CACHE)  # piece text -> (digest, ids)
        self.heads = _Cache(PIECE_CACHE)  # `_pieces` arguments -> its result
        self.tails = (_Cache(TAIL_CACHE), _Cache(TAIL_CACHE))  # text -> ids (or the tokenizer's exception); without, with specials
        self.sent: set[int] = set()
        self.seen = 0
        self.exact = True

    def stage(self, req) -> Staged | LineError:
        too_long = beyond_context(req, self.tok, self.ctx, self.source)
        if too_long is not None:
            return too_long
        if req.kind != "chat":
            rendered = render(req, self.tok, self.source, self.limit)
            if isinstance(rendered, LineError):
                return rendered
            text = rendered[0]
            tail = None if text is not None else np.asarray(req.prompt, dtype=np.int32)
            return Staged(req, [], [], text, True, tail, False)
        fast = self.exact and (self.shapes.on or self.cut is not None)
        rendered = self.shapes.render(req, self.source) if fast else render(req, self.tok, self.source)
        if isinstance(rendered, LineError):
            return rendered
        text = rendered[0]
        if self.cut is None or not fast:
            return Staged(req, [], [], text, False, None, fast)
        last = req.messages[-1]["content"]
        at = text.rfind(last) if last else -1
        head = text[:at] if at >= 0 else text
        key = (head, at < 0 or self.cut.match(text, at) is not None)
        hit = self.heads.get(key)
        if hit is None:
            hit = self._pieces(*key)  # its pieces' ids are the piece cache's arrays: the head's text is its cost
            hit = self.heads.add(key, hit, _text_bytes(head) + _text_bytes(hit[2]))
        digests, ids, rest = hit
        return Staged(req, digests, ids, rest + text[len(head):], False, None, True)

    def _pieces(self, head: str, whole: bool) -> tuple[list, list, str]:
        """`head` (the text before the last message) cut before each special token ->
        (digests, ids) of its pieces and the text of the last one, which starts the tail,
        unless `whole` (the tail starts right after `head`)."""
        parts = [p for p in self.cut.split(head) if p]
        rest = "" if whole or not parts else parts.pop()
        digests, ids = [], []
        for p in parts:
            hit = self.cache.get(p)
            if hit is None:
                d = int.from_bytes(hashlib.blake2b(p.encode(), digest_size=8).digest(), "little", signed=True)
                encoded = self._encode([p], False)[0]
                hit = self.cache.add(p, (d, encoded), _text_bytes(p) + encoded.nbytes)
            digests.append(hit[0])
            ids.append(hit[1])
        return digests, ids, rest

    def _encode(self, texts: list[str], special: bool) -> list[np.ndarray]:
        """Each text's ids (int32). The fast tokenizer is given at most `ENCODE_CHARS` characters a
        call: its results hold offsets and masks beside the ids, and a whole batch of long prompts
        (16 MB) in one call made a worker's peak (`bench/long_prompts_memory.py`)."""
        if self.fast is None:
            return [np.asarray(self.tok.encode(t, add_special_tokens=special), np.int32) for t in texts]
        out, start = [], 0
        while start < len(texts):
            stop, size = start + 1, len(texts[start])
            while stop < len(texts) and size + len(texts[stop]) <= ENCODE_CHARS:
                size += len(texts[stop])
                stop += 1
            out += [np.asarray(e.ids, np.int32)
                    for e in self.fast.encode_batch(texts[start:stop], add_special_tokens=special)]
            start = stop
        return out

    def finish(self, staged: list) -> list:
        """Staged requests -> for each, (piece digests, piece ids, tail ids int32, max_tokens)
        or a LineError, in order."""
        tails: list = [s.tail for s in staged]
        for special in (False, True):
            cache = self.tails[special]
            todo = [k for k, s in enumerate(staged) if s.tail is None and s.special == special and s.text]
            known = {staged[k].text: cache[staged[k].text] for k in todo if staged[k].text in cache}
            texts = list(dict.fromkeys(staged[k].text for k in todo if staged[k].text not in known))
            try:
                encoded = self._encode(texts, special)
            except Exception:  # noqa: BLE001 (one text the tokenizer rejects: find it, one at a time)
                encoded = []
                for t in texts:
                    try:
                        encoded.append(self._encode([t], special)[0])
                    except Exception as exc:  # noqa: BLE001 (its requests get their own error records)
                        encoded.append(exc)
            for t, ids in zip(texts, encoded):
                known[t] = ids
                cache.add(t, ids, _text_bytes(t) + getattr(ids, "nbytes", 0))
            for k in todo:
                ids = known[staged[k].text]
                tails[k] = tokenizer_failure(staged[k].req, self.source, ids) if isinstance(ids, Exception) else ids
        return [self._check(s, t if t is not None else np.zeros(0, np.int32)) for s, t in zip(staged, tails)]

    def _check(self, s: Staged, tail):
        if isinstance(tail, LineError):
            return tail
        req, digests, ids = s.req, s.digests, s.ids
        if s.fast:
            self.seen += 1
            if not self.exact or self.seen <= VERIFY_FIRST or self.seen % VERIFY_EVERY == 0:
                whole = encode(req, self.tok, self.source, self.limit)
                if (not self.exact or isinstance(whole, LineError)
                        or np.concatenate(ids + [tail]).tolist() != whole[0]):
                    self.exact = False
                    if isinstance(whole, LineError):
                        return whole
                    digests, ids = [], []
                    tail = np.asarray(whole[0], np.int32)
        n = len(tail) + sum(len(p) for p in ids)
        what = CHAT_WHAT if req.kind == "chat" else "the prompt"
        if self.text_limit is not None:
            top = max((int(a.max()) for a in (*ids, tail) if len(a)), default=-1)
            beyond = outside_model(req, top, what, self.text_limit, self.source)
            if beyond is not None:
                return beyond
        max_tokens = check_context(req, n, what, self.ctx, self.default_max_tokens, self.source)
        return max_tokens if isinstance(max_tokens, LineError) else (digests, ids, tail, max_tokens)


# ---------------------------------------------------------------------- worker side
_encoder: PieceEncoder | None = None
_init_error = ""


class WorkerError(RuntimeError):
    """A worker could not load the tokenizer."""


def _init_worker(model_dir: str, context_len: int, default_max_tokens: int, source: str) -> None:
    global _encoder, _init_error
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    lifetime.watch()  # a `kill -9` of the run left the pool's workers idle at about 500 MB each (a probe)
    try:
        from transformers import AutoTokenizer

        _encoder = PieceEncoder(AutoTokenizer.from_pretrained(model_dir), context_len, default_max_tokens, source,
                                model_dir)
    except Exception as exc:  # noqa: BLE001 (reported by the first task; the driver reads in-process)
        _init_error = f"{type(exc).__name__}: {exc}"


class Encoded(NamedTuple):
    """A worker's batch: `order` lists each non-blank line's LineError or index into the
    accepted requests' columns (as `TokenStore.add_many` takes them)."""

    order: list
    pieces: dict  # {digest: ids} of the pieces this worker had not handed over yet
    exact: bool  # every checked piece-wise encoding matched the whole-text one
    line: np.ndarray
    custom_ids: list
    kind: np.ndarray
    models: list
    samplings: list
    max_tokens: np.ndarray
    ref_digests: np.ndarray
    ref_counts: np.ndarray
    tails: np.ndarray
    tail_lens: np.ndarray
    digests: list  # request_digest (hex) of each accepted request
    defaulted: np.ndarray  # per accepted request: it gave no max_tokens (the default applies)

    def select(self, keep: np.ndarray) -> dict:
        """The columns of the accepted requests `keep` (a boolean mask), as `add_many` keywords."""
        pick = lambda xs: [x for x, k in zip(xs, keep) if k]  # noqa: E731
        return dict(line=self.line[keep], custom_ids=pick(self.custom_ids), kind=self.kind[keep],
                    models=pick(self.models), samplings=pick(self.samplings), max_tokens=self.max_tokens[keep],
                    ref_digests=self.ref_digests[np.repeat(keep, self.ref_counts)], ref_counts=self.ref_counts[keep],
                    tails=self.tails[np.repeat(keep, self.tail_lens)], tail_lens=self.tail_lens[keep],
                    digests=b"".join(bytes.fromhex(d) for d in pick(self.digests)))


def _work(batch: list[tuple[int, bytes]]) -> Encoded:
    """Lines -> their `Encoded` batch."""
    enc = _encoder
    if enc is None:
        raise WorkerError(_init_error)
    order: list = []
    staged: list = []
    for number, raw in batch:
        req = parse_line(raw, number, enc.source)
        if isinstance(req, LineError):
            order.append(req)
            continue
        try:
            s = enc.stage(req)
        except Exception as exc:  # noqa: BLE001 (the tokenizer failed on this request: its own error record)
            s = tokenizer_failure(req, enc.source, exc)
        if isinstance(s, LineError):
            order.append(s if s.digest else replace(s, digest=req.digest))
            continue
        order.append(len(staged))
        staged.append(s)
    done = enc.finish(staged)
    pieces, reqs, tails, refs, counts, maxes = {}, [], [], [], [], []
    for k, item in enumerate(order):
        if type(item) is not int:
            continue
        req, out = staged[item].req, done[item]
        if isinstance(out, LineError):
            order[k] = out if out.digest else replace(out, digest=req.digest)
            continue
        digests, ids, tail, max_tokens = out
        for d, piece in zip(digests, ids):
            if d not in enc.sent:  # each piece goes to the driver once, with the first request using it
                enc.sent.add(d)
                pieces[d] = piece
        order[k] = len(reqs)
        reqs.append(req)
        tails.append(tail)
        refs += digests
        counts.append(len(digests))
        maxes.append(max_tokens)
    return Encoded(order, pieces, enc.exact, np.array([r.line for r in reqs], np.int64), [r.custom_id for r in reqs],
                   np.array([KINDS.index(r.kind) for r in reqs], np.int8), [r.model for r in reqs],
                   [json.dumps(r.sampling, sort_keys=True) for r in reqs], np.array(maxes, np.int32),
                   np.array(refs, np.int64), np.array(counts, np.int64),
                   np.concatenate(tails) if tails else np.zeros(0, np.int32),
                   np.array([len(t) for t in tails], np.int64), [r.digest for r in reqs],
                   np.array([r.max_tokens is None for r in reqs], bool))


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
    defaulted: list = []

    def take(got: Encoded) -> None:
        store = out.store
        for d, ids in got.pieces.items():
            store.add_piece(d, ids)
        out.whole_text_fallback |= not got.exact
        keep = np.ones(len(got.custom_ids), bool)
        for item in got.order:
            if type(item) is int:
                line, cid, digest = int(got.line[item]), got.custom_ids[item], got.digests[item]
                if cid in owner:
                    errors.append(repeated_id(line, cid, owner[cid], p.name, digest))
                    index.append(LineKey(line, None, digest))
                    keep[item] = False
                else:
                    owner[cid] = line
                    index.append(LineKey(line, cid, digest))
                continue
            cid = item.custom_id
            if cid is not None and cid in owner:
                item = repeated_id(item.line, cid, owner[cid], p.name, item.digest)
            elif cid is not None:
                owner[cid] = item.line
            errors.append(item)
            index.append(LineKey(item.line, item.custom_id, item.digest))
        if keep.any():
            store.add_many(**got.select(keep))
            defaulted.append(got.defaulted[keep])
        if tick is not None:
            tick(len(index))

    global _encoder
    batches = _batches(p, batch_lines)
    if workers <= 0:
        _encoder = PieceEncoder(tokenizer, context_len, default_max_tokens, p.name, model_dir)
        for b in batches:
            take(_work(b))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        try:  # a worker that dies (the OOM killer) breaks the pool: the read starts over in this process
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                     initargs=(str(model_dir), context_len, default_max_tokens, p.name)) as pool:
                pending: deque = deque()
                for b in batches:
                    pending.append(pool.submit(_work, b))
                    while len(pending) > 2 * workers:
                        take(pending.popleft().result())
                while pending:
                    take(pending.popleft().result())
        except BrokenProcessPool as exc:
            raise WorkerError(f"a reader process died ({exc})") from None
    out.done = np.zeros(len(out.store), bool)
    out.defaulted = np.concatenate(defaulted) if defaulted else np.zeros(0, bool)
    return out


def _batches(path: Path, size: int, max_bytes: int = BATCH_BYTES):
    """(line number, raw line) in batches of `size` lines, a batch closed early once its lines hold
    `max_bytes` (the driver keeps 2 x workers batches in flight: bounded by bytes, not lines)."""
    batch, held = [], 0
    with open(path, "rb") as f:
        for number, raw in iter_lines(f):
            batch.append((number, raw))
            held += len(raw) if isinstance(raw, (bytes, bytearray)) else 0
            if len(batch) >= size or held >= max_bytes:
                yield batch
                batch, held = [], 0
    if batch:
        yield batch
