"""The one global plan of a batch: the order in which the engine receives its requests.

`plan(store, cost)` builds the resource tree over every stored request (its shared pieces as
`Group` keys, its tail as the unshared rest, output length estimated from max_tokens), runs the
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
from .store import TokenStore

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
    plen_piece = store.piece_lengths().tolist()
    names = [str(i) for i in range(store.pieces)]
    prompt = store.prompt_lengths().tolist()
    max_tokens = store.max_tokens.view.tolist()
    ref_off = store.ref_off.view.tolist()
    refs = store.ref_ids.view.tolist()
    add = tree.add
    for i in range(len(store)):
        groups = [(names[p], plen_piece[p]) for p in refs[ref_off[i]:ref_off[i + 1]]]
        add(i, prompt_len=prompt[i], prefix=groups, output_len=max_tokens[i], max_tokens=max_tokens[i])
    return tree


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
