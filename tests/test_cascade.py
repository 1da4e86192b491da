"""Cascade attention (kernels/cascade): the plan builder's arrays on hand-made trees and against
brute force, the torch reference and the CPU path against plain per-request attention, the
FlashInfer path (GPU only), and the `cascade` SGLang backend's decode against `torch_native`'s
on the same KV pool (no engine; the engine test is in test_cascade_engine.py).

Tolerances. Values are float32 with q, k, v ~ N(0, 1) and at most a few hundred tokens per
request. The cascade computes the same softmax as plain attention, only in another order
(per segment, then rescaled by exp(lse_segment - lse)); each output is a convex combination of
V rows (|v| < 6), and float32 rounding of scores (|s| < 20, relative 6e-8) and of sums over
<= 10^3 terms bounds the difference near 1e-6. We allow 2e-5 (more than 10x margin) and show
the decomposition is exact by repeating the comparison in float64 at 1e-10.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kernels.cascade import CascadePlan, Level, Prefix, Seq, plan_from_req_to_token, plan_from_tree  # noqa: E402
from kernels.cascade.cpu import CpuCascade  # noqa: E402
from kernels.cascade.plan import prefix_tree_from_pages  # noqa: E402
from kernels.cascade.reference import (  # noqa: E402
    attention_with_lse,
    cascade_reference,
    decode_attention_reference,
    merge_state,
)

ATOL_FP32 = 2e-5
ATOL_FP64 = 1e-10


# ---------------------------------------------------------------------- random batches in a paged pool
def random_batch(rng: np.random.Generator, page_size: int, depth: int = 2, fanout=(1, 5), node_pages=(0, 4),
                 suffix=(0, 3 * 16), pool_pages: int = 2048):
    """A batch laid out like SGLang's radix cache leaves it: a random prefix tree whose nodes own
    full pages (random page ids), each request its own suffix pages; rows of a slot table in a
    shuffled order. Suffixes may be empty (a request's tokens all shared). Returns (table, rows,
    seq_lens, slots per request)."""
    free = [int(p) for p in rng.permutation(pool_pages)]
    reqs: list[list[int]] = []

    def pages_of(n_tokens):
        out = []
        while n_tokens > 0:
            p, take = free.pop(), min(n_tokens, page_size)
            out += [p * page_size + j for j in range(take)]
            n_tokens -= take
        return out

    def node(prefix, level):
        slots = prefix + pages_of(int(rng.integers(*node_pages)) * page_size)
        for _ in range(int(rng.integers(*fanout))):
            if level == depth:
                reqs.append(slots + pages_of(int(rng.integers(*suffix))))
            else:
                node(slots, level + 1)

    while not reqs:
        node([], 0)
    n = len(reqs)
    width = max(len(r) for r in reqs) + 5
    rows = rng.permutation(n + 3)[:n]
    table = np.zeros((n + 3, width), dtype=np.int32)
    for i, r in enumerate(reqs):
        table[rows[i], :len(r)] = r
    return table, rows, np.array([len(r) for r in reqs]), reqs


# every page size x plan depth; KV heads and GQA ratio vary with the case
CASES = [(seed, ps, levels, (1, 2)[seed % 2], (1, 4, 2)[seed % 3])
         for seed, (ps, levels) in enumerate(itertools.product((1, 2, 4, 16), (1, 2, 3)))]


@pytest.mark.parametrize("seed,page_size,levels,num_kv_heads,gqa", CASES)
def test_reference_and_cpu_path_equal_plain_attention(seed, page_size, levels, num_kv_heads, gqa):
    """Over random trees, page sizes, plan depths, GQA ratios and empty suffixes: the plan covers
    each request's tokens exactly once, and the cascade reference and the CPU path both equal
    per-request attention (float32 at ATOL_FP32; float64 at ATOL_FP64)."""
    rng = np.random.default_rng(seed)
    table, rows, lens, reqs = random_batch(rng, page_size, depth=int(rng.integers(1, 3)), fanout=(1, 4))
    plan = plan_from_req_to_token(table, rows, lens, page_size, num_levels=levels)
    plan.check()
    for pos in range(plan.num_requests):
        assert plan.request_slots(pos).tolist() == reqs[plan.order[pos]]
    d, hq = 16, num_kv_heads * gqa
    scale = d ** -0.5
    for dtype, atol in ((torch.float32, ATOL_FP32), (torch.float64, ATOL_FP64)):
        g = torch.Generator().manual_seed(seed)
        k = torch.randn(2048 * page_size, num_kv_heads, d, generator=g, dtype=dtype)
        v = torch.randn(2048 * page_size, num_kv_heads, d, generator=g, dtype=dtype)
        q = torch.randn(len(reqs), hq, d, generator=g, dtype=dtype)
        plain = decode_attention_reference(q, k, v, reqs, scale)
        torch.testing.assert_close(cascade_reference(q, k, v, plan, scale), plain, atol=atol, rtol=0)
        if dtype == torch.float32:  # the CPU path computes in float32
            cpu = CpuCascade()
            cpu.plan(plan, num_qo_heads=hq, num_kv_heads=num_kv_heads, head_dim=d, sm_scale=scale)
            paged_k = k.view(2048, page_size, num_kv_heads, d)  # the paged view works as well
            torch.testing.assert_close(cpu.run(q, paged_k, v), plain, atol=atol, rtol=0)


def test_cpu_path_on_a_big_shared_group_with_split_queries(monkeypatch):
    """Many requests sharing a long prefix, Llama-like heads (8 KV, ratio 4), the group's queries
    split into several score matrices, suffix buckets of very different lengths."""
    import kernels.cascade.cpu as cpu_mod

    monkeypatch.setattr(cpu_mod, "SCORES_MAX_FLOATS", 32 * 600)  # a few queries per product
    monkeypatch.setattr(cpu_mod, "BUCKET_MAX_TOKENS", 300)
    rng = np.random.default_rng(1)
    n, prefix = 24, 500
    perm = rng.permutation(4096)
    suffix = [int(x) for x in rng.integers(0, 200, n)]
    reqs, at = [], prefix
    for s in suffix:
        reqs.append(perm[:prefix].tolist() + perm[at:at + s].tolist())
        at += s
    table = np.zeros((n, max(map(len, reqs))), dtype=np.int32)
    for i, r in enumerate(reqs):
        table[i, :len(r)] = r
    plan = plan_from_req_to_token(table, np.arange(n), [len(r) for r in reqs], 1)
    assert plan.levels[0].num_groups == 1 and plan.levels[0].kv_lens(1).tolist() == [prefix]
    k, v, q = torch.randn(4096, 8, 32), torch.randn(4096, 8, 32), torch.randn(n, 32, 32)
    cpu = CpuCascade()
    cpu.plan(plan, num_qo_heads=32, num_kv_heads=8, head_dim=32, sm_scale=0.2)
    torch.testing.assert_close(cpu.run(q, k, v), decode_attention_reference(q, k, v, reqs, 0.2),
                               atol=ATOL_FP32, rtol=0)


def test_merge_state_is_attention_over_the_union():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(20, 2, 8, generator=g), torch.randn(20, 2, 8, generator=g)
    whole = attention_with_lse(q, k, v, 0.3)
    for cut in (0, 1, 7, 19, 20):  # cuts 0 and 20 merge with an empty segment
        a, b = attention_with_lse(q, k[:cut], v[:cut], 0.3), attention_with_lse(q, k[cut:], v[cut:], 0.3)
        o, lse = merge_state(*a, *b)
        torch.testing.assert_close(o, whole[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=0)
    empty = attention_with_lse(q, k[:0], v[:0], 0.3)
    o, lse = merge_state(*empty, *empty)
    assert torch.all(o == 0) and torch.all(torch.isinf(lse)) and not torch.isnan(o).any()


# ---------------------------------------------------------------------- the plan on hand-made trees
def arrays(level: Level) -> tuple[list, list, list, list]:
    return (level.qo_indptr.tolist(), level.kv_indptr.tolist(), level.kv_indices.tolist(),
            level.last_page_len.tolist())


def mmlu_like() -> Prefix:
    """A system prompt (pages 1, 2) shared by all; two few-shot prefixes, 4 pages each, shared by
    3 and 2 requests; one request with only the system prompt. Page size 4."""
    return Prefix((1, 2), (
        Prefix((10, 11, 12, 13), (Seq(0, (30,), 2), Seq(1, (31, 32), 4), Seq(2, (33,), 1))),
        Seq(3, (40,), 3),
        Prefix((20, 21, 22, 23), (Seq(4, (50,), 4), Seq(5, (51,), 1))),
    ))


def test_plan_two_levels_groups_the_few_shot_prefixes():
    """Savings: the root, (6 requests - 1) x 2 pages = 10, is less than the few-shot groups,
    (3 - 1) x 6 + (2 - 1) x 6 = 18 pages; per-request attention reads 39 pages, the plan 21."""
    plan = plan_from_tree(mmlu_like(), page_size=4, num_levels=2)
    plan.check()
    assert plan.order.tolist() == [0, 1, 2, 3, 4, 5]
    assert arrays(plan.levels[0]) == ([0, 3, 4, 6], [0, 6, 6, 12],
                                      [1, 2, 10, 11, 12, 13, 1, 2, 20, 21, 22, 23], [4, 0, 4])
    assert arrays(plan.levels[1]) == ([0, 1, 2, 3, 4, 5, 6], [0, 1, 3, 4, 7, 8, 9],
                                      [30, 31, 32, 33, 1, 2, 40, 50, 51], [2, 4, 1, 3, 4, 1])
    per_request = sum(math.ceil(len(plan.request_slots(i)) / 4) for i in range(6))
    assert plan.pages_read() == 21 and per_request == 39
    assert plan.shared_positions().tolist() == [True, True, True, False, True, True]


def test_plan_three_levels_nests_the_system_prompt_group():
    plan = plan_from_tree(mmlu_like(), page_size=4, num_levels=3)
    plan.check()
    assert arrays(plan.levels[0]) == ([0, 6], [0, 2], [1, 2], [4])
    assert arrays(plan.levels[1]) == ([0, 3, 4, 6], [0, 4, 4, 8], [10, 11, 12, 13, 20, 21, 22, 23], [4, 0, 4])
    assert arrays(plan.levels[2])[2] == [30, 31, 32, 33, 40, 50, 51]
    assert plan.pages_read() == 2 + 8 + 7


def test_plan_min_shared_pages_and_single_level_mean_no_groups():
    big = plan_from_tree(mmlu_like(), page_size=4, num_levels=2, min_shared_pages=7)
    assert big.levels[0].kv_indices.tolist() == [] and big.levels[0].num_groups == 6
    assert not big.shared_positions().any()
    flat = plan_from_tree(mmlu_like(), page_size=4, num_levels=1)
    assert flat.num_levels == 1 and flat.pages_read() == 39
    assert arrays(flat.levels[0])[2][:7] == [1, 2, 10, 11, 12, 13, 30]


def test_plan_empty_suffix_and_partial_pages():
    """Request 1's tokens are all shared (empty suffix): its last level reads nothing."""
    tree = Prefix((), (Prefix((5, 6), (Seq(0, (7,), 3), Seq(1))),))
    plan = plan_from_tree(tree, page_size=4)
    plan.check()
    assert arrays(plan.levels[0]) == ([0, 2], [0, 2], [5, 6], [4])
    assert arrays(plan.levels[1]) == ([0, 1, 2], [0, 1, 1], [7], [3, 0])
    assert plan.request_slots(1).tolist() == list(range(20, 28))
    with pytest.raises(ValueError, match=r"Seq\(request=0\).last_page_len=5"):
        plan_from_tree(Prefix((), (Seq(0, (1,), 5),)), page_size=4)
    with pytest.raises(ValueError, match="requests must be 0..1"):
        plan_from_tree(Prefix((), (Seq(0, (1,), 1), Seq(2, (2,), 1))), page_size=4)


