#!/usr/bin/env python3
"""Smoke test: the real SGLang 0.5.23 engine generating on a CPU-only machine.

1. writes a tiny random-weight Llama (config.json, model.safetensors, an
   offline byte-level BPE tokenizer built with the ``tokenizers`` library)
   into a temporary directory -- or uses ``--model-path``;
2. starts ``sglang.Engine(device="cpu", attention_backend="torch_native")``
   with ``SGLANG_USE_CPU_ENGINE=1``, generates for a few prompts, prints the
   outputs, engine start time and output tokens/s, and shuts the engine down.

Needs the environment built from ``requirements/cpu.lock`` with the CPU
fallback activated in every process (``python -m kernels.cpu_fallback
install-pth``); see ``kernels/cpu_fallback``.  Usage::

    .venv-sgl/bin/python scripts/cpu_smoke.py                      # tiny random model
    .venv-sgl/bin/python scripts/cpu_smoke.py --num-prompts 64 --prompt-len 128 --max-new-tokens 32
    .venv-sgl/bin/python scripts/cpu_smoke.py --model-path DIR --prompt "The capital of France is" \
        --expect Paris

The last line printed is a JSON summary.  Exit status 0 on success, 1 when
the generation or an ``--expect`` check fails, 2 when the environment is not
set up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Must be set before sglang is imported (sglang reads it at import time), and
# is inherited by the scheduler/detokenizer processes SGLang spawns.
os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
# torch's OpenMP threads spin-wait by default; with 2 cores shared by the
# scheduler, detokenizer and tokenizer processes (and anything else running)
# that made decode 50-100x slower here (tiny model: ~30 instead of ~2,500
# output tok/s).  Passive waiting fixes it; OMP_NUM_THREADS=1 works as well.
# Both must be in the environment before torch is first imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Offline batch inference means",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "To make a cup of tea, first",
    "A prefix tree is a data structure that",
    "In 1969, the first humans",
]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# --------------------------------------------------------------------------- #
# A tiny Llama that needs nothing from a model hub
# --------------------------------------------------------------------------- #
def _tokenizer_corpus() -> list[str]:
    words = [
        "the", "a", "of", "to", "and", "in", "is", "was", "for", "on", "that", "with", "as", "by",
        "it", "at", "from", "this", "be", "are", "or", "an", "prefix", "tree", "batch", "request",
        "token", "cache", "memory", "compute", "decode", "prefill", "model", "server", "capital",
        "france", "paris", "city", "river", "village", "time", "once", "upon", "colors", "red",
        "green", "blue", "tea", "water", "cup", "first", "second", "def", "return", "if", "else",
        "for", "while", "print", "function", "value", "number",
    ]
    lines = []
    for i in range(400):
        k = 5 + i % 11
        lines.append(" ".join(words[(i * 7 + j * 13) % len(words)] for j in range(k)) + ".")
    lines.extend(DEFAULT_PROMPTS)
    lines.append("0123456789 ()[]{}:;,.!?+-*/=<>_'\"")
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512):
    """Train a small byte-level BPE tokenizer offline and save it as a HF fast tokenizer."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
    )
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    fast.save_pretrained(str(out_dir))
    return fast


