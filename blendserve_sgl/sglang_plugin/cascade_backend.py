"""`--attention-backend cascade`: SGLang attention with cascade decode for shared prefixes.

Prefill (extend) runs as in the base backend. For each decode batch, `init_forward_metadata`
reads the batch's rows of SGLang's slot table (`req_to_token`): requests that the radix cache
gave the same leading KV slots share those pages, and `kernels.cascade.plan` turns that into a
`CascadePlan` (once per step; every layer reuses it).

- CPU (`TorchCascadeBackend`, base: SGLang's `torch_native`): each shared group's prefix
  attention is one batched product, merged with the batched suffix attention
  (`kernels.cascade.cpu`); requests that share nothing take `torch_native`'s own per-request
  decode. Layers the cascade does not cover (cross attention, sliding windows, logit caps) and
  batches without sharing run `torch_native` unchanged.
- GPU (`FlashInferCascadeBackend`, base: SGLang's `flashinfer`): a batch with sharing runs
  through `flashinfer.MultiLevelCascadeAttentionWrapper` (`kernels.cascade.gpu`), unshared
  requests with empty shared levels; other batches run FlashInfer's plain decode. It plans on
  the host every step, so it refuses CUDA graphs (`--disable-cuda-graph`). Not run here yet.

Knobs (environment, read when the backend is built): `BLENDSERVE_CASCADE_LEVELS` (levels of the
plan, shared ones + the suffix level; default 2), `BLENDSERVE_CASCADE_MIN_SHARED_TOKENS` (a
group must share at least this many tokens; default 16), `BLENDSERVE_CASCADE_STATS_PATH` (rewrite
decode counters there as JSON after every decode step, one file a DP rank or Ray replica
(`NAME.dpR.EXT`); for tests and benchmarks).
"""

from __future__ import annotations

import functools
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from .settings import CASCADE_KNOBS, check_values, parse_environment, rank_of, rank_path, write_json_file

BACKEND_NAME = "cascade"
_registered = False


# ---------------------------------------------------------------------- knobs and counters
@dataclass(frozen=True, slots=True)
class CascadeSettings:
    """The `BLENDSERVE_CASCADE_*` knobs (typed in `settings.CASCADE_KNOBS`)."""

    levels: int = CASCADE_KNOBS["levels"].default
    min_shared_tokens: int = CASCADE_KNOBS["min_shared_tokens"].default
    stats_path: str = CASCADE_KNOBS["stats_path"].default

    def __post_init__(self) -> None:
        check_values(CASCADE_KNOBS, self)

    @classmethod
    def from_env(cls, environ=os.environ) -> "CascadeSettings":
        return cls(**parse_environment(CASCADE_KNOBS, environ))


@dataclass
class CascadeStats:
    """Decode counters: `tokens_per_request` is what per-request attention reads per layer
    (sum of sequence lengths), `tokens_read` what this backend reads (each group's prefix once)."""

    decode_steps: int = 0
    cascade_steps: int = 0
    requests: int = 0
    shared_requests: int = 0  # in a group that shares a prefix
    cascade_requests: int = 0  # run by the cascade kernel (the GPU backend plans the whole batch)
    groups: int = 0
    tokens_per_request: int = 0
    tokens_read: int = 0
    plan_seconds: float = 0.0


class _StatsWriter:
    def __init__(self, path: str | None) -> None:
        self.path, self.stats = path, CascadeStats()

    def record(self, plan, plain_lens: np.ndarray, seq_lens: np.ndarray, seconds: float) -> None:
        s = self.stats
        s.decode_steps += 1
        s.requests += len(seq_lens)
        s.tokens_per_request += int(seq_lens.sum())
        s.plan_seconds += seconds
        s.tokens_read += int(plain_lens.sum())
        if plan is not None:
            s.cascade_steps += 1
            s.shared_requests += int(plan.shared_positions().sum())
            s.cascade_requests += plan.num_requests
            s.groups += sum(int(np.sum(np.diff(lv.qo_indptr) >= 2)) for lv in plan.levels[:-1])
            s.tokens_read += plan.tokens_read()
        if self.path and not write_json_file(self.path, {"backend": BACKEND_NAME, **asdict(s)}, "the cascade counters"):
            self.path = None


