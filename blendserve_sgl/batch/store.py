"""Compact storage of a whole batch of tokenized requests (no per-request Python objects).

Token ids live in *pieces*: runs of a prompt that are stored once however many requests use
them (a system prompt, a few-shot turn, the template text between them), and one unshared
*tail* per request (everything from its last message on). Layout, all NumPy and growable:

    piece_tokens int32[...]   token ids of every piece, back to back; piece_off int64[pieces+1]
    tail_tokens  int32[...]   token ids of every tail, back to back;  tail_off  int64[n+1]
    ref_ids      int32[...]   the pieces each request starts with;    ref_off   int64[n+1]
    line int64, max_tokens int32, sampling int32, model int16, kind int8     (one per request)
    custom ids   utf-8 bytes back to back;                             cid_off   int64[n+1]
    digests      16 bytes per request (the line's `request_digest`)

A request's prompt is its pieces in order followed by its tail. Sampling parameters and model
names are interned in small tables.

Shared heads (`Heads`): a tail that starts as an earlier tail did (the same piece before it and
the same first `HEAD_BLOCK` tokens: a few-shot header in completion prompts, a document many
questions quote) is compared with that tail once, and the whole blocks they share become pieces
of `HEAD_BLOCK` tokens each; later tails with that start take as many of those blocks as they
match. So a million completions behind one 2,000-token header hold it once (plus a 4-byte
reference per block) instead of a million times. The first tail of a head stays whole. Bounded:
at most `HEAD_KEYS` starts remembered and `HEAD_BYTES` of head tokens.

`nbytes()` counts the bytes in use; per request that is `REQUEST_BYTES + 4 x (tail tokens +
pieces referenced) + len(custom_id)`, plus each distinct piece once and the heads' own
(`Heads.nbytes`). `prepared(i)` rebuilds one `Prepared` for the engine and the result writer.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

from .prompts import Prepared
from .requests import BatchRequest

KINDS = ("chat", "completion")
DIGEST_BYTES = 16
# line 8 + max_tokens 4 + sampling 4 + model 2 + kind 1 + three offsets (tail, ref, cid) 3 x 8 + digest 16
REQUEST_BYTES = 8 + 4 + 4 + 2 + 1 + 3 * 8 + DIGEST_BYTES


class _Grow:
    """A growable 1-D NumPy array (amortized doubling)."""

    __slots__ = ("a", "n")

    def __init__(self, dtype, first=()):
        self.a = np.zeros(max(16, len(first)), dtype=dtype)
        self.n = 0
        if len(first):
            self.extend(first)

    def extend(self, values) -> None:
        values = np.asarray(values, dtype=self.a.dtype)
        need = self.n + len(values)
        if need > len(self.a):
            bigger = np.zeros(max(need, 2 * len(self.a)), dtype=self.a.dtype)
            bigger[:self.n] = self.a[:self.n]
            self.a = bigger
        self.a[self.n:need] = values
        self.n = need

    def append(self, value) -> None:
        if self.n == len(self.a):
            self.extend([value])
        else:
            self.a[self.n] = value
            self.n += 1

    @property
    def view(self) -> np.ndarray:
        return self.a[:self.n]

    @property
    def nbytes(self) -> int:
        return self.n * self.a.itemsize


HEAD_BLOCK = 32  # tokens: shared heads are cut in whole blocks (the global plan's tail block)
HEAD_KEYS = 1 << 18  # tail starts remembered (a dict entry each, ~100 bytes)
HEAD_BYTES = 64 << 20  # head tokens kept for comparison


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def block_sums(tokens: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of a (blocks, block) token matrix (a token's weight by its place)."""
    weights = mix64(np.arange(1, tokens.shape[1] + 1, dtype=np.uint64)) | np.uint64(1)  # odd
    with np.errstate(over="ignore"):
        return mix64((tokens.astype(np.uint64) * weights).sum(axis=1))


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