def _tree_nodes(node, depth=0, out=None):
    out = [] if out is None else out
    depth += len(node.pages)
    reqs = []
    for c in node.children:
        if isinstance(c, Seq):
            reqs.append(c.request)
        else:
            reqs += _tree_nodes(c, depth, out)[-1][1]
    out.append((node, reqs, depth))
    return out


@pytest.mark.parametrize("seed", range(15))
def test_plan_is_optimal_against_brute_force(seed):
    """The dynamic program's page count equals the best over every admissible choice of groups
    (nodes with >= 2 requests, <= levels - 1 on any path, each adding >= min pages)."""
    rng = np.random.default_rng(100 + seed)
    table, rows, lens, _ = random_batch(rng, 1, depth=2, fanout=(1, 4), node_pages=(0, 6), suffix=(1, 4))
    levels, min_pages = int(rng.integers(2, 4)), int(rng.integers(1, 4))
    tree = prefix_tree_from_pages([table[r] for r in rows], lens, 1)
    plan = plan_from_tree(tree, 1, num_levels=levels, min_shared_pages=min_pages)
    nodes = [x for x in _tree_nodes(tree) if len(x[1]) >= 2]
    assert len(nodes) <= 13

    def above(a, b):  # b is a proper ancestor of a
        return set(a[1]) < set(b[1]) or (a is not b and set(a[1]) == set(b[1]) and b[2] < a[2])

    best = 0
    for r in range(len(nodes) + 1):
        for pick in itertools.combinations(nodes, r):
            saved = 0
            for x in pick:
                ups = [y for y in pick if above(x, y)]
                top = max((y[2] for y in ups), default=0)
                if len(ups) + 1 > levels - 1 or x[2] - top < min_pages:
                    break
                saved += (len(x[1]) - 1) * (x[2] - top)
            else:
                best = max(best, saved)
    assert int(lens.sum()) - plan.tokens_read() == best


