"""The SGLang plugin's pieces that need no engine: knobs, CLI hook, version check, and the
BlendPolicy adapter driven by a stand-in scheduler (queue bookkeeping: nothing is lost)."""

from __future__ import annotations

import argparse
import random
from types import SimpleNamespace

import pytest

from blendserve_sgl import sglang_plugin
from blendserve_sgl.sglang_plugin.settings import BlendSettings


def test_settings_load_defaults_and_errors():
    assert BlendSettings.load({}) == BlendSettings()
    s = BlendSettings.load({"BLENDSERVE_HARDWARE": "a100", "BLENDSERVE_SAMPLE_FRACTION": "0.05",
                            "BLENDSERVE_KEEP_SHARING": "0.95", "BLENDSERVE_SEED": "3"})
    assert (s.hardware, s.sample_fraction, s.keep_sharing, s.seed) == ("a100", 0.05, 0.95, 3)
    assert BlendSettings.load({"BLENDSERVE_HARDWARE": "flops=1e15,bandwidth=4e12,memory=8e10"}).hardware == \
        "flops=1e15,bandwidth=4e12,memory=8e10"
    assert BlendSettings().final_wave is True
    assert BlendSettings.load({"BLENDSERVE_FINAL_WAVE": "0"}).final_wave is False
    assert BlendSettings.load({"BLENDSERVE_FINAL_WAVE": " Off "}).final_wave is False
    assert BlendSettings.load({"BLENDSERVE_FINAL_WAVE": "yes"}).final_wave is True
    assert BlendSettings.load({"BLENDSERVE_PACING": "0"}, {"pacing": True}).pacing is True  # the flag wins
    for env, needle in (({"BLENDSERVE_SAMPLE_FRACTION": "2"}, "BLENDSERVE_SAMPLE_FRACTION"),
                        ({"BLENDSERVE_SAMPLE_FRACTION": "lots"}, "BLENDSERVE_SAMPLE_FRACTION"),
                        ({"BLENDSERVE_KEEP_SHARING": "nan"}, "BLENDSERVE_KEEP_SHARING"),
                        ({"BLENDSERVE_HARDWARE": "tpu"}, "BLENDSERVE_HARDWARE"),
                        ({"BLENDSERVE_HARDWARE": "flops=1e15,bandwidth=fast,memory=8e10"}, "bandwidth must be a number"),
                        ({"BLENDSERVE_HARDWARE": "flops=1e15,memory=8e10"}, "lacks bandwidth"),
                        ({"BLENDSERVE_PRIOR_OUTPUT_LEN": "0"}, "BLENDSERVE_PRIOR_OUTPUT_LEN"),
                        ({"BLENDSERVE_PRIOR_OUTPUT_LEN": "1.5"}, "an integer"),
                        ({"BLENDSERVE_METERING": "maybe"}, "BLENDSERVE_METERING"),
                        # a digit or two too many, other scripts' digits, 1_000: refused, not taken (a probe)
                        ({"BLENDSERVE_PRIOR_OUTPUT_LEN": "99999999999999999999999"}, "must be from 1 to 2,147,483,647"),
                        ({"BLENDSERVE_HOLD_PREFIX_TOKENS": str(2 ** 31)}, "must be from 0 to 2,147,483,647"),
                        ({"BLENDSERVE_SEED": str(2 ** 64)}, "BLENDSERVE_SEED"),
                        ({"BLENDSERVE_FREE_POOL_CREDIT": "1e308"}, "must be in \\[0, 1000\\]"),
                        ({"BLENDSERVE_SEED": "\u0661\u0662"}, "expected an integer"),
                        ({"BLENDSERVE_PRIOR_OUTPUT_LEN": "1_000"}, "expected an integer"),
                        ({"BLENDSERVE_FINAL_WAVE": "maybe"}, "BLENDSERVE_FINAL_WAVE")):
        with pytest.raises(ValueError, match=needle):
            BlendSettings.load(env)
    with pytest.raises(ValueError, match="BLENDSERVE_SEED"):
        BlendSettings(seed=-1)
    with pytest.raises(ValueError, match="BLENDSERVE_FINAL_WAVE"):
        BlendSettings(final_wave="yes")


def test_settings_override_the_preset_and_defaults_are_the_presets():
    from dataclasses import replace

    from blendserve_sgl.core.preset import PRESET
    from blendserve_sgl.sglang_plugin.settings import KNOBS

    assert BlendSettings().preset() == PRESET
    knobs = [k for k in KNOBS.values() if k.preset]
    assert len({k.preset for k in knobs}) == len(knobs), "two settings override one preset field"
    for knob in knobs:  # each setting moves its own preset field and no other
        old = PRESET.leaf(knob.preset)
        new = (not old if knob.kind is bool else old + 1 if knob.kind is int else
               next(v for v in (old / 2, old * 2, 0.5, 0.75) if v != old and knob.check(v) is None))
        assert knob.check(new) is None, (knob.name, new)
        moved = BlendSettings(**{knob.name: new}).preset()
        assert moved.leaf(knob.preset) == new and moved.replace(**{knob.preset: old}) == PRESET, knob.name
    s = BlendSettings(keep_sharing=0.9, prior_output_len=64, final_wave=False, pacing=False, seed=5)
    assert s.preset() == replace(PRESET, pacing=False, scan=replace(PRESET.scan, keep_sharing=0.9, final_wave=False),
                                 estimator=replace(PRESET.estimator, prior=64, seed=5))
    with pytest.raises(ValueError, match="unknown blend preset field"):
        PRESET.replace(nope=1)


