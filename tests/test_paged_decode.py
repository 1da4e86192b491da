"""kernels/paged_decode.py against the plain per-request reference, in Triton's interpreter on
the CPU (a subprocess: TRITON_INTERPRET must be set before Triton compiles anything)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CHECK = r'''
import math, torch
from kernels.paged_decode import num_splits, paged_decode_attention
from kernels.cascade.reference import decode_attention_reference

def case(seed, lens, hq, hkv, dim, page, splits, block_n):
    g = torch.Generator().manual_seed(seed)
    per = [math.ceil(n / page) for n in lens]
    total = sum(per) + 3
    k = torch.randn(total, page, hkv, dim, generator=g)
    v = torch.randn(total, page, hkv, dim, generator=g)
    order = torch.randperm(total, generator=g).tolist()  # pages in shuffled order, some unused
    table = torch.zeros(len(lens), max(1, max(per)), dtype=torch.int32)
    slots, at = [], 0
    for b, n in enumerate(per):
        pages = order[at:at + n]
        at += n
        table[b, :n] = torch.tensor(pages, dtype=torch.int32)
        slots.append([pages[t // page] * page + t % page for t in range(lens[b])])
    q = torch.randn(len(lens), hq, dim, generator=g)
    out = paged_decode_attention(q, k, v, table, torch.tensor(lens, dtype=torch.int32), dim ** -0.5,
                                 splits=splits, block_n=block_n)
    ref = decode_attention_reference(q, k, v, slots, dim ** -0.5)
    err = (out - ref).abs().max().item()
    assert err < 1e-5, (seed, lens, hq, hkv, splits, err)
    return err

# an empty request, lengths off the page and block edges, one token; GQA groups 1, 2 and 4
case(0, [0, 5, 37, 1], 8, 2, 16, 4, 1, 8)
case(1, [0, 5, 37, 1], 8, 2, 16, 4, 3, 8)
case(2, [64, 63, 65], 4, 4, 32, 16, 2, 16)
case(3, [100, 7], 32, 8, 128, 16, None, 64)
case(4, [33], 2, 1, 16, 8, 5, 8)  # more stretches than blocks: the extra ones are empty
assert num_splits(1, 8, 32768, 64, 264) == 33 and num_splits(512, 8, 32768, 64, 264) == 1
assert num_splits(1, 8, 10, 64, 264) == 1
print("ok")
'''


def test_paged_decode_matches_reference_in_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout[-2000:] + proc.stderr[-3000:]


def test_paged_decode_refuses_bad_shapes():
    pytest.importorskip("triton")
    import torch

    from kernels.paged_decode import paged_decode_attention

    q, k = torch.zeros(1, 6, 16), torch.zeros(2, 4, 4, 16)
    with pytest.raises(ValueError, match="6 query heads are not a multiple of 4 KV heads"):
        paged_decode_attention(q, k, k, torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
    with pytest.raises(ValueError, match="powers of two"):
        paged_decode_attention(torch.zeros(1, 4, 12), torch.zeros(2, 4, 4, 12), torch.zeros(2, 4, 4, 12),
                               torch.zeros(1, 2, dtype=torch.int32), torch.ones(1, dtype=torch.int32), 1.0)
