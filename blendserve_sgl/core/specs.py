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
import re
import time
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float8": 1, "fp8": 1}
_KV_CACHE_DTYPE_BYTES = {"fp8_e4m3": 1, "fp8_e5m2": 1, "mxfp8": 1, "bf16": 2, "bfloat16": 2}  # --kv-cache-dtype


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
    devices: int = 1  # accelerators in the figures (`times`: a tensor-parallel group): what GPU-hours count

    def __post_init__(self) -> None:
        for field in ("flops", "mem_bandwidth", "mem_capacity"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be a positive finite number, got {value!r}")
        for field in ("flops_efficiency", "bandwidth_efficiency"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and 0 < value <= 1):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be in (0, 1], got {value!r}")
        if not (isinstance(self.devices, int) and self.devices >= 1):
            raise ValueError(f"HardwareSpec {self.name!r}: devices must be a whole number >= 1, got {self.devices!r}")
        for field in ("step_overhead_s", "request_overhead_s", "prefill_token_overhead_s", "kv_token_overhead_s"):
            value = getattr(self, field)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"HardwareSpec {self.name!r}: {field} must be a finite number >= 0, got {value!r}")

    def times(self, n: int) -> "HardwareSpec":
        """n of these as one tensor-parallel engine, ideally: n times the FLOP/s, bandwidth and memory,
        no communication cost (so an upper bound on its speed); the host overheads stay per step."""
        if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
            raise ValueError(f"a tensor-parallel group needs a whole number of devices >= 1, got {n!r}")
        if n == 1:
            return self
        return replace(self, name=f"{n}x{self.name}", flops=self.flops * n, mem_bandwidth=self.mem_bandwidth * n,
                       mem_capacity=self.mem_capacity * n, devices=self.devices * n)

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
    head_dim: int  # per head; with latent attention (qk_nope + qk_rope + v_head_dim) / 2, for the attention FLOPs
    dtype_bytes: int
    max_context: int
    num_heads: int = 0  # query heads (0: not given; the prefill-attention term needs it)
    lm_head_params: int = 0  # of gemm_params, the LM head's (vocab x hidden): run only for sampled tokens
    kv_dim: int = 0  # values one token keeps per layer in the KV cache (0: K and V, 2 x kv heads x head_dim;
    # multi-head latent attention keeps one latent of kv_lora_rank + qk_rope_head_dim)
    weight_bytes: int = 0  # all weights as stored, bytes (0: num_params x dtype_bytes; a quantized checkpoint less)
    experts: int = 0  # routed experts per sparse layer (0: a dense model)
    experts_per_token: int = 0  # of them, the ones each token runs through
    expert_bytes: int = 0  # of weight_read_bytes, the routed experts' (a step reads those its tokens route to)

    def __post_init__(self) -> None:
        for field in ("num_params", "gemm_params", "num_layers", "num_kv_heads", "head_dim", "dtype_bytes", "max_context"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be a positive integer, got {value!r}")
        for field in ("kv_dim", "weight_bytes"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be an integer >= 0, got {value!r}")
        for field in ("experts", "experts_per_token", "expert_bytes"):
            value = getattr(self, field)
            if not (isinstance(value, int) and value >= 0):
                raise ValueError(f"ModelSpec {self.name!r}: {field} must be an integer >= 0, got {value!r}")
        if self.experts and not (1 <= self.experts_per_token <= self.experts
                                 and 0 < self.expert_bytes <= self.weight_read_bytes):
            raise ValueError(f"ModelSpec {self.name!r}: a mixture of experts needs 1 <= experts_per_token <= experts "
                             f"and 0 < expert_bytes <= the weights' bytes, got {self.experts_per_token!r} of "
                             f"{self.experts!r}, {self.expert_bytes!r} bytes")
        if not (isinstance(self.lm_head_params, int) and 0 <= self.lm_head_params < self.gemm_params):
            raise ValueError(f"ModelSpec {self.name!r}: lm_head_params must be an integer in [0, gemm_params), "
                             f"got {self.lm_head_params!r}")

    @property
    def kv_bytes_per_token(self) -> int:
        """What one token keeps in the KV cache across all layers: K and V, or MLA's latent."""
        per_layer = self.kv_dim or 2 * self.num_kv_heads * self.head_dim
        return self.dtype_bytes * per_layer * self.num_layers

    def with_kv_cache_dtype(self, flag: str | None) -> "ModelSpec":
        """The spec under an engine's `--kv-cache-dtype` (SGLang's values): FP8 caches keep a byte a
        value; "auto", bf16 and values this model does not size keep the checkpoint's width. The
        weights keep theirs."""
        width = _KV_CACHE_DTYPE_BYTES.get(str(flag or "auto").lower())
        if width is None or width == self.dtype_bytes:
            return self
        return replace(self, dtype_bytes=width, weight_bytes=self.weight_read_bytes)

    @property
    def weight_read_bytes(self) -> int:
        """Bytes of every weight: what the device holds besides the KV cache, and what a step reads
        once its tokens reach every expert (`step_weight_bytes`)."""
        return self.weight_bytes or self.num_params * self.dtype_bytes

    def step_weight_bytes(self, tokens):
        """Weight bytes a step of `tokens` GEMM tokens reads (a number or a NumPy array): all of a
        dense model's; of a mixture of experts, the dense part and, in each sparse layer, the experts
        its tokens route to, on average 1 - (1 - k / E)^tokens of them when a token picks k of E
        uniformly (skewed routing touches fewer: an upper estimate). Mixtral (top-2 of 8) reads 99%
        of its experts at 16 tokens, DeepSeek-V3 (top-8 of 256) 13% at 4 and 98% at 128."""
        if not self.experts:
            return self.weight_read_bytes
        untouched = (1.0 - self.experts_per_token / self.experts) ** tokens
        return self.weight_read_bytes - self.expert_bytes * untouched

    @classmethod
    def from_hf_config(cls, config: dict, name: str | None = None) -> "ModelSpec":
        """Build from a decoder-only `config.json` dict: Llama/Qwen-style dense models, mixtures of
        experts (Mixtral, Qwen-MoE, gpt-oss, DeepSeek, Llama-4: every expert held, those a step's
        tokens route to read, the routed ones computed), multi-head latent attention (DeepSeek: the
        KV cache keeps the latent)
        and quantized checkpoints (`quantization_config`: the decoder's GEMM weights at its bits)."""
        name = name or config.get("_name_or_path") or config.get("model_type") or "model"
        required = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
        text = config.get("text_config")
        if isinstance(text, dict) and any(k not in config for k in required):
            # a multimodal config: the language model's fields sit under text_config (its dtype may sit above)
            keep = ("torch_dtype", "dtype", "quantization_config")  # Llama-4 FP8 keeps its quantization at the top
            config = {**{k: v for k, v in config.items() if k in keep}, **text}
        missing = [k for k in required if k not in config]
        if missing:
            raise ValueError(f"config.json for {name!r} lacks {missing}; a decoder-only HF config is required")
        fields = _ConfigFields(config, name)
        whole, first = fields.whole, fields.first

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

        # Attention, per layer.
        kv_dim = 0
        if config.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
            lora, rope = whole("kv_lora_rank"), whole("qk_rope_head_dim")
            nope, v_dim = whole("qk_nope_head_dim"), whole("v_head_dim")
            q_lora = whole("q_lora_rank") if config.get("q_lora_rank") else 0
            q = hidden * q_lora + q_lora * heads * (nope + rope) if q_lora else hidden * heads * (nope + rope)
            kv = hidden * (lora + rope) + lora * heads * (nope + v_dim)
            o = heads * v_dim * hidden
            attn_norms = q_lora + lora
            head_dim = max(1, (nope + rope + v_dim) // 2)  # a query-key pair's FLOPs: 4 x heads x head_dim
            kv_dim = lora + rope
        else:
            q = hidden * heads * head_dim
            kv = 2 * hidden * kv_heads * head_dim
            o = heads * head_dim * hidden
            attn_norms = 0
        qkv_bias = config.get("attention_bias") or str(config.get("model_type", "")).startswith("qwen2")
        bias = (heads + 2 * kv_heads) * head_dim if qkv_bias else 0

        # Feed-forward, per layer: dense, or routed experts (+ shared ones and the router). Llama-4
        # sizes its experts by intermediate_size and its dense layers by intermediate_size_mlp.
        experts = first(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts"), 0)
        dense_mlp = 3 * hidden * first(("intermediate_size_mlp",), inter)
        moe_layers = top_k = expert = 0
        moe_all = moe_active = 0
        if experts > 1:
            top_k = first(("num_experts_per_tok", "experts_per_token", "moe_topk", "num_experts_per_token"),
                          nonzero=True)
            if top_k > experts:
                raise ValueError(f"config.json for {name!r}: {top_k} experts per token of {experts}; fix that field of "
                                 "the model's config.json")
            expert = 3 * hidden * first(("moe_intermediate_size",), inter)
            llama4 = str(config.get("model_type", "")).startswith("llama4")  # one shared expert, no field for it
            shared = (expert * first(("n_shared_experts",), int(llama4))
                      + 3 * hidden * first(("shared_expert_intermediate_size",), 0))
            router = hidden * experts
            moe_all, moe_active = experts * expert + shared + router, top_k * expert + shared + router
            dense_first = first(("first_k_dense_replace",), 0)
            every = first(("moe_layer_freq",), 1)
            step = first(("decoder_sparse_step", "interleave_moe_layer_step"), 1)  # MoE where (i + 1) % step == 0
            mlp_only = fields.layer_list("mlp_only_layers")
            moe_layers = sum(1 for i in range(layers) if i >= dense_first and i % every == 0
                             and (i + 1) % step == 0 and i not in mlp_only)
        dense_layers = layers - moe_layers

        attn = q + kv + o
        norms = 2 * hidden + attn_norms
        embed = vocab * hidden
        tied = config.get("tie_word_embeddings", False)
        tied = tied.strip().lower() == "true" if isinstance(tied, str) else bool(tied)
        layer_params = layers * (attn + bias + norms) + dense_layers * dense_mlp + moe_layers * moe_all
        num_params = layer_params + embed + (0 if tied else embed) + hidden
        gemm_params = layers * attn + dense_layers * dense_mlp + moe_layers * moe_active + embed
        quantized = layers * attn + dense_layers * dense_mlp + moe_layers * moe_all  # the decoder's GEMM weights
        bits = _weight_bits(config.get("quantization_config"), name)
        routed = moe_layers * experts * expert  # the routed experts' weights (the router runs for every token)
        weight_bytes, expert_bytes = 0, routed * _DTYPE_BYTES[dtype]
        if bits is not None:
            if bits == _MXFP4_BITS:  # gpt-oss: only the experts are MXFP4
                quantized = routed
            weight_bytes = math.ceil(quantized * bits / 8 + (num_params - quantized) * _DTYPE_BYTES[dtype])
            expert_bytes = math.ceil(routed * bits / 8)
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
            kv_dim=kv_dim,
            weight_bytes=weight_bytes,
            experts=experts if moe_layers else 0,
            experts_per_token=top_k if moe_layers else 0,
            expert_bytes=expert_bytes if moe_layers else 0,
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


_MXFP4_BITS = 4.25  # 4-bit values with one 8-bit scale per 32 (the OCP microscaling format)


class _ConfigFields:
    """Reads whole-number fields of one config.json, naming the field and the fix when one is bad."""

    def __init__(self, config: dict, name: str):
        self.config, self.name = config, name

    def whole(self, key: str, default: int | None = None) -> int:
        value = self.config.get(key)
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
            raise ValueError(f"config.json for {self.name!r}: {key} must be a whole number of at least 1, got "
                             f"{value!r}; fix that field of the model's config.json")
        return value_ok

    def first(self, keys: tuple[str, ...], default: int | None = None, nonzero: bool = False) -> int:
        """The first of `keys` the config sets (not null, not 0), or `default`; a config that sets none
        and has no default is named with the first key (`nonzero`: a 0 there is named as such)."""
        for key in keys:
            value = self.config.get(key)
            if value == 0 and nonzero and not isinstance(value, bool):
                raise ValueError(f"config.json for {self.name!r}: {key} is 0; a mixture of experts runs each token "
                                 "through at least one expert: fix that field of the model's config.json")
            if value is not None and (value != 0 or isinstance(value, bool)):
                return self.whole(key)
        if default is None:
            raise ValueError(f"config.json for {self.name!r} lacks {keys[0]} (or {', '.join(keys[1:])}); "
                             "a mixture-of-experts config names its experts per token")
        return default

    def layer_list(self, key: str) -> set[int]:
        value = self.config.get(key) or []
        if not (isinstance(value, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in value)):
            raise ValueError(f"config.json for {self.name!r}: {key} must be a list of layer numbers, got {value!r}")
        return set(value)


def _weight_bits(qc, name: str) -> float | None:
    """Bits per quantized weight a `quantization_config` names (None: not quantized, or a scheme
    this model does not know, whose weights are then counted at torch_dtype)."""
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise ValueError(f"config.json for {name!r}: quantization_config must be an object, got {qc!r}")
    method = str(qc.get("quant_method") or "").lower()
    if method == "mxfp4":
        return _MXFP4_BITS
    if "fp8" in method or str(qc.get("quant_algo") or "").upper() == "FP8":
        return 8.0
    if qc.get("load_in_4bit"):
        return 4.0
    if qc.get("load_in_8bit"):
        return 8.0
    for key in ("bits", "w_bit", "weight_bits"):
        bits = _bit_count(qc.get(key))
        if bits is not None:
            return bits
    groups = qc.get("config_groups")
    for group in groups.values() if isinstance(groups, dict) else ():  # compressed-tensors
        weights = group.get("weights") if isinstance(group, dict) else None
        bits = _bit_count(weights.get("num_bits")) if isinstance(weights, dict) else None
        if bits is not None:
            return bits
    return None


def whole_number(value) -> int | None:
    """`value` (a number or its text: 4, 4.0 or "4") as an integer when it is a whole number; None
    for anything else (a bool, a fraction, NaN, inf, a number too large for a float, other types,
    text Python reads as a number but a file means otherwise: "1_000", digits of other scripts)."""
    if isinstance(value, bool) or isinstance(value, str) and (not value.isascii() or "_" in value):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        return None
    return int(v) if v.is_integer() else None


def _bit_count(value) -> float | None:
    """A whole number of bits from 1 to 16, or None."""
    bits = whole_number(value)
    return float(bits) if bits is not None and 1 <= bits <= 16 else None


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
    # Mixtures of experts and latent attention (their config.json fields; totals in the tests)
    "mixtral-8x7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=32000, torch_dtype="bfloat16",
                         max_position_embeddings=32768, tie_word_embeddings=False, model_type="mixtral",
                         num_local_experts=8, num_experts_per_tok=2),
    "qwen3-30b-a3b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, vocab_size=151936, torch_dtype="bfloat16",
                          max_position_embeddings=40960, tie_word_embeddings=False, model_type="qwen3_moe",
                          num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                          mlp_only_layers=[]),
    "deepseek-v3": dict(hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, vocab_size=129280, torch_dtype="bfloat16",
                        max_position_embeddings=163840, tie_word_embeddings=False, model_type="deepseek_v3",
                        n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, moe_intermediate_size=2048,
                        first_k_dense_replace=3, moe_layer_freq=1, q_lora_rank=1536, kv_lora_rank=512,
                        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                        quantization_config=dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic",
                                                 weight_block_size=[128, 128])),
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


CUSTOM_HARDWARE = "flops=F,bandwidth=B,memory=M"  # the form of a hardware given by its figures
MAX_GROUP = 65536  # devices in one NxNAME group
_CUSTOM_FIELDS = {"flops": "flops", "bandwidth": "mem_bandwidth", "memory": "mem_capacity"}
# one device's plausible figures, with room on both sides (a laptop CPU to many times today's largest
# GPU): outside them a plan is a unit slip (989 for 989e12) or overflows into inf and nan
_CUSTOM_RANGES = {"flops": (1e9, 1e17, "FLOP/s"), "bandwidth": (1e8, 1e14, "bytes/s"), "memory": (1e8, 1e13, "bytes")}


def custom_hardware(text: str) -> HardwareSpec:
    """A hardware given by its datasheet figures, `flops=989e12,bandwidth=3.35e12,memory=80e9`: dense
    BF16 FLOP/s, memory bytes/s and memory bytes; for an accelerator no preset names."""
    fields: dict[str, float] = {}
    for part in str(text).split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in _CUSTOM_FIELDS or key in fields:
            raise ValueError(f"hardware {text!r}: expected {CUSTOM_HARDWARE} (dense BF16 FLOP/s, memory bytes/s, "
                             "memory bytes; each once), e.g. flops=989e12,bandwidth=3.35e12,memory=80e9")
        try:
            fields[key] = float(value)
        except ValueError:
            raise ValueError(f"hardware {text!r}: {key} must be a number, got {value.strip()!r}") from None
    missing = [k for k in _CUSTOM_FIELDS if k not in fields]
    if missing:
        raise ValueError(f"hardware {text!r} lacks {', '.join(missing)}; expected {CUSTOM_HARDWARE}")
    for key, (low, high, unit) in _CUSTOM_RANGES.items():
        if not low <= fields[key] <= high:  # also nan
            raise ValueError(f"hardware {text!r}: {key}={fields[key]:g} is outside {low:g} to {high:g} {unit} for one "
                             "device (figures in base units: flops=989e12 for 989 TFLOP/s); NxNAME for a group")
    return HardwareSpec(str(text), **{_CUSTOM_FIELDS[k]: v for k, v in fields.items()})


def hardware(name: str) -> HardwareSpec:
    """A named hardware preset: `a100`, `h100`, `h200`, `cpu` (`CPU_PRESET`, recorded on this
    project's CPU machine) or `h200-measured` (fitted on an H200 by `bench/gpu_evidence.py`);
    or an accelerator's figures, `flops=F,bandwidth=B,memory=M` (`custom_hardware`); `NxNAME` is N of
    them as one tensor-parallel engine (`HardwareSpec.times`: `8xh200` for a model no one GPU holds)."""
    group = re.fullmatch(r"\s*(\d+)\s*x\s*(\S.*?)\s*", str(name), flags=re.IGNORECASE)
    if group:
        if not 1 <= len(group[1]) <= 6 or not 1 <= int(group[1]) <= MAX_GROUP:
            raise ValueError(f"hardware {name!r}: a tensor-parallel group holds 1 to {MAX_GROUP:,} devices")
        if re.match(r"\d+\s*x", group[2], flags=re.IGNORECASE):  # 2x3xh100, or a thousand levels deep
            shown = name if len(name) <= 40 else f"{name[:40]}..."
            raise ValueError(f"hardware {shown!r}: one NxNAME level, N devices of one kind (write the total, as in "
                             "8xh100)")
        return hardware(group[2]).times(int(group[1]))
    if "=" in str(name):
        return custom_hardware(name)
    key = str(name).strip().lower()
    key = _HARDWARE_ALIASES.get(key, key)
    if key == "cpu":
        return cpu_preset()
    if key == MEASURED:
        return measured_hardware()
    if key not in _HARDWARE:
        raise ValueError(f"unknown hardware preset {name!r}; choose one of {hardware_names()} (NxNAME for N "
                         f"tensor-parallel devices), or give the accelerator's figures as {CUSTOM_HARDWARE}")
    return _HARDWARE[key]


def model_config(name: str) -> dict:
    """The stored Hugging Face config fields of a preset model (a copy)."""
    key = str(name).lower()
    if key not in _MODEL_CONFIGS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {model_names()}")
    return dict(_MODEL_CONFIGS[key])


def vocab_size(name: str) -> int | None:
    """The vocabulary size of a named model preset or of a config.json (its text part for a
    multimodal one); None where it is not known."""
    config = _MODEL_CONFIGS.get(str(name).lower())
    if config is None and os.path.isfile(name):
        try:
            config = json.loads(Path(name).read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
        config = (config.get("text_config") or config) if isinstance(config, dict) else None
    value = config.get("vocab_size") if isinstance(config, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


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