@pytest.mark.parametrize("seed,page_size", [(s, ps) for s in range(10) for ps in (1, 4)])
def test_prefix_tree_from_pages_matches_pairwise_common_prefixes(seed, page_size):
    """Two requests meet in the tree at the depth of their common leading full pages."""
    rng = np.random.default_rng(200 + seed)
    table, rows, lens, reqs = random_batch(rng, page_size, depth=2)
    tree = prefix_tree_from_pages([table[r][::page_size] // page_size for r in rows], lens, page_size)
    nodes = _tree_nodes(tree)
    for i, j in itertools.combinations(range(len(reqs)), 2):
        full = min(lens[i], lens[j]) // page_size
        a, b = np.asarray(reqs[i][:full * page_size]), np.asarray(reqs[j][:full * page_size])
        lcp = int(np.argmin(a == b)) if not np.array_equal(a, b) else len(a)
        meet = max(depth for _, members, depth in nodes if i in members and j in members)
        assert meet == lcp // page_size, (i, j)


def test_restrict_keeps_shared_requests_only():
    plan = plan_from_tree(mmlu_like(), page_size=4)
    shared = plan.restrict(plan.shared_positions())
    shared.check()
    assert shared.order.tolist() == [0, 1, 2, 4, 5]
    assert arrays(shared.levels[0])[:2] == ([0, 3, 5], [0, 6, 12])
    with pytest.raises(ValueError, match="several positions"):
        plan.restrict(np.array([False, True, True, True, True, True]))


def test_bad_inputs_name_the_input():
    table = np.array([[8, 9, 10, 11, 4, 5], [8, 9, 10, 11, 7, 6]])
    with pytest.raises(ValueError, match=r"row 1: token 4 is in slot 7.*page_size=2"):
        plan_from_req_to_token(table, [0, 1], [6, 6], page_size=2)
    with pytest.raises(ValueError, match="seq_lens must be in 0..6"):
        plan_from_req_to_token(table, [0, 1], [6, 7], page_size=1)
    with pytest.raises(ValueError, match="req_pool_indices must be in 0..1"):
        plan_from_req_to_token(table, [0, 2], [6, 6], page_size=1)
    with pytest.raises(ValueError, match="num_levels=0"):
        plan_from_req_to_token(table, [0, 1], [6, 6], page_size=1, num_levels=0)
    bad = CascadePlan(1, np.array([0]), (Level(np.array([0, 1]), np.array([0, 1]), np.array([3]), np.array([2])),))
    with pytest.raises(ValueError, match=r"levels\[0\].last_page_len\[0\]=2"):
        bad.check()
    with pytest.raises(ValueError, match="not a multiple"):
        CpuCascade().plan(plan_from_tree(mmlu_like(), 4), num_qo_heads=6, num_kv_heads=4, head_dim=8, sm_scale=1.0)


# ---------------------------------------------------------------------- GPU (FlashInfer)
def _cuda_flashinfer() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_flashinfer(), reason="needs a CUDA device and flashinfer-python")
@pytest.mark.parametrize("page_size,levels,dtype", [(1, 2, "float16"), (16, 2, "bfloat16"), (4, 3, "float16")])
def test_flashinfer_path_matches_reference(page_size, levels, dtype):
    """FlashInfer's MultiLevelCascadeAttentionWrapper on the same plans; half precision inputs,
    compared with the float32 reference of the same (rounded) inputs at 2e-2 (bf16 has 8 bits)."""
    from kernels.cascade.gpu import FlashInferCascade

    rng = np.random.default_rng(7)
    table, rows, lens, reqs = random_batch(rng, page_size, depth=2, suffix=(1, 40))
    plan = plan_from_req_to_token(table, rows, lens, page_size, num_levels=levels)
    dt = getattr(torch, dtype)
    k = torch.randn(2048 * page_size, 8, 128, dtype=dt, device="cuda")
    v = torch.randn(2048 * page_size, 8, 128, dtype=dt, device="cuda")
    q = torch.randn(len(reqs), 32, 128, dtype=dt, device="cuda")
    gpu = FlashInferCascade("cuda")
    gpu.plan(plan, num_qo_heads=32, num_kv_heads=8, head_dim=128, sm_scale=128 ** -0.5, q_dtype=dt, kv_dtype=dt)
    got = gpu.run(q, k, v).float().cpu()
    want = decode_attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), reqs, 128 ** -0.5)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)


