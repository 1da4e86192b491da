"""Frozen hardware and model specs with named presets.

Hardware numbers are vendor peak figures (dense BF16 tensor FLOP/s, HBM bandwidth); the `cpu`
preset is this project's CPU machine as recorded by a calibration (`CPU_PRESET`; `measure_cpu`
measures the machine at hand). Model specs are built from a
Hugging Face `config.json` dict, so a preset is just a stored config.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "fp8": 1}


@dataclass(frozen=True, slots=True)
class HardwareSpec:
    """One accelerator: peak GEMM throughput, memory bandwidth and capacity, and the engine's
    host work per step that no operator accounts for (scheduling, sampling, kernel launches,
    per-request attention calls, element-wise kernels): `step_overhead_s` per step that runs,
    `request_overhead_s` per request in a decode batch, `prefill_token_overhead_s` per prompt
    token a step computes, `kv_token_overhead_s` per KV token the running requests hold in a step
    that decodes (beyond the bandwidth term). All 0 for the vendor GPU presets; `h200-measured`
    carries a fit over whole steps on an H200, the `cpu` preset a fit over SGLang's logged steps."""

    name: str
    flops: float  # dense FP16/BF16 FLOP/s
    mem_bandwidth: float  # bytes/s
    mem_capacity: float  # bytes
    flops_efficiency: float = 1.0  # achieved / peak, fitted by calibration
    bandwidth_efficiency: float = 1.0
    step_overhead_s: float = 0.0  # seconds per engine step
    request_overhead_s: float = 0.0  # seconds per decoding request per step
    prefill_token_overhead_s: float = 0.0  # seconds per prompt token computed in a step
    kv_token_overhead_s: float = 0.0  # seconds per KV token held by the running requests in a decode step

    def __post_init__(self) -> None:
        for field in ("flops", "mem_bandwidth", "mem_capacity"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be a positive finite number, got {value!r}")
        for field in ("flops_efficiency", "bandwidth_efficiency"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be in (0, 1], got {value!r}")
        for field in ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s", "kv_token_overhead_s"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be a finite number >= 0, got {value!r}")

    @property
    def effective_flops(self) -> float:
        return self.flops * self.flops_efficiency

    @property
    def effective_bandwidth(self) -> float:
        return self.mem_bandwidth * self.bandwidth_efficiency


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The shape facts the cost model needs, derived from a Hugging Face config."""

    name: str
    num_params: int  # all weights, embeddings included
    gemm_params: int  # weights that enter a GEMM per token: decoder layers + LM head
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int
    max_context: int
    num_heads: int = 0  # query heads (0: not given; the prefill-attention term needs it)
    lm_head_params: int = 0  # of gemm_params, the LM head's (vocab x hidden): run only for sampled tokens

    def __post_init__(self) -> None:
        for field in ("num_params", "gemm_params", "num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "max_context"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be a positive integer, got {value!r}")
        if not (isinstance(self.lm_head_params, int) and 0 <= self.lm_head_params < self.gemm_params):
            raise ValueError(f"ModelSpec {self.name!r}: lm_head_params must be an integer in [0, gemm_params), "
                             f"got {self.lm_head_params!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token across all layers."""
        return 2 * self.dtype_bytes * self.num_kv_heads * self.head_dim * self.num_layers

    @classmethod
    def from_hf_config(cls, config: dict, name: str | None = None) -> "ModelSpec":
        """Build from a decoder-only (Llama/Qwen2-style) `config.json` dict."""
        name = name or config.get("_name_or_path") or config.get("model_type") or "model"
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        text = config.get("text_config")
        if isinstance(text, dict) and any(k not in config for k in required):
            # a multimodal config: the language model's fields sit under text_config (its dtype may sit above)
            config = {**{k: v for k, v in config.items() if k in ("torch_dtype", "dtype")}, **text}
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"config.json for {name!r} lacks {missing}; a decoder-only HF config is required")
        def whole(key: str, default: int | None = None) -> int:
            value = config.get(key)
            if value is None and default is not None:
                return default
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                value_ok = None
            else:
                try:
                    value_ok = int(value) if float(value) == int(float(value)) else None
                except (ValueError, OverflowError):
                    value_ok = None
            if value_ok is None or value_ok < 1:
                raise ValueError(f"config.json for {name!r}: {key} must be a whole number of at least 1, got "
                                 f"{value!r}; fix that field of the model's config.json")
            return value_ok

        hidden = whole("hidden_size")
        inter = whole("intermediate_size")
        layers = whole("num_hidden_layers")
        heads = whole("num_attention_heads")
        kv_heads = whole("num_key_value_heads", heads)
        head_dim = whole("head_dim", max(1, hidden // heads))
        vocab = whole("vocab_size")
        dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
        if dtype.startswith(("float8", "fp8")):  # float8_e4m3fn, float8_e5m2, ...
            dtype = "float8"
        if dtype not in _DTYPE_BYTES:
            raise ValueError(f"config.json for {name!r}: unknown torch_dtype {dtype!r}; one of {sorted(_DTYPE_BYTES)}")
        q = hidden * heads * head_dim
        kv = 2 * hidden * kv_heads * head_dim
        o = heads * head_dim * hidden
        bias = (heads + 2 * kv_heads) * head_dim if config.get("attention_bias") or config.get("model_type") == "qwen2" else 0
        mlp = 3 * hidden * inter
        per_layer = q + kv + o + bias + mlp + 2 * hidden
        embed = vocab * hidden
        tied = bool(config.get("tie_word_embeddings", False))
        num_params = layers * per_layer + embed + (0 if tied else embed) + hidden
        gemm_params = layers * (q + kv + o + mlp) + embed
        return cls(
            name=name,
            num_params=num_params,
            gemm_params=gemm_params,
            num_layers=layers,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            dtype_bytes=_DTYPE_BYTES[dtype],
            max_context=whole("max_position_embeddings", 4096),
            num_heads=heads,
            lm_head_params=embed,
        )

    @classmethod
    def from_config_file(cls, path: str | os.PathLike) -> "ModelSpec":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"model config {path} not found; pass a model directory holding config.json")
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read model config {path} ({exc.strerror}); check its permissions") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"model config {path} is not JSON ({exc}); pass a model directory holding a "
                             "Hugging Face config.json") from None
        if not isinstance(config, dict):
            raise ValueError(f"model config {path} is not a JSON object; pass a Hugging Face config.json")
        return cls.from_hf_config(config, name=path.parent.name)


