"""Test helpers: workloads, tree builders, brute-force references and a small engine loop."""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
from typing import Any

from blendserve_sgl.core import Budget, CostModel, ResourceTree
from blendserve_sgl.core.cost import memory_units
from blendserve_sgl.core.tree import Group, Node

COST = CostModel.from_names("llama-3.1-8b", "a100")


# ---------------------------------------------------------------- processes
def kill_group(proc: subprocess.Popen, sig=signal.SIGTERM, grace: float = 30.0) -> None:
    """Stop `proc` and everything in its process group (it was started with
    start_new_session=True: engine subprocesses included): `sig` first with `grace` seconds to
    exit (skipped for SIGKILL), then SIGKILL; waits for `proc`."""
    if proc.poll() is None and sig != signal.SIGKILL:
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------- workloads
def mixed_workload(n: int, seed: int = 0, *, fractions=(0.30, 0.45), compute_prompt=(1000, 4000),
                   compute_output=(5, 40), memory_output=(2000, 8000), n_subjects: int = 10) -> list[tuple]:
    """(rid, prefix groups, prompt_len, output_len). Default: 30% MMLU-like (shared system prompt +
    subject, 1-2 output tokens), 45% compute-dense (long prompt, short output), 25% memory-dense
    (short prompt, long output)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        u = rng.random()
        if u < fractions[0]:
            k = rng.randrange(n_subjects)
            out.append((i, [("sys", 50), (f"subj{k}", 600)], rng.randint(700, 800), rng.randint(1, 2)))
        elif u < fractions[0] + fractions[1]:
            out.append((i, [("sysc", 40)], rng.randint(*compute_prompt), rng.randint(*compute_output)))
        else:
            out.append((i, [("sysv", 40)], rng.randint(50, 200), rng.randint(*memory_output)))
    return out


def build_length_tree(records, cost: CostModel = COST, known: bool = True, estimator=None) -> ResourceTree:
    tree = ResourceTree(cost, estimator)
    for rid, prefix, p, d in records:
        tree.add(rid, prompt_len=p, prefix=prefix, output_len=d if known else None)
    return tree


def token_workload(seed: int, n: int) -> dict[Any, tuple[list[int], int]]:
    """Token prompts built from a few shared system prompts and subjects, mixed output lengths."""
    rng = random.Random(seed)
    systems = [[rng.randrange(1000) for _ in range(rng.randint(20, 200))] for _ in range(3)]
    subjects = [[rng.randrange(1000) for _ in range(rng.randint(10, 300))] for _ in range(6)]
    out = {}
    for i in range(n):
        toks = list(systems[rng.randrange(3)])
        if rng.random() < 0.7:
            toks += subjects[rng.randrange(6)]
        toks += [rng.randrange(1000) for _ in range(rng.randint(1, 300))]
        d = rng.randint(1, 20) if rng.random() < 0.5 else rng.randint(200, 3000)
        out[f"r{i}"] = (toks, d)
    return out


def build_token_tree(work: dict, cost: CostModel = COST, known: bool = True, estimator=None) -> ResourceTree:
    tree = ResourceTree(cost, estimator)
    for rid, (toks, d) in work.items():
        tree.add(rid, tokens=toks, output_len=d if known else None)
    return tree


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


# ---------------------------------------------------------------- engine loop
def drive(picker, outputs: dict, kv_bytes: float, slots: int, prefill: int, *, arrivals=None,
          tree=None, on_step=None, max_steps: int = 200_000):
    """A tiny engine: each step asks the picker for admissions within the free budget; an admitted
    request runs for its output length in steps, then `finished` is called. `arrivals` maps a
    step number to [(rid, add-kwargs)] added to `tree` just before that step's schedule call.
    Returns (admissions in order, list of (budget, admissions) per step)."""
    arrivals = dict(arrivals or {})
    running: dict = {}  # rid -> [steps left, kv]
    held = 0.0
    order, steps = [], []
    total = len(set(outputs) | {rid for batch in arrivals.values() for rid, _ in batch})
    done = 0
    for step in range(max_steps):
        for rid, kwargs in arrivals.pop(step, []):
            tree.add(rid, **kwargs)
        if done == total and not arrivals:
            return order, steps
        budget = Budget(kv_bytes - held, slots - len(running), prefill)
        adm = picker.schedule(budget)
        steps.append((budget, adm))
        for a in adm:
            order.append(a)
            held += a.kv_bytes
            running[a.rid] = [max(1, outputs[a.rid]), a.kv_bytes]
        if on_step is not None:
            on_step(step)
        for rid in list(running):
            running[rid][0] -= 1
            if running[rid][0] <= 0:
                held -= running.pop(rid)[1]
                picker.finished(rid, outputs[rid])
                done += 1
        if not adm and not running and not arrivals and done < total:
            raise RuntimeError("stalled")
    raise RuntimeError("did not finish")


def windowed_means(values, window: int) -> list[float]:
    out = []
    for i in range(0, len(values) - window + 1, window):
        chunk = [x for x in values[i:i + window] if not math.isnan(x)]
        if chunk:
            out.append(sum(chunk) / len(chunk))
    return out
