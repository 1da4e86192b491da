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

import logging
import os
import time
from itertools import filterfalse
from typing import Any

from ..core import Budget, CostModel, DualScanner, OutputLengthEstimator, ResourceTree, ScanConfig
from ..core.specs import ModelSpec, hardware
from .settings import BlendSettings

logger = logging.getLogger(__name__)

HINT_KEY = "blendserve_output_len"  # sampling_params.custom_params key: a known output length


def resolve_hardware(name: str, device: str) -> str:
    if name != "auto":
        return name
    if str(device).startswith("cpu"):
        return "cpu"
    try:
        import torch

        gpu = torch.cuda.get_device_name(0).upper()
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError("BLENDSERVE_HARDWARE=auto could not read the GPU name; set BLENDSERVE_HARDWARE "
                           "to a100, h100, h200 or cpu") from exc
    for key in ("H200", "H100", "A100"):
        if key in gpu:
            return key.lower()
    raise RuntimeError(f"BLENDSERVE_HARDWARE=auto does not know the GPU {gpu!r}; set BLENDSERVE_HARDWARE "
                       "to the closest of a100, h100, h200")


class BlendPolicy:
    """Stands in for SGLang's `SchedulePolicy` (other attributes are the stock policy's)."""

    def __init__(self, scheduler, stock_policy, settings: BlendSettings):
        self.scheduler = scheduler
        self.stock = stock_policy
        self.settings = settings
        hf = scheduler.model_config.hf_config
        spec = ModelSpec.from_hf_config(hf.to_dict() if hasattr(hf, "to_dict") else dict(hf),
                                        name=getattr(hf, "_name_or_path", None) or "model")
        device = getattr(getattr(scheduler, "server_args", None), "device", "cuda")
        hw = hardware(resolve_hardware(settings.hardware, device))
        self.cost = CostModel(spec, hw)
        estimator = OutputLengthEstimator(prior=settings.prior_output_len, sample_fraction=settings.sample_fraction,
                                          seed=settings.seed)
        self.tree = ResourceTree(self.cost, estimator)
        self.scanner = DualScanner(self.tree, ScanConfig(keep_sharing=settings.keep_sharing,
                                                         hold_prefix_tokens=settings.hold_prefix_tokens))
        self.waiting: dict[Any, Any] = {}  # rid -> sglang Req, in the tree
        self.untracked: dict[Any, Any] = {}  # rid -> sglang Req the tree cannot hold (left to SGLang, FCFS)
        self.planned: dict[Any, Any] = {}  # rid -> sglang Req put in the queue this step
        self.running: dict[Any, Any] = {}  # rid -> sglang Req the scanner handed out
        self._aside: list | None = None
        self.steps = 0
        self.planning_seconds = 0.0  # calc_priority + after_step
        self.insert_seconds = 0.0  # arrivals into the tree (on_arrival)
        self.stats_path = os.environ.get("BLENDSERVE_STATS_PATH") or None
        logger.info("blend policy: %s on %s (%s)", spec.name, hw.name, settings)

    def __getattr__(self, name):
        return getattr(self.stock, name)

    # ------------------------------------------------------------------ tree upkeep
    def on_arrival(self, req, is_retracted: bool = False) -> None:
        t0 = time.perf_counter()
        rid = req.rid
        if rid in self.running:  # retracted: it comes back with its output so far
            del self.running[rid]
            self.scanner.retracted(rid)
        self.planned.pop(rid, None)
        self._track(req)
        self.insert_seconds += time.perf_counter() - t0

    def on_abort(self, req) -> None:
        rid = req.rid
        if rid in self.waiting:
            del self.waiting[rid]
            self.tree.remove(rid)
        self.untracked.pop(rid, None)

    def _track(self, req) -> None:
        rid = req.rid
        if rid in self.waiting or rid in self.untracked:
            return
        sp = req.sampling_params
        output_so_far = len(req.output_ids)
        max_new = max(1, sp.max_new_tokens - output_so_far) if sp.max_new_tokens is not None else None
        hint = (sp.custom_params or {}).get(HINT_KEY) if isinstance(getattr(sp, "custom_params", None), dict) else None
        known = max_new if getattr(sp, "ignore_eos", False) else None
        if hint is not None and known is None:
            known = max(0, int(hint) - output_so_far)
        tokens = list(req.origin_input_ids)
        if output_so_far:
            tokens += list(req.output_ids)
        try:
            self.scanner.add(rid, tokens=tokens, output_len=known, max_tokens=max_new)
        except (ValueError, TypeError) as exc:
            logger.warning("blend policy: request %r left to first-come-first-served order: %s", rid, exc)
            self.untracked[rid] = req
            return
        self.waiting[rid] = req

    def _sync_running(self) -> None:
        for rid, req in list(self.running.items()):
            if req.finished():
                del self.running[rid]
                self.scanner.finished(rid, len(req.output_ids))
            else:
                self.scanner.progress(rid, len(req.output_ids))

    # ------------------------------------------------------------------ each step
    def calc_priority(self, waiting_queue: list, running_batch=None, processed_tokens: int = 0) -> None:
        """Plan this step. The scheduler's queue becomes the plan (untracked requests first);
        the full queue waits aside, untouched, until `after_step`."""
        t0 = time.perf_counter()
        if len(waiting_queue) != len(self.waiting) + len(self.untracked):
            self._reconcile(waiting_queue)
        self._sync_running()
        admissions = self.scanner.schedule(self._budget(running_batch))
        planned = []
        for a in admissions:
            req = self.waiting.pop(a.rid)
            if req.finished():  # aborted while waiting
                self.scanner.finished(a.rid, len(req.output_ids))
                continue
            planned.append(req)
        self.planned = {r.rid: r for r in planned}
        self._aside = waiting_queue
        self.scheduler.waiting_queue = list(self.untracked.values()) + planned
        self.steps += 1
        self.planning_seconds += time.perf_counter() - t0

    def after_step(self) -> None:
        """Put the waiting requests back; planned requests SGLang did not admit go back to the tree.

        The queue becomes: what is left of this step's queue (refused plans, requests re-queued
        during the step), then the set-aside queue without this step's planned requests (one
        C-level filter pass, skipped when nothing was planned)."""
        if self._aside is None:
            return
        t0 = time.perf_counter()
        sched = self.scheduler
        left = sched.waiting_queue
        for req in left:
            rid = req.rid
            if rid in self.planned:
                del self.planned[rid]
                self.scanner.cancel(rid)
                self._track(req)
        for rid, req in self.planned.items():
            self.running[rid] = req
        offered = set(self.untracked.values())
        for rid in [r for r, q in self.untracked.items() if q not in left]:
            del self.untracked[rid]
        offered.update(self.planned.values())
        offered.update(left)
        rest = self._aside if not offered else list(filterfalse(offered.__contains__, self._aside))
        sched.waiting_queue = list(left) + rest
        self.planned = {}
        self._aside = None
        self.planning_seconds += time.perf_counter() - t0
        if self.stats_path and (self.steps % 32 == 0 or not self.waiting):
            self.write_stats()

    def _reconcile(self, waiting_queue: list) -> None:
        """The queue changed behind the hooks' back: track what is new, drop what is gone."""
        present = {r.rid: r for r in waiting_queue}
        for rid, req in present.items():
            if rid not in self.waiting and rid not in self.untracked:
                self.on_arrival(req)
        for rid in [r for r in self.waiting if r not in present]:
            self.on_abort(self.waiting[rid])
        for rid in [r for r in self.untracked if r not in present]:
            del self.untracked[rid]

    def _budget(self, running_batch) -> Budget:
        sched = self.scheduler
        running = list(running_batch.reqs) if running_batch is not None else []
        ratio = sched.new_token_ratio_tracker.current
        from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

        budget = sched.token_to_kv_pool_allocator.create_prefill_budget(sched.tree_cache, num_mixed_decode_tokens=0)
        offset = 0.0
        for r in running:
            left = min(r.sampling_params.max_new_tokens - len(r.output_ids), CLIP_MAX_NEW_TOKENS)
            offset += left * (1.0 if r.sampling_params.ignore_eos else ratio)
        free_tokens = max(0.0, budget.remaining_total - offset)
        slots = sched.get_num_allocatable_reqs(len(running), running_batch=running_batch)
        chunk = sched.chunked_prefill_size
        prefill = min(chunk, sched.max_prefill_tokens) if chunk and chunk > 0 else sched.max_prefill_tokens
        return Budget(free_tokens * self.cost.kv_bytes_per_token, max(0, slots), prefill, output_ratio=ratio)

    def stats(self) -> dict:
        split = self.scanner.split_report
        return {"policy": "blend", "steps": self.steps, "planning_seconds": round(self.planning_seconds, 6),
                "planning_ms_per_step": round(1e3 * self.planning_seconds / self.steps, 4) if self.steps else 0.0,
                "insert_seconds": round(self.insert_seconds, 6),
                "waiting": len(self.waiting), "running": len(self.running), "handed_out": self.scanner.handed_out,
                "sample_size": self.scanner.sample_size, "splits": split.splits if split else None,
                "hardware": self.cost.hardware.name, "model": self.cost.model.name}

    def write_stats(self) -> None:
        """Write `stats()` as JSON to $BLENDSERVE_STATS_PATH (atomically), for benchmarks and tests."""
        import json
        import os

        tmp = f"{self.stats_path}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(self.stats(), f)
        os.replace(tmp, self.stats_path)
