"""The SGLang plugin's pieces that need no engine: knobs, CLI hook, version check, and the
BlendPolicy adapter driven by a stand-in scheduler (queue bookkeeping: nothing is lost)."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest

from blendserve_sgl import sglang_plugin
from blendserve_sgl.sglang_plugin.settings import BlendSettings


def test_settings_from_env_defaults_and_errors():
    assert BlendSettings.from_env({}) == BlendSettings()
    s = BlendSettings.from_env({"BLENDSERVE_HARDWARE": "a100", "BLENDSERVE_SAMPLE_FRACTION": "0.05",
                                "BLENDSERVE_KEEP_SHARING": "0.95", "BLENDSERVE_SEED": "3"})
    assert (s.hardware, s.sample_fraction, s.keep_sharing, s.seed) == ("a100", 0.05, 0.95, 3)
    assert BlendSettings().final_wave is True
    assert BlendSettings.from_env({"BLENDSERVE_FINAL_WAVE": "0"}).final_wave is False
    assert BlendSettings.from_env({"BLENDSERVE_FINAL_WAVE": " Off "}).final_wave is False
    assert BlendSettings.from_env({"BLENDSERVE_FINAL_WAVE": "yes"}).final_wave is True
    for env, needle in (({"BLENDSERVE_SAMPLE_FRACTION": "2"}, "BLENDSERVE_SAMPLE_FRACTION"),
                        ({"BLENDSERVE_SAMPLE_FRACTION": "lots"}, "BLENDSERVE_SAMPLE_FRACTION"),
                        ({"BLENDSERVE_KEEP_SHARING": "nan"}, "BLENDSERVE_KEEP_SHARING"),
                        ({"BLENDSERVE_HARDWARE": "tpu"}, "BLENDSERVE_HARDWARE"),
                        ({"BLENDSERVE_PRIOR_OUTPUT_LEN": "0"}, "BLENDSERVE_PRIOR_OUTPUT_LEN"),
                        ({"BLENDSERVE_FINAL_WAVE": "maybe"}, "BLENDSERVE_FINAL_WAVE")):
        with pytest.raises(ValueError, match=needle):
            BlendSettings.from_env(env)


def test_cli_hook_adds_blend_and_flags_that_set_the_environment(monkeypatch):
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule-policy", choices=["lpm", "fcfs"], default="fcfs")
    sglang_plugin._after_add_cli_args(None, parser)
    sglang_plugin._after_add_cli_args(None, parser)  # idempotent
    monkeypatch.delenv("BLENDSERVE_KEEP_SHARING", raising=False)
    args = parser.parse_args(["--schedule-policy", "blend", "--blend-keep-sharing", "0.9"])
    assert args.schedule_policy == "blend"
    import os

    assert os.environ["BLENDSERVE_KEEP_SHARING"] == "0.9"
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule-policy", "nope"])


def test_version_mismatch_names_the_version_needed(monkeypatch):
    import importlib.metadata

    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9")
    problems = sglang_plugin.compatibility_problems()
    assert any("9.9.9" in p for p in problems)
    with pytest.raises(sglang_plugin.IncompatibleSGLang, match="sglang==0.5.23"):
        sglang_plugin.require_compatible()


# ---------------------------------------------------------------------- adapter with a stand-in scheduler
sglang = pytest.importorskip("sglang", reason="the adapter reads SGLang's admission constants")


class FakeReq:
    def __init__(self, rid, tokens, max_new, ignore_eos=False):
        self.rid = rid
        self.origin_input_ids = tokens
        self.output_ids = []
        self.sampling_params = SimpleNamespace(max_new_tokens=max_new, ignore_eos=ignore_eos, custom_params=None)
        self.done = False

    def finished(self):
        return self.done


class FakeScheduler:
    """What BlendPolicy reads from SGLang's Scheduler, with a KV pool of `capacity` tokens."""

    def __init__(self, capacity=4000, slots=16):
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, torch_dtype="float32")))
        self.server_args = SimpleNamespace(device="cpu")
        self.new_token_ratio_tracker = SimpleNamespace(current=0.5)
        self.capacity, self.slots_total = capacity, slots
        self.used = 0
        self.token_to_kv_pool_allocator = SimpleNamespace(
            create_prefill_budget=lambda cache, num_mixed_decode_tokens=0: SimpleNamespace(
                remaining_total=self.capacity - self.used - num_mixed_decode_tokens))
        self.tree_cache = None
        self.chunked_prefill_size, self.max_prefill_tokens = 512, 4096
        self.waiting_queue = []

    def get_num_allocatable_reqs(self, running_bs, running_batch=None):
        return self.slots_total - running_bs


def _make_policy(sched, **settings):
    from blendserve_sgl.sglang_plugin.policy import BlendPolicy

    return BlendPolicy(sched, SimpleNamespace(policy="fcfs"), BlendSettings(hardware="a100", **settings))