# ---------------------------------------------------------------------- the SGLang backend, no engine
class _Pool:
    """Stands in for SGLang's token_to_kv_pool: one layer of K and V, token-major."""

    def __init__(self, k, v):
        self.k, self.v = k, v

    def get_key_buffer(self, layer_id):
        return self.k

    def get_value_buffer(self, layer_id):
        return self.v

    def set_kv_buffer(self, layer, loc, k, v, *scales):
        self.k[loc.loc] = k.view(-1, *self.k.shape[1:])
        self.v[loc.loc] = v.view(-1, *self.v.shape[1:])


def test_backend_decode_equals_torch_native_on_the_same_pool(monkeypatch, tmp_path):
    """The `cascade` backend's decode (shared groups batched, unshared requests through
    torch_native's own loop) against SGLang's torch_native backend: same pool, same step, new KV
    written by both."""
    pytest.importorskip("sglang")
    from types import SimpleNamespace

    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from blendserve_sgl.sglang_plugin.cascade_backend import create_backend

    monkeypatch.setenv("BLENDSERVE_CASCADE_STATS_PATH", str(tmp_path / "stats.json"))
    rng = np.random.default_rng(3)
    _, _, _, reqs = random_batch(rng, 1, depth=2, node_pages=(0, 40), suffix=(1, 30))
    unused = np.setdiff1d(np.arange(2048), np.concatenate(reqs))
    reqs += [unused[:50].tolist(), unused[50:57].tolist()]  # two requests that share nothing
    lens = np.array([len(r) for r in reqs])
    rows = rng.permutation(len(reqs))
    table = np.zeros((len(reqs), lens.max()), dtype=np.int32)
    for row, r in zip(rows, reqs):
        table[row, :len(r)] = r
    hkv, hq, d = 3, 9, 16
    g = torch.Generator().manual_seed(3)
    k, v = torch.randn(2048, hkv, d, generator=g), torch.randn(2048, hkv, d, generator=g)
    runners = [SimpleNamespace(device="cpu", req_to_token_pool=SimpleNamespace(req_to_token=torch.from_numpy(table)),
                               token_to_kv_pool=_Pool(k.clone(), v.clone()), page_size=1, use_mla_backend=False)
               for _ in range(2)]
    cascade, native = create_backend(runners[0]), TorchNativeAttnBackend(runners[1])
    seq_lens = torch.from_numpy(lens)
    batch = SimpleNamespace(forward_mode=ForwardMode.DECODE, req_pool_indices=torch.from_numpy(rows), seq_lens=seq_lens,
                            seq_lens_cpu=seq_lens, encoder_lens=None,
                            out_cache_loc=torch.tensor([r[-1] for r in reqs]))
    layer = SimpleNamespace(tp_q_head_num=hq, tp_k_head_num=hkv, qk_head_dim=d, v_head_dim=d, head_dim=d, scaling=0.25,
                            layer_id=0, is_cross_attention=False, sliding_window_size=-1, logit_cap=0.0)
    q, k_new, v_new = torch.randn(len(reqs), hq * d), torch.randn(len(reqs), hkv * d), torch.randn(len(reqs), hkv * d)
    outs = []
    for backend in (cascade, native):
        backend.init_forward_metadata(batch)
        outs.append(backend.forward_decode(q, k_new, v_new, layer, batch))
    assert cascade._plan is not None and 0 < cascade._plan.num_requests and len(cascade._plain) > 0
    torch.testing.assert_close(outs[0], outs[1], atol=ATOL_FP32, rtol=0)
    torch.testing.assert_close(runners[0].token_to_kv_pool.k, runners[1].token_to_kv_pool.k, atol=0, rtol=0)
    import json

    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["cascade_steps"] == 1 and stats["tokens_read"] < stats["tokens_per_request"]


