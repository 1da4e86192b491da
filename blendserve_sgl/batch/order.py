"""The one global plan of a batch: the order in which the engine receives its requests.

`plan(store, cost)` builds the resource tree over every stored request (its shared pieces as
`Group` keys, then the blocks of its tail that other tails with the same pieces share
(`tail_segments`: a completion prompt is all tail, and so is a chat's last message), the rest
unshared, output length estimated from max_tokens), runs the
sort -> conditional split -> sort loop, and walks the sorted leaves with two cursors, as the
dual scanner does: the left cursor (compute-dense end) and the right cursor (memory-dense end)
each move in DFS order, so both keep their prefix sharing, and the next request comes from the
left while the compute time handed out so far is below `rho(root)` times the memory time, else
from the right, so every stretch of the order holds about the whole batch's density.

Deterministic: the store lists requests in file order and nothing here depends on time or
hashing of Python objects, so the same input and arguments give the same order; a resumed run
plans the whole input again (done requests included) and skips what is done.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..core.cost import CostModel
from ..core.preset import PRESET
from ..core.specs import ModelSpec, hardware, model
from ..core.split import sort_and_split
from ..core.tree import ResourceTree
from .store import HEAD_BLOCK, TokenStore, block_sums, mix64

PLAN_HARDWARE = "h100"  # the plan's compute/bandwidth ratio; only the order matters here


def cost_for(model_dir: str | Path | None) -> CostModel:
    """Cost model of the model in `model_dir` (config.json), Llama-3.1-8B if it cannot be read."""
    try:
        spec = ModelSpec.from_hf_config(json.loads((Path(model_dir) / "config.json").read_text()))
    except (OSError, TypeError, ValueError, KeyError):
        spec = model("llama-3.1-8b")
    return CostModel(spec, hardware(PLAN_HARDWARE))


def build_tree(store: TokenStore, cost: CostModel) -> ResourceTree:
    """The resource tree of every stored request; request id = store index."""
    tree = ResourceTree(cost)
    prompt = store.prompt_lengths().tolist()
    max_tokens = store.max_tokens.view.tolist()
    add = tree.add
    for i, groups in enumerate(store_prefixes(store)):
        add(i, prompt_len=prompt[i], prefix=groups, output_len=max_tokens[i], max_tokens=max_tokens[i])
    return tree


def store_prefixes(store: TokenStore):
    """Each stored request's prompt as the plan sees it, in store order: its pieces as `Group`
    keys (name, tokens), then the shared blocks of its tail (`tail_segments`; head pieces are the
    tail's); the rest of the prompt is unshared. One (name, tokens) pair per piece, shared by every
    request that holds it, so a million requests behind one prompt hold one pair and their
    references (`blendserve plan` keeps these for every request of a file)."""
    plen_piece = store.piece_lengths().tolist()
    pairs = [(str(p), plen_piece[p]) for p in range(store.pieces)]
    starts = store.ref_off.view[:-1].tolist()
    # head blocks are the tail's to the plan (`tail_blocks`): each request's pieces end before them
    ends = (store.ref_off.view[1:] - store.head_counts()).tolist()
    refs = store.ref_ids.view  # sliced per request: a list of every head reference would hold 36 bytes each
    shared_tails = tail_segments(store)
    for i in range(len(store)):
        a, b = starts[i], ends[i]
        groups = [pairs[p] for p in refs[a:b].tolist()] if b > a else []
        groups += shared_tails.get(i, ())
        yield groups


TAIL_BLOCK = HEAD_BLOCK  # tokens: tails are compared in whole blocks; a shared run shorter than this is ignored
_CHUNK_TOKENS = 1 << 20  # tail tokens hashed at a time (bounds the temporary arrays)


def _path_seeds(store: TokenStore, heads: np.ndarray) -> np.ndarray:
    """Per request, a hash of the pieces it starts with (0 for none; head blocks, `heads` per
    request, are the tail's): tails are compared only among requests behind the same pieces."""
    n = len(store)
    seeds = np.zeros(n, np.uint64)
    counts = np.diff(store.ref_off.view) - heads
    refs = store.ref_ids.view.astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(int(counts.max()) if n else 0):  # one pass per piece position (a few)
            rows = np.flatnonzero(counts > j)
            seeds[rows] = mix64(seeds[rows] * np.uint64(0x9E3779B97F4A7C15) + refs[store.ref_off.view[rows] + j]
                               + np.uint64(1))
    return seeds


def tail_blocks(store: TokenStore, block: int = TAIL_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """Every whole `block`-token block of every tail as a 64-bit hash of the request's pieces and
    its tail up to that block's end (`chain`, request by request, block by block) and each
    request's first block in `chain` (`first`, n + 1 entries). Equal chains mean equal prompts up
    to there (a collision, about one in 2^64 per pair, could only change the order)."""
    n = len(store)
    off = store.tail_off.view
    heads = store.head_counts()  # a shared head's blocks (pieces) start the tail as the plan sees it
    if heads.any() and block != HEAD_BLOCK:
        raise ValueError(f"tails with shared heads are compared in blocks of {HEAD_BLOCK} tokens, not {block}")
    nt = (np.diff(off) // block).astype(np.int64)  # whole blocks in the stored tail
    nb = heads + nt
    first = np.zeros(n + 1, np.int64)
    np.cumsum(nb, out=first[1:])
    tfirst = np.zeros(n + 1, np.int64)
    np.cumsum(nt, out=tfirst[1:])
    sums = np.empty(int(first[-1]), np.uint64)  # each block's token hash
    tokens = store.tail_tokens.a
    start = 0
    with np.errstate(over="ignore"):
        while start < n:  # requests in chunks of about _CHUNK_TOKENS tail tokens
            stop = int(np.searchsorted(off, off[start] + _CHUNK_TOKENS, side="right"))
            stop = min(n, max(stop - 1, start + 1))
            rows = np.repeat(np.arange(start, stop), nt[start:stop])
            if len(rows):
                k = np.arange(len(rows)) - (tfirst[rows] - tfirst[start])  # block index within its stored tail
                at = off[rows] + k * block
                sums[first[rows] + heads[rows] + k] = block_sums(tokens[at[:, None] + np.arange(block)])
            start = stop
        if heads.any():  # each head block hashed once, as the same tokens in a tail are
            pids = np.flatnonzero(store.head_piece.view)
            piece_sum = np.zeros(store.pieces, np.uint64)
            piece_sum[pids] = block_sums(store.piece_tokens.a[store.piece_off.view[pids][:, None] + np.arange(block)])
            rows = np.repeat(np.arange(n), heads)
            j = np.arange(len(rows)) - (np.cumsum(heads) - heads)[rows]  # head block index within its request
            refs = store.ref_ids.view[store.ref_off.view[rows + 1] - heads[rows] + j]
            sums[first[rows] + j] = piece_sum[refs]
        chain = np.empty_like(sums)
        cur = _path_seeds(store, heads)
        order = np.argsort(-nb, kind="stable")  # requests by block count, most first
        alive = len(order)
        for k in range(int(nb.max()) if n else 0):  # block k of every tail that has one
            while alive and nb[order[alive - 1]] <= k:
                alive -= 1
            rows = order[:alive]
            at = first[rows] + k
            cur[rows] = mix64(cur[rows] * np.uint64(0x9E3779B97F4A7C15) + sums[at])
            chain[at] = cur[rows]
        del sums
    return chain, first


def tail_segments(store: TokenStore, block: int = TAIL_BLOCK) -> dict[int, list[tuple[str, int]]]:
    """The shared part of each tail as prefix groups [(name, tokens)], for the requests that have
    one: the leading whole blocks that another request behind the same pieces has too, cut where
    the number of requests sharing them drops (where the prefix tree branches), each segment
    named by its last block's chain hash. Tails are where completion prompts keep all their
    tokens and chats their last message; without this, requests that share them look unrelated
    to the plan."""
    chain, first = tail_blocks(store, block)
    if not len(chain):
        return {}
    srt = np.sort(chain)
    again = srt[1:][srt[1:] == srt[:-1]]  # each value once per repeat: few unless tails share much
    del srt
    values, repeats = np.unique(again, return_counts=True)
    count = dict(zip(values.tolist(), (repeats + 1).tolist()))  # chain hash -> requests holding it (>= 2)
    rows = np.flatnonzero(np.diff(first) > 0)
    rows = rows[np.isin(chain[first[rows]], values)]  # the requests whose first tail block is shared
    out: dict[int, list[tuple[str, int]]] = {}
    names: dict[int, str] = {}
    for i in rows.tolist():
        h = chain[first[i]:first[i + 1]].tolist()
        c = [count.get(x, 1) for x in h]
        groups, start = [], 0
        for k in range(len(c)):
            if c[k] < 2:
                break
            if k + 1 == len(c) or c[k + 1] != c[k]:  # the next block is held by fewer (or none)
                name = names.get(h[k])
                if name is None:
                    name = names[h[k]] = f"t{h[k]:016x}"
                groups.append((name, (k + 1 - start) * block))
                start = k + 1
        out[i] = groups
    return out


def plan(store: TokenStore, cost: CostModel, keep_sharing: float = PRESET.scan.keep_sharing) -> np.ndarray:
    """Store indices in plan order (int64, a permutation of range(len(store)))."""
    if len(store) == 0:
        return np.zeros(0, np.int64)
    tree = build_tree(store, cost)
    sort_and_split(tree, keep_sharing, PRESET.scan.max_split_rounds)  # the plugin's split budget
    leaves = [(r.rid, r.prompt_len, r.output_len) for r in tree.iter_requests()]
    return dual_order(leaves, cost)


def dual_order(leaves: list[tuple[int, int, int]], cost: CostModel) -> np.ndarray:
    """Merge the sorted leaves [(rid, prompt_len, output_len)] from both ends (module doc)."""
    comp = np.array([cost.request_comp_time(p, d) for _, p, d in leaves])
    mem = np.array([cost.request_mem_time(p, d) for _, p, d in leaves])
    rho = comp.sum() / mem.sum() if mem.sum() > 0 else float("inf")
    out = np.empty(len(leaves), np.int64)
    i, j, c, m = 0, len(leaves) - 1, 0.0, 0.0
    for k in range(len(leaves)):
        if c <= rho * m:
            take, i = i, i + 1
        else:
            take, j = j, j - 1
        c += comp[take]
        m += mem[take]
        out[k] = leaves[take][0]
    return out


def check_plan(order: np.ndarray, n: int) -> None:
    """Every request planned exactly once."""
    assert len(order) == n, f"plan has {len(order)} entries for {n} requests"
    seen = np.zeros(n, bool)
    seen[order] = True
    assert seen.all(), f"plan misses {int((~seen).sum())} requests"
