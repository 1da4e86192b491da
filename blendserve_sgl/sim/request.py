"""A request as the simulated engine sees it: its cache keys, lengths and progress.

Keys are runs of atoms for the radix cache (`cache.py`): token ids (one token each) for token
prompts, or `Group` segments for length-only records. A length-only request's unshared rest
of the prompt is an atom of its own (`tail`), and so is each run of output tokens that gets
recomputed after a retraction, so nothing unshared is ever matched by another request.

`fill` (SGLang's fill_ids) is what a (re-)admission prefills: the prompt plus the output
generated before a retraction. `gen` counts output tokens generated so far; the first comes
out of the prefill step, each decode round adds one, and the request finishes at
`output_len` (its true length: ignore_eos, or the EOS of the real run).
"""

from __future__ import annotations

from typing import Any, Iterable

from ..core.tree import Group

WAITING, PREFILLING, DECODING, FINISHED = "waiting", "prefilling", "decoding", "finished"


def atom_len(atom) -> int:
    return atom.length if type(atom) is Group else 1


def keys_len(keys) -> int:
    return sum(a.length if type(a) is Group else 1 for a in keys)


class SimRequest:
    __slots__ = ("rid", "seq", "prompt_keys", "prompt_len", "prefix", "tokens", "output_len", "max_new_tokens",
                 "ignore_eos", "shared_atoms", "kind",
                 # progress, owned by the engine
                 "state", "gen", "out_keys", "out_len", "fill_len", "hit", "lock", "slot", "gen_ck", "prefill_left",
                 "reserve", "admissions", "first_hit", "watch", "published", "ck_atoms", "ck_len")

    def __init__(self, rid, seq: int, *, prompt_len: int | None = None, prefix: Iterable[tuple[str, int]] = (),
                 tokens: Iterable[int] | None = None, output_len: int, max_new_tokens: int | None = None,
                 ignore_eos: bool = True, kind: str = ""):
        self.rid = rid
        self.seq = seq
        self.kind = kind
        if not (isinstance(output_len, int) and output_len >= 1):
            raise ValueError(f"request {rid!r}: output_len must be a positive integer, got {output_len!r}")
        if tokens is not None:
            self.tokens = tuple(tokens)
            if not self.tokens:
                raise ValueError(f"request {rid!r}: empty prompt")
            self.prefix = ()
            self.prompt_keys = self.tokens
            self.prompt_len = len(self.tokens)
            self.shared_atoms = len(self.tokens)  # any token may be shared
        else:
            self.tokens = None
            self.prefix = tuple((str(n), int(k)) for n, k in prefix)
            groups = tuple(Group(n, k) for n, k in self.prefix)
            shared = sum(g.length for g in groups)
            if isinstance(prompt_len, bool) or not hasattr(prompt_len, "__index__") or prompt_len < 1:  # NumPy's too
                raise ValueError(f"request {rid!r}: prompt_len must be an integer >= 1, got {prompt_len!r}")
            if prompt_len < shared:
                raise ValueError(f"request {rid!r}: prompt_len {prompt_len!r} is shorter than its prefix groups ({shared})")
            tail = prompt_len - shared
            self.prompt_keys = groups + ((Group(f"\x00tail:{rid}", tail),) if tail else ())
            self.prompt_len = prompt_len
            self.shared_atoms = len(groups)
        self.output_len = output_len
        self.max_new_tokens = output_len if max_new_tokens is None else max_new_tokens
        if self.max_new_tokens < output_len:
            raise ValueError(f"request {rid!r}: max_new_tokens {self.max_new_tokens} below its output length {output_len}")
        self.ignore_eos = ignore_eos
        self.state = WAITING
        self.gen = 0
        self.out_keys: tuple = ()  # output runs kept for a re-admission after retraction
        self.out_len = 0
        self.fill_len = self.prompt_len
        self.hit = 0
        self.lock = None  # the cache node this request holds locked
        self.slot = -1
        self.gen_ck = 0  # gen when the fill was published to the cache
        self.prefill_left = 0
        self.reserve = 0  # KV tokens the picker reserved for the request's life (0: none)
        self.admissions = 0
        self.first_hit = 0
        self.watch = None
        self.published = 0  # fill tokens handed to the cache (the admission hit, then each finished chunk)
        self.ck_atoms = self.ck_len = 0  # fill atoms (and their tokens) completed by finished chunks

    @property
    def fill_keys(self) -> tuple:
        return self.prompt_keys + self.out_keys

    def class_key(self) -> tuple:
        """The atoms another request could share: the prefix groups (or every token)."""
        return self.prompt_keys[:self.shared_atoms]

    def __repr__(self) -> str:
        return f"SimRequest({self.rid!r}, p={self.prompt_len}, d={self.output_len}, {self.state}, gen={self.gen})"


def from_records(records, known: bool = True, max_tokens: int | None = None) -> list[SimRequest]:
    """Engine requests from `workloads.Record`s (token-id prompts when a record has `tokens`),
    in their order (the arrival order).

    known: output lengths are known and fixed (ignore_eos, max_new_tokens = output length), as
    SGLang's offline benchmark runs them; otherwise requests stop at their true length (EOS)
    and carry the record's own `max_tokens`, else `max_tokens` (default: 4 x the longest output),
    as max_new_tokens."""
    out = []
    for i, (r, max_new) in enumerate(zip(records, max_new_tokens(records, known, max_tokens))):
        tokens = getattr(r, "tokens", None)
        shape = dict(tokens=tokens) if tokens is not None else dict(prompt_len=r.prompt_len, prefix=r.prefix)
        out.append(SimRequest(r.rid, i, **shape, output_len=r.output_len, max_new_tokens=None if known else max_new,
                              ignore_eos=known, kind=getattr(r, "kind", "")))
    return out


def max_new_tokens(records, known: bool = True, max_tokens: int | None = None) -> list[int]:
    """Each record's max_new_tokens as `from_records` sets it (its output length when `known`)."""
    if known:
        return [r.output_len for r in records]
    if max_tokens is None:
        max_tokens = 4 * max((r.output_len for r in records), default=0)
    return [max(getattr(r, "max_tokens", None) or max_tokens, r.output_len) for r in records]


def from_tokens(work: dict[Any, tuple[list[int], int]], known: bool = True,
                max_tokens: int | None = None) -> list[SimRequest]:
    """Engine requests from {rid: (prompt token ids, output length)} (tests, small examples);
    `known` and `max_tokens` as in `from_records`."""
    from ..workloads import Record

    return from_records([Record(rid, len(toks), (), d, tokens=tuple(toks)) for rid, (toks, d) in work.items()],
                        known, max_tokens)