class Heads:
    """Shared heads of tails (module docstring): tail starts seen (key -> the store index of the
    first tail with it, or -(k + 1) for head k once a second tail shared whole blocks with it)."""

    def __init__(self, max_keys: int = HEAD_KEYS, max_bytes: int = HEAD_BYTES):
        self.max_keys, self.max_bytes = max_keys, max_bytes
        self.seen: dict[int, int] = {}
        self.heads: list[tuple[np.ndarray, np.ndarray]] = []  # (piece ids, tokens) of each head
        self.bytes = 0

    def nbytes(self) -> int:
        """The heads' tokens and piece ids, and about 100 bytes a remembered start."""
        return self.bytes + 100 * len(self.seen)

    def split(self, store: "TokenStore", ref_pids: np.ndarray, counts: np.ndarray, tails: np.ndarray,
              lens: np.ndarray):
        """The batch about to be appended to `store` (its requests' piece ids and tails) with the
        shared heads of its tails moved to pieces: (ref_pids, counts, tails, lens) again."""
        block = HEAD_BLOCK
        n, base = len(lens), len(store)
        ref_at = np.concatenate(([0], np.cumsum(counts)))
        tail_at = np.concatenate(([0], np.cumsum(lens)))
        cuts: dict[int, np.ndarray] = {}  # batch request -> the head pieces it starts its tail with
        rows = np.flatnonzero(lens > 2 * block)
        if not len(rows):
            return ref_pids, counts, tails, lens
        last = ref_pids[np.maximum(ref_at[rows + 1] - 1, 0)] if len(ref_pids) else np.zeros(len(rows), np.int32)
        before = np.where(counts[rows] > 0, last.astype(np.int64), -1)  # the piece before the tail, -1: none
        with np.errstate(over="ignore"):  # the start's key: the piece before and the first block (a collision
            # only costs a comparison)
            keys = mix64(block_sums(tails[tail_at[rows][:, None] + np.arange(block)])
                         ^ mix64(before.astype(np.uint64) + np.uint64(1)))
        seen, room = self.seen, self.max_keys - len(self.seen)
        for i, key in zip(rows.tolist(), keys.tolist()):
            hit = seen.get(key)
            if hit is None:
                if room > 0:
                    seen[key] = base + i
                    room -= 1
                continue
            tail = tails[tail_at[i]:tail_at[i + 1]]
            if hit >= 0:  # the first tail with this start: the blocks both hold become a head
                r = hit - base
                first = store.tail(hit) if r < 0 else tails[tail_at[r]:tail_at[r + 1]]
                m = common_prefix(tail[:-1], first) // block  # at least one token stays in the tail
                if m < 2 or self.bytes + m * block * 4 > self.max_bytes:
                    continue
                head = tail[:m * block].copy()
                pids = np.fromiter((store.add_piece(_block_digest(head[k * block:(k + 1) * block]),
                                                    head[k * block:(k + 1) * block], head=True) for k in range(m)),
                                   np.int32, m)
                self.heads.append((pids, head))
                self.bytes += head.nbytes + pids.nbytes
                self.seen[key] = -len(self.heads)
                cuts[i] = pids
            else:
                pids, head = self.heads[-hit - 1]
                m = common_prefix(tail[:-1], head) // block
                if m >= 2:
                    cuts[i] = pids[:m]
        if not cuts:
            return ref_pids, counts, tails, lens
        refs_out, tails_out = [], []
        counts, lens = counts.copy(), lens.copy()
        for i in range(n):
            refs_out.append(ref_pids[ref_at[i]:ref_at[i + 1]])
            tail = tails[tail_at[i]:tail_at[i + 1]]
            pids = cuts.get(i)
            if pids is not None:
                refs_out.append(pids)
                tail = tail[len(pids) * block:]
                counts[i] += len(pids)
                lens[i] -= len(pids) * block
            tails_out.append(tail)
        return (np.concatenate(refs_out).astype(np.int32), counts, np.concatenate(tails_out).astype(np.int32), lens)


def _block_digest(tokens: np.ndarray) -> int:
    """A head block's piece digest (apart from the reader's text digests by its prefix)."""
    return int.from_bytes(hashlib.blake2b(b"blendserve-head-block\0" + tokens.astype("<i4").tobytes(),
                                          digest_size=8).digest(), "little", signed=True)