def test_cli_flags_are_typed_checked_and_leave_the_environment_alone(monkeypatch, capsys):
    import os

    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule-policy", choices=["lpm", "fcfs"], default="fcfs")
    sglang_plugin._after_add_cli_args(None, parser)
    sglang_plugin._after_add_cli_args(None, parser)  # idempotent
    monkeypatch.delenv("BLENDSERVE_KEEP_SHARING", raising=False)
    before = dict(os.environ)
    args = parser.parse_args(["--schedule-policy", "blend", "--blend-keep-sharing", "0.9", "--blend-pacing", "off"])
    assert args.schedule_policy == "blend" and args.blend_keep_sharing == 0.9 and args.blend_pacing is False
    assert dict(os.environ) == before, "parsing flags must not write os.environ"
    # the flags reach the ServerArgs as one settings object (what the scheduler process reads)
    server_args = sglang_plugin._after_from_cli_args(SimpleNamespace(schedule_policy="blend"), object, args)
    assert server_args._blend_settings == BlendSettings(keep_sharing=0.9, pacing=False)
    with pytest.raises(SystemExit):
        parser.parse_args(["--schedule-policy", "nope"])
    for bad in (["--blend-keep-sharing", "2"], ["--blend-sample-fraction", "x"], ["--blend-final-wave", "maybe"],
                ["--blend-hardware", "tpu"], ["--blend-seed", "-3"]):
        capsys.readouterr()
        with pytest.raises(SystemExit):
            parser.parse_args(["--schedule-policy", "blend", *bad])
        err = capsys.readouterr().err
        assert bad[0] in err and "BLENDSERVE_" not in err, err


def test_bad_variables_fail_when_the_launch_checks_its_arguments(monkeypatch, capsys, tmp_path):
    """The launching process's `check_server_args` (every launch) and `from_cli_args` (the server's
    command line: one line, exit 2) name a bad variable; a policy or backend that does not read a
    variable leaves it alone."""
    monkeypatch.setenv("BLENDSERVE_KEEP_SHARING", "1.5")
    monkeypatch.setenv("BLENDSERVE_CASCADE_LEVELS", "65")
    with pytest.raises(ValueError, match="BLENDSERVE_KEEP_SHARING='1.5'"):
        sglang_plugin._after_check_server_args(None, SimpleNamespace(schedule_policy="blend"))
    with pytest.raises(ValueError, match="BLENDSERVE_CASCADE_LEVELS='65'"):
        sglang_plugin._after_check_server_args(None, SimpleNamespace(schedule_policy="fcfs", attention_backend="cascade"))
    sglang_plugin._after_check_server_args(None, SimpleNamespace(schedule_policy="fcfs"))  # neither is read
    with pytest.raises(SystemExit) as exc:
        sglang_plugin._after_from_cli_args(SimpleNamespace(schedule_policy="blend"), object, SimpleNamespace())
    assert exc.value.code == 2 and "error: BLENDSERVE_KEEP_SHARING='1.5'" in capsys.readouterr().err
    monkeypatch.delenv("BLENDSERVE_KEEP_SHARING")
    server_args = SimpleNamespace(schedule_policy="blend")
    sglang_plugin._after_check_server_args(None, server_args)
    assert server_args._blend_settings == BlendSettings()  # carried to the scheduler
    import json

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 0, "intermediate_size": 8, "vocab_size": 8,
                                                      "num_hidden_layers": 1, "num_attention_heads": 1}))
    with pytest.raises(ValueError, match="hidden_size must be a whole number of at least 1"):  # before the weights load
        sglang_plugin._after_check_server_args(None, SimpleNamespace(schedule_policy="blend", model_path=str(tmp_path)))


def test_side_file_paths_never_name_another_file(monkeypatch, tmp_path):
    """A counters path that named a results file replaced it, and a trace path that named a batch
    input appended step lines to it, which the next run read as requests (a probe). An existing
    file must be empty or hold what the knob writes; devices and pipes are written in place."""
    import json

    results = tmp_path / "results.jsonl"
    results.write_text('{"id": "batch_1", "custom_id": "q0", "response": null, "error": null}\n')
    batch = tmp_path / "requests.jsonl"
    batch.write_text('{"custom_id": "q0", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}\n')
    before = (results.read_bytes(), batch.read_bytes())
    for var, path, said in (("BLENDSERVE_STATS_PATH", results, "the blend policy's counters, which this would replace"),
                            ("BLENDSERVE_TRACE_PATH", batch, "the blend policy's step trace, which this would append to")):
        monkeypatch.setenv(var, str(path))
        with pytest.raises(ValueError, match=f"{var}=.*holds something other than {said}"):
            BlendSettings.load()
        monkeypatch.delenv(var)
    monkeypatch.setenv("BLENDSERVE_CASCADE_STATS_PATH", str(results))
    with pytest.raises(ValueError, match="BLENDSERVE_CASCADE_STATS_PATH=.*other than the cascade counters"):
        sglang_plugin._after_check_server_args(None, SimpleNamespace(schedule_policy="fcfs", attention_backend="cascade"))
    monkeypatch.delenv("BLENDSERVE_CASCADE_STATS_PATH")
    assert (results.read_bytes(), batch.read_bytes()) == before
    stats, trace, empty = tmp_path / "stats.json", tmp_path / "trace.jsonl", tmp_path / "empty.json"
    stats.write_text(json.dumps(_make_policy(FakeScheduler()).stats()))  # an earlier run's: written over
    trace.write_text(json.dumps({"step": 0, "plan": []}) + "\n" + "{partial")  # appended to
    empty.write_text("")
    for var, path in (("BLENDSERVE_STATS_PATH", stats), ("BLENDSERVE_TRACE_PATH", trace),
                      ("BLENDSERVE_STATS_PATH", empty), ("BLENDSERVE_STATS_PATH", "/dev/null")):
        monkeypatch.setenv(var, str(path))
        assert BlendSettings.load() is not None
        monkeypatch.delenv(var)