GB = 1e9
_HARDWARE = {
    # NVIDIA datasheets: dense BF16 tensor throughput, HBM bandwidth, HBM size.
    "a100": HardwareSpec("a100", flops=312e12, mem_bandwidth=2.039e12, mem_capacity=80 * GB),
    "h100": HardwareSpec("h100", flops=989.4e12, mem_bandwidth=3.35e12, mem_capacity=80 * GB),
    "h200": HardwareSpec("h200", flops=989.4e12, mem_bandwidth=4.8e12, mem_capacity=141 * GB),
}
_HARDWARE_ALIASES = {"a100-80gb": "a100", "a100-80gb-sxm": "a100", "h100-sxm": "h100", "h200-sxm": "h200"}

# Stored Hugging Face config.json fields of the preset models.
_MODEL_CONFIGS = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, torch_dtype="bfloat16",
                         max_position_embeddings=131072, tie_word_embeddings=False, model_type="llama"),
    "llama-3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                          num_key_value_heads=8, vocab_size=128256, torch_dtype="bfloat16",
                          max_position_embeddings=131072, tie_word_embeddings=False, model_type="llama"),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, torch_dtype="bfloat16",
                       max_position_embeddings=131072, tie_word_embeddings=False, model_type="qwen2"),
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, torch_dtype="bfloat16",
                         max_position_embeddings=8192, tie_word_embeddings=True, model_type="llama"),
}


MEASURED = "h200-measured"
GPU_EVIDENCE = Path(__file__).resolve().parents[2] / "bench" / "results" / "gpu_evidence.json"
GPU_EVIDENCE_COMMAND = "bash bench/gpu_run.sh (python bench/gpu_evidence.py on an H200)"
ASSUMED_INTERFERENCE = 0.1  # overlapped mode's contention share when nothing was measured


def hardware_names() -> list[str]:
    return sorted([*_HARDWARE, "cpu", MEASURED])


def gpu_evidence(path: str | os.PathLike | None = None) -> dict:
    """The figures of a CUDA run of `bench/gpu_evidence.py` (`bench/results/gpu_evidence.json`)."""
    path = Path(path) if path is not None else GPU_EVIDENCE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the {MEASURED!r} preset and the measured interference come "
                                f"from a GPU run; produce it with {GPU_EVIDENCE_COMMAND}")
    data = json.loads(path.read_text())
    for key in ("device", "preset", "interference"):
        if key not in data:
            raise ValueError(f"{path} lacks {key!r}; rerun {GPU_EVIDENCE_COMMAND}")
    if data.get("tiny") or "H200" not in str(data["device"]):
        raise ValueError(f"{path} was measured on {data['device']!r}{' (--tiny)' if data.get('tiny') else ''}, "
                         f"not an H200; rerun {GPU_EVIDENCE_COMMAND}")
    return data


