"""`BlendPolicy`: the dual scanner driving SGLang's admission.

SGLang calls `calc_priority(waiting_queue, running_batch, ...)` once per prefill step and then
admits from the queue in order with its `PrefillAdder`. This policy keeps a `ResourceTree`
over the waiting requests, updated incrementally (arrivals and retracted requests through
`on_arrival`, aborts through `on_abort`, admissions by taking them out), asks the
`DualScanner` for this step's admissions against the scheduler's real budgets (the memory the
admission check will reserve, free request slots, chunked-prefill tokens), and leaves only
those in the queue, in plan order; the other waiting requests wait aside for the step and are
put back by `after_step`, together with any planned request SGLang's own check refused (it
goes back into the tree). No request is dropped: `after_step` always restores the queue.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict
from typing import Any

from ..core import Budget, CostModel, DualScanner, ResourceTree
from ..core.pacing import WaitingWork, paced_prefill_tokens, paces
from ..core.specs import CUSTOM_HARDWARE, ModelSpec, hardware
from .settings import INT32_MAX, BlendSettings, open_in_place, rank_of, rank_path, write_json_file

logger = logging.getLogger(__name__)

HINT_KEY = "blendserve_output_len"  # sampling_params.custom_params key: a known output length
MAX_HINT = 1 << 31  # a larger hint is ignored (no output is that long; the tree holds int64 sums)


def resolve_hardware(name: str, device: str) -> str:
    if name != "auto":
        return name
    if str(device).startswith("cpu"):
        return "cpu"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0).upper()
    except Exception as exc:  # noqa: BLE001
        gpu = f"unreadable ({exc})"
    for key in ("H200", "H100", "A100"):
        if key in gpu:
            return key.lower()
    # Not a reason to stop a server: the density split and the paced chunk depend on the ratios of
    # the model's and the workload's figures, not on the hardware's (its compute-to-bandwidth ratio
    # only moves the paced chunk's floor).
    logger.warning("BLENDSERVE_HARDWARE=auto does not know the GPU %r; planning with the h100 preset. Set "
                   "BLENDSERVE_HARDWARE=%s with its figures for a closer plan", gpu, CUSTOM_HARDWARE)
    return "h100"


def ending_by_abort(req) -> bool:
    """Whether SGLang ends `req` by an abort: its finish reason, or the one set for its next step
    (`to_finish`: a prompt refused on arrival, a client that went away), is a `FINISH_ABORT`."""
    reason = getattr(req, "finished_reason", None) or getattr(req, "to_finish", None)
    return type(reason).__name__ == "FINISH_ABORT"


def output_len_hint(value, rid, warn: bool = True) -> int | None:
    """A request's `custom_params.blendserve_output_len`: an integer from 0 to `MAX_HINT` (an
    integral float or a decimal string too); anything else is ignored, with a warning when `warn`
    (the request runs with an estimated length). Never raises: it runs in the scheduler."""
    if value is None:
        return None
    n = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        n = int(value)
    elif isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) <= 12:
        n = int(value.strip())  # ASCII digits only: int() refuses "²" (a digit to isdigit), and 4,300+ digits
    if n is None or not 0 <= n <= MAX_HINT:
        if not warn:
            return None
        logger.warning("blend policy: request %r: custom_params.%s=%r ignored (expected a non-negative integer); "
                       "its output length is estimated", rid, HINT_KEY, value)
        return None
    return n


def prompt_problem(req, vocab_size: int | None) -> str | None:
    """Why the model's forward pass cannot take `req`'s prompt, or None: no tokens at all (text
    the tokenizer turns into nothing), or a token id outside [0, vocab_size) sent as `input_ids`.
    SGLang checks neither, and either one raises inside the scheduler's forward pass, which kills
    the server and every request with it. Multimodal prompts are not checked against the
    vocabulary (their placeholder ids lie beyond it by design). Never raises."""
    ids = req.origin_input_ids
    if len(ids) == 0:
        return "the prompt has no tokens; send a prompt of at least one token"
    if vocab_size is None or getattr(req, "multimodal_inputs", None) is not None:
        return None
    lo, hi = min(ids), max(ids)
    if lo < 0 or hi >= vocab_size:
        return (f"input_ids holds the token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                f"[0, {vocab_size}); send token ids of this model's tokenizer")
    return logprob_problem(req, vocab_size)


def logprob_problem(req, vocab_size: int) -> str | None:
    """Why the logprobs `req` asks for would raise in the scheduler (and end the server with every
    request in it), or None: more top logprobs than the vocabulary has (a top-k past the logits'
    width), or a negative logprob_start_len other than -1 (an assertion once its prompt is
    cached). SGLang 0.5.23 checks neither."""
    if not getattr(req, "return_logprob", False):
        return None
    top = getattr(getattr(req, "logprob", None), "top_logprobs_num", None)
    top = getattr(req, "top_logprobs_num", 0) if top is None else top
    if isinstance(top, int) and top > vocab_size:
        return f"top_logprobs_num {top} is more than the model's vocabulary of {vocab_size} tokens; ask for fewer"
    start = getattr(req, "logprob_start_len", -1)
    if isinstance(start, int) and start < -1:
        return (f"logprob_start_len {start} is negative; pass -1 (the output only) or a prompt position from 0 "
                f"to {len(req.origin_input_ids) - 1}")
    return None


def request_problem(req, vocab_size: int | None, hidden_size: int | None) -> str | None:
    """Why a new request would end the scheduler (and the server with every request in it), or
    None: every check a blend server makes before the plan sees the request."""
    return prompt_problem(req, vocab_size) or sampling_problem(req, vocab_size) or embeds_problem(req, hidden_size)


def embeds_problem(req, hidden_size: int | None) -> str | None:
    """Why `req`'s `input_embeds` cannot enter the model, or None: rows of another width than the
    model's hidden size (SGLang 0.5.23 takes them and the forward pass raises in the scheduler,
    ending the server). Never raises."""
    rows = getattr(req, "input_embeds", None)
    if not hidden_size or not isinstance(rows, (list, tuple)):
        return None
    bad = next((len(r) for r in rows if isinstance(r, (list, tuple)) and len(r) != hidden_size), None)
    if bad is not None:
        return (f"input_embeds has rows of {bad} values; this model's embeddings have {hidden_size}: send rows "
                "of the model's hidden size")
    return None


def sampling_problem(req, vocab_size: int | None = None) -> str | None:
    """Why `req`'s sampling parameters would stop the engine, or None (SGLang 0.5.23 checks
    neither, and both raise in the scheduler, ending the server with every request in it): a
    repetition penalty below `MIN_REPETITION_PENALTY` (it takes [0, 2]; 0 or 1e-40 divides a
    positive logit into infinity and the sampler raises on the NaN probabilities), or
    `min_new_tokens` with a stop token id outside the vocabulary (the penalizer indexes the logits
    with it), or a `top_k` past int32 (the batch's top-k tensor cannot hold it: "value cannot be
    converted to type int32 without overflow"). Never raises."""
    from ..batch.requests import MIN_REPETITION_PENALTY

    sp = getattr(req, "sampling_params", None)
    top_k = getattr(sp, "top_k", None)
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k > INT32_MAX:
        return (f"top_k {top_k} is beyond what the sampler holds ({INT32_MAX:,}); pass -1 for every token, or a "
                "top_k up to the vocabulary's size")
    penalty = getattr(sp, "repetition_penalty", 1.0)
    if isinstance(penalty, (int, float)) and not isinstance(penalty, bool) and penalty < MIN_REPETITION_PENALTY:
        return (f"repetition_penalty {penalty:g} is below {MIN_REPETITION_PENALTY:g}, where the sampler divides a "
                "logit into infinity; pass a penalty from 0.01 to 2 (1 for none)")
    stops = getattr(sp, "stop_token_ids", None) or ()
    if vocab_size and (getattr(sp, "min_new_tokens", 0) or 0) > 0:
        bad = next((t for t in stops if isinstance(t, int) and not 0 <= t < vocab_size), None)
        if bad is not None:
            return (f"stop_token_ids holds {bad}, outside the model's vocabulary [0, {vocab_size}), which "
                    "min_new_tokens cannot suppress; send token ids of this model's tokenizer")
    return None


class BlendPolicy:
    """Stands in for SGLang's `SchedulePolicy`: `calc_priority` is the blend plan; the other
    methods the scheduler calls (`STOCK_METHODS`) are the stock policy's."""

    def __init__(self, scheduler, stock_policy, settings: BlendSettings):
        self.scheduler = scheduler
        self.stock = stock_policy
        self.settings = settings
        self.preset = settings.preset()
        if scheduler.disable_radix_cache:  # nothing cached across requests: no hold, no cached prefix
            self.preset = self.preset.replace(prefix_cache=False)
        hf = getattr(scheduler.model_config, "hf_text_config", None) or scheduler.model_config.hf_config  # multimodal:
        # the language model's config
        server_args = getattr(scheduler, "server_args", None)
        spec = ModelSpec.from_hf_config(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf),
                                        name=getattr(hf, "_name_or_path", None) or "model")
        spec = spec.with_kv_cache_dtype(getattr(server_args, "kv_cache_dtype", None))  # an FP8 cache: a byte a value
        device = getattr(server_args, "device", "cuda")
        hw = hardware(resolve_hardware(settings.hardware, device))
        tp = getattr(server_args, "tp_size", 1)
        if settings.hardware == "auto" and isinstance(tp, int) and tp > 1 and hw.name != "cpu":
            hw = hw.times(tp)  # the scheduler plans for its tensor-parallel group (NxNAME names one itself)
        self.cost = CostModel(spec, hw)
        self.tree = ResourceTree(self.cost, self.preset.estimator)
        self.scanner = DualScanner(self.tree, self.preset.scan)
        self.waiting: dict[Any, Any] = {}  # rid -> sglang Req, in the tree
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

        self.work = WaitingWork(CLIP_MAX_NEW_TOKENS)  # the pacing target's inputs, as the simulator keeps them
        self.work_of: dict[Any, tuple] = {}  # rid -> what `work` counts for that waiting request
        self.untracked: dict[Any, Any] = {}  # rid -> sglang Req the tree cannot hold (left to SGLang, FCFS)
        self.planned: dict[Any, Any] = {}  # rid -> sglang Req put in the queue this step
        self.running: dict[Any, Any] = {}  # rid -> sglang Req the scanner handed out
        self.written_at_take: dict[Any, int] = {}  # rid -> its output tokens when handed out (a retracted one's kept)
        self.queue: list = scheduler.waiting_queue  # the full waiting queue, also while it stands aside
        self.pos: dict[Any, int] = {}  # rid -> index in self.queue
        self._dirty = True  # positions must be rebuilt before the next plan
        self._in_step = False
        self.reindexes = 0
        self.steps = 0
        self.planning_seconds = 0.0  # calc_priority + after_step
        self.insert_seconds = 0.0  # arrivals into the tree (on_arrival)
        self.dp_rank, writes = rank_of(scheduler)  # the files are the first of each DP rank's group's, apart
        self.stats_path = rank_path(settings.stats_path, self.dp_rank) if writes else None
        self.trace_path = rank_path(settings.trace_path, self.dp_rank) if writes else None  # one JSON line per step
        self._trace: dict | None = None
        self._forward_ct = int(getattr(scheduler, "forward_ct", 0) or 0)  # at the previous plan (metering)
        self._paced: dict | None = None  # the stock sizes while a paced step runs
        logger.info("blend policy: %s on %s (%s)", spec.name, hw.name, settings)

    # ------------------------------------------------------------------ the stock policy's methods
    def waiting_queue_prefix_matched(self, *args, **kwargs):
        return self.stock.waiting_queue_prefix_matched(*args, **kwargs)

    def shortest_prefill_chunk_limit(self, *args, **kwargs):
        return self.stock.shortest_prefill_chunk_limit(*args, **kwargs)

    # ------------------------------------------------------------------ tree upkeep
    def on_arrival(self, req, is_retracted: bool = False) -> None:
        """A request joined the scheduler's queue (appended last, by SGLang)."""
        t0 = time.perf_counter()
        rid = req.rid
        if not self._in_step and not self._dirty:
            q = self.scheduler.waiting_queue
            if q is self.queue and q and q[-1] is req and rid not in self.pos:
                self.pos[rid] = len(q) - 1
            elif rid not in self.pos:
                self._dirty = True
        old = self.running.get(rid)
        if old is not None and old is not req:  # a new request under the rid of one that ended since the
            self._ended(rid, old)  # last step (a client reusing its ids): that one finished, this one is new
        readd = rid in self.running
        if readd:  # retracted: it comes back with its output so far
            del self.running[rid]
            self.written_at_take.pop(rid, None)
            self.scanner.retracted(rid)
        self.planned.pop(rid, None)
        if not readd and not self._in_step and self.running and not self.scanner.tree.root.count:
            # SGLang skips calc_priority while its queue is empty, so requests that finished since the
            # last plan still count as running: the scanner would take this arrival for part of the
            # drained batch and plan it with that batch's sample (a probe: a warm-up's 4 tokens for
            # every later request). Their ends are taken now; a new batch is sampled anew.
            self._sync_running(None)
        self._track(req, readd)
        self.insert_seconds += time.perf_counter() - t0

    def on_abort(self, req) -> None:
        """SGLang took `req` out of its queue (positions shift: rebuilt at the next plan)."""
        rid = req.rid
        if self.pos.pop(rid, None) is not None:
            self._dirty = True
        if rid in self.waiting:
            self._unwait(rid)
            self.scanner.remove(rid)
        self.untracked.pop(rid, None)

    def _track(self, req, readd: bool = False) -> None:
        """`req` waits in the scanner's tree (`readd`: it waited before: retracted or not admitted)."""
        rid = req.rid
        if rid in self.waiting or rid in self.untracked:
            return
        sp = req.sampling_params
        output_so_far = len(req.output_ids)
        max_new = max(1, sp.max_new_tokens - output_so_far) if sp.max_new_tokens is not None else None
        params = getattr(sp, "custom_params", None)
        # warned once, on arrival: not again each time a retraction or a refused plan hands it back
        hint = output_len_hint(params.get(HINT_KEY), rid, warn=not readd) if isinstance(params, dict) else None
        known = max_new if getattr(sp, "ignore_eos", False) else None
        if not output_so_far and ending_by_abort(req):
            # refused on arrival (SGLang's own checks, or `request_problem`): its one-token stand-in
            # prompt passes one prefill step and ends; drawn into the sample, that step would be
            # the batch's output length
            known = 1
        elif hint is not None and known is None:
            known = max(0, hint - output_so_far)
            if max_new is not None:
                known = min(known, max_new)
        tokens = list(req.origin_input_ids)
        if output_so_far:
            tokens += list(req.output_ids)
        try:
            self.scanner.add(rid, readd=readd, tokens=tokens, output_len=known, max_tokens=max_new)
        except (ValueError, TypeError) as exc:
            logger.warning("blend policy: request %r left to first-come-first-served order: %s", rid, exc)
            self.untracked[rid] = req
            return
        self.waiting[rid] = req
        self.work_of[rid] = (len(tokens), max_new, known)
        self.work.wait(*self.work_of[rid])

    def _unwait(self, rid):
        """`rid` leaves the waiting requests (planned or aborted): out of the pacing target's work."""
        self.work.wait(*self.work_of.pop(rid), sign=-1)
        return self.waiting.pop(rid)

    def _ended(self, rid, req) -> None:
        """Running request `req` ended: out of the running requests and the scanner's accounts. An
        aborted one's output so far is no output length: neither a sample nor in the mean."""
        del self.running[rid]
        self.written_at_take.pop(rid, None)
        aborted = ending_by_abort(req)
        self.scanner.finished(rid, len(req.output_ids), aborted=aborted)
        if not aborted:
            self.work.finished(len(req.output_ids))

    def _sync_running(self, running_batch=None) -> None:
        """Running requests that ended leave the scanner's accounts. SGLang aborts a beam group it
        cannot retract (and a retraction without a KV backup) by setting `to_finish` and dropping
        the request from the batch: `finished()` never turns true for it, so a request marked so
        and out of the running batch has ended too (it held its side's memory for good)."""
        live = None
        for rid, req in list(self.running.items()):
            ended = req.finished()
            if not ended and getattr(req, "to_finish", None) is not None and running_batch is not None:
                if live is None:
                    live = {r.rid for r in running_batch.reqs}
                ended = rid not in live
            if ended:
                self._ended(rid, req)
            else:
                self.scanner.progress(rid, len(req.output_ids))

    # ------------------------------------------------------------------ each step
    def calc_priority(self, waiting_queue: list, running_batch=None, processed_tokens: int = 0) -> None:
        """Plan this step. The scheduler's queue becomes the plan (untracked requests first);
        the full queue waits aside, untouched, until `after_step`."""
        t0 = time.perf_counter()
        if (waiting_queue is not self.queue or self._dirty
                or len(self.pos) != len(waiting_queue) or len(self.pos) != len(self.waiting) + len(self.untracked)):
            self._reindex(waiting_queue)
        self._sync_running(running_batch)
        admissions = self.scanner.schedule(self._budget(running_batch))
        planned = []
        for a in admissions:
            req = self._unwait(a.rid)
            if req.finished():  # aborted while waiting: SGLang's own path takes it out
                self.scanner.finished(a.rid, len(req.output_ids), aborted=True)
                self.untracked[a.rid] = req
                continue
            planned.append(req)
        self.planned = {r.rid: r for r in planned}
        if self.trace_path:
            chunked = getattr(self.scheduler, "chunked_req", None)
            self._trace = {"step": self.steps, "waiting": len(self.waiting), "prefilling": getattr(chunked, "rid", None),
                           "plan": [[a.rid, a.side, a.prompt_len, a.cached_tokens] for a in admissions],
                           "scan": self.scanner.last_step}
        self._in_step = True
        self.scheduler.waiting_queue = list(self.untracked.values()) + planned
        self.steps += 1
        self.planning_seconds += time.perf_counter() - t0

    def after_step(self) -> None:
        """Put the waiting requests back; planned requests SGLang did not admit go back to the tree.

        The full queue (`self.queue`) stayed aside during the step; the requests SGLang admitted
        leave it by swap-remove (positions in `self.pos`), requests queued during the step join
        it, and it becomes the scheduler's queue again: O(planned + left), never O(waiting)."""
        if not self._in_step:
            return
        t0 = time.perf_counter()
        sched = self.scheduler
        left = sched.waiting_queue
        left_ids = set()
        for req in left:
            rid = req.rid
            left_ids.add(rid)
            if rid in self.planned:
                del self.planned[rid]
                self.scanner.cancel(rid)
                self._track(req, readd=True)
            elif rid not in self.pos:  # queued during the step (a retraction, an arrival)
                self.pos[rid] = len(self.queue)
                self.queue.append(req)
                self._track(req)
        for rid, req in self.planned.items():
            self.running[rid] = req
            self.written_at_take[rid] = len(req.output_ids)
            self._remove(rid)
        if self.untracked:
            for rid in [r for r in self.untracked if r not in left_ids]:
                del self.untracked[rid]
                self._remove(rid)
        sched.waiting_queue = self.queue
        if self._trace is not None:
            self._trace["admitted"] = sorted(self.planned)
        self.planned = {}
        self._in_step = False
        self.planning_seconds += time.perf_counter() - t0
        if self.stats_path and (self.steps % 32 == 0 or not self.waiting):
            self.write_stats()

    def _remove(self, rid) -> None:
        """Take `rid` out of the full queue by swap-remove (order in the queue carries no meaning)."""
        i = self.pos.pop(rid, None)
        q = self.queue
        if i is None or i >= len(q) or q[i].rid != rid:  # positions went stale: rebuild them once
            self._reposition()
            i = self.pos.pop(rid, None)
            if i is None:
                return
        last = q.pop()
        if i < len(q):
            q[i] = last
            self.pos[last.rid] = i

    def _reposition(self) -> None:
        self.pos = {r.rid: i for i, r in enumerate(self.queue)}
        self._dirty = False
        self.reindexes += 1

    def _reindex(self, waiting_queue: list) -> None:
        """The queue changed behind the hooks' back (or positions went stale): index it again,
        track what is new, drop what is gone. O(waiting); rare."""
        self.queue = waiting_queue
        self._reposition()
        for rid, i in self.pos.items():
            if rid not in self.waiting and rid not in self.untracked:
                self.on_arrival(waiting_queue[i])
        for rid in [r for r in self.waiting if r not in self.pos]:
            self.on_abort(self.waiting[rid])
        for rid in [r for r in self.untracked if r not in self.pos]:
            del self.untracked[rid]

    def _budget(self, running_batch) -> Budget:
        sched = self.scheduler
        running = list(running_batch.reqs) if running_batch is not None else []
        ratio = sched.new_token_ratio_tracker.current
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

        # With --enable-mixed-chunk the running requests' decode tokens ride in the prefill batch:
        # SGLang's PrefillAdder takes them out of both the KV budget and the step's prefill tokens.
        mixed_steps = bool(getattr(sched, "is_mixed_chunk", False))
        mixed = len(running) if mixed_steps else 0
        budget = sched.token_to_kv_pool_allocator.create_prefill_budget(sched.tree_cache,
                                                                         num_mixed_decode_tokens=mixed)
        # SGLang's check reserves every running request's remaining max_new_tokens (clipped, at the
        # new-token ratio unless ignore_eos): the room it admits within. The plan's memory (the
        # sides' split, the metered credit) counts the requests the scanner handed out at its own
        # reservation, what the simulator's blend sees (the reserved output not written yet).
        offset = own = 0.0
        for r in running:
            left = min(r.sampling_params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS)
            left *= 1.0 if r.sampling_params.ignore_eos else ratio
            offset += left
            run = self.scanner.running.get(r.rid) if self.running.get(r.rid) is r else None
            own += left if run is None else max(0, run.out_reserved - (len(r.output_ids) - self.written_at_take.get(r.rid, 0)))
        free_tokens = max(0.0, budget.remaining_total - offset)
        plan_tokens = max(0.0, budget.remaining_total - own)
        slots = sched.get_num_allocatable_reqs(len(running), running_batch=running_batch)
        chunk = sched.chunked_prefill_size
        prefill = min(chunk, sched.max_prefill_tokens) if chunk and chunk > 0 else sched.max_prefill_tokens
        prefill -= mixed
        # A request prefilled in chunks goes first this step (SGLang's add_chunked_req): its
        # remaining prompt comes out of the step's tokens.
        chunked = getattr(sched, "chunked_req", None)
        if chunked is not None:
            left = len(chunked.origin_input_ids) + len(chunked.output_ids) - int(getattr(chunked, "prefix_len", 0) or 0)
            prefill = max(0, prefill - max(0, left))
        # Prompts not in the radix cache yet: no output token processed (prefill chunks left, or,
        # with the overlap scheduler, the prefill result is processed after this step is planned).
        prefilling = {rid for rid, r in self.running.items() if not r.output_ids}
        kvb = self.cost.kv_bytes_per_token
        steps = pool = None
        if self.preset.metering:  # forward passes since the previous plan, and the whole KV pool
            forward_ct = int(sched.forward_ct)
            steps, self._forward_ct = max(0, forward_ct - self._forward_ct), forward_ct
            pool = sched.max_total_num_tokens * kvb
        return Budget(plan_tokens * kvb, max(0, slots), prefill, output_ratio=ratio if self.preset.engine_ratio else None,
                      steps=steps, kv_pool=pool,
                      prefilling=prefilling, admit_room=free_tokens, admit_clip=CLIP_MAX_NEW_TOKENS,
                      mixed_steps=mixed_steps)

    # ------------------------------------------------------------------ paced prefill
    def paced_tokens(self, running_batch) -> int | None:
        """This step's prefill tokens by `core.pacing` (None: no pacing): the running requests'
        decode KV read at the density of the waiting work (`core.pacing.WaitingWork`: the
        estimate the simulator's engine gives every policy, so blend paces here as it is
        measured). Only with `--enable-mixed-chunk`: without it a prefill step decodes nothing
        (`core.pacing.paces`)."""
        if not paces(self.preset.pacing, getattr(self.scheduler, "is_mixed_chunk", False)) or not self.waiting:
            return None
        running = list(running_batch.reqs) if running_batch is not None else []
        kv_read = sum(len(r.origin_input_ids) + len(r.output_ids) for r in running)
        return paced_prefill_tokens(self.cost, kv_read, len(running), self.work.density(self.cost))

    def begin_step(self, running_batch) -> None:
        """Before SGLang builds this step's PrefillAdder: the paced budget as its prefill-token
        budget (`max_prefill_tokens`) and chunk size (`chunked_prefill_size`, when chunked prefill
        is on), never above the configured ones; `end_step` restores them.

        SGLang runs this step also when idle, but calc_priority only while its queue holds
        requests: once the engine has drained, the requests that ended since the last plan are
        taken out here (else a server between batches would hold the last batch's requests, their
        prompt and output ids, until the next arrival)."""
        if self.running and not self.scheduler.waiting_queue and (running_batch is None or not running_batch.reqs):
            self._sync_running(running_batch)
            if self.stats_path:  # the counters a drained engine shows (the last plan's said requests still ran)
                self.write_stats()
        paced = self.paced_tokens(running_batch)
        if paced is None:
            return
        sched = self.scheduler
        # SGLang truncates a chunk to whole pages (and to truncation_align_size): a smaller one
        # would make no progress.
        paced = max(paced, int(sched.page_size or 1), int(getattr(sched, "truncation_align_size", None) or 1))
        # With mixed steps SGLang's PrefillAdder takes one token per running request off both
        # budgets (`num_mixed_decode_tokens`); the paced figure is prefill tokens after the decode
        # tokens already (`paced_prefill_tokens`), so they are added back once here.
        paced += len(running_batch.reqs) if running_batch is not None else 0
        stock = {"max_prefill_tokens": sched.max_prefill_tokens, "chunked_prefill_size": sched.chunked_prefill_size}
        self._paced = stock
        sched.max_prefill_tokens = min(paced, stock["max_prefill_tokens"])
        if stock["chunked_prefill_size"] is not None:
            sched.chunked_prefill_size = min(paced, stock["chunked_prefill_size"])

    def end_step(self, result=None) -> None:
        """After SGLang's prefill step: the configured sizes back; the trace line written."""
        sched = self.scheduler
        paced = None
        if self._paced is not None:
            paced = {"budget": sched.max_prefill_tokens, "stock": self._paced["max_prefill_tokens"]}
            sched.max_prefill_tokens = self._paced["max_prefill_tokens"]
            sched.chunked_prefill_size = self._paced["chunked_prefill_size"]
            self._paced = None
        self.after_step()
        if self.trace_path and self._trace is not None:
            batch = result[0] if isinstance(result, tuple) and result else None
            self._trace["paced"] = paced
            self._trace["prefill_tokens"] = getattr(batch, "extend_num_tokens", None) if batch is not None else 0
            try:
                with open_in_place(self.trace_path, "a") as f:
                    f.write(json.dumps(self._trace, default=str) + "\n")
            except OSError as exc:  # a full disk ends the trace, never the scheduler
                logger.warning("blend policy: cannot append to %s (%s); the step trace stops here", self.trace_path, exc)
                self.trace_path = None
            self._trace = None

    def stats(self) -> dict:
        split = self.scanner.split_report
        return {"policy": "blend", "steps": self.steps, "reindexes": self.reindexes, "planning_seconds": round(self.planning_seconds, 6),
                "planning_ms_per_step": round(1e3 * self.planning_seconds / self.steps, 4) if self.steps else 0.0,
                "insert_seconds": round(self.insert_seconds, 6),
                "waiting": len(self.waiting), "running": len(self.running), "handed_out": self.scanner.handed_out,
                "sample_size": self.scanner.sample_size, "splits": split.splits if split else None,
                "dp_rank": self.dp_rank, "hardware": self.cost.hardware.name, "model": self.cost.model.name,
                "settings": {k: v for k, v in asdict(self.settings).items() if not k.endswith("_path")}}

    def write_stats(self) -> None:
        """Write `stats()` as JSON to $BLENDSERVE_STATS_PATH (atomically), for benchmarks and tests."""
        if not write_json_file(self.stats_path, self.stats(), "the blend policy's counters"):
            self.stats_path = None
