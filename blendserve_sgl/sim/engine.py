"""The step loop: continuous batching as SGLang runs it, on a KV pool of a fixed number of pages.

One page holds one token (SGLang's default page_size). Each step:

1. admission: the picker hands out waiting requests; each is matched in the radix cache, its
   cached prefix locked, and the pages of its uncached fill allocated (evicting LRU cache
   leaves when the free pool is short). A pick that does not fit goes back to the picker.
2. chunked prefill: at most `chunked_prefill` fill tokens (the step's chunk size; `pace` sizes
   it per step), oldest admission first. Each finished chunk publishes the atoms it completed
   to the cache, as SGLang's `stash_chunked_request` -> `cache_unfinished_req` does (a `Group`
   atom is published once all of it is computed; token prompts per token), so a request
   admitted later hits them; duplicates of what others published meanwhile are freed. A
   request whose fill is done publishes all of it and its first output token comes out of
   this step.
3. a decode round for every decoding request (one new KV page each). With `mixed_chunk`
   (SGLang's --enable-mixed-chunk; NanoFlow always mixes) it shares the step with the prefill,
   and sits out a step whose prefill left no room for it; without, prefill steps and decode
   steps alternate, prefill first. A decode-only step that finds no room retracts requests in
   SGLang's order (fewest output tokens first, then longest prompt) until the rest fit:
   their decode pages are freed, their published prefix stays cached, and they wait again
   with their output so far (re-prefilled later).
4. requests that reached their output length publish their KV to the cache and leave.

Per step the engine records GEMM tokens, KV tokens read, prefill-attention query-key pairs,
running requests and KV pages held by running requests; `timing.py` turns them into seconds. Decoding requests live in NumPy
arrays (struct of arrays), so a decode round costs a few vector operations, not a Python loop.

Engine features, the same for every picker (`EngineConfig`):
- `pace`: each step's chunk size is `core.pacing.paced_prefill_tokens` for the step's memory
  time (`pace_memory`: the weight read plus the next decode round's KV read, as the plugin paces;
  "kv": the KV read alone, for ablations) at the target density of the waiting requests, Comp / Mem over their
  (fill, remaining output) with no sharing term, kept as incremental sums. Known lengths
  (ignore_eos) give the remaining output exactly; for the others every picker sees the same
  estimate: the mean output of the requests finished so far, and before the first finish
  their mean min(max_new_tokens, clip_max_new_tokens) (`core.pacing.WaitingWork`, which the
  plugin keeps too). `pace_density="spread"` takes the memory of unknown outputs from the finished
  outputs' second moment (an ablation). `pace_density="true"` paces at the waiting requests' true remaining
  lengths instead: an oracle no engine has, for ablations only (`bench/pacing_ablation.py`).
- `kv_projection`: admission may count the KV that running requests of known remaining length
  will release (`kv_horizons`). SGLang cannot do this: results with it are their own rows.
- metering: `steps` and the pool size are part of the view; a picker that meters takes them.

The run never ends with requests waiting: a step where nothing runs, requests wait and the
picker admits nothing raises with the numbers.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from ..core.cost import CostModel, prefill_attention_pairs
from ..core.pacing import MEMORY_SIDES, WaitingWork, paced_prefill_tokens, paces
from ..core.tree import Group
from .cache import RadixCache
from .request import DECODING, FINISHED, PREFILLING, WAITING, SimRequest, atom_len

_NO_WATCH = np.iinfo(np.int64).max
# Horizons of the KV projection: a request of lifetime <= h steps gets the KV free over
# SAFETY x h + SLACK steps (its prefill may wait behind others', a decode round may be skipped).
HORIZONS = np.array([4 ** k for k in range(9)], dtype=np.int64)
SAFETY, SLACK = 2, 16
PACE_DENSITIES = ("estimate", "spread", "true")
FULL_CHECK_EVERY = 1024  # check=True: the full recount every this many steps (and at the end)


def _group_for(weights: float, hw, mem_fraction: float) -> str:
    """How to hold `weights`: `NxNAME` for the fewest devices of `hw` (a power of two) whose
    `mem_fraction` holds them with room left, or a device of more memory when no group of
    `MAX_GROUP` does."""
    from ..core.specs import MAX_GROUP

    n = 1
    while weights >= 0.8 * mem_fraction * hw.mem_capacity * n:
        n *= 2
        if n > MAX_GROUP:
            return f"give a device of more memory than {hw.mem_capacity:g} bytes"
    return f"plan for a tensor-parallel group that holds it (--hardware NxNAME, e.g. {n}x{hw.name})"


@dataclass(frozen=True, slots=True)
class EngineConfig:
    kv_tokens: int  # KV pool size in pages of one token
    max_running: int = 1024  # max_running_requests: prefilling + decoding
    chunked_prefill: int = 512  # fill tokens per step (chunked-prefill size: the step's token budget)
    mixed_chunk: bool = True  # prefill and decode share a step
    clip_max_new_tokens: int = 4096  # SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION
    init_new_token_ratio: float = 0.7  # SGLANG_INIT_NEW_TOKEN_RATIO
    min_new_token_ratio_factor: float = 0.14
    new_token_ratio_decay_steps: int = 600
    retract_decode_steps: int = 20  # SGLANG_RETRACT_DECODE_STEPS
    pace: bool = False  # each step's chunk size follows the decode batch's memory time (module docstring)
    kv_projection: bool = False  # admission counts KV that known-length running requests will release
    pace_density: str = "estimate"  # pacing's target density: "estimate" (WaitingWork, as the plugin
    # paces), "spread" (WaitingWork's memory from the finished outputs' second moment: an ablation) or
    # "true" (the waiting requests' true remaining lengths: a simulator-only oracle for ablations)
    pace_memory: str = MEMORY_SIDES[0]  # the step's memory side pacing matches (core.pacing.MEMORY_SIDES):
    # "kv+weights" (the decode's KV read and per-request work plus the weight read: as the plugin paces) or
    # "kv" (the weight read only as the floor: the earlier rule, for ablations)

    def __post_init__(self) -> None:
        if self.pace_density not in PACE_DENSITIES:
            raise ValueError(f"EngineConfig.pace_density must be one of {', '.join(PACE_DENSITIES)}, "
                             f"got {self.pace_density!r}")
        if self.pace_memory not in MEMORY_SIDES:
            raise ValueError(f"EngineConfig.pace_memory must be one of {', '.join(MEMORY_SIDES)}, "
                             f"got {self.pace_memory!r}")
        for field in ("kv_tokens", "max_running", "chunked_prefill", "clip_max_new_tokens",
                      "new_token_ratio_decay_steps"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{field} must be a positive integer, got {value!r}")
        if not (0 < self.init_new_token_ratio <= 1 and 0 < self.min_new_token_ratio_factor <= 1):
            raise ValueError("new-token ratios must be in (0, 1]")

    @classmethod
    def for_cost(cls, cost: CostModel, kv_gb: float | None = None, mem_fraction: float = 0.88,
                 **kwargs) -> "EngineConfig":
        """KV pool from the device: mem_fraction x capacity minus the weights (SGLang's
        mem_fraction_static), or `kv_gb` when given."""
        weights = cost.model.weight_read_bytes
        if weights >= mem_fraction * cost.hardware.mem_capacity:
            raise ValueError(f"{cost.model.name} does not fit on {cost.hardware.name}: weights {weights / 1e9:.1f} GB "
                             f"> {mem_fraction:.0%} of {cost.hardware.mem_capacity / 1e9:.0f} GB; "
                             f"{_group_for(weights, cost.hardware, mem_fraction)}")
        if kv_gb is None:
            kv_bytes = mem_fraction * cost.hardware.mem_capacity - weights
        else:
            kv_bytes = kv_gb * 1e9
            if not kv_bytes >= cost.kv_bytes_per_token:
                raise ValueError(f"kv_gb (--kv-gb) {kv_gb:g} holds no token of the KV cache "
                                 f"({cost.kv_bytes_per_token:,.0f} bytes per token); pass a larger --kv-gb")
            room = cost.hardware.mem_capacity - weights
            if kv_bytes > room:  # a pool the device cannot hold (a probe: 43 billion tokens on an A100)
                raise ValueError(f"kv_gb (--kv-gb) {kv_gb:g} does not fit on {cost.hardware.name} beside "
                                 f"{cost.model.name}'s weights ({weights / 1e9:.1f} GB of "
                                 f"{cost.hardware.mem_capacity / 1e9:.0f} GB); pass at most {room / 1e9:.1f}")
        return cls(kv_tokens=int(kv_bytes // cost.kv_bytes_per_token), **kwargs)

    def check_fits(self, records, fix: str = "pass a larger --kv-gb", known: bool = True) -> None:
        """ValueError naming the first request the engine could never run, even alone (it would
        stall on it), and `fix`: its prompt and output must fit in the KV pool, and SGLang's
        admission must take it into an empty pool (prompt + min(max_new_tokens, clip) + 1 below
        the pool; max_new_tokens as `from_records` sets it for `known`)."""
        from .request import max_new_tokens

        for r, max_new in zip(records, max_new_tokens(records, known)):
            need = max(r.prompt_len + r.output_len, r.prompt_len + min(max_new, self.clip_max_new_tokens) + 2)
            if need > self.kv_tokens:
                raise ValueError(f"request {r.rid!r}: prompt {r.prompt_len:,} + {'output' if known else 'max_tokens'} "
                                 f"needs {need:,} tokens of KV (SGLang's admission reserves min(max_new_tokens, "
                                 f"{self.clip_max_new_tokens:,}) + 2 beside the prompt), more than the KV pool of "
                                 f"{self.kv_tokens:,} tokens; {fix}")

    @classmethod
    def trace_engine(cls, cost: CostModel, pace: bool = True, **kwargs) -> "EngineConfig":
        """The engine every Trace-analog comparison in bench/ runs: the device's KV pool, 1,024
        running requests, 1,024-token chunks, paced prefill for every policy (`pace=False`: the
        stock SGLang engine of the product comparison)."""
        return cls.for_cost(cost, max_running=1024, chunked_prefill=1024, pace=pace, **kwargs)


class Counters:
    """Totals over a run (request-level facts; per-step series are in `Engine.series`)."""

    __slots__ = ("prompt_tokens", "output_tokens", "first_hit_tokens", "prefill_tokens", "retractions",
                 "retracted_tokens", "admit_rejections", "evicted_tokens")

    def __init__(self):
        for f in self.__slots__:
            setattr(self, f, 0)


class Engine:
    """Drives a picker over a set of requests; see the module docstring."""

    def __init__(self, cost: CostModel, config: EngineConfig, picker, requests: Iterable[SimRequest]):
        self.cost = cost
        self.config = config
        self.picker = picker
        self.requests = list(requests)
        if len({r.rid for r in self.requests}) != len(self.requests):
            raise ValueError("request ids must be unique")
        self.cache = RadixCache()
        self.free_tokens = config.kv_tokens
        self.private = 0  # pages owned by running requests and not (yet) in the cache
        self.prefilling: deque[SimRequest] = deque()
        cap = config.max_running
        self._gen = np.zeros(cap, np.int64)
        self._out = np.zeros(cap, np.int64)
        self._base = np.zeros(cap, np.int64)  # context = base + gen (KV tokens read per round)
        self._gen_ck = np.zeros(cap, np.int64)
        self._maxnew = np.zeros(cap, np.int64)
        self._ign = np.zeros(cap, bool)
        self._resv = np.zeros(cap, np.int64)  # reserve - (fill - hit): reservation beyond the fill
        self._watch = np.full(cap, _NO_WATCH, np.int64)
        self._dec: list[SimRequest | None] = [None] * cap
        self.n_dec = 0
        self.n_eos = 0  # decoding requests without ignore_eos (their reservations use the ratio)
        self.n_watch = 0
        self.sum_base = 0
        self.sum_gen = 0
        self.waiting = 0
        self.finished = 0
        self.steps = 0
        self.chunk = config.chunked_prefill  # this step's chunked-prefill size (a picker may pace it)
        self.decode_rounds = 0
        self.new_token_ratio = config.init_new_token_ratio
        self._min_ratio = config.init_new_token_ratio * config.min_new_token_ratio_factor
        self._ratio_decay = (config.init_new_token_ratio - self._min_ratio) / config.new_token_ratio_decay_steps
        self.counters = Counters()
        self.series = {k: [] for k in ("prefill", "decode", "kv_read", "attn_pairs", "kv_active", "running")}
        self.finish_order: list = []
        self.work = WaitingWork(config.clip_max_new_tokens, spread=config.pace_density == "spread")  # pacing target
        # the oracle target (pace_density="true"): every waiting request at its true remaining length
        self.true_work = WaitingWork(config.clip_max_new_tokens) if config.pace_density == "true" else None
        self._checked = 0  # steps since the last full check
        for r in self.requests:
            if r.state != WAITING:
                raise ValueError(f"request {r.rid!r} was already run; build fresh requests per simulation")
            self.counters.prompt_tokens += r.prompt_len
            self._wait(r, +1)

    # ------------------------------------------------------------------ the view pickers see
    @property
    def kv_bytes_per_token(self) -> int:
        return self.cost.kv_bytes_per_token

    @property
    def slots_left(self) -> int:
        return self.config.max_running - self.n_dec - len(self.prefilling)

    @property
    def prefill_left(self) -> int:
        return max(0, self.chunk - sum(r.prefill_left for r in self.prefilling))

    @property
    def next_kv_read(self) -> int:
        """KV tokens the next decode round reads."""
        return self.sum_base + self.sum_gen

    def sglang_room(self) -> float:
        """The room SGLang's admission check sees, in tokens: free + evictable less `sglang_offset`."""
        return self.free_tokens + self.cache.evictable_tokens - self.sglang_offset()

    def sglang_offset(self) -> float:
        """SGLang's reservation for running requests: sum of min(max_new - generated, clip),
        scaled by the new-token ratio unless ignore_eos."""
        n, clip, ratio = self.n_dec, self.config.clip_max_new_tokens, self.new_token_ratio
        rem = np.minimum(self._maxnew[:n] - self._gen[:n], clip)
        total = float(rem.sum()) if not self.n_eos else float((rem * np.where(self._ign[:n], 1.0, ratio)).sum())
        for r in self.prefilling:
            left = min(max(r.max_new_tokens - r.gen, 0), clip)
            total += left if r.ignore_eos else left * ratio
        return total

    def reserved_left(self) -> int:
        """Pages still reserved (by a picker's `reserve`) beyond what running requests hold."""
        n = self.n_dec
        total = int(np.maximum(self._resv[:n] - (self._gen[:n] - self._gen_ck[:n]), 0).sum()) if n else 0
        for r in self.prefilling:
            total += max(0, r.reserve - (r.fill_len - r.hit))
        return total

    def generated(self, req: SimRequest) -> int:
        return int(self._gen[req.slot]) if req.state == DECODING else req.gen

    def submit(self, req: SimRequest) -> None:
        """A request arriving during the run: it waits, and the picker is given it."""
        if req.state != WAITING:
            raise ValueError(f"request {req.rid!r} was already run; build a fresh one")
        self.requests.append(req)
        self.counters.prompt_tokens += req.prompt_len
        self._wait(req, +1)
        self.picker.add(req)

    @property
    def kv_pool_bytes(self) -> int:
        return self.config.kv_tokens * self.cost.kv_bytes_per_token

    def _wait(self, r: SimRequest, sign: int) -> None:
        """Count `r` into (+1) or out of (-1) the waiting requests and their work (`core.pacing.WaitingWork`)."""
        self.waiting += sign
        self.work.wait(r.fill_len, r.max_new_tokens - r.gen, r.output_len - r.gen if r.ignore_eos else None, sign)
        if self.true_work is not None:
            self.true_work.wait(r.fill_len, None, r.output_len - r.gen, sign)

    def waiting_density(self) -> float:
        """Comp / Mem of the waiting requests, no sharing term (the pacing target)."""
        return (self.work if self.true_work is None else self.true_work).density(self.cost)

    def chunk_size(self) -> int:
        """This step's chunked-prefill size: the configured one, or paced (`EngineConfig.pace`)."""
        size = self.config.chunked_prefill
        if paces(self.config.pace, self.config.mixed_chunk) and self.waiting:
            paced = paced_prefill_tokens(self.cost, self.next_kv_read, self.n_dec, self.waiting_density(),
                                         self.config.pace_memory)
            if paced is not None:
                size = max(1, min(paced, size))
        return size

    def kv_horizons(self, floor: int) -> tuple[int, tuple]:
        """(pages free for good, ((h, pages free over the next SAFETY x h + SLACK steps), ...))
        from the KV the running requests hold now and will hold. A decoding request of known
        length (ignore_eos: it stops at max_new_tokens) grows one page per step for its
        remaining output, then releases its decode pages (its prompt may stay locked by others:
        counted as held); one of unknown length holds its remaining reservation from now on
        (the picker's, or SGLang's min(max_new - generated, clip) x new-token ratio where the
        picker reserved nothing) and releases nothing within the projection; so does a
        prefilling one (its whole output when known). free(t) = free + evictable - growth(t) +
        released(t); the pages free over the next t steps are min free(0..t), evaluated just
        before each release and at each horizon. Never below `floor` (what the caller counts as
        free without the projection)."""
        n = self.n_dec
        base = self.free_tokens + self.cache.evictable_tokens
        gen, out, ck = self._gen[:n], self._out[:n], self._gen_ck[:n]
        clip, ratio = self.config.clip_max_new_tokens, self.new_token_ratio
        held = 0.0
        for q in self.prefilling:
            if q.ignore_eos:
                held += max(0, q.output_len - q.gen)
            elif q.reserve:
                held += max(0, q.reserve - (q.fill_len - q.hit))
            else:
                held += min(max(q.max_new_tokens - q.gen, 0), clip) * ratio
        if self.n_eos:
            known = self._ign[:n]
            unknown = ~known
            resv = self._resv[:n][unknown]
            own = np.maximum(resv - (gen - ck)[unknown], 0)
            sglang = np.minimum(self._maxnew[:n][unknown] - gen[unknown], clip) * ratio
            held += float(np.where(resv > 0, own, sglang).sum())
            gen, out, ck = gen[known], out[known], ck[known]
            n = len(gen)
        base -= math.ceil(held)
        rem = out - gen
        order = np.argsort(rem, kind="stable")
        r = rem[order]
        grown = np.concatenate(([0], np.cumsum(r)))
        released = np.concatenate(([0], np.cumsum((out - ck)[order])))
        ends = HORIZONS * SAFETY + SLACK
        t = np.sort(np.concatenate((r, ends)))
        le = np.searchsorted(r, t, side="right")
        free_t = base - (grown[le] + t * (n - le)) + released[np.searchsorted(r, t, side="left")]
        low = np.minimum.accumulate(np.minimum(free_t, base))
        forever = max(floor, min(int(low[-1]), base - int(grown[-1]) + int(released[-1])))
        at = low[np.searchsorted(t, ends)]
        return forever, tuple((int(h), max(int(f), forever)) for h, f in zip(HORIZONS, at))

    # ------------------------------------------------------------------ run
    def run(self, check: bool = False, max_steps: int = 50_000_000,
            on_step: Callable[["Engine"], None] | None = None) -> "Engine":
        total = len(self.requests)
        while self.finished < total:
            if self.steps >= max_steps:
                raise RuntimeError(f"simulation did not finish within {max_steps} steps")
            self.step()
            if check:
                self.check_step()
            if on_step is not None:
                on_step(self)
        if check:
            self.check_integrity()
        return self

    def step(self) -> None:
        self.steps += 1
        self.chunk = self.chunk_size()
        if self.waiting and self.slots_left > 0:
            left = self.prefill_left
            if left > 0:
                picks = self.picker.pick(self)
                for i, pick in enumerate(picks):
                    if not self._admit(pick.req, pick.reserve):
                        self.counters.admit_rejections += len(picks) - i
                        self.picker.rejected(picks[i:])
                        break
        budget = self.chunk
        prefill = pairs = 0
        done = []
        while self.prefilling and budget > 0:
            r = self.prefilling[0]
            chunk = min(r.prefill_left, budget)
            pairs += prefill_attention_pairs(r.fill_len - r.prefill_left, chunk)
            r.prefill_left -= chunk
            budget -= chunk
            prefill += chunk
            if r.prefill_left == 0:
                self.prefilling.popleft()
                done.append(r)
            else:
                self._checkpoint(r)
        decode = kv_read = 0
        if self.n_dec and (prefill == 0 or self.config.mixed_chunk):
            if self._room_for_decode(decode_only=prefill == 0):
                decode, kv_read = self._decode_round()
        for r in done:
            self._prefill_done(r)
        if not (prefill or decode) and self.finished < len(self.requests):
            self._stalled()
        self.counters.prefill_tokens += prefill
        s = self.series
        s["prefill"].append(prefill)
        s["decode"].append(decode)
        s["kv_read"].append(kv_read)
        s["attn_pairs"].append(pairs)
        s["kv_active"].append(self.config.kv_tokens - self.free_tokens - self.cache.evictable_tokens)
        s["running"].append(self.n_dec + len(self.prefilling))

    # ------------------------------------------------------------------ admission
    def _admit(self, r: SimRequest, reserve: int) -> bool:
        if r.state != WAITING:
            raise AssertionError(f"picker handed out {r!r}, which is not waiting")
        node, matched = self.cache.match(r.fill_keys)
        hit = min(matched, r.fill_len - 1)  # at least one token is computed (it yields the logits)
        extend = r.fill_len - hit
        self.cache.lock(node)
        if self.free_tokens < extend:
            self._evict(extend - self.free_tokens)
        if self.free_tokens < extend:
            self.cache.unlock(node)
            return False
        self.free_tokens -= extend
        self.private += extend
        r.lock = node
        r.hit = hit
        r.published = hit
        r.ck_atoms = r.ck_len = 0
        r.prefill_left = extend
        r.reserve = reserve
        r.state = PREFILLING
        if r.admissions == 0:
            r.first_hit = hit
            self.counters.first_hit_tokens += hit
        r.admissions += 1
        self._wait(r, -1)
        self.prefilling.append(r)
        return True

    def _evict(self, tokens: int) -> None:
        freed = self.cache.evict(tokens)
        self.free_tokens += freed
        self.counters.evicted_tokens += freed

    # ------------------------------------------------------------------ prefill -> decode
    def _publish(self, r: SimRequest, keys, length: int) -> None:
        """Hand the first `length` fill tokens (`keys`) to the cache: the request's pages beyond
        what it published before leave its private KV; copies of what another request published
        meanwhile are freed; the lock moves to the new end."""
        node, dup = self.cache.insert(keys)
        self.private -= length - r.published
        self.free_tokens += dup - r.published
        self.cache.lock(node)
        self.cache.unlock(r.lock)
        r.lock = node
        r.published = length

    def _checkpoint(self, r: SimRequest) -> None:
        """A chunk of `r` finished: publish the atoms it completed (SGLang caches each chunk)."""
        keys = r.fill_keys
        done = r.fill_len - r.prefill_left
        k, length = r.ck_atoms, r.ck_len
        while k < len(keys) and length + atom_len(keys[k]) <= done:
            length += atom_len(keys[k])
            k += 1
        r.ck_atoms, r.ck_len = k, length
        if length > r.published:
            self._publish(r, keys[:k], length)

    def _prefill_done(self, r: SimRequest) -> None:
        self._publish(r, r.fill_keys, r.fill_len)
        r.gen += 1
        r.gen_ck = r.gen
        if r.gen >= r.output_len:
            self._finish(r)
            return
        s = self.n_dec
        self.n_dec += 1
        r.slot = s
        r.state = DECODING
        self._dec[s] = r
        self._gen[s] = r.gen
        self._out[s] = r.output_len
        self._base[s] = r.fill_len - r.gen + 1
        self._gen_ck[s] = r.gen
        self._maxnew[s] = r.max_new_tokens
        self._ign[s] = r.ignore_eos
        self._resv[s] = max(0, r.reserve - (r.fill_len - r.hit)) if r.reserve else 0
        watch = self.picker.watch(r)
        self._watch[s] = _NO_WATCH if watch is None else watch
        self.n_watch += watch is not None
        self.n_eos += not r.ignore_eos
        self.sum_base += int(self._base[s])
        self.sum_gen += r.gen

    def _remove_decoder(self, r: SimRequest) -> None:
        s = r.slot
        r.gen = int(self._gen[s])
        self.sum_base -= int(self._base[s])
        self.sum_gen -= r.gen
        self.n_eos -= not r.ignore_eos
        self.n_watch -= int(self._watch[s] != _NO_WATCH)
        last = self.n_dec - 1
        if s != last:
            for arr in (self._gen, self._out, self._base, self._gen_ck, self._maxnew, self._ign, self._resv, self._watch):
                arr[s] = arr[last]
            moved = self._dec[last]
            self._dec[s] = moved
            moved.slot = s
        self._dec[last] = None
        self.n_dec = last
        r.slot = -1

    # ------------------------------------------------------------------ decode
    def _room_for_decode(self, decode_only: bool) -> bool:
        """SGLang's check_decode_mem: evict for the round's pages; a decode-only step that still
        lacks room retracts, one that has room decays the new-token ratio; a mixed step without
        room skips decoding."""
        need = self.n_dec
        if self.free_tokens < need:
            self._evict(need - self.free_tokens)
        if self.free_tokens >= need:
            if decode_only:
                self.new_token_ratio = max(self.new_token_ratio - self._ratio_decay, self._min_ratio)
            return True
        if not decode_only:
            return False
        self._retract()
        return True

    def _retract(self) -> None:
        """SGLang's retract_decode: retract at least one request, then more until the rest fit."""
        n = self.n_dec
        gen = self._gen[:n]
        reqs = self._dec[:n]
        inputs = np.array([r.prompt_len for r in reqs], np.int64)
        keep = list(np.lexsort((-inputs, gen))[::-1])  # most preferred to keep first: (gen, -input) descending
        keep = [reqs[i] for i in keep]
        retracted = []
        first = True
        while first or self.free_tokens < len(keep):
            if len(keep) == 1:
                break
            first = False
            r = keep.pop()
            self._remove_decoder(r)
            private = r.gen - r.gen_ck
            self.private -= private
            self.free_tokens += private
            self.cache.unlock(r.lock)
            r.lock = None
            r.out_keys = r.out_keys + (Group(f"\x00out:{r.rid}:{r.out_len}", r.gen - r.out_len),)
            r.out_len = r.gen
            r.fill_len = r.prompt_len + r.gen
            r.state = WAITING
            self._wait(r, +1)
            retracted.append(r)
            self.counters.retractions += 1
            self.counters.retracted_tokens += r.gen
            self._evict(len(keep) * self.config.retract_decode_steps)
            if self.free_tokens < len(keep):
                self._evict(len(keep) - self.free_tokens)
        if self.free_tokens < len(keep):
            r = keep[0]
            raise RuntimeError(f"request {r.rid!r} (prompt {r.prompt_len}, output {r.output_len}) does not fit in "
                               f"the KV pool of {self.config.kv_tokens} tokens even alone; raise kv_gb (--kv-gb)")
        total_gen = sum(int(self._gen[r.slot]) for r in keep)
        total_max = sum(r.max_new_tokens for r in keep)
        self.new_token_ratio = min(1.0, (total_gen + self.config.retract_decode_steps * len(keep)) / (total_max + 1))
        for r in retracted:
            self.picker.retracted(r)

    def _decode_round(self) -> tuple[int, int]:
        n = self.n_dec
        kv_read = self.sum_base + self.sum_gen
        self.free_tokens -= n
        self.private += n
        self.decode_rounds += 1
        gen = self._gen[:n]
        gen += 1
        self.sum_gen += n
        if self.n_watch:
            for s in np.flatnonzero(gen >= self._watch[:n]):
                r = self._dec[s]
                nxt = self.picker.progress(r, int(gen[s]))
                if nxt is None:
                    self._watch[s] = _NO_WATCH
                    self.n_watch -= 1
                else:
                    self._watch[s] = nxt
        done = np.flatnonzero(gen >= self._out[:n])
        for s in done[::-1]:
            r = self._dec[s]
            self._remove_decoder(r)
            self._finish(r)
        return n, kv_read

    def _finish(self, r: SimRequest) -> None:
        private = r.gen - r.gen_ck
        if private:
            node, dup = self.cache.insert(r.fill_keys + (Group(f"\x00out:{r.rid}:{r.out_len}", private),))
            self.free_tokens += dup - r.fill_len  # 0 unless the fill itself was republished
            self.cache.unlock(r.lock)
        else:
            self.cache.unlock(r.lock)
        self.private -= private
        r.lock = None
        r.state = FINISHED
        self.finished += 1
        self.counters.output_tokens += r.gen
        self.work.finished(r.gen)
        self.finish_order.append(r.rid)
        self.picker.finished(r)

    def _stalled(self) -> None:
        if self.prefilling or self.n_dec:
            return
        # the waiting request that asks the most of the pool (its prompt and every token it may
        # write): the usual cause, named; a scan of the requests, once, on the way to the error
        need, big = max(((r.fill_len + r.max_new_tokens - r.gen, i) for i, r in enumerate(self.requests)
                         if r.state == WAITING), default=(0, None))
        largest = "" if big is None else (
            f" The largest waiting request, {self.requests[big].rid!r} (prompt {self.requests[big].prompt_len}, "
            f"max_new_tokens {self.requests[big].max_new_tokens}), may need {need} KV tokens.")
        raise RuntimeError(
            f"simulation stalled at step {self.steps}: {self.waiting} requests wait ({len(self.picker)} in the "
            f"{self.picker.name} picker), nothing runs and the picker admits nothing (free {self.free_tokens} + "
            f"evictable {self.cache.evictable_tokens} of {self.config.kv_tokens} KV tokens, {self.slots_left} slots, "
            f"chunk {self.chunk}, {self.counters.admit_rejections} rejected picks so far).{largest} A request "
            f"larger than the KV pool (raise kv_gb, --kv-gb), or a picker that refuses everything?")

    # ------------------------------------------------------------------ checks
    def check_step(self) -> None:
        """The per-step check of `run(check=True)`: what a step can break, in O(running)
        (request counts, KV conservation, the decode sums, the cache's counters); the full
        recount of `check_integrity` (every request, the cache tree, the picker) every
        FULL_CHECK_EVERY steps and at the end of the run."""
        self._checked += 1
        if self._checked >= FULL_CHECK_EVERY:
            self._checked = 0
            self.check_integrity()
            return
        assert self.waiting + len(self.prefilling) + self.n_dec + self.finished == len(self.requests), \
            (f"requests not conserved: waiting {self.waiting} + prefilling {len(self.prefilling)} + decoding "
             f"{self.n_dec} + finished {self.finished} != {len(self.requests)}")
        assert self.waiting == len(self.picker), f"engine counts {self.waiting} waiting, picker {len(self.picker)}"
        assert self.free_tokens >= 0 and self.private >= 0, "KV pool over-committed"
        assert self.free_tokens + self.cache.total_tokens + self.private == self.config.kv_tokens, \
            (f"KV pages not conserved: free {self.free_tokens} + cached {self.cache.total_tokens} + "
             f"private {self.private} != {self.config.kv_tokens}")
        assert 0 <= self.cache.evictable_tokens <= self.cache.total_tokens
        n = self.n_dec
        assert self.sum_gen == int(self._gen[:n].sum()) and self.sum_base == int(self._base[:n].sum())
        assert bool((self._gen[:n] < self._out[:n]).all()), "a decoding request is past its output length"
        for r in self.prefilling:
            assert r.state == PREFILLING and r.lock is not None and r.prefill_left > 0

    def check_integrity(self) -> None:
        """Every invariant, recomputed from scratch: KV pages conserved, every request in exactly
        one state (finished ones exactly once), decode arrays consistent, cache locks match."""
        by_state = {WAITING: 0, PREFILLING: 0, DECODING: 0, FINISHED: 0}
        private = 0
        locks: dict = {}
        for r in self.requests:
            by_state[r.state] += 1
            if r.state == PREFILLING:
                private += r.fill_len - r.published
                assert r.lock is not None and r.prefill_left > 0 and r.hit <= r.published < r.fill_len
            elif r.state == DECODING:
                assert self._dec[r.slot] is r, f"{r!r}: slot {r.slot} holds another request"
                gen = int(self._gen[r.slot])
                assert r.gen_ck <= gen < r.output_len
                private += gen - r.gen_ck
            else:
                assert r.lock is None, f"{r!r} holds a cache lock"
            if r.lock is not None:
                locks[r.lock] = locks.get(r.lock, 0) + 1
        assert by_state[PREFILLING] == len(self.prefilling) and by_state[DECODING] == self.n_dec
        assert by_state[WAITING] == self.waiting == len(self.picker) and by_state[FINISHED] == self.finished
        assert len(self.finish_order) == len(set(self.finish_order)) == self.finished, "a request finished twice"
        assert self.n_dec + len(self.prefilling) <= self.config.max_running
        assert private == self.private, f"private pages {self.private} != recomputed {private}"
        assert self.free_tokens >= 0, "KV pool over-committed"
        assert self.free_tokens + self.cache.total_tokens + self.private == self.config.kv_tokens, \
            (f"KV pages not conserved: free {self.free_tokens} + cached {self.cache.total_tokens} + "
             f"private {self.private} != {self.config.kv_tokens}")
        n = self.n_dec
        assert self.sum_gen == int(self._gen[:n].sum()) and self.sum_base == int(self._base[:n].sum())
        assert self.n_eos == int((~self._ign[:n]).sum())
        assert all(self._dec[i] is None for i in range(n, self.config.max_running))
        self.cache.check_integrity(locks)
        self.picker.check_integrity()


def simulate_requests(requests, cost: CostModel, config: EngineConfig, picker, check: bool = False) -> Engine:
    """Run `picker` over `requests` to completion and return the engine (series + counters)."""
    return Engine(cost, config, picker, requests).run(check=check)