def measured_hardware(path: str | os.PathLike | None = None) -> HardwareSpec:
    """The `h200-measured` preset: peaks and efficiency factors fitted on a real H200's operators,
    and the per-step work no operator term covers (`step_overhead_s`, `request_overhead_s`,
    `prefill_token_overhead_s`) fitted on whole steps of a Llama-shaped stack (0 where absent)."""
    p = gpu_evidence(path)["preset"]
    over = {k: float(p.get(k, 0.0)) for k in ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s")}
    return HardwareSpec(MEASURED, flops=p["flops"], mem_bandwidth=p["mem_bandwidth"], mem_capacity=p["mem_capacity"],
                        flops_efficiency=p["flops_efficiency"], bandwidth_efficiency=p["bandwidth_efficiency"], **over)


def interference_names() -> list[str]:
    return ["assumed", MEASURED]


def interference(setting: str | float) -> float:
    """The overlapped mode's interference: a number in [0, 1], `assumed` (0.1) or `h200-measured`
    (the median measured by `bench/gpu_evidence.py` on an H200, clipped to [0, 1]: the range
    the overlapped mode takes)."""
    if isinstance(setting, (int, float)) and not isinstance(setting, bool):
        return float(setting)
    key = str(setting).lower()
    if key == "assumed":
        return ASSUMED_INTERFERENCE
    if key == MEASURED:
        return min(1.0, max(0.0, float(gpu_evidence()["interference"]["median"])))
    try:
        return float(key)
    except ValueError:
        raise ValueError(f"unknown interference {setting!r}: a number in [0, 1] "
                         f"or one of {interference_names()}") from None


def model_names() -> list[str]:
    return sorted(_MODEL_CONFIGS)


def hardware(name: str) -> HardwareSpec:
    """A named hardware preset: `a100`, `h100`, `h200`, `cpu` (`CPU_PRESET`, recorded on this
    project's CPU machine) or `h200-measured` (fitted on an H200 by `bench/gpu_evidence.py`)."""
    key = _HARDWARE_ALIASES.get(str(name).lower(), str(name).lower())
    if key == "cpu":
        return cpu_preset()
    if key == MEASURED:
        return measured_hardware()
    if key not in _HARDWARE:
        raise ValueError(f"unknown hardware preset {name!r}; choose one of {hardware_names()}")
    return _HARDWARE[key]


def model_config(name: str) -> dict:
    """The stored Hugging Face config fields of a preset model (a copy)."""
    key = str(name).lower()
    if key not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {model_names()}")
    return dict(_MODEL_CONFIGS[key])


def model(name: str) -> ModelSpec:
    """A named model preset, or a path to a model directory / config.json."""
    key = str(name).lower()
    if key in _MODEL_CONFIGS:
        return ModelSpec.from_hf_config(_MODEL_CONFIGS[key], name=key)
    if os.path.exists(name):
        return ModelSpec.from_config_file(name)
    raise ValueError(f"unknown model preset {name!r}; choose one of {model_names()} or pass a path to config.json")


# The `cpu` preset: GEMM FLOP/s and copy bandwidth as `measure_cpu` found them during
# `python bench/plan_file.py --phases calibrate` (the best of its measurements: the least loaded), and
# the engine overheads fitted by least squares over SGLang's logged steps of the calibration runs
# against them (`overhead_fit` in bench/results/plan_file.json). Fixed figures: the planner and the
# plugin's pacing see the same machine whatever the load when they start.
CPU_PRESET = {"flops": 40304444695.76308, "mem_bandwidth": 39811176379.998, "step_overhead_s": 0.0064759,
              "request_overhead_s": 0.0004532, "prefill_token_overhead_s": 0.000106, "kv_token_overhead_s": 0.0}


@lru_cache(maxsize=1)
def cpu_preset() -> HardwareSpec:
    """The `cpu` preset (`CPU_PRESET`); memory capacity is this machine's physical RAM."""
    return HardwareSpec("cpu", mem_capacity=_physical_ram(), **CPU_PRESET)


def _physical_ram() -> float:
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GB


@lru_cache(maxsize=1)
def measure_cpu(seconds: float = 0.6) -> HardwareSpec:
    """Measure this machine: float32 GEMM FLOP/s (NumPy BLAS) and streaming-copy bandwidth, no
    engine overheads (the calibration that records `CPU_PRESET` fits them).

    Each figure is the best of repeated runs inside a small time budget. Memory capacity is the
    machine's physical RAM. Measured once per process; different machines give different specs.
    """
    import numpy as np

    n = 1024
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm-up: thread pool and caches
    best_gemm = math.inf
    deadline = time.perf_counter() + seconds / 2
    while True:
        t0 = time.perf_counter()
        a @ b
        best_gemm = min(best_gemm, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    src = np.ones(32 * 1024 * 1024, dtype=np.float32)  # 128 MiB, far beyond cache
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best_copy = math.inf
    deadline = time.perf_counter() + seconds / 2
    while True:
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best_copy = min(best_copy, time.perf_counter() - t0)
        if time.perf_counter() > deadline:
            break
    return HardwareSpec("cpu", flops=2 * n**3 / best_gemm, mem_bandwidth=2 * src.nbytes / best_copy,  # read + write
                        mem_capacity=_physical_ram())