def test_misspelled_variables_and_flags_without_blend_are_said(monkeypatch, capsys, caplog):
    """A misspelled variable left its setting at the default without a word (`sglang.Engine` takes
    the settings only from variables); `--blend-*` flags with another policy did nothing; a bad
    variable stopped the launch although a flag overrode it; `--enable-priority-scheduling` with
    blend was SGLang's AssertionError traceback (a probe)."""
    import logging

    from blendserve_sgl.sglang_plugin.settings import check_launch, unread_variables

    monkeypatch.setenv("BLENDSERVE_SAMPLEFRACTION", "0.5")
    monkeypatch.setenv("BLENDSERVE_ZZZ", "1")
    monkeypatch.setenv("BLENDSERVE_MODEL_CACHE", "/tmp/x")  # read by the model cache: not a knob, not a typo
    assert unread_variables() == [("BLENDSERVE_SAMPLEFRACTION", "BLENDSERVE_SAMPLE_FRACTION"), ("BLENDSERVE_ZZZ", None)]
    with caplog.at_level(logging.WARNING):
        check_launch("blend", [None])
    assert "BLENDSERVE_SAMPLEFRACTION is set, but no blendserve-sgl setting reads it (did you mean " \
           "BLENDSERVE_SAMPLE_FRACTION?)" in caplog.text and "BLENDSERVE_ZZZ is set" in caplog.text
    monkeypatch.setenv("BLENDSERVE_SAMPLE_FRACTION", "abc")
    assert BlendSettings.load(flags={"sample_fraction": 0.5}).sample_fraction == 0.5  # the flag decides
    with pytest.raises(ValueError, match="BLENDSERVE_SAMPLE_FRACTION='abc'"):
        BlendSettings.load()
    monkeypatch.delenv("BLENDSERVE_SAMPLE_FRACTION")
    capsys.readouterr()
    fcfs = SimpleNamespace(schedule_policy="fcfs")
    sglang_plugin._after_from_cli_args(fcfs, object, SimpleNamespace(blend_sample_fraction=0.5))
    assert "warning: --blend-sample-fraction take effect only with --schedule-policy blend; this server runs fcfs" \
        in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        sglang_plugin._after_from_cli_args(SimpleNamespace(schedule_policy="blend", enable_priority_scheduling=True),
                                           object, SimpleNamespace())
    assert exc.value.code == 2 and "drop --enable-priority-scheduling" in capsys.readouterr().err


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
        self.max_total_num_tokens = capacity
        self.forward_ct = 0
        self.page_size, self.truncation_align_size = 1, None
        self.disable_radix_cache = False
        self.waiting_queue = []

    def get_num_allocatable_reqs(self, running_bs, running_batch=None):
        return self.slots_total - running_bs


def _make_policy(sched, **settings):
    from blendserve_sgl.sglang_plugin.policy import BlendPolicy

    return BlendPolicy(sched, SimpleNamespace(policy="fcfs"), BlendSettings(hardware="a100", **settings))


def _assert_work_recounts(pol):
    """The pacing target's incremental sums (`BlendPolicy.work`) equal a recount over the waiting requests."""
    from blendserve_sgl.core.pacing import WaitingWork

    ref = WaitingWork(pol.work.clip)
    for r in pol.waiting.values():
        out = len(r.output_ids)
        left = max(1, r.sampling_params.max_new_tokens - out)
        ref.wait(len(r.origin_input_ids) + out, left, left if r.sampling_params.ignore_eos else None)
    fields = ("known_comp", "known_mem", "n", "fill", "cap")
    assert [getattr(pol.work, f) for f in fields] == [getattr(ref, f) for f in fields]


def test_a_gpu_no_preset_names_plans_as_an_h100_with_a_warning(monkeypatch, caplog):
    """BLENDSERVE_HARDWARE=auto on a GPU no preset names (an L40S) used to raise in the scheduler,
    after the weights loaded, which ends the server. The plan depends on the hardware only through
    the paced chunk's floor, so the policy plans as an h100 and says how to give the figures."""
    import torch

    from blendserve_sgl.sglang_plugin.policy import resolve_hardware

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA L40S")
    with caplog.at_level("WARNING"):
        assert resolve_hardware("auto", "cuda") == "h100"
    assert "does not know the GPU 'NVIDIA L40S'" in caplog.text and "flops=F,bandwidth=B,memory=M" in caplog.text
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200 NVL")
    assert resolve_hardware("auto", "cuda") == "h200"
    assert resolve_hardware("auto", "cpu") == "cpu"
    custom = "flops=362e12,bandwidth=864e9,memory=48e9"
    assert resolve_hardware(custom, "cuda") == custom
    from blendserve_sgl.sglang_plugin.policy import BlendPolicy

    pol = BlendPolicy(FakeScheduler(), SimpleNamespace(policy="fcfs"), BlendSettings(hardware=custom))
    assert (pol.cost.hardware.flops, pol.cost.hardware.mem_bandwidth) == (362e12, 864e9)
    # a scheduler of a tensor-parallel group plans for the group (auto), or for what the knob names
    sched = FakeScheduler()
    sched.server_args = SimpleNamespace(device="cuda", tp_size=4)
    assert BlendPolicy(sched, SimpleNamespace(policy="fcfs"), BlendSettings()).cost.hardware.name == "4xh200"
    assert BlendPolicy(sched, SimpleNamespace(policy="fcfs"), BlendSettings(hardware="2xh100")).cost.hardware.name \
        == "2xh100"

def test_the_policy_sizes_kv_by_the_engines_cache_dtype():
    """An FP8 KV cache (`--kv-cache-dtype fp8_e4m3`) holds a byte a value: the policy's bytes per
    token follow it (pacing reads the cache at that width); the weights keep the checkpoint's."""
    plain = _make_policy(FakeScheduler())
    sched = FakeScheduler()
    sched.server_args = SimpleNamespace(device="cpu", kv_cache_dtype="fp8_e4m3")
    fp8 = _make_policy(sched)
    assert fp8.cost.kv_bytes_per_token * 4 == plain.cost.kv_bytes_per_token  # float32 checkpoint -> 1 byte
    assert fp8.cost.model.weight_read_bytes == plain.cost.model.weight_read_bytes
    sched.server_args = SimpleNamespace(device="cpu", kv_cache_dtype="auto")
    assert _make_policy(sched).cost == plain.cost


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
        sched.forward_ct += 1
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
        _assert_work_recounts(pol)
    assert not sched.waiting_queue and not running
    assert sorted(admitted) == sorted(set(reqs) - aborted), "a request was admitted twice or never"
    assert pol.stats()["steps"] > 0
    # the full queue is re-indexed (O(waiting)) only after SGLang popped from it behind the hooks
    assert pol.reindexes <= n_aborts + 1, (pol.reindexes, n_aborts)


