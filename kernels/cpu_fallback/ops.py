"""Pure-torch stand-ins for the ``sgl_kernel`` functions SGLang 0.5.23 needs on CPU.

SGLang's CPU engine (``SGLANG_USE_CPU_ENGINE=1``) expects the CPU build of
``sgl_kernel``, which is not published on PyPI.  For a dense (Llama-style)
model without speculative decoding, only two of its functions are ever
*called*; a handful more are imported at module level by files that every
engine process imports, so those names must exist even though they never run.

Called (implemented here):

* :func:`assign_req_to_token_pool_cpu` -- ``sglang/srt/mem_cache/allocation.py``
  (imported at line 46, called from ``assign_req_to_token_pool_func``).
* :func:`copy_all_layer_kv_cache_cpu` -- ``sglang/kernels/ops/kvcache/cache_move.py``
  (imported at line 10, called from ``copy_all_layer_kv_cache_func``; runs once
  at KV-pool construction as a warm-up and whenever KV slots are moved).

Imported by CPU-gated module-level imports but never reached by a dense model
without speculative decoding (provided as stubs that raise
``NotImplementedError`` when called): the speculative-decoding helpers of
``sglang/kernels/ops/speculative/{eagle,spec_tree,cache_locs}.py``, which every
scheduler imports at start-up (through ``sglang/srt/speculative/spec_utils.py``),
and ``multi_layer_eagle.py`` (only with multi-layer EAGLE).  See
``IMPORT_ONLY_NAMES``.

Besides these names, ``import sgl_kernel`` itself must succeed
(``sglang/srt/utils/common.py`` ``_is_intel_amx_backend_available``), and
``from sgl_kernel.scalar_type import ...`` is attempted and its ImportError
handled (``sglang/srt/layers/quantization/utils.py``).

Every ``torch.ops.sgl_kernel.*`` call site in sglang 0.5.23 is behind
``cpu_has_amx_support()`` / ``use_intel_amx_backend(layer)``, which is true only
when ``torch.ops.sgl_kernel.convert_weight_packed`` exists
(``sglang/srt/utils/common.py`` ``_is_intel_amx_backend_available``).  This
module deliberately registers no ``torch.ops.sgl_kernel`` operators, so SGLang
takes its ``forward_native`` torch paths for norms, activations, rotary
embeddings, linear layers and KV-cache stores.  (A few model files read
``torch.ops.sgl_kernel.<op>`` at import time -- e.g. ``fused_sigmoid_mul_cpu``
for the Qwen3.5 family, ``fused_moe_router_cpu`` for Grok -- so SGLang's model
registry skips those architectures on CPU; Llama-style models are unaffected.)
"""

from __future__ import annotations

import ctypes

import torch

__all__ = [
    "CALLED_NAMES",
    "IMPORT_ONLY_NAMES",
    "PROVIDED_NAMES",
    "assign_req_to_token_pool_cpu",
    "copy_all_layer_kv_cache_cpu",
]


def assign_req_to_token_pool_cpu(
    req_pool_indices: torch.Tensor,
    req_to_token: torch.Tensor,
    start_offset: torch.Tensor,
    end_offset: torch.Tensor,
    out_cache_loc: torch.Tensor,
    pool_len: int,
) -> None:
    """Write freshly allocated KV slot indices into the request-to-token table.

    Semantics (from the caller ``assign_req_to_token_pool_func`` in
    ``sglang/srt/mem_cache/allocation.py`` and its Triton twin
    ``assign_req_to_token_pool``): for each request ``i`` of the batch, with
    ``n_i = end_offset[i] - start_offset[i]`` and ``o_i = n_0 + ... + n_{i-1}``::

        req_to_token[req_pool_indices[i], start_offset[i]:end_offset[i]] = \
            out_cache_loc[o_i : o_i + n_i]

    i.e. ``out_cache_loc`` is the concatenation, in batch order, of the slots
    allocated for every request, and each request's piece lands at token
    positions ``[start, end)`` of its own row.  ``pool_len`` is the row length
    of ``req_to_token`` (``req_to_token.shape[1]``).  Works in place; returns
    nothing.
    """
    if req_to_token.dim() != 2:
        raise ValueError(f"req_to_token must be 2-D, got shape {tuple(req_to_token.shape)}")
    if int(pool_len) != req_to_token.shape[1]:
        raise ValueError(f"pool_len={pool_len} but req_to_token has rows of {req_to_token.shape[1]}")
    if req_pool_indices.numel() == 0:
        return

    device = req_to_token.device
    starts = start_offset.to(device=device, dtype=torch.int64).reshape(-1)
    ends = end_offset.to(device=device, dtype=torch.int64).reshape(-1)
    rows = req_pool_indices.to(device=device, dtype=torch.int64).reshape(-1)
    lengths = ends - starts
    if bool((lengths < 0).any()):
        raise ValueError("end_offset must be >= start_offset for every request")
    total = int(lengths.sum())
    if total == 0:
        return
    if total > out_cache_loc.numel():
        raise ValueError(f"out_cache_loc holds {out_cache_loc.numel()} slots but the batch needs {total}")
    if int(ends.max()) > pool_len:
        raise ValueError(f"an end_offset exceeds the pool row length {pool_len}")

    # Flatten the ragged [start_i, end_i) ranges into (row, column) pairs.
    row_idx = torch.repeat_interleave(rows, lengths, output_size=total)
    first_of_request = torch.cumsum(lengths, 0) - lengths  # o_i
    pos_in_request = torch.arange(total, device=device) - torch.repeat_interleave(
        first_of_request, lengths, output_size=total
    )
    col_idx = torch.repeat_interleave(starts, lengths, output_size=total) + pos_in_request
    values = out_cache_loc.reshape(-1)[:total].to(device=device, dtype=req_to_token.dtype)
    req_to_token[row_idx, col_idx] = values