class TokenStore:
    """Every accepted request of a batch; see the module docstring. `share_heads` False: every
    tail stored whole (the reference the tests compare with)."""

    def __init__(self, share_heads: bool = True):
        self.piece_tokens = _Grow(np.int32)
        self.piece_off = _Grow(np.int64, [0])
        self.head_piece = _Grow(np.int8)  # 1: a shared head's block (`Heads`), which a request's pieces end with
        self._piece_ids: dict[int, int] = {}  # piece digest -> piece id
        self.tail_tokens = _Grow(np.int32)
        self.tail_off = _Grow(np.int64, [0])
        self.ref_ids = _Grow(np.int32)
        self.ref_off = _Grow(np.int64, [0])
        self.line = _Grow(np.int64)
        self.max_tokens = _Grow(np.int32)
        self.sampling = _Grow(np.int32)
        self.model = _Grow(np.int16)
        self.kind = _Grow(np.int8)
        self.cid_bytes = bytearray()
        self.cid_off = _Grow(np.int64, [0])
        self.digests = bytearray()
        self.sampling_table: list[str] = []  # JSON of the sampling params (without max_new_tokens)
        self.model_table: list[str | None] = []
        self._interned: dict = {}
        self.heads = Heads() if share_heads else None

    def __len__(self) -> int:
        return self.line.n

    @property
    def pieces(self) -> int:
        return self.piece_off.n - 1

    # ------------------------------------------------------------------ filling
    def has_piece(self, digest: int) -> bool:
        return digest in self._piece_ids

    def add_piece(self, digest: int, tokens, head: bool = False) -> int:
        """Store a piece once under its content digest; returns its id (the old one if known).
        `head`: a block of a shared head of tails (`Heads`)."""
        pid = self._piece_ids.get(digest)
        if pid is None:
            pid = self._piece_ids[digest] = self.pieces
            self.piece_tokens.extend(tokens)
            self.piece_off.append(self.piece_tokens.n)
            self.head_piece.append(1 if head else 0)
        return pid

    def head_counts(self) -> np.ndarray:
        """Per request, how many of its pieces are head blocks (the last ones): the plan reads
        them as the start of its tail, where the first tail with that head still holds them."""
        flags = self.head_piece.view[self.ref_ids.view].astype(np.int64)
        csum = np.concatenate(([0], np.cumsum(flags)))
        off = self.ref_off.view
        return csum[off[1:]] - csum[off[:-1]]

    def add(self, *, line: int, custom_id: str, kind: str, model: str | None, sampling: dict | str, max_tokens: int,
            piece_digests, tail, digest: str = "") -> int:
        """Append one request: the digests of its leading pieces (each stored by `add_piece`
        already) and its tail tokens; `sampling` as a dict or its JSON with sorted keys.
        Returns its index."""
        self.add_many(line=[line], custom_ids=[custom_id], kind=[KINDS.index(kind)], models=[model],
                      samplings=[sampling if isinstance(sampling, str) else json.dumps(sampling, sort_keys=True)],
                      max_tokens=[max_tokens], ref_digests=list(piece_digests), ref_counts=[len(piece_digests)],
                      tails=tail, tail_lens=[len(tail)], digests=bytes.fromhex(digest).ljust(DIGEST_BYTES, b"\0"))
        return len(self) - 1

    def add_many(self, *, line, custom_ids: list[str], kind, models: list, samplings: list[str], max_tokens,
                 ref_digests, ref_counts, tails, tail_lens, digests: bytes) -> None:
        """Append requests column by column: per request its line, custom id, kind (index into
        `KINDS`), model name, sampling JSON (sorted keys), max_tokens, the digests of its
        leading pieces (`ref_counts` of `ref_digests` each, every piece stored by `add_piece`
        already), its tail (`tail_lens` of `tails`) and its 16-byte request digest."""
        n = len(custom_ids)
        counts, lens = np.asarray(ref_counts, np.int64), np.asarray(tail_lens, np.int64)
        empty = np.flatnonzero(counts + lens == 0)
        if len(empty):
            raise ValueError(f"line {int(np.asarray(line)[empty[0]])}: a request needs at least one prompt token")
        refs = np.asarray(ref_digests, np.int64)
        ref_pids = np.zeros(0, np.int32)
        if len(refs):
            known, inverse = np.unique(refs, return_inverse=True)
            ref_pids = np.fromiter((self._piece_ids[int(d)] for d in known), np.int32, len(known))[inverse]
        tails = np.asarray(tails, np.int32)
        if self.heads is not None:
            ref_pids, counts, tails, lens = self.heads.split(self, ref_pids, counts, tails, lens)
        self.ref_ids.extend(ref_pids)
        self.ref_off.extend(self.ref_ids.n - len(ref_pids) + np.cumsum(counts))
        self.tail_tokens.extend(tails)
        self.tail_off.extend(self.tail_tokens.n - int(lens.sum()) + np.cumsum(lens))
        self.line.extend(line)
        self.max_tokens.extend(max_tokens)
        self.sampling.extend([self._intern(self.sampling_table, x) for x in samplings])
        self.model.extend([self._intern(self.model_table, m) for m in models])
        self.kind.extend(kind)
        ids = [c.encode("utf-8") for c in custom_ids]
        self.cid_off.extend(len(self.cid_bytes) + np.cumsum([len(c) for c in ids], dtype=np.int64))
        self.cid_bytes += b"".join(ids)
        assert len(digests) == DIGEST_BYTES * n, "one 16-byte digest per request"
        self.digests += digests

    def _intern(self, table: list, value) -> int:
        key = (id(table), value)
        idx = self._interned.get(key)
        if idx is None:
            idx = self._interned[key] = len(table)
            table.append(value)
        return idx

    # ------------------------------------------------------------------ reading
    def custom_id(self, i: int) -> str:
        off = self.cid_off.a
        return self.cid_bytes[off[i]:off[i + 1]].decode("utf-8")

    def refs(self, i: int) -> np.ndarray:
        return self.ref_ids.a[self.ref_off.a[i]:self.ref_off.a[i + 1]]

    def tail(self, i: int) -> np.ndarray:
        return self.tail_tokens.a[self.tail_off.a[i]:self.tail_off.a[i + 1]]

    def piece(self, pid: int) -> np.ndarray:
        return self.piece_tokens.a[self.piece_off.a[pid]:self.piece_off.a[pid + 1]]

    def piece_lengths(self) -> np.ndarray:
        return np.diff(self.piece_off.view)

    def prompt_lengths(self) -> np.ndarray:
        """Prompt tokens of every request (pieces + tail)."""
        plen = self.piece_lengths()
        csum = np.concatenate(([0], np.cumsum(plen[self.ref_ids.view], dtype=np.int64)))
        off = self.ref_off.view
        per_ref = csum[off[1:]] - csum[off[:-1]]
        return per_ref + np.diff(self.tail_off.view)

    def input_ids(self, i: int) -> list[int]:
        parts = [self.piece(int(p)) for p in self.refs(i)]
        parts.append(self.tail(i))
        return np.concatenate(parts).tolist()

    def prompt_keys(self, indices=None):
        """Each request's prompt (every request in store order, or those of `indices`) as
        big-endian uint32 bytes (they sort as the id sequences do, a prefix first); each piece
        converted once."""
        piece_bytes = {}
        tail_off, ref_off, refs = self.tail_off.view, self.ref_off.view, self.ref_ids.view
        for i in range(len(self)) if indices is None else indices:
            parts = []
            for p in refs[ref_off[i]:ref_off[i + 1]].tolist():
                b = piece_bytes.get(p)
                if b is None:
                    b = piece_bytes[p] = self.piece(p).astype(">u4").tobytes()
                parts.append(b)
            parts.append(self.tail_tokens.a[tail_off[i]:tail_off[i + 1]].astype(">u4").tobytes())
            yield b"".join(parts)

    def prepared(self, i: int) -> Prepared:
        """Request `i` as the engine and `results.ok_record` take it (messages/prompt not kept)."""
        req = BatchRequest(line=int(self.line.a[i]), custom_id=self.custom_id(i), kind=KINDS[self.kind.a[i]],
                           messages=None, prompt=None, max_tokens=int(self.max_tokens.a[i]),
                           sampling=json.loads(self.sampling_table[self.sampling.a[i]]),
                           model=self.model_table[self.model.a[i]],
                           digest=self.digests[i * DIGEST_BYTES:(i + 1) * DIGEST_BYTES].hex())
        return Prepared(req, self.input_ids(i), int(self.max_tokens.a[i]))

    def nbytes(self) -> int:
        """Bytes in use (arrays up to their length, custom ids); see the module docstring."""
        arrays = (self.piece_tokens, self.piece_off, self.tail_tokens, self.tail_off, self.ref_ids, self.ref_off,
                  self.line, self.max_tokens, self.sampling, self.model, self.kind, self.cid_off)
        heads = self.heads.nbytes() if self.heads is not None else 0
        return sum(a.nbytes for a in arrays) + len(self.cid_bytes) + len(self.digests) + heads

    def check_integrity(self) -> None:
        n = len(self)
        for name, g in (("tail_off", self.tail_off), ("ref_off", self.ref_off), ("cid_off", self.cid_off)):
            assert g.n == n + 1, f"{name} has {g.n} entries for {n} requests"
            assert np.all(np.diff(g.view) >= 0), f"{name} is not non-decreasing"
        for name, g in (("max_tokens", self.max_tokens), ("sampling", self.sampling), ("model", self.model),
                        ("kind", self.kind)):
            assert g.n == n, f"{name} has {g.n} entries for {n} requests"
        assert self.tail_off.view[-1] == self.tail_tokens.n and self.ref_off.view[-1] == self.ref_ids.n
        assert self.piece_off.view[-1] == self.piece_tokens.n and self.head_piece.n == self.pieces
        heads = np.flatnonzero(self.head_piece.view)
        assert np.all(np.diff(self.piece_off.view)[heads] == HEAD_BLOCK), "a head piece is not one block"
        if self.ref_ids.n:  # head blocks only after a request's other pieces
            flags = self.head_piece.view[self.ref_ids.view].astype(np.int64)
            own = np.repeat(np.arange(n), np.diff(self.ref_off.view))
            last_other = np.full(n, -1, np.int64)
            np.maximum.at(last_other, own[flags == 0], np.flatnonzero(flags == 0))
            first_head = np.full(n, np.iinfo(np.int64).max, np.int64)
            np.minimum.at(first_head, own[flags == 1], np.flatnonzero(flags == 1))
            assert np.all(last_other < first_head), "a request's head blocks come before another piece"
        assert len(self.digests) == DIGEST_BYTES * n
        assert self.ref_ids.n == 0 or (self.ref_ids.view.min() >= 0 and self.ref_ids.view.max() < self.pieces)
        assert n == 0 or self.prompt_lengths().min() >= 1, "a request without prompt tokens"