def test_a_request_sglang_aborts_out_of_the_batch_leaves_the_running_accounts():
    """SGLang aborts a beam group it cannot retract by setting `to_finish` and dropping it from the
    running batch; `finished()` never turns true for it. It stayed in the policy's running requests
    for good (found by a server probe: `running` 2 with one request in flight), its memory held
    against its side and the nothing-runs liveness rule blocked."""
    sched = FakeScheduler()
    pol = _make_policy(sched, sample_fraction=0.0)
    reqs = [FakeReq(f"r{i}", [1] * 20 + [i + 4], 8) for i in range(2)]
    for r in reqs:
        r.to_finish = None
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    took, sched.waiting_queue = sched.waiting_queue, []
    pol.after_step()
    assert {r.rid for r in took} == {"r0", "r1"} and set(pol.running) == {"r0", "r1"}
    reqs[0].to_finish = reqs[1].to_finish = object()  # both marked; only r0 is out of the batch
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[reqs[1]]))
    pol.after_step()
    assert set(pol.running) == {"r1"}  # r1 still runs until SGLang processes its abort
    reqs[1].done = True
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    pol.after_step()
    assert not pol.running and pol.stats()["running"] == 0


def _sampled_batch(sched, n, refuse=None):
    """A policy with the shipped 1% sample over `n` requests of 2,000-token limits; `refuse(rids)`
    names one SGLang refuses on arrival (its prompt cut to a one-token stand-in, an abort set)."""
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    pol = _make_policy(sched)
    rids = [f"req-{i}" for i in range(n)]
    bad = refuse(rids) if refuse else None
    reqs = {}
    for i, rid in enumerate(rids):
        r = FakeReq(rid, [1] * 30 + [2 + i] * 20, 2000)
        r.to_finish = None
        if rid == bad:
            r.origin_input_ids, r.to_finish = [0], FINISH_ABORT("Input length exceeds the maximum allowed length")
        reqs[rid] = r
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    return pol, reqs, bad


def test_a_request_refused_on_arrival_is_never_the_sample():
    """SGLang refuses a prompt longer than the context on arrival (a one-token stand-in that ends
    after its prefill) and the request still reaches the queue: drawn into the sample, its one step
    was every waiting request's estimated output (a probe: estimates of 1 token for outputs of 2,000)."""
    sched = FakeScheduler(capacity=200_000, slots=256)
    est_key = _make_policy(FakeScheduler()).tree.estimator.sample_key
    pol, reqs, bad = _sampled_batch(sched, 100, refuse=lambda rids: min(rids, key=est_key))
    running: list = []
    for _ in range(20):  # steps until the refused request has run its stand-in step
        pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=running))
        if not pol.scanner.planned:
            assert bad not in pol.scanner.pending_sample and pol.scanner.pending_sample  # another one is drawn
        running, sched.waiting_queue = running + sched.waiting_queue, []
        pol.after_step()
        for r in running:
            r.output_ids.append(7)
        reqs[bad].done = reqs[bad] in running
        running = [r for r in running if not r.done]
        if reqs[bad].done:
            break
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=running))
    pol.after_step()
    assert reqs[bad].done and bad not in pol.running
    assert pol.tree.root.sample_n == 0 and pol.work.done == 0  # no length of it: not a sample, not in the mean
    pol.scanner.check_integrity()


def test_a_sample_aborted_while_running_leaves_the_sample_unrecorded():
    """A client that goes away while its request is the sample: its output so far (3 tokens) was
    recorded as the batch's output length and the plan made at it; now the sample shrinks, the
    plan comes once the rest of it is in, and the pacing mean leaves it out too."""
    sched = FakeScheduler(capacity=20_000, slots=8)
    pol, reqs, _ = _sampled_batch(sched, 100)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    plan, sched.waiting_queue = list(sched.waiting_queue), []
    pol.after_step()
    sample = next(iter(pol.scanner.pending_sample))
    for _ in range(3):
        for r in plan:
            r.output_ids.append(7)
    from sglang.srt.managers.schedule_batch import FINISH_ABORT

    gone = reqs[sample]
    gone.done, gone.finished_reason = True, FINISH_ABORT("client disconnected")
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[r for r in plan if r is not gone]))
    pol.after_step()
    assert pol.tree.root.sample_n == 0 and pol.work.done == 0
    assert sample not in pol.scanner.pending_sample
    assert {r.output_len for r in pol.tree.reqs.values()} != {3}
    pol.scanner.check_integrity()


def test_a_new_request_under_a_finished_ones_rid_is_an_arrival_not_a_retraction():
    """A client reusing an id right after its request finished (before the next step synced it):
    the arrival was taken for a retraction of the old one, which then never counted as finished
    (a probe's counter was 2 short) and, were it the sample, ended sampling with no plan."""
    sched = FakeScheduler()
    pol = _make_policy(sched, sample_fraction=0.0)
    first = FakeReq("same", [1] * 20, 8)
    sched.waiting_queue.append(first)
    pol.on_arrival(first)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    sched.waiting_queue = []
    pol.after_step()
    assert set(pol.running) == {"same"}
    first.output_ids, first.done = [7, 7, 7], True
    again = FakeReq("same", [2] * 20, 8)
    sched.waiting_queue.append(again)
    pol.on_arrival(again)
    assert pol.scanner.handed_out == 1 and not pol.running and "same" in pol.waiting
    assert pol.work.done == 1 and pol.work.done_out == 3  # the first one counted as finished
    pol.scanner.check_integrity()


