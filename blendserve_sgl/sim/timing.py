"""Step time from the cost model, in the two execution modes.

Per step the engine records the tokens that pass through the GEMMs (prefill + one per decoding
request) and the KV tokens decode attention reads. With the cost model (`core/cost.py`):

    comp  = 2 P tokens / FLOPS               GEMM compute
    w     = weight bytes / BW                every step reads the weights once
    gemm  = max(comp, w)                     the GEMMs at their roofline
    attn  = KV bytes read / BW               decode attention, memory-bound

- `sequential` (SGLang today): operators run one after another: gemm + attn.
- `overlapped` (NanoFlow-style): compute-bound and memory-bound operators share the GPU:
  max(gemm, attn) + interference x min(gemm, attn). interference = 0 is perfect overlap,
  1 is no overlap at all; the concurrent kernels slow each other down by that share of the
  shorter one (contention for SMs, L2 and HBM). Prefill attention is left out, as in the
  paper's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.cost import CostModel
from ..core.pacing import weight_read_seconds as weight_seconds

MODES = ("sequential", "overlapped")


@dataclass(frozen=True, slots=True)
class ExecModel:
    mode: str = "overlapped"
    interference: float = 0.1  # overlapped only: share of the shorter operator time lost to contention

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown execution mode {self.mode!r}; choose one of {list(MODES)}")
        if not (0.0 <= self.interference <= 1.0):
            raise ValueError(f"interference must be in [0, 1], got {self.interference!r}")


def operator_seconds(cost: CostModel, gemm_tokens, kv_read_tokens) -> tuple[np.ndarray, np.ndarray]:
    """(GEMM time at its roofline, decode-attention time) per step."""
    comp = np.asarray(gemm_tokens, dtype=np.float64) * cost.seconds_per_compute_token
    gemm = np.maximum(comp, np.where(comp > 0, weight_seconds(cost), 0.0))
    attn = np.asarray(kv_read_tokens, dtype=np.float64) * (cost.kv_bytes_per_token / cost.hardware.effective_bandwidth)
    return gemm, attn


def step_seconds(gemm: np.ndarray, attn: np.ndarray, model: ExecModel) -> np.ndarray:
    if model.mode == "sequential":
        return gemm + attn
    return np.maximum(gemm, attn) + model.interference * np.minimum(gemm, attn)