def write_tiny_llama(
    out_dir: str | os.PathLike[str],
    *,
    hidden_size: int = 256,
    intermediate_size: int = 512,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    seed: int = 0,
) -> Path:
    """Write a random-weight LlamaForCausalLM (float32) plus tokenizer into ``out_dir``."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    vocab_size = len(tokenizer)
    vocab_size += (-vocab_size) % 64  # pad the embedding like real checkpoints do
    head_dim = hidden_size // num_heads

    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "vocab_size": vocab_size,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )

    gen = torch.Generator().manual_seed(seed)

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).contiguous()

    tensors = {
        "model.embed_tokens.weight": normal(vocab_size, hidden_size),
        "model.norm.weight": torch.ones(hidden_size),
        "lm_head.weight": normal(vocab_size, hidden_size),
    }
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(num_heads * head_dim, hidden_size)
        tensors[p + "self_attn.k_proj.weight"] = normal(num_kv_heads * head_dim, hidden_size)
        tensors[p + "self_attn.v_proj.weight"] = normal(num_kv_heads * head_dim, hidden_size)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden_size, num_heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(intermediate_size, hidden_size)
        tensors[p + "mlp.up_proj.weight"] = normal(intermediate_size, hidden_size)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden_size, intermediate_size)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden_size)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden_size)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- #
# Environment check and the engine run
# --------------------------------------------------------------------------- #
def check_cpu_fallback_active() -> None:
    """Exit with instructions unless the .pth activation is in place.

    SGLang spawns its scheduler and detokenizer; only an interpreter-start hook
    (the .pth file written by ``python -m kernels.cpu_fallback install-pth``)
    reaches them.  Import-time installation in this script would not.
    """
    boot = sys.modules.get("_blendserve_cpu_fallback")
    if boot is not None and boot.is_installed():
        return
    try:
        import sgl_kernel  # noqa: F401

        return  # a real sgl_kernel is installed: nothing to bridge
    except ImportError:
        pass
    repo = Path(__file__).resolve().parent.parent
    sys.exit(
        "The sgl_kernel CPU fallback is not active in this interpreter.\n"
        f"Run once per environment:  cd {repo} && {sys.executable} -m kernels.cpu_fallback install-pth"
    )


def run_smoke(
    model_path: str,
    prompts: list[str],
    *,
    max_new_tokens: int = 16,
    ignore_eos: bool = False,
    dtype: str = "auto",
    max_total_tokens: int = 16384,
    attention_backend: str = "torch_native",
    expect: str | None = None,
    log_level: str = "error",
    show: int = 8,
) -> dict:
    """Start an Engine on CPU, generate greedily for ``prompts``, shut down; return a summary."""
    import sglang

    t0 = time.perf_counter()
    engine = sglang.Engine(
        model_path=model_path,
        device="cpu",
        attention_backend=attention_backend,
        dtype=dtype,
        max_total_tokens=max_total_tokens,
        tp_size=1,
        random_seed=0,
        log_level=log_level,
    )
    start_s = time.perf_counter() - t0
    summary: dict = {"model_path": model_path, "engine_start_s": round(start_s, 2)}
    try:
        params = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "ignore_eos": ignore_eos}
        t1 = time.perf_counter()
        engine.generate(prompt=prompts[:1], sampling_params={**params, "max_new_tokens": 2})
        summary["warmup_s"] = round(time.perf_counter() - t1, 2)

        t2 = time.perf_counter()
        outputs = engine.generate(prompt=prompts, sampling_params=params)
        gen_s = time.perf_counter() - t2
        out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outputs)
        in_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outputs)
        for prompt, out in list(zip(prompts, outputs))[:show]:
            print(f"--- {prompt!r}\n    -> {out['text']!r}")
        summary.update(
            num_prompts=len(prompts),
            prompt_tokens=in_tokens,
            output_tokens=out_tokens,
            generate_s=round(gen_s, 3),
            output_tok_per_s=round(out_tokens / gen_s, 1) if gen_s > 0 else None,
            total_tok_per_s=round((in_tokens + out_tokens) / gen_s, 1) if gen_s > 0 else None,
        )
        if expect is not None:
            summary["expect"] = expect
            summary["expect_found"] = expect.lower() in outputs[0]["text"].lower()
    finally:
        t3 = time.perf_counter()
        engine.shutdown()
        summary["shutdown_s"] = round(time.perf_counter() - t3, 2)
    return summary


def _synthetic_prompts(n: int, approx_tokens: int) -> list[str]:
    base = _tokenizer_corpus()
    prompts = []
    for i in range(n):
        words: list[str] = []
        j = i
        while len(words) < approx_tokens:
            words.extend(base[j % len(base)].split())
            j += 17
        prompts.append(f"[{i}] " + " ".join(words[:approx_tokens]))
    return prompts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="existing HF model directory (default: write a tiny random Llama)")
    ap.add_argument("--keep-dir", help="write the tiny model here and keep it (default: a temp dir)")
    ap.add_argument("--prompt", action="append", help="prompt (repeatable; default: 8 built-in prompts)")
    ap.add_argument("--num-prompts", type=int, default=0,
                    help="use N synthetic prompts of about --prompt-len words instead (throughput run)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--ignore-eos", action="store_true", help="always generate --max-new-tokens tokens")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-total-tokens", type=int, default=16384, help="KV cache size in tokens")
    ap.add_argument("--attention-backend", default="torch_native")
    ap.add_argument("--expect", help="substring the first output must contain (case-insensitive)")
    ap.add_argument("--log-level", default="error")
    ap.add_argument("--omp-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for the engine processes (default: torch's choice)")
    args = ap.parse_args(argv)

    if args.omp_threads is not None:
        if "torch" in sys.modules:
            print("warning: torch already imported; --omp-threads reaches only SGLang's subprocesses",
                  file=sys.stderr)
        os.environ["OMP_NUM_THREADS"] = str(args.omp_threads)
    check_cpu_fallback_active()

    if args.num_prompts > 0:
        prompts = _synthetic_prompts(args.num_prompts, args.prompt_len)
    else:
        prompts = args.prompt or list(DEFAULT_PROMPTS)

    tmp = None
    if args.model_path:
        model_path = args.model_path
        ignore_eos = args.ignore_eos
    else:
        if args.keep_dir:
            model_dir = Path(args.keep_dir)
        else:
            tmp = tempfile.TemporaryDirectory(prefix="tiny-llama-")
            model_dir = Path(tmp.name)
        t = time.perf_counter()
        write_tiny_llama(model_dir)
        print(f"wrote tiny random Llama to {model_dir} in {time.perf_counter() - t:.1f}s")
        model_path = str(model_dir)
        ignore_eos = True  # random weights: make every request produce max_new_tokens

    try:
        summary = run_smoke(
            model_path,
            prompts,
            max_new_tokens=args.max_new_tokens,
            ignore_eos=ignore_eos,
            dtype=args.dtype,
            max_total_tokens=args.max_total_tokens,
            attention_backend=args.attention_backend,
            expect=args.expect,
            log_level=args.log_level,
        )
    finally:
        if tmp is not None:
            tmp.cleanup()

    print(json.dumps(summary))
    if summary.get("output_tokens", 0) <= 0:
        return 1
    if args.expect is not None and not summary.get("expect_found"):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
