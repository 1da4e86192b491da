"""A dry run of a plan: what batches a picker forms, and their densities.

A fluid model of continuous batching, enough to judge a plan without an engine: every step
admits what the picker hands out (its whole uncached prompt is prefilled in that step), every
running request that was admitted earlier decodes one token, and a request leaves when it
reaches its true output length. KV memory is reserved at admission as the picker says, and a
request that runs past its reservation (an underestimated output) holds its real size from
then on, so the budget shrinks (there is no retraction here: `peak_kv_bytes` shows any
over-commit); prefix
hits come from `sharing.PrefixHitCounter`. Per step it records compute and memory time from the
cost model, so `fraction_of_overlap` = max(sum comp, sum mem) / sum max(comp_i, mem_i) tells
how well each step mixes the two (1.0: every step has the workload's density).

The full simulator (radix cache with eviction, retraction, execution modes) is a separate
component; this one is what the demo and the core's tests use.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Protocol

from .cost import CostModel
from .scanner import Admission, Budget, DualScanner, common_prefix_len
from .sharing import PrefixHitCounter
from .tree import ResourceTree


class Picker(Protocol):
    def schedule(self, budget: Budget) -> list[Admission]: ...
    def finished(self, rid, output_len: int | None = None) -> None: ...
    def progress(self, rid, generated: int) -> bool: ...


class OrderPicker:
    """Admit in a fixed order (DFS, FCFS, random) while the next request fits: the baselines."""

    def __init__(self, tree: ResourceTree, order: Iterable, reserve_output_ratio: float = 1.0):
        self.tree = tree
        self.order = list(order)
        self.pos = 0
        self.ratio = reserve_output_ratio
        self.last = None

    def schedule(self, budget: Budget) -> list[Admission]:
        out = []
        kv, slots, prefill = budget.kv_bytes, budget.slots, budget.prefill_tokens
        bpt = self.tree.cost.kv_bytes_per_token
        while self.pos < len(self.order) and slots > 0 and prefill > 0:
            req = self.tree.reqs[self.order[self.pos]]
            cached = 0
            if self.last is not None:
                cached = min(common_prefix_len(self.last, req.node), req.prompt_len - 1)
            need = (req.prompt_len - cached + self.ratio * req.output_len) * bpt
            if need > kv:
                break
            out.append(Admission(req.rid, "order", req.prompt_len, cached, req.output_len, need))
            kv -= need
            slots -= 1
            prefill -= req.prompt_len - cached
            self.last = req.node
            self.pos += 1
        return out

    def finished(self, rid, output_len=None) -> None:
        pass

    def progress(self, rid, generated) -> bool:
        return False


class StepRecord(NamedTuple):
    running: int  # requests in the batch
    prefill_tokens: int  # uncached prompt tokens computed
    decode_tokens: int
    comp_s: float  # this step's GEMM time (cost model)
    mem_s: float  # this step's decode KV-read time (cost model)
    batch_density: float  # KV-weighted mean request density of the batch: what the scanner balances

    @property
    def density(self) -> float:
        return self.comp_s / self.mem_s if self.mem_s > 0 else math.inf


@dataclass
class ReplayResult:
    steps: list[StepRecord] = field(default_factory=list)
    admitted: list = field(default_factory=list)  # rids in admission order
    prefix_hit_tokens: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    peak_kv_bytes: float = 0.0  # reservations plus growth past them (can exceed kv_bytes: no retraction here)

    @property
    def comp_s(self) -> float:
        return sum(s.comp_s for s in self.steps)

    @property
    def mem_s(self) -> float:
        return sum(s.mem_s for s in self.steps)

    @property
    def overlapped_s(self) -> float:
        return sum(max(s.comp_s, s.mem_s) for s in self.steps)

    @property
    def sequential_s(self) -> float:
        return self.comp_s + self.mem_s

    @property
    def fraction_of_overlap(self) -> float:
        """max(sum comp, sum mem) / sum max(comp_i, mem_i): 1.0 when every step is balanced."""
        return max(self.comp_s, self.mem_s) / self.overlapped_s if self.overlapped_s else 1.0

    @property
    def density(self) -> float:
        return self.comp_s / self.mem_s if self.mem_s else math.inf


def replay(picker: Picker, reference: ResourceTree, true_output: dict[Any, int], cost: CostModel,
           kv_bytes: float, max_running: int, prefill_tokens: int, max_steps: int = 10_000_000,
           check: bool = False) -> ReplayResult:
    """Run `picker` to completion over the requests of `reference` (an unsorted copy of the tree).

    Chunked prefill as SGLang does it: each step computes at most `prefill_tokens` prompt tokens,
    first those still pending from earlier admissions; a request decodes once its prompt is done
    (the step finishing its prompt emits its first token). The picker sees what is left of the
    step's prefill budget.
    """
    result = ReplayResult()
    hits = PrefixHitCounter(reference, window=max_running)
    prefilling: deque = deque()  # [rid, tokens left to prefill]
    running: dict[Any, list] = {}  # rid -> [context_len, generated, target, uncached prompt]
    reserved: dict[Any, float] = {}
    uncached: dict[Any, int] = {}
    bpt = cost.kv_bytes_per_token
    held = 0.0
    left = len(true_output)
    batch_kv = batch_kv_rho = 0.0  # sum kv_r and sum kv_r rho_r over the batch
    work: dict[Any, tuple[float, float]] = {}
    for _ in range(max_steps):
        if left == 0:
            break
        pending = sum(x[1] for x in prefilling)
        adm = picker.schedule(Budget(kv_bytes - held, max_running - len(running) - len(prefilling),
                                     max(0, prefill_tokens - pending)))
        if not adm and not running and not prefilling:
            raise RuntimeError("replay stalled: nothing running and the picker admits nothing "
                               "(a request larger than the KV memory?)")
        for a in adm:
            hit = hits.admit(a.rid)
            result.admitted.append(a.rid)
            held += a.kv_bytes
            reserved[a.rid] = a.kv_bytes
            uncached[a.rid] = max(1, a.prompt_len - hit)
            prefilling.append([a.rid, max(1, a.prompt_len - hit), a.prompt_len])
            d = true_output[a.rid]
            kv = a.prompt_len + d / 2
            work[a.rid] = (kv, kv * min(cost.request_density(a.prompt_len, d), 1e9))
            batch_kv += work[a.rid][0]
            batch_kv_rho += work[a.rid][1]
        decode_ctx = decode_n = 0
        finished = []
        for rid, st in running.items():
            decode_ctx += st[0]
            decode_n += 1
            st[0] += 1
            st[1] += 1
            grown = (st[3] + st[1]) * bpt  # a request past its reserved output length holds more
            if grown > reserved[rid]:
                held += grown - reserved[rid]
                reserved[rid] = grown
            if st[1] >= st[2]:
                finished.append(rid)
            else:
                picker.progress(rid, st[1])
        budget = prefill_tokens
        prefill = 0
        while prefilling and budget > 0:
            item = prefilling[0]
            chunk = min(item[1], budget)
            item[1] -= chunk
            budget -= chunk
            prefill += chunk
            if item[1] == 0:
                prefilling.popleft()
                rid, p = item[0], item[2]
                running[rid] = [p + 1, 1, true_output[rid], uncached.pop(rid)]
                if true_output[rid] <= 1:
                    finished.append(rid)
        step_density = batch_kv_rho / batch_kv if batch_kv > 0 else math.nan
        for rid in finished:
            st = running.pop(rid)
            kv, kv_rho = work.pop(rid)
            batch_kv -= kv
            batch_kv_rho -= kv_rho
            held -= reserved.pop(rid)
            result.output_tokens += st[1]
            picker.finished(rid, st[1])
            left -= 1
        result.peak_kv_bytes = max(result.peak_kv_bytes, held)
        result.steps.append(StepRecord(len(running) + len(finished), prefill, decode_n,
                                       cost.comp_time(prefill + decode_n), cost.mem_time(2 * decode_ctx),
                                       step_density))
        if check and isinstance(picker, DualScanner):
            picker.check_integrity()
    else:
        raise RuntimeError(f"replay did not finish within {max_steps} steps")
    result.prefix_hit_tokens = hits.hits
    result.prompt_tokens = hits.prompt_tokens
    return result