def plan_decode_batch(req_to_token, req_pool_indices, seq_lens, page_size: int, settings: CascadeSettings,
                      restrict: bool):
    """(plan or None, batch indices outside it). With `restrict`, the plan holds only the requests
    in a shared group and the rest are returned for the plain path; else the plan holds the whole
    batch. None when nothing is shared."""
    from kernels.cascade.plan import plan_from_req_to_token

    lens = np.asarray(seq_lens, dtype=np.int64)
    plan = plan_from_req_to_token(req_to_token, req_pool_indices, lens, page_size, num_levels=settings.levels,
                                  min_shared_pages=math.ceil(settings.min_shared_tokens / page_size))
    shared = plan.shared_positions()
    if not shared.any():
        return None, np.arange(len(lens))
    if not restrict:
        return plan, np.zeros(0, dtype=np.int64)
    return plan.restrict(shared), np.sort(plan.order[~shared])


def _decode_seq_lens(forward_batch):
    """Sequence lengths of a decode batch as a NumPy array (host copy), or None for any other
    batch (prefill, encoder-decoder): those take the base backend's path."""
    if not forward_batch.forward_mode.is_decode() or forward_batch.encoder_lens is not None:
        return None
    lens = forward_batch.seq_lens_cpu if forward_batch.seq_lens_cpu is not None else forward_batch.seq_lens
    return lens.cpu().numpy()


def _cascade_covers(layer) -> bool:
    window = getattr(layer, "sliding_window_size", None)
    return (not getattr(layer, "is_cross_attention", False) and (window is None or window < 0)
            and not (getattr(layer, "logit_cap", 0) or 0) > 0)


class _Planning:
    """What both backends share: the settings, the stats writer and each decode batch's plan
    (`_plan`; `_planned_for`: the layer shape the kernel was last planned for)."""

    restrict = True  # the plan holds only the requests in a shared group (the rest: the plain path)

    def _init_planning(self, model_runner) -> None:
        self.page_size = int(model_runner.page_size)
        self.settings = CascadeSettings.from_env()
        dp, writes = rank_of(model_runner)  # one file a DP rank (NAME.dpR.EXT), as the policy's
        self.stats = _StatsWriter(rank_path(self.settings.stats_path, dp) if writes else None)
        self._plan = None
        self._planned_for = None

    def _plan_batch(self, forward_batch, table_of):
        """Plan a decode batch (after the base backend's own metadata); the batch indices outside
        the plan, or None for a batch the base backend runs alone. `table_of(forward_batch,
        seq_lens)` gives (req_to_token table, the batch's rows in it) on the host."""
        self._plan, self._planned_for = None, None
        t0 = time.perf_counter()
        seq_lens = _decode_seq_lens(forward_batch)
        if seq_lens is None:
            return None
        table, rows = table_of(forward_batch, seq_lens)
        self._plan, plain = plan_decode_batch(table, rows, seq_lens, self.page_size, self.settings,
                                              restrict=self.restrict)
        self.stats.record(self._plan, seq_lens[plain], seq_lens, time.perf_counter() - t0)
        return plain


# ---------------------------------------------------------------------- CPU
@functools.cache
def _torch_cascade_backend_class():
    import torch
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from kernels.cascade.cpu import CpuCascade

    class TorchCascadeBackend(_Planning, TorchNativeAttnBackend):
        """torch_native with cascade decode (see the module docstring)."""

        def __init__(self, model_runner):
            super().__init__(model_runner)
            self._init_planning(model_runner)
            self.kernel = CpuCascade()
            self._plain = torch.zeros(0, dtype=torch.long)

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)
            plain = self._plan_batch(forward_batch, lambda fb, lens: (self.req_to_token_pool.req_to_token,
                                                                      fb.req_pool_indices.cpu().numpy()))
            if plain is not None:
                self._plain = torch.from_numpy(plain)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if self._plan is None or not _cascade_covers(layer):
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
            hq, hkv, d, dv = layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim, layer.v_head_dim
            q = q.reshape(-1, hq * d)
            o = q.new_empty((q.shape[0], hq * dv))
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc(forward_batch.out_cache_loc, self.swa_out_cache_loc), k, v)
            q_, o_ = q.view(-1, hq, d), o.view(-1, hq, dv)
            k_buf = self.token_to_kv_pool.get_key_buffer(layer.layer_id)
            v_buf = self.token_to_kv_pool.get_value_buffer(layer.layer_id)
            if len(self._plain):
                rows = self._plain
                o_plain = q.new_empty((len(rows), hq, dv))
                self._run_sdpa_forward_decode(
                    q_[rows], o_plain, k_buf, v_buf, self.req_to_token_pool.req_to_token,
                    forward_batch.req_pool_indices[rows], forward_batch.seq_lens[rows],
                    scaling=layer.scaling, enable_gqa=hq != hkv, causal=False)
                o_[rows] = o_plain
            shape = (hq, hkv, d, float(layer.scaling))
            if self._planned_for != shape:
                self.kernel.plan(self._plan, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, sm_scale=layer.scaling)
                self._planned_for = shape
            self.kernel.run(q_, k_buf, v_buf, out=o_)
            return o

    return TorchCascadeBackend