# ctypes array types are cached per length: building one is the only
# non-trivial cost of viewing raw memory as a tensor.
_BYTE_ARRAY_TYPES: dict[int, type] = {}


def _bytes_at(address: int, nbytes: int) -> torch.Tensor:
    """A writable uint8 tensor aliasing ``nbytes`` of memory at ``address`` (no copy)."""
    array_type = _BYTE_ARRAY_TYPES.get(nbytes)
    if array_type is None:
        array_type = ctypes.c_uint8 * nbytes
        if len(_BYTE_ARRAY_TYPES) < 256:
            _BYTE_ARRAY_TYPES[nbytes] = array_type
    return torch.frombuffer(array_type.from_address(address), dtype=torch.uint8)


def copy_all_layer_kv_cache_cpu(
    data_ptrs: torch.Tensor,
    strides: torch.Tensor,
    tgt_loc: torch.Tensor,
    src_loc: torch.Tensor,
) -> None:
    """Move KV-cache slots ``src_loc[j] -> tgt_loc[j]`` in every layer buffer at once.

    Semantics (from ``copy_all_layer_kv_cache_func`` in
    ``sglang/kernels/ops/kvcache/cache_move.py`` and its Triton twin
    ``copy_all_layer_kv_cache_tiled``; the arguments are built by
    ``MHATokenToKVPool._init_data_ptrs_and_strides`` in
    ``sglang/srt/mem_cache/memory_pool.py``):

    * ``data_ptrs`` -- uint64 tensor, one raw base address per KV buffer
      (every layer's K buffer, then every layer's V buffer, plus scale buffers
      for quantized caches); each buffer is contiguous with one row per slot.
    * ``strides`` -- int64 tensor, the byte size of one slot row of each
      buffer (``stride(0) * itemsize``); the copy moves whole rows.
    * ``tgt_loc`` / ``src_loc`` -- equal-length int tensors of slot indices
      (the caller already sliced them to the number of valid entries).

    For each buffer, row ``src_loc[j]`` is copied over row ``tgt_loc[j]`` for
    all ``j``.  All source rows are read before any target row is written, so
    overlapping source/target sets behave like the Triton kernel ("safe for
    in-place copy").  Returns nothing.
    """
    if tgt_loc.numel() != src_loc.numel():
        raise ValueError(f"tgt_loc has {tgt_loc.numel()} entries but src_loc has {src_loc.numel()}")
    if data_ptrs.numel() != strides.numel():
        raise ValueError("data_ptrs and strides must have one entry per buffer")
    if tgt_loc.numel() == 0 or data_ptrs.numel() == 0:
        return

    tgt = tgt_loc.reshape(-1).to(dtype=torch.int64, device="cpu")
    src = src_loc.reshape(-1).to(dtype=torch.int64, device="cpu")
    if bool((tgt < 0).any()) or bool((src < 0).any()):
        raise ValueError("slot indices must be non-negative")
    rows_needed = int(torch.maximum(tgt.max(), src.max())) + 1

    for address, row_bytes in zip(data_ptrs.tolist(), strides.tolist()):
        row_bytes = int(row_bytes)
        if row_bytes <= 0:
            continue
        buffer = _bytes_at(int(address), rows_needed * row_bytes).view(rows_needed, row_bytes)
        buffer[tgt] = buffer[src]  # advanced indexing gathers into a temporary first


def _import_only(name: str, used_by: str):
    """Build a placeholder for an sgl_kernel function that must exist but is never run."""

    def placeholder(*args, **kwargs):
        raise NotImplementedError(
            f"sgl_kernel.{name} is not implemented by the blendserve pure-torch CPU fallback "
            f"(used by {used_by}). It exists only so the module imports; this feature needs the "
            "real CPU build of sgl_kernel."
        )

    placeholder.__name__ = name
    placeholder.__qualname__ = name
    placeholder.__doc__ = (
        f"Import-time placeholder for ``sgl_kernel.{name}`` (imported by {used_by}); "
        "raises NotImplementedError when called."
    )
    return placeholder


# name -> file of sglang 0.5.23 whose module-level ``if _is_cpu:`` block imports it.
IMPORT_ONLY_NAMES: dict[str, str] = {
    "fill_accept_out_cache_loc_cpu": "sglang/kernels/ops/speculative/eagle.py",
    "fill_bonus_tokens_cpu": "sglang/kernels/ops/speculative/eagle.py",
    "rotate_input_ids_cpu": "sglang/kernels/ops/speculative/multi_layer_eagle.py",
    "build_tree_kernel_efficient_cpu": "sglang/kernels/ops/speculative/spec_tree.py",
    "verify_tree_greedy_cpu": "sglang/kernels/ops/speculative/spec_tree.py",
    "assign_draft_cache_locs_contiguous_cpu": "sglang/kernels/ops/speculative/cache_locs.py",
    "assign_extend_cache_locs_cpu": "sglang/kernels/ops/speculative/cache_locs.py",
}

for _name, _used_by in IMPORT_ONLY_NAMES.items():
    globals()[_name] = _import_only(_name, _used_by)
    __all__.append(_name)
del _name, _used_by

CALLED_NAMES: tuple[str, ...] = ("assign_req_to_token_pool_cpu", "copy_all_layer_kv_cache_cpu")
PROVIDED_NAMES: tuple[str, ...] = CALLED_NAMES + tuple(IMPORT_ONLY_NAMES)
