"""Cascade attention for shared prefixes in decode.

When many requests of a decode batch share a prefix, plain decode attention reads the prefix's
KV once per request. A cascade reads it once per group: attention of all the group's queries
over the shared prefix, attention of each request over its own suffix, merged by log-sum-exp.

- `plan` (NumPy only): `CascadePlan` in FlashInfer's multi-level layout, built from SGLang's
  `req_to_token` slot table or from a hand-written prefix tree;
- `reference` (torch): attention with LSE, the merge, multi-level cascade attention and plain
  per-request decode attention, written for clarity;
- `kernel`: the `CascadeAttention` interface (plan per batch, run per layer), `make_kernel`;
- `cpu`: batched torch products on CPU; `gpu`: `flashinfer.MultiLevelCascadeAttentionWrapper`.

Importing this package imports NumPy only; the torch modules load when used.
"""

from .plan import CascadePlan, Level, Prefix, Seq, plan_from_req_to_token, plan_from_tree, prefix_tree_from_pages

__all__ = ["CascadePlan", "Level", "Prefix", "Seq", "plan_from_req_to_token", "plan_from_tree",
           "prefix_tree_from_pages"]