def test_a_batch_after_the_engine_drained_is_sampled_anew_in_the_policy():
    """SGLang skips calc_priority while its queue is empty, so a warm-up's requests that finished
    still counted as running when the next batch arrived: the scanner took it for part of the
    drained batch and planned all of it with the warm-up's 4-token sample (a probe, in the engine).
    The first arrival after the drain now takes their ends and starts a new batch."""
    sched = FakeScheduler(capacity=200_000, slots=64)
    pol = _make_policy(sched)
    warm = [FakeReq(f"w{i}", [1] * 10 + [50 + i] * 5, 4) for i in range(3)]
    for r in warm:
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    running: list = []
    for _ in range(10):  # steps until the warm-up has run out; no step after (the queue is empty)
        pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=running))
        running, sched.waiting_queue = running + sched.waiting_queue, []
        pol.after_step()
        for r in running:
            r.output_ids.append(7)
            r.done = len(r.output_ids) >= 4
        running = [r for r in running if not r.done]
        if not running and not sched.waiting_queue:
            break
    assert not running and set(pol.running) == {"w0", "w1", "w2"}  # ended, not yet synced
    drained = pol.scanner.sample
    batch = [FakeReq(f"b{i}", [3] * 30 + [100 + i] * 20, 64) for i in range(60)]
    for r in batch:
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    assert not pol.running and pol.work.done == 3  # the warm-up counted as finished
    assert pol.scanner.sample is not drained and not pol.scanner.planned  # a new batch, to be sampled
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    assert pol.scanner.pending_sample  # its own sample goes first
    pol.scanner.check_integrity()


def test_a_drained_engine_holds_none_of_its_finished_requests(tmp_path):
    """A server between batches kept the last batch's requests (SGLang's Req objects, their ids)
    in the policy and the scanner until the next arrival (probe 29): SGLang calls calc_priority
    only while its queue holds requests. The idle step after the drain now lets them go, and the
    counters file says so (it showed the last plan's running requests: probe 31); a request still
    running is kept."""
    import json

    sched = FakeScheduler(capacity=200_000, slots=64)
    stats = tmp_path / "stats.json"
    pol = _make_policy(sched, stats_path=str(stats))
    batch = [FakeReq(f"r{i}", [1] * 10 + [50 + i] * 5, 4 + (i == 0) * 10) for i in range(12)]
    for r in batch:
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    running: list = []
    for _ in range(40):
        pol.begin_step(SimpleNamespace(reqs=running))
        if sched.waiting_queue:
            pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=running))
            running, sched.waiting_queue = running + sched.waiting_queue, []
        pol.end_step()
        for r in running:
            r.output_ids.append(7)
            r.done = len(r.output_ids) >= r.sampling_params.max_new_tokens
        running = [r for r in running if not r.done]
        if not running:
            break
    assert not running and not sched.waiting_queue
    assert json.loads(stats.read_text())["running"] > 0  # written at the last plan
    pol.begin_step(SimpleNamespace(reqs=[]))  # the idle step after the drain
    pol.end_step()
    assert not pol.running and not pol.written_at_take and not pol.scanner.running
    assert json.loads(stats.read_text())["running"] == 0
    assert pol.work.done == 12
    pol.scanner.check_integrity()
    late = FakeReq("late", [2] * 40, 8)  # admitted, then outside the running batch (a chunked prefill)
    sched.waiting_queue.append(late)
    pol.on_arrival(late)
    pol.begin_step(SimpleNamespace(reqs=[]))
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    sched.waiting_queue = []
    pol.end_step()
    pol.begin_step(SimpleNamespace(reqs=[]))
    pol.end_step()
    assert set(pol.running) == {"late"}  # not ended: kept


@pytest.mark.parametrize("radix", [True, False])
def test_without_a_radix_cache_no_request_is_held_for_a_prefix_it_cannot_reuse(radix):
    """The hold takes one request of a group sharing an uncached prefix and the rest a step later,
    when that prefix is cached. With `--disable-radix-cache` nothing is ever cached, so holding
    only split each group's prefill over more steps (48 requests: 6 prefill steps against fcfs's 3,
    a probe); the plan then takes the group whole and counts no prefix as cached."""
    sched = FakeScheduler(capacity=40000, slots=64)
    sched.disable_radix_cache = not radix
    pol = _make_policy(sched)
    for i in range(10):
        r = FakeReq(f"r{i}", [1] * 40 + [100 + i, 200 + i, 300 + i], 4, ignore_eos=True)
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    planned = [r.rid for r in sched.waiting_queue]
    assert len(planned) == (1 if radix else 10), planned
    assert pol.scanner.config.prefix_cache is radix and pol.scanner.config.hold_prefix_tokens == 32


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