def test_adapter_loses_nothing_and_admits_each_request_once():
    """Random arrivals, SGLang-like admission that sometimes refuses part of the plan, finishes,
    retractions and aborts: every request is admitted exactly once unless aborted, and the
    waiting queue always holds exactly the waiting requests between steps."""
    rng = random.Random(0)
    sched = FakeScheduler()
    pol = _make_policy(sched, sample_fraction=0.1)
    prefixes = [[1] * 40, [2] * 60, [3] * 20]
    reqs, admitted, aborted, running = {}, [], set(), []
    next_id = n_aborts = 0
    for step in range(400):
        for _ in range(rng.randint(0, 4) if step < 60 else 0):
            r = FakeReq(f"r{next_id}", prefixes[next_id % 3] + [rng.randint(4, 500) for _ in range(rng.randint(1, 30))],
                        rng.choice([4, 16, 64]), ignore_eos=rng.random() < 0.3)
            next_id += 1
            reqs[r.rid] = r
            sched.waiting_queue.append(r)
            pol.on_arrival(r)
        if sched.waiting_queue and rng.random() < 0.03:  # abort a waiting request
            victim = sched.waiting_queue.pop(rng.randrange(len(sched.waiting_queue)))
            victim.done = True
            aborted.add(victim.rid)
            pol.on_abort(victim)
            n_aborts += 1
        batch = SimpleNamespace(reqs=running)
        if sched.waiting_queue:
            pol.calc_priority(sched.waiting_queue, batch)
            queue = sched.waiting_queue  # as SGLang: it admits from the attribute, after calc_priority
            take = rng.randint(0, len(queue))  # SGLang's own check may stop early
            took = queue[:take]
            sched.waiting_queue = queue[take:]
            if step < 60 and rng.random() < 0.1:  # a request queued during the step
                r = FakeReq(f"r{next_id}", prefixes[next_id % 3] + [rng.randint(4, 500)], 8)
                next_id += 1
                reqs[r.rid] = r
                sched.waiting_queue.append(r)
                pol.on_arrival(r)
            pol.after_step()
            for r in took:
                admitted.append(r.rid)
                running.append(r)
            assert {r.rid for r in sched.waiting_queue} | set(admitted) | aborted == set(reqs)
            assert len(sched.waiting_queue) == len({r.rid for r in sched.waiting_queue})
        for r in list(running):  # decode one token; finish at the limit; rarely retract
            r.output_ids.append(7)
            if len(r.output_ids) >= r.sampling_params.max_new_tokens:
                r.done = True
                running.remove(r)
            elif rng.random() < 0.01:
                running.remove(r)
                admitted.remove(r.rid)
                sched.waiting_queue.append(r)
                pol.on_arrival(r, is_retracted=True)
        pol.tree.check_integrity()
    assert not sched.waiting_queue and not running
    assert sorted(admitted) == sorted(set(reqs) - aborted), "a request was admitted twice or never"
    assert pol.stats()["steps"] > 0
    # the full queue is re-indexed (O(waiting)) only after SGLang popped from it behind the hooks
    assert pol.reindexes <= n_aborts + 1, (pol.reindexes, n_aborts)


def test_budget_matches_sglangs_admission_check_with_mixed_chunks():
    """With --enable-mixed-chunk SGLang's PrefillAdder takes the running requests' decode tokens
    out of the KV budget and of the step's prefill tokens; the plan's budget does the same (else
    the last planned prompt is chunked by the engine, not by the plan)."""
    running = [FakeReq(f"run{i}", [5] * 10, 4, ignore_eos=True) for i in range(30)]
    for r in running:
        r.output_ids = [7]  # decoding: not prefilling
    kvb = None
    budgets = {}
    for mixed in (False, True):
        sched = FakeScheduler(capacity=4000)
        sched.is_mixed_chunk = mixed
        pol = _make_policy(sched)
        kvb = pol.cost.kv_bytes_per_token
        budgets[mixed] = pol._budget(SimpleNamespace(reqs=running))
    plain, mixed = budgets[False], budgets[True]
    assert plain.prefill_tokens == 512 and mixed.prefill_tokens == 512 - 30
    assert round((plain.kv_bytes - mixed.kv_bytes) / kvb) == 30


def test_readme_documents_every_knob_with_its_default():
    from pathlib import Path

    from blendserve_sgl.sglang_plugin.settings import KNOBS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for field, (var, flag, _) in KNOBS.items():
        default = getattr(BlendSettings(), field)
        default = int(default) if isinstance(default, bool) else default  # written 1 / 0
        row = next((line for line in readme.splitlines() if f"`{var}`" in line), None)
        assert row is not None, f"README has no row for {var}"
        assert f"`{flag}`" in row and f"`{default}`" in row, f"README row for {var} lacks {flag} or default {default}"