# ---------------------------------------------------------------------- GPU
@functools.cache
def _flashinfer_cascade_backend_class():
    from sglang.srt.layers.attention.flashinfer_backend import FlashInferAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    from kernels.cascade.gpu import FlashInferCascade

    class FlashInferCascadeBackend(_Planning, FlashInferAttnBackend):
        """SGLang's flashinfer backend with multi-level cascade decode (see the module docstring)."""

        restrict = False  # the cascade kernel runs the whole batch

        def __init__(self, model_runner):
            super().__init__(model_runner, init_new_workspace=getattr(model_runner, "init_new_workspace", False))
            self._init_planning(model_runner)
            self.kernel = FlashInferCascade(model_runner.device, workspace=self.workspace_buffer)

        def init_cuda_graph_state(self, *args, **kwargs):
            raise RuntimeError(f"--attention-backend {BACKEND_NAME} plans each decode batch on the host and does not "
                               "run inside CUDA graphs: add --disable-cuda-graph")

        def init_forward_metadata(self, forward_batch):
            super().init_forward_metadata(forward_batch)

            def table_of(fb, lens):  # the batch's rows copied to the host, in batch order
                rows = fb.req_pool_indices.long()
                return self.req_to_token_pool.req_to_token[rows, :int(lens.max())].cpu().numpy(), np.arange(len(lens))

            self._plan_batch(forward_batch, table_of)

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
            if self._plan is None or not _cascade_covers(layer) or self.decode_uses_dequant_workspace:
                return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache)
            if k is not None and save_kv_cache:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc.for_layer(forward_batch, layer, swa_loc=self.forward_metadata.swa_out_cache_loc),
                    k, v, *self._kv_write_scales(layer))
            hq, hkv, d = layer.tp_q_head_num, layer.tp_k_head_num, layer.head_dim
            k_buf, v_buf = self.token_to_kv_pool.get_kv_buffer(layer.layer_id)
            shape = (hq, hkv, d, float(layer.scaling), q.dtype, k_buf.dtype)
            if self._planned_for != shape:
                self.kernel.plan(self._plan, num_qo_heads=hq, num_kv_heads=hkv, head_dim=d, sm_scale=layer.scaling,
                                 q_dtype=q.dtype, kv_dtype=k_buf.dtype)
                self._planned_for = shape
            o = self.kernel.run(q.contiguous().view(-1, hq, d), k_buf, v_buf)
            return o.view(-1, hq * d)

    return FlashInferCascadeBackend


# ---------------------------------------------------------------------- registration
def create_backend(model_runner):
    """SGLang's factory signature: the GPU backend on CUDA, the CPU one elsewhere."""
    if getattr(model_runner, "use_mla_backend", False):
        raise ValueError(f"--attention-backend {BACKEND_NAME} supports multi-head (MHA/GQA) attention, not MLA models; "
                         "choose another backend for this model")
    if str(model_runner.device).startswith("cuda"):
        return _flashinfer_cascade_backend_class()(model_runner)
    return _torch_cascade_backend_class()(model_runner)


def register() -> None:
    """Add `cascade` to SGLang's attention-backend registry and --attention-backend choices (idempotent)."""
    global _registered
    if _registered:
        return
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    ATTENTION_BACKENDS.setdefault(BACKEND_NAME, create_backend)
    _registered = True