def test_the_plans_memory_counts_handed_out_requests_at_the_scanners_reservation():
    """SGLang's check (`admit_room`) reserves each running request's remaining max_new_tokens at the
    new-token ratio; the plan's memory (`kv_bytes`: the sides' split, the metered credit) counts a
    request the scanner handed out at the scanner's own reservation less what it wrote since (what
    the simulator's blend sees), and a running request the scanner never handed out at SGLang's."""
    sched = FakeScheduler(capacity=4000)
    pol = _make_policy(sched, sample_fraction=0.0)  # no sample: estimates are the prior (256)
    a = FakeReq("a", [1] * 20, 1000)
    sched.waiting_queue.append(a)
    pol.on_arrival(a)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    sched.waiting_queue = []
    pol.after_step()
    assert "a" in pol.running
    reserved = pol.scanner.running["a"].out_reserved
    assert 0 < reserved < 1000
    other = FakeReq("o", [2] * 10, 500)  # running, never handed out by the scanner
    other.output_ids = [7] * 50
    kvb = pol.cost.kv_bytes_per_token
    for written in (reserved // 2, reserved + 10):
        a.output_ids = [7] * written
        b = pol._budget(SimpleNamespace(reqs=[a, other]))
        assert b.admit_room == pytest.approx(4000 - (1000 - written) * 0.5 - 450 * 0.5)
        assert b.kv_bytes / kvb == pytest.approx(4000 - max(0, reserved - written) - 450 * 0.5)


def test_readme_documents_every_knob_with_its_default():
    from pathlib import Path

    from blendserve_sgl.sglang_plugin.settings import KNOBS

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for knob in KNOBS.values():
        default = knob.default_value
        default = int(default) if isinstance(default, bool) else default  # written 1 / 0
        row = next((line for line in readme.splitlines() if f"`{knob.var}`" in line), None)
        assert row is not None, f"README has no row for {knob.var}"
        assert f"`{knob.flag}`" in row and f"`{default}`" in row, f"README row for {knob.var} lacks {knob.flag} or default {default}"


def test_installed_sglang_has_every_name_the_plugin_touches():
    assert sglang_plugin.compatibility_problems() == []
    problems = sglang_plugin.compatibility_problems(SimpleNamespace(waiting_queue=[]))
    assert "Scheduler has no attribute 'forward_ct'" in problems


def test_engine_takes_the_settings_as_blend_keywords(monkeypatch, caplog):
    """`sglang.Engine(..., blend_keep_sharing=0.9)`: msgspec refused the keyword ("Unexpected
    keyword argument"); the settings are server arguments like SGLang's own. The ServerArgs the
    Engine builds carries them over the variables, as the command line's flags do; a bad value or
    an unknown name is an error naming it; without `blend_*` keywords the build is SGLang's."""
    from sglang.srt.entrypoints.engine import Engine
    from sglang.srt.server_args import ServerArgs

    sglang_plugin._engine_keywords()
    sglang_plugin._engine_keywords()  # idempotent: wraps SGLang's class once
    build = Engine.server_args_class
    assert build.__wrapped__ is ServerArgs
    monkeypatch.setenv("BLENDSERVE_SEED", "7")
    monkeypatch.delenv("BLENDSERVE_KEEP_SHARING", raising=False)
    sa = build(model_path="m", schedule_policy="blend", blend_keep_sharing=0.9, blend_pacing="off", blend_prior_output_len=64)
    assert type(sa) is ServerArgs and sa.model_path == "m"
    assert sa._blend_settings == BlendSettings(keep_sharing=0.9, pacing=False, prior_output_len=64, seed=7)
    assert build(model_path="m", blend_seed=3)._blend_settings.seed == 3  # the keyword over its variable
    assert build(model_path="m", blend_final_wave=0)._blend_settings.final_wave is False
    assert "take effect only with schedule_policy='blend'" in caplog.text
    plain = build(model_path="m", schedule_policy="blend")
    assert type(plain) is ServerArgs and getattr(plain, "_blend_settings", None) is None  # the launch check sets it
    for kw, message in [({"blend_keep_sharing": 2}, "blend_keep_sharing=2.0: must be in"),
                        ({"blend_keep_sharing": "x"}, "blend_keep_sharing='x': expected a number"),
                        ({"blend_pacing": 2}, "blend_pacing=2: expected 1 or 0"),
                        ({"blend_seed": 1.5}, "blend_seed=1.5: expected an integer"),
                        ({"blend_hardware": 123}, "blend_hardware=123: expected a string"),  # was an AttributeError
                        ({"blend_stats_path": None}, "blend_stats_path=None: expected a string")]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
            build(model_path="m", schedule_policy="blend", **kw)
    with pytest.raises(TypeError, match="blend_keep_shring=0.9, which is not a blendserve-sgl setting; did you mean "
                                        "blend_keep_sharing"):
        build(model_path="m", schedule_policy="blend", blend_keep_shring=0.9)


def test_policy_delegates_explicitly_what_the_scheduler_calls():
    from blendserve_sgl.sglang_plugin.policy import BlendPolicy

    assert "__getattr__" not in vars(BlendPolicy)
    calls = []
    stock = SimpleNamespace(waiting_queue_prefix_matched=lambda q: calls.append(("matched", q)) or True,
                            shortest_prefill_chunk_limit=lambda *a: calls.append(("limit", a)) or 7)
    pol = BlendPolicy(FakeScheduler(), stock, BlendSettings(hardware="a100"))
    assert pol.waiting_queue_prefix_matched([]) is True and pol.shortest_prefill_chunk_limit(1, [], 2, 1) == 7
    assert [c[0] for c in calls] == ["matched", "limit"]
    with pytest.raises(AttributeError):
        pol.some_other_stock_attribute  # noqa: B018


@pytest.mark.parametrize("hint", ["abc", [3], float("inf"), float("nan"), -4, True, {"n": 1}, 2.5])
def test_bad_output_length_hint_is_ignored_with_a_warning(hint, caplog):
    """A bad `custom_params.blendserve_output_len` must not kill the scheduler: the request is
    planned with an estimated length and runs like the others."""
    sched = FakeScheduler()
    pol = _make_policy(sched, sample_fraction=0.0)
    good, bad = FakeReq("good", [1] * 10, 16), FakeReq("bad", [1] * 10 + [2], 16)
    good.sampling_params.custom_params = {"blendserve_output_len": 5}
    bad.sampling_params.custom_params = {"blendserve_output_len": hint}
    with caplog.at_level("WARNING"):
        for r in (good, bad):
            sched.waiting_queue.append(r)
            pol.on_arrival(r)
    assert "bad" in pol.waiting and pol.tree.reqs["bad"].known is False
    assert pol.tree.reqs["good"].known and pol.tree.reqs["good"].output_len == 5
    assert any("blendserve_output_len" in rec.getMessage() and "'bad'" in rec.getMessage() for rec in caplog.records)
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    assert {r.rid for r in sched.waiting_queue} == {"good", "bad"}
    sched.waiting_queue = []
    pol.after_step()
    assert not sched.waiting_queue and set(pol.running) == {"good", "bad"}
    caplog.clear()
    bad.output_ids = [7, 7]
    with caplog.at_level("WARNING"):  # retracted: back in the tree, warned once already (a probe: every time)
        sched.waiting_queue.append(bad)
        pol.on_arrival(bad, is_retracted=True)
    assert "bad" in pol.waiting and not any("blendserve_output_len" in rec.getMessage() for rec in caplog.records)
    pol.scanner.check_integrity()


def test_good_output_length_hints_are_known_lengths():
    from blendserve_sgl.sglang_plugin.policy import output_len_hint

    assert [output_len_hint(v, "r") for v in (0, 7, 7.0, " 12 ", None)] == [0, 7, 7, 12, None]


def test_paced_step_sets_and_restores_the_prefill_budget():
    """begin_step sets SGLang's prefill-token budget and chunk size to core.pacing's value for the
    running batch and the waiting work's density (never above the configured sizes); end_step
    puts the configured sizes back."""
    from blendserve_sgl.core.cost import memory_units
    from blendserve_sgl.core.pacing import paced_prefill_tokens

    sched = FakeScheduler(capacity=100_000)
    sched.chunked_prefill_size, sched.max_prefill_tokens = 100_000, 100_000
    sched.is_mixed_chunk = True  # prefill and decode share a step: pacing has decode work to balance
    pol = _make_policy(sched, sample_fraction=0.0)
    for i in range(20):
        r = FakeReq(f"w{i}", [1] * 50 + [i + 2] * 200, 400, ignore_eos=True)
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    running = [FakeReq(f"run{i}", [9] * 300, 64) for i in range(8)]
    for r in running:
        r.output_ids = [7] * 20
    # the waiting work at its known lengths, no sharing term (as the simulator's engine paces every policy)
    want = paced_prefill_tokens(pol.cost, 8 * 320, 8, pol.cost.density(20 * (250 + 400), 20 * memory_units(250, 400)))
    assert want < 100_000
    pol.begin_step(SimpleNamespace(reqs=running))
    # SGLang's PrefillAdder takes the running requests' decode tokens off both sizes in a mixed step
    # (`num_mixed_decode_tokens`); `want` is prefill tokens after them already, so they are added
    # back once (a probe: the step carried want - 2 x 8 prefill tokens, the simulator want)
    assert sched.max_prefill_tokens == want + len(running) and sched.chunked_prefill_size == want + len(running)
    # the plan sees what SGLang's adder will: the paced prefill tokens
    assert pol._budget(SimpleNamespace(reqs=running)).prefill_tokens == want
    pol.end_step()
    assert (sched.max_prefill_tokens, sched.chunked_prefill_size) == (100_000, 100_000)
    sched.chunked_prefill_size = None  # chunked prefill off: only the step's token budget is paced
    pol.begin_step(SimpleNamespace(reqs=running))
    assert sched.max_prefill_tokens == want + len(running) and sched.chunked_prefill_size is None
    pol.end_step()
    off = _make_policy(sched, sample_fraction=0.0, pacing=False)
    off.on_arrival(sched.waiting_queue[0])
    off.begin_step(SimpleNamespace(reqs=running))
    assert sched.max_prefill_tokens == 100_000
    off.end_step()
    sched.is_mixed_chunk = False  # SGLang's default: a prefill step decodes nothing, so no pacing
    pol.begin_step(SimpleNamespace(reqs=running))
    assert pol.paced_tokens(SimpleNamespace(reqs=running)) is None and sched.max_prefill_tokens == 100_000
    pol.end_step()


def test_pacing_estimates_unknown_outputs_as_the_simulator_does():
    """Requests of unknown length: before any finish each counts min(max_new_tokens, clip)
    tokens of output; after, the mean output of the finished requests (`core.pacing.WaitingWork`,
    the estimate the simulator's engine gives every policy)."""
    from sglang.srt.managers.schedule_policy import CLIP_MAX_NEW_TOKENS

    from blendserve_sgl.core.cost import memory_units

    sched = FakeScheduler(capacity=100_000, slots=2)
    pol = _make_policy(sched, sample_fraction=0.0)
    for i in range(10):
        r = FakeReq(f"w{i}", [i + 1] * 100, 9000)
        sched.waiting_queue.append(r)
        pol.on_arrival(r)
    m = min(9000, CLIP_MAX_NEW_TOKENS)
    assert pol.work.output_estimate() == m
    assert pol.work.density(pol.cost) == pytest.approx(pol.cost.density(10 * (100 + m), 10 * memory_units(100, m)))
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
    took, sched.waiting_queue = sched.waiting_queue[:2], sched.waiting_queue[2:]
    pol.after_step()
    assert len(took) == 2 and len(pol.waiting) == 8
    took[0].output_ids, took[0].done = [7] * 10, True
    took[1].output_ids = [7] * 500  # still running: not counted
    pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[took[1]]))
    pol.after_step()
    assert pol.work.output_estimate() == 10
    left = len(pol.waiting)
    assert pol.work.density(pol.cost) == pytest.approx(pol.cost.density(left * 110, left * memory_units(100, 10)))


