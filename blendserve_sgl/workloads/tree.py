"""The one builder of a `ResourceTree` from a workload's records."""

from __future__ import annotations

from typing import Iterable

from ..core.cost import CostModel
from ..core.tree import ResourceTree


def build_tree(records: Iterable, cost: CostModel, known: bool = True, estimator=None,
               max_tokens: int | None = None) -> ResourceTree:
    """A tree over `records` in their order: anything with `rid`, `prompt_len`, `prefix`,
    `output_len` and optionally `tokens` (a `Record`, the simulator's `SimRequest`). Lengths are
    known, or left to `estimator` (each request may then run to `max_tokens`)."""
    tree = ResourceTree(cost, estimator)
    for r in records:
        d = r.output_len if known else None
        tokens = getattr(r, "tokens", None)
        if tokens is not None:
            tree.add(r.rid, tokens=tokens, output_len=d, max_tokens=max_tokens)
        else:
            tree.add(r.rid, prompt_len=r.prompt_len, prefix=r.prefix, output_len=d, max_tokens=max_tokens)
    return tree