def test_registration_is_idempotent_and_adds_the_cli_choice():
    pytest.importorskip("sglang")
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    from blendserve_sgl.sglang_plugin import cascade_backend

    cascade_backend.register()
    cascade_backend._registered = False
    cascade_backend.register()
    assert ATTENTION_BACKEND_CHOICES.count("cascade") == 1
    assert ATTENTION_BACKENDS["cascade"] is cascade_backend.create_backend
    with pytest.raises(ValueError, match="BLENDSERVE_CASCADE_LEVELS"):
        cascade_backend.CascadeSettings.from_env({"BLENDSERVE_CASCADE_LEVELS": "two"})
    with pytest.raises(ValueError, match="BLENDSERVE_CASCADE_MIN_SHARED_TOKENS"):
        cascade_backend.CascadeSettings.from_env({"BLENDSERVE_CASCADE_MIN_SHARED_TOKENS": "0"})


def test_both_attention_backends_plan_a_decode_batch_through_one_path(monkeypatch):
    """The CPU and GPU backend classes over stand-in base backends (no FlashInfer here): one shared
    group of two requests plus one request alone; the CPU plan keeps the group and sends the other
    to the plain path, the GPU plan holds the whole batch; a prefill batch gets no plan."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("sglang")
    import sys
    import types

    from blendserve_sgl.sglang_plugin import cascade_backend as cb

    class Base:
        def __init__(self, model_runner, **kwargs):
            self.req_to_token_pool = model_runner.req_to_token_pool
            self.workspace_buffer = None

        def init_forward_metadata(self, forward_batch):
            self.base_metadata = forward_batch

    for name, attr in (("sglang.srt.layers.attention.flashinfer_backend", "FlashInferAttnBackend"),
                       ("sglang.srt.layers.attention.torch_native_backend", "TorchNativeAttnBackend")):
        mod = types.ModuleType(name)
        setattr(mod, attr, Base)
        monkeypatch.setitem(sys.modules, name, mod)
    gpu = types.ModuleType("kernels.cascade.gpu")
    gpu.FlashInferCascade = lambda device, workspace: None
    monkeypatch.setitem(sys.modules, "kernels.cascade.gpu", gpu)
    monkeypatch.delenv("BLENDSERVE_CASCADE_STATS_PATH", raising=False)

    table = torch.arange(4 * 64, dtype=torch.int32).reshape(4, 64)
    table[2, :20] = table[0, :20]  # requests 0 and 2 share a 20-token prefix (min_shared_tokens 16)
    runner = types.SimpleNamespace(page_size=1, device="cpu",
                                   req_to_token_pool=types.SimpleNamespace(req_to_token=table))

    def batch(decode: bool):
        return types.SimpleNamespace(forward_mode=types.SimpleNamespace(is_decode=lambda: decode), encoder_lens=None,
                                     seq_lens_cpu=torch.tensor([30, 25, 28]), seq_lens=torch.tensor([30, 25, 28]),
                                     req_pool_indices=torch.tensor([0, 1, 2]))

    cb._torch_cascade_backend_class.cache_clear()
    cb._flashinfer_cascade_backend_class.cache_clear()
    try:
        cpu = cb._torch_cascade_backend_class()(runner)
        cpu.init_forward_metadata(batch(True))
        assert sorted(cpu._plan.order.tolist()) == [0, 2] and cpu._plain.tolist() == [1]
        gpu_backend = cb._flashinfer_cascade_backend_class()(runner)
        gpu_backend.init_forward_metadata(batch(True))
        assert sorted(gpu_backend._plan.order.tolist()) == [0, 1, 2]
        for backend, in_plan in ((cpu, 2), (gpu_backend, 3)):  # the requests the cascade kernel runs
            st = backend.stats.stats
            assert st.decode_steps == 1 and st.cascade_requests == in_plan and st.shared_requests == 2
            assert backend.stats.stats.tokens_per_request == 30 + 25 + 28
            backend.init_forward_metadata(batch(False))
            assert backend._plan is None and backend.base_metadata.forward_mode.is_decode() is False
    finally:
        cb._torch_cascade_backend_class.cache_clear()
        cb._flashinfer_cascade_backend_class.cache_clear()
