"""Test helpers: workload shapes, brute-force references, the simulator set up for a test."""

from __future__ import annotations

import math
from typing import Any

from blendserve_sgl.core import Budget, CostModel, DualScanner, ResourceTree, ScanConfig
from blendserve_sgl.core.cost import memory_units
from blendserve_sgl.core.tree import Group, Node
from blendserve_sgl.core.estimate import OutputLengthEstimator
from blendserve_sgl.core.preset import BlendPreset
from blendserve_sgl.sim import Engine, EngineConfig, make_picker
from blendserve_sgl.sim.request import from_records
from blendserve_sgl.workloads import Record, build_tree, synthetic_mix, token_prompts

COST = CostModel.from_names("llama-3.1-8b", "a100")


def one_class_sampled(config: ScanConfig, sample_output: int, n: int = 40) -> DualScanner:
    """A scanner over `n` requests of unknown length under one prefix (prompt 100, shared 50):
    its one sample request handed out and finished at `sample_output` tokens, so the plan
    estimates every other request at `sample_output`."""
    from blendserve_sgl.core.scanner import SAMPLE

    tree = ResourceTree(COST, OutputLengthEstimator(sample_fraction=0.025, seed=1))
    for i in range(n):
        tree.add(i, prompt_len=100, prefix=(("sys", 50),), max_tokens=50_000)
    sc = DualScanner(tree, config)
    (s,) = [a.rid for a in sc.schedule(Budget(1e15, 100, 10 ** 6)) if a.side == SAMPLE]
    sc.finished(s, sample_output)
    return sc


# ---------------------------------------------------------------- workloads
# The generators live in `blendserve_sgl.workloads`; these give the tuple and dict shapes the
# core tests index into.
def mixed_workload(n: int, seed: int = 0, **kwargs) -> list[tuple]:
    """(rid, prefix groups, prompt_len, output_len) of `workloads.synthetic_mix`."""
    return [(r.rid, list(r.prefix), r.prompt_len, r.output_len) for r in synthetic_mix(n, seed, **kwargs)]


def token_workload(seed: int, n: int) -> dict[Any, tuple[list[int], int]]:
    """{rid: (prompt token ids, output length)} of `workloads.token_prompts`."""
    return {r.rid: (list(r.tokens), r.output_len) for r in token_prompts(seed, n)}


def length_records(records) -> list[Record]:
    return [Record(rid, p, tuple(prefix), d) for rid, prefix, p, d in records]


def token_records(work: dict) -> list[Record]:
    return [Record(rid, len(toks), (), d, tokens=tuple(toks)) for rid, (toks, d) in work.items()]


def build_length_tree(records, cost: CostModel = COST, known: bool = True, estimator=None) -> ResourceTree:
    return build_tree(length_records(records), cost, known, estimator)


# ---------------------------------------------------------------- brute force
def node_path_keys(node: Node) -> tuple:
    keys = []
    while node is not None and node.parent is not None:
        keys[:0] = list(node.keys)
        node = node.parent
    return tuple(keys)


def _key_len(k) -> int:
    return k.length if type(k) is Group else 1


def brute_aggregates(live: dict) -> dict:
    """live: rid -> (keys, prompt_len, output_len, tail). Aggregates of the whole set from scratch.

    computed prompt tokens = sum over the distinct key prefixes of the last key's length, plus
    every request's unshared tail; saved = sum p - computed.
    """
    prefixes = set()
    for keys, _p, _d, _tail in live.values():
        for i in range(1, len(keys) + 1):
            prefixes.add(tuple(keys[:i]))
    computed = sum(_key_len(pre[-1]) for pre in prefixes) + sum(t for *_x, t in live.values())
    sum_p = sum(p for _k, p, _d, _t in live.values())
    return dict(
        count=len(live),
        tokens=sum(p + d for _k, p, d, _t in live.values()),
        mem=sum(memory_units(p, d) for _k, p, d, _t in live.values()),
        sum_p=sum_p,
        saved=sum_p - computed,
    )


def inversions(values) -> int:
    """Pairs i < j with values[i] < values[j] (0 for a non-increasing sequence)."""
    vals = list(values)
    return sum(1 for i in range(len(vals)) for j in range(i + 1, len(vals)) if vals[i] < vals[j])


def windowed_means(values, window: int) -> list[float]:
    out = []
    for i in range(0, len(values) - window + 1, window):
        chunk = [x for x in values[i:i + window] if not math.isnan(x)]
        if chunk:
            out.append(sum(chunk) / len(chunk))
    return out


# ---------------------------------------------------------------- the simulator
def sim_engine(records, policy: str = "blend", *, kv_bytes: float, max_running: int, chunk: int, known: bool = True,
               estimator=None, scan=None, cost: CostModel = COST) -> Engine:
    """The simulator over `records` (`Record`s) with `policy`'s picker, not yet run. blend is the
    dual scanner alone (no paced prefill, KV projection or metering), at `engine.picker.scanner`."""
    requests = from_records(records, known=known)
    preset = BlendPreset(scan=scan or ScanConfig(), estimator=estimator or OutputLengthEstimator(), pacing=False,
                         metering=False)
    picker = make_picker(policy, requests, cost, preset=preset)
    config = EngineConfig(kv_tokens=int(kv_bytes // cost.kv_bytes_per_token), max_running=max_running,
                          chunked_prefill=chunk)
    return Engine(cost, config, picker, requests)


def run_batch_densities(engine: Engine) -> list[float]:
    """Runs `engine`; per step, the KV-weighted mean request density of the running batch (what the
    scanner balances): sum kv_r rho_r / sum kv_r, kv_r = p + d / 2, rho_r = Comp / Mem of the request."""
    out = []

    def record(e: Engine) -> None:
        running = [r for r in e._dec[:e.n_dec]] + list(e.prefilling)
        kv = [r.prompt_len + r.output_len / 2 for r in running]
        rho = [min(e.cost.request_density(r.prompt_len, r.output_len), 1e9) for r in running]
        out.append(sum(k * x for k, x in zip(kv, rho)) / sum(kv) if running else math.nan)

    engine.run(on_step=record)
    return out


def prepared_reference(path, tok, ctx: int = 2048, default: int = 16) -> list:
    """`blendserve run`'s reading done the plain way: read_requests + prepare, one request at a
    time (an error keeps its line's request digest, as the command records it)."""
    import dataclasses

    from blendserve_sgl.batch.prompts import prepare
    from blendserve_sgl.batch.requests import LineError, read_requests

    out = []
    for item in read_requests(path):
        p = item if isinstance(item, LineError) else prepare(item, tok, ctx, default, path.name)
        out.append(dataclasses.replace(p, digest=item.digest) if isinstance(p, LineError) else p)
    return out