def test_plugin_and_simulator_build_the_same_blend_configuration():
    """The plugin (default settings) and the simulator's blend picker run one preset: the same
    scanner configuration, estimator, pacing and metering."""
    from blendserve_sgl.core.preset import PRESET
    from blendserve_sgl.sim.policies import make_picker

    pol = _make_policy(FakeScheduler())
    picker = make_picker("blend", [], pol.cost)
    assert pol.preset == picker.preset == PRESET
    assert pol.scanner.config == picker.scanner.config == PRESET.scan
    assert pol.tree.estimator == picker.tree.estimator == PRESET.estimator
    assert picker.meter == PRESET.metering  # pacing is an engine feature in the simulator (EngineConfig.pace)
    ablation = PRESET.replace(final_wave=False)
    assert make_picker("blend", [], pol.cost, preset=ablation).scanner.config.final_wave is False


def test_cpu_kernel_fallback_only_for_the_cpu_engine(monkeypatch):
    """The pure-torch sgl_kernel stand-in is installed only for SGLang's CPU engine: on a machine
    with a GPU driver and without SGLANG_USE_CPU_ENGINE, install() does nothing."""
    import sys as _sys

    import kernels.cpu_fallback as fb

    monkeypatch.setattr(fb, "_gpu_present", lambda: True)
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)
    finders = list(_sys.meta_path)
    assert fb.cpu_engine() is False and fb.install() is False
    assert _sys.meta_path == finders
    monkeypatch.setenv("SGLANG_USE_CPU_ENGINE", "1")
    assert fb.cpu_engine() is True
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE")
    monkeypatch.setattr(fb, "_gpu_present", lambda: False)
    assert fb.cpu_engine() is True


def test_flags_ride_to_the_scheduler_on_pickled_server_args():
    """`launch_server`'s argument path with the plugin loaded: the `--blend-*` values end up on
    the ServerArgs and survive the pickling SGLang uses to start its scheduler (no environment
    variable involved)."""
    import pickle

    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args

    from blendserve_sgl.sglang_plugin.settings import SETTINGS_ATTR

    load_plugins()
    args = prepare_server_args(["--model-path", "/nonexistent", "--schedule-policy", "blend", "--device", "cpu",
                                "--blend-sample-fraction", "0.05", "--blend-pacing", "0"])
    assert getattr(pickle.loads(pickle.dumps(args)), SETTINGS_ATTR) == BlendSettings(sample_fraction=0.05, pacing=False)
    assert _make_policy(FakeScheduler(), sample_fraction=0.05).stats()["settings"]["sample_fraction"] == 0.05


def test_side_files_are_written_in_place_on_pipes_and_through_links(tmp_path):
    """The counters' atomic write renamed a temporary file over the path: `BLENDSERVE_STATS_PATH=/dev/full`
    (as root) replaced the device node with a regular file. A path that exists and is no regular
    file (a device, a pipe) is written in place; a link keeps pointing at its file."""
    import json
    import os
    import stat
    import threading

    from blendserve_sgl.sglang_plugin.settings import write_json_file

    from blendserve_sgl.sglang_plugin.settings import open_in_place

    fifo = tmp_path / "counters.pipe"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader, there before the write
    assert write_json_file(str(fifo), {"steps": 3}, "the counters")
    assert stat.S_ISFIFO(os.stat(fifo).st_mode), "the pipe was replaced by a file"
    assert json.loads(os.read(rfd, 1 << 16)) == {"steps": 3}
    os.close(rfd)
    # no reader: the write fails at once (a blocking open waited for one and held the scheduler)
    done = []
    writer = threading.Thread(target=lambda: done.append(write_json_file(str(fifo), {"steps": 5}, "the counters")),
                              daemon=True)
    writer.start()
    writer.join(timeout=60)
    assert done == [False]
    with pytest.raises(OSError):  # the step trace's append: the same
        open_in_place(str(fifo), "a")
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("{}")
    link.symlink_to(real)
    assert write_json_file(str(link), {"steps": 4}, "the counters")
    assert link.is_symlink() and json.loads(real.read_text()) == {"steps": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counters.pipe", "link.json", "real.json"]  # no temporary left


def test_each_dp_rank_writes_its_own_side_files_and_a_run_sums_them(tmp_path, monkeypatch):
    """With `--dp N` every rank's policy wrote the one BLENDSERVE_STATS_PATH (and appended to one
    trace): the file held whichever rank wrote last, and `blendserve run`'s summary showed one
    rank's steps as the run's (a probe). Each rank writes NAME.dpR.EXT; only the first of a
    tensor-parallel group writes; the run's summary sums the ranks."""
    from sglang.srt import runtime_context

    from blendserve_sgl.batch.progress import combine_policy_stats
    from blendserve_sgl.sglang_plugin.policy import BlendPolicy
    from blendserve_sgl.sglang_plugin.settings import rank_of, rank_path, read_policy_stats

    assert rank_path("/x/stats.json", 1) == "/x/stats.dp1.json"
    assert rank_path("/x.d/stats", 0) == "/x.d/stats.dp0" and rank_path("/x/stats.json", None) == "/x/stats.json"
    assert rank_path("/dev/null", 1) == "/dev/null" and rank_path("", 1) == ""
    assert rank_path(str(tmp_path / "s.json"), 2) == str(tmp_path / "s.dp2.json")  # a folder under /dev is a folder

    def ranks(**kw):
        monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(**kw))

    two = SimpleNamespace(server_args=SimpleNamespace(dp_size=2))
    ranks(dp_rank=1, tp_rank=0, pp_rank=0)
    assert rank_of(two) == (1, True)
    ranks(dp_rank=1, tp_rank=1, pp_rank=0)
    assert rank_of(two) == (1, False)  # the same plan as its group's first: written once
    ranks(dp_rank=None, attn_dp_rank=1, attn_tp_rank=0, tp_rank=3, pp_rank=0)
    assert rank_of(two) == (1, True)  # DP attention: the attention group's first
    ranks(dp_rank=0, tp_rank=0, pp_rank=0)
    assert rank_of(SimpleNamespace(server_args=SimpleNamespace(dp_size=1))) == (None, True)

    path = tmp_path / "stats.json"
    monkeypatch.setattr(runtime_context, "get_parallel", lambda: SimpleNamespace(dp_rank=1, tp_rank=0, pp_rank=0))
    sched = FakeScheduler()
    sched.server_args.dp_size = 2
    pol = BlendPolicy(sched, SimpleNamespace(policy="fcfs"), BlendSettings(hardware="a100", stats_path=str(path)))
    pol.write_stats()
    assert not path.exists() and read_policy_stats(str(tmp_path / "stats.dp1.json"))["dp_rank"] == 1
    assert read_policy_stats(str(path)) == {} and read_policy_stats(None) == {}

    # the cascade backend's counters too: one file a DP rank (they overwrote each other: a probe)
    from blendserve_sgl.sglang_plugin.cascade_backend import _Planning

    monkeypatch.setenv("BLENDSERVE_CASCADE_STATS_PATH", str(tmp_path / "cascade.json"))
    backend = _Planning()
    backend._init_planning(SimpleNamespace(page_size=1, server_args=SimpleNamespace(dp_size=2)))
    assert backend.stats.path == str(tmp_path / "cascade.dp1.json")

    a = {"steps": 10, "planning_seconds": 0.02, "handed_out": 4, "splits": None, "dp_rank": 0, "model": "m"}
    b = {"steps": 30, "planning_seconds": 0.06, "handed_out": 6, "splits": 2, "dp_rank": 1, "model": "m"}
    both = combine_policy_stats([a, b])
    assert (both["steps"], both["handed_out"], both["splits"], both["replicas"]) == (40, 10, 2, 2)
    assert both["planning_ms_per_step"] == 2.0 and both["model"] == "m" and "dp_rank" not in both
    assert combine_policy_stats([a]) == a and combine_policy_stats([{}, {}]) == {}
    assert combine_policy_stats([a, {}])["replicas"] == 2  # a replica that wrote nothing still counts
