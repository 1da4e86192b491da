"""`blendserve plan`: a user's file read as `run` reads it, and a view over the simulator."""

import json
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blendserve_sgl import cli, plan
from blendserve_sgl.batch.order import store_prefixes
from blendserve_sgl.batch.prompts import prepare
from blendserve_sgl.batch.requests import LineError, read_requests
from blendserve_sgl.core import CostModel
from blendserve_sgl.sim import EngineConfig, ExecModel, RunSpec, Workload, simulate
from blendserve_sgl.workloads import Record, build_tree
from blendserve_sgl.workloads.batch_file import ByteTokenizer, compress, load_batch_file

COST = CostModel.from_names("llama-3.1-8b", "h100")
SYSTEM = "You are a helpful assistant who answers in one sentence, politely and with care. " * 4


def _line(cid, content, max_tokens=16, system=True, **extra):
    msgs = ([{"role": "system", "content": SYSTEM}] if system else []) + [{"role": "user", "content": content}]
    body = {"model": "m", "messages": msgs, "max_tokens": max_tokens, **extra}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions", "body": body})


@pytest.fixture
def user_file(tmp_path):
    lines = [_line(f"q{i}", f"question number {i} about the topic {i % 5}?", max_tokens=8 + 40 * (i % 3))
             for i in range(40)]
    lines[3] = "{not json"
    lines[7] = _line("q8", "a duplicate custom_id")
    lines[11] = _line("q11", "too many tokens", max_tokens=-2)
    lines.append(json.dumps({"custom_id": "c1", "method": "POST", "url": "/v1/completions",
                             "body": {"model": "m", "prompt": SYSTEM + "complete this", "max_tokens": 300}}))
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_batch_file_reads_as_run_reads_it(user_file):
    """Records and bad lines equal what `run`'s reader and `prepare` make of each line (the
    batched tokenization changes nothing); output lengths are the requests' max_tokens."""
    tok = ByteTokenizer()
    got = load_batch_file(user_file, tok, 4096, 256)
    want_ok, want_bad = [], []
    for item in read_requests(user_file):
        item = item if isinstance(item, LineError) else prepare(item, tok, 4096, 256, user_file.name)
        (want_bad if isinstance(item, LineError) else want_ok).append(item)
    assert [e.message for e in got.errors] == [e.message for e in want_bad] and len(want_bad) == 3
    assert [e.line for e in got.errors] == [4, 9, 12]  # q8 first on line 8, again on 9
    assert [(r.rid, r.tokens, r.output_len, r.max_tokens) for r in got.records] == \
        [(p.request.custom_id, tuple(p.input_ids), p.max_tokens, p.max_tokens) for p in want_ok]
    assert got.lines == 41 and got.records[-1].output_len == 300


def test_plan_names_bad_lines_and_writes_json(user_file, tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", str(user_file), "--model", "llama-3.1-8b", "--hardware", "h100", "--gpus", "2",
                     "--policies", "fcfs,dfs,blend", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "requests.jsonl line 4:" in text and "requests.jsonl line 9: custom_id" in text and "3 bad" in text
    data = json.loads(out.read_text())
    for key in ("command", "requests", "bad_lines", "bad_line_messages", "token_counts", "output_lengths", "policies",
                "best_other", "blend_speedup_vs_best_other", "plan_seconds", "plot", "engine", "timing", "gpus"):
        assert key in data, key
    assert data["requests"] == 38 and data["bad_lines"] == 3 and data["gpus"] == 2
    row = data["policies"][0]
    for key in ("wall_s", "gpu_hours", "throughput_tok_s", "prefix_hit_ratio", "peak_kv_gb"):
        assert row[key]["low"] <= row[key]["high"]
    assert (tmp_path / "plan.png").stat().st_size > 0


def test_gpu_hours_count_every_device_of_a_tensor_parallel_group():
    """`--hardware 8xh200` read one engine's hours as GPU-hours; eight devices spend eight times that,
    as `--hardware h200 --gpus 8` (eight replicas) does (a probe)."""
    records = [Record(f"r{i}", 200, (), 50, "t", None, 50) for i in range(40)]
    cost8 = CostModel.from_names("llama-3.1-8b", "8xh200")
    out, res = plan.plan(records, cost8, EngineConfig.for_cost(cost8, kv_gb=4), ("fcfs",))
    t = res["max_tokens"]["fcfs"].time(ExecModel("sequential"))
    assert out["policies"][0]["gpu_hours"]["max_tokens"] == round(8 * t / 3600, 8)


def test_plan_is_the_simulators_result(user_file):
    """Every figure of the plan is the simulator's own number for the same records and rules."""
    records = load_batch_file(user_file, ByteTokenizer(), 4096, 256).records
    engine = EngineConfig.for_cost(COST, kv_gb=0.3, max_running=16, chunked_prefill=256)
    timing = ExecModel("sequential")
    out, _ = plan.plan(records, COST, engine, ("fcfs", "blend"), gpus=2, output_fraction=0.25, timing=timing)
    scen = plan.scenario_records(records, 0.25)
    assert [r.output_len for r in scen["estimate"]] == [max(1, round(0.25 * r.max_tokens)) for r in records]
    for row in out["policies"]:
        for name, recs in scen.items():
            res = simulate(Workload(recs, COST), row["policy"], RunSpec(COST, engine, known_lengths=False))
            floor = plan.alone_seconds(recs, COST, engine, timing)
            assert row["wall_s"][name] == round(max(res.time(timing) / 2, floor), 4)
            assert row["gpu_hours"][name] == round(res.time(timing) / 3600, 8)
            assert row["prefix_hit_tokens"][name] == res.first_hit_tokens
            assert row["retractions"][name] == res.retractions



@pytest.mark.parametrize("hw", ["a100", "cpu"])
def test_more_replicas_than_work_do_not_divide_the_wall_time_below_the_longest_request(hw):
    """`--gpus 16` divided one request's wall time by 16 (and 10^11 replicas gave 0 s): N replicas
    split the batch, but none finishes before its longest request run alone (`alone_seconds`: its
    prefill and the engine's overheads too; on the `cpu` preset those are most of its time)."""
    cost = CostModel.from_names("llama-3.1-8b", hw)
    records = [Record("only", 100, (), 20, "t", None, 20)]
    engine = EngineConfig.for_cost(cost, kv_gb=1)
    one, _ = plan.plan(records, cost, engine, ("fcfs",), gpus=1)
    many, _ = plan.plan(records, cost, engine, ("fcfs",), gpus=16)
    assert many["policies"][0]["wall_s"] == one["policies"][0]["wall_s"]
    assert many["policies"][0]["gpu_hours"] == one["policies"][0]["gpu_hours"]

def test_plan_in_worker_processes_equals_the_serial_plan(user_file):
    """The simulations run in forked workers give the plan the serial runs give, sampling spread
    included."""
    cost = CostModel.from_names("llama-3.1-8b", "a100")
    records = compress(load_batch_file(user_file, ByteTokenizer(), 8192, 256).records)
    engine = EngineConfig.for_cost(cost, kv_gb=4, max_running=64, chunked_prefill=512)
    serial, _ = plan.plan(records, cost, engine, ("fcfs", "blend"), sim_requests=len(records) - 3, workers=1)
    forked, _ = plan.plan(records, cost, engine, ("fcfs", "blend"), sim_requests=len(records) - 3, workers=2)
    assert serial["sampling_spread"] is not None and forked == serial


def test_plan_json_only_and_errors(user_file, capsys):
    assert cli.main(["plan", str(user_file), "--policies", "fcfs,blend", "--json", "--plot", "/dev/null"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["best_other"]["max_tokens"] == "fcfs" and data["input"] == str(user_file)
    assert cli.main(["plan", str(user_file), "--policies", "nope"]) == 2
    assert "unknown policy 'nope'" in capsys.readouterr().err
    assert cli.main(["plan", str(user_file), "--policies", "fcfs,,blend"]) == 2  # an empty entry was skipped
    assert "--policies 'fcfs,,blend': entry 2 of 3 is empty" in capsys.readouterr().err
    assert cli.main(["plan", str(user_file), "--policies", "dfs-weight,blend", "--json", "--plot", "/dev/null"]) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["policies"]] == ["sglang-dfs-weight", "blend"]
    assert cli.main(["plan", str(user_file.parent / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert cli.main(["plan"]) == 2


def test_plan_builtin_workload(capsys, tmp_path, monkeypatch):
    assert cli.main(["plan", "--workload", "mixed", "--requests", "300", "--policies", "dfs,blend", "--kv-gb", "4",
                     "--plot", str(tmp_path / "p.png")]) == 0
    assert "blend vs the best other policy" in capsys.readouterr().out
    # --out /dev/null: no plot next to it (it was a new file /dev/null.png; a probe); the sample's figures named
    made = []
    monkeypatch.setattr(plan, "plot_steps", lambda *a, **k: made.append(a[1]))
    assert cli.main(["plan", "--workload", "mixed", "--requests", "300", "--sim-requests", "100", "--policies", "fcfs",
                     "--kv-gb", "4", "--out", os.devnull]) == 0
    text = capsys.readouterr().out
    assert not made and "plot:" not in text and "; density and sharing of the simulated sample of " in text
    monkeypatch.undo()
    # a size no machine builds in memory is refused before anything is built, naming the flag
    assert cli.main(["plan", "--workload", "trace2", "--requests", str(10**9)]) == 2
    assert "--requests 1,000,000,000: a built-in workload (trace2) is built in memory" in capsys.readouterr().err
    # a file and a workload, or --requests for a file: said instead of one being dropped
    assert cli.main(["plan", "requests.jsonl", "--workload", "trace1"]) == 2
    assert "pass either a requests file (requests.jsonl) or --workload (trace1), not both" in capsys.readouterr().err
    assert cli.main(["plan", "requests.jsonl", "--requests", "5"]) == 2
    assert "a requests file (requests.jsonl) is planned whole" in capsys.readouterr().err
    # a context for a workload holds its prompts to it
    assert cli.main(["plan", "--workload", "trace1", "--context-length", "10"]) == 2
    assert "no request fits llama-3.1-8b's context of 10 tokens" in capsys.readouterr().err


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 2), min_size=1, max_size=9), min_size=1, max_size=25))
def test_compress_keeps_the_prefix_tree(prompts):
    """Token prompts as prefix groups: the same tree (count, tokens, shared tokens, density) and
    the same DFS order, duplicates and prompts that are prefixes of others included."""
    recs = [Record(f"r{i}", len(t), (), 1 + i % 4, tokens=tuple(t)) for i, t in enumerate(prompts)]
    packed = compress(recs)
    assert all(r.tokens is None and sum(n for _, n in r.prefix) <= r.prompt_len for r in packed)
    a, b = build_tree(recs, COST), build_tree(packed, COST)
    b.check_integrity()
    assert (a.root.count, a.root.tokens, a.root.saved, a.root.mem) == (b.root.count, b.root.tokens, b.root.saved,
                                                                      b.root.mem)
    assert [r.rid for r in a.iter_requests()] == [r.rid for r in b.iter_requests()]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_byte_tokenizer_matches_its_reference(text):
    """The NumPy encoding of `ByteTokenizer` is the per-4-bytes reference, token for token."""
    assert ByteTokenizer().encode(text) == ByteTokenizer.encode_reference(text)


def _shared(a: Record, b: Record) -> int:
    """Tokens two records' prefix groups share."""
    n = 0
    for x, y in zip(a.prefix, b.prefix):
        if x != y:
            break
        n += x[1]
    return n


def test_a_file_read_as_prefix_groups_is_its_token_prompts_compressed(user_file):
    """`plan` holds a file in the store's view (`store_prefixes`: what `run` plans with, no token
    tuples), which never claims more sharing than the prompts have (here at most a 32-token block
    less); `exact` gives any chosen
    records the groups `compress` makes of their token prompts, field for field."""
    tokens = load_batch_file(user_file, ByteTokenizer(), 4096, 256).records
    loaded = load_batch_file(user_file, ByteTokenizer(), 4096, 256, tokens=False)
    n = len(tokens)
    assert loaded.exact(list(range(n))) == compress(tokens) and any(len(r.prefix) > 1 for r in compress(tokens))
    some = [0, 5, 6, 20, n - 1]
    assert loaded.exact(some) == compress([tokens[i] for i in some])
    got = loaded.records
    assert [r._replace(prefix=()) for r in got] == [r._replace(tokens=None) for r in tokens]
    assert [list(r.prefix) for r in got] == list(store_prefixes(loaded.store))
    for i in range(n):
        for j in range(i + 1, n):
            common = next((k for k, (x, y) in enumerate(zip(tokens[i].tokens, tokens[j].tokens)) if x != y),
                          min(len(tokens[i].tokens), len(tokens[j].tokens)))
            assert _shared(got[i], got[j]) <= common and _shared(got[i], got[j]) >= common - 32 * (common > 0)
    assert compress([]) == [] and loaded.errors == load_batch_file(user_file, ByteTokenizer(), 4096, 256).errors
    with pytest.raises(ValueError, match="tokens=False"):
        load_batch_file(user_file, ByteTokenizer(), 4096, 256).exact([0])


def test_plan_of_a_sample_is_scaled(user_file):
    """Above `sim_requests`, the plan simulates a seeded sample of whole prefix groups and scales its
    time; the first policy on the next seed's sample gives the reported sampling spread."""
    records = load_batch_file(user_file, ByteTokenizer(), 4096, 256).records
    engine = EngineConfig.for_cost(COST, kv_gb=0.3, max_running=16, chunked_prefill=256)
    timing = ExecModel("sequential")
    out, _ = plan.plan(records, COST, engine, ("fcfs",), timing=timing, sim_requests=19, seed=3)
    part = plan.sample(records, 19, seed=3, cost=COST)
    assert 19 <= len(part) < 38 and [r.rid for r in part] == [r.rid for r in records if r in part]
    scale = 38 / len(part)
    assert out["simulated_requests"] == len(part) and out["requests"] == 38 and out["scale"] == round(scale, 4)
    res = simulate(Workload(part, COST), "fcfs", RunSpec(COST, engine, known_lengths=False))
    assert out["policies"][0]["wall_s"]["max_tokens"] == round(scale * res.time(timing), 4)
    second = plan.sample(records, 19, seed=4, cost=COST)
    other = simulate(Workload(second, COST), "fcfs", RunSpec(COST, engine, known_lengths=False))
    spread = out["sampling_spread"]
    assert spread["seeds"] == [3, 4] and spread["wall_s"][1] == round(38 / len(second) * other.time(timing), 4)
    first, again = scale * res.time(timing), 38 / len(second) * other.time(timing)
    assert spread["relative"] == round(abs(again - first) / first, 4)
    assert out["density_and_sharing_of"] == f"the simulated sample of {len(part)} requests"  # not the batch's
    whole = plan.plan(records, COST, engine, ("fcfs",), timing=timing)[0]
    assert whole["sampling_spread"] is None and whole["density_and_sharing_of"] == "the batch"  # all simulated


def _config_dir(path):
    """A model directory without weights: a tokenizer and a small Llama config."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from cpu_smoke import build_tokenizer

    tok = build_tokenizer(path)
    (path / "config.json").write_text(json.dumps(dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), torch_dtype="float32", max_position_embeddings=2048, model_type="llama")))
    return tok


def test_plan_with_a_model_directory_tokenizes_with_its_tokenizer(user_file, tmp_path, capsys):
    """--model DIR: the directory's config (cost model, context) and tokenizer, as `run` uses them."""
    tok = _config_dir(tmp_path)
    assert cli.main(["plan", str(user_file), "--model", str(tmp_path), "--hardware", "a100", "--policies", "fcfs",
                     "--json", "--plot", str(tmp_path / "p.png")]) == 0
    data = json.loads(capsys.readouterr().out)
    want = load_batch_file(user_file, tok, 2048, 256).records
    assert data["token_counts"] == f"the tokenizer of {tmp_path}" and data["requests"] == len(want)
    assert data["prompt_tokens"] == sum(len(r.tokens) for r in want)


def test_run_plan_only_prints_the_plan_of_the_same_arguments(user_file, tmp_path, capsys, monkeypatch):
    """`blendserve run FILE --model DIR ... --plan-only HW` prints exactly `blendserve plan` of the
    same file with the run's model and engine limits mapped to the plan's flags, runs nothing,
    needs no -o; without --plan-only -o stays required."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from cpu_smoke import write_tiny_llama

    from blendserve_sgl.core.specs import ModelSpec

    model_dir = write_tiny_llama(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)  # a plot would land here
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "plan.png").symlink_to(tmp_path / "notes.txt")
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100", "--max-total-tokens",
                     "8192", "--engine-arg", "chunked_prefill_size=256", "--engine-arg", "max_running_requests=16",
                     "--default-max-tokens", "64"]) == 0
    via_run = capsys.readouterr().out.splitlines()
    # it prints and writes nothing: a plan.png here was replaced, through a link (a probe)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    (tmp_path / "plan.png").unlink()
    kv_gb = 8192 * ModelSpec.from_config_file(model_dir).kv_bytes_per_token / 1e9
    assert cli.main(["plan", str(user_file), "--model", str(model_dir), "--hardware", "a100", "--kv-gb", repr(kv_gb),
                     "--chunk", "256", "--max-running", "16", "--default-max-tokens", "64"]) == 0
    via_plan = capsys.readouterr().out.splitlines()
    assert any(line.startswith("blend ") for line in via_run) and "KV pool 8,192 tokens" in "\n".join(via_run)
    assert [x for x in via_run if "planned in" not in x and not x.startswith("model:")] == \
        [x for x in via_plan if "planned in" not in x]
    assert [p.name for p in tmp_path.glob("*.jsonl")] == ["requests.jsonl"]  # nothing run, no results file
    # an engine on a tensor-parallel group plans on N of the devices
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100", "--max-total-tokens",
                     "8192", "--engine-arg", "tp_size=2", "--default-max-tokens", "64"]) == 0
    assert "2xa100" in capsys.readouterr().out
    # data-parallel ranks are replicas (--gpus); a group named twice is refused, not multiplied
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100", "--max-total-tokens",
                     "8192", "--dp", "2", "--default-max-tokens", "64"]) == 0
    assert " on 2 x a100" in capsys.readouterr().out
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "8xa100",
                     "--engine-arg", "tp_size=8"]) == 2
    assert "both name a tensor-parallel group; give it once (--plan-only 8xa100)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["run", str(user_file), "--model", str(model_dir)])
    assert "-o/--output" in capsys.readouterr().err


@pytest.mark.parametrize("pair", ["chunked_prefill_size=abc", "max_running_requests=0", "tp_size=-2",
                                  "tp_size=²", "chunked_prefill_size=²"])  # a digit int() refuses: was a traceback
def test_run_plan_only_names_the_engine_arg_it_maps(user_file, tmp_path, capsys, pair):
    """A bad engine limit was reported as the plan's own flag (`argument --chunk`), which the
    user never typed, with plan's usage text."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from cpu_smoke import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny")
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100",
                     "--engine-arg", pair]) == 2
    err = capsys.readouterr().err
    assert f"--engine-arg {pair}: {pair.split('=')[0]} must be a whole number of at least 1" in err
    assert "--chunk" not in err and "--max-running" not in err


def test_a_kv_pool_beyond_the_device_and_a_zero_token_prompt_are_refused_by_name():
    """`--kv-gb 1e6` on an 80 GB A100 was planned with a pool of 43 billion tokens, and the
    simulator's request took a 0-token prompt as "shorter than its prefix groups (0)" (a probe)."""
    from blendserve_sgl.sim.request import SimRequest

    cost = CostModel.from_names("llama-3.1-8b", "a100")
    with pytest.raises(ValueError, match=r"kv_gb \(--kv-gb\) 1e\+06 does not fit on a100 beside llama-3.1-8b's weights "
                                         r"\(16\.1 GB of 80 GB\); pass at most 63\.9"):
        EngineConfig.for_cost(cost, kv_gb=1e6)
    assert EngineConfig.for_cost(cost, kv_gb=63.9).kv_tokens > 0
    for bad in (0, -3, 5.5, None, True):
        with pytest.raises(ValueError, match=f"request 'a': prompt_len must be an integer >= 1, got {bad!r}"):
            SimRequest("a", 0, prompt_len=bad, output_len=3)
    assert SimRequest("a", 0, prompt_len=np.int64(4), prefix=(("s", 2),), output_len=3).prompt_len == 4


def test_no_chunked_prefill_is_planned_on_a_gpu_and_refused_on_the_cpu_by_plan_and_run(user_file, tmp_path, capsys):
    """`chunked_prefill_size=-1` is SGLang's "no chunked prefill": `--plan-only` refused it
    while `run` passed it on, and on the CPU SGLang then stopped at start with a traceback
    asking for a negative memory fraction (a probe). Now both take it for a GPU (planned with a
    whole prompt a step) and both refuse it for the CPU before anything starts."""
    import sys
    from pathlib import Path

    from blendserve_sgl.batch.runner import check_engine_args, chunk_problem

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from cpu_smoke import write_tiny_llama

    model_dir = write_tiny_llama(tmp_path / "tiny")
    args = ["run", str(user_file), "--model", str(model_dir), "--engine-arg", "chunked_prefill_size=-1"]
    assert cli.main([*args, "--plan-only", "a100"]) == 0
    capsys.readouterr()
    assert cli.main([*args, "--plan-only", "cpu"]) == 2
    assert "the CPU engine needs chunked prefill" in capsys.readouterr().err
    assert cli.main([*args, "-o", str(tmp_path / "out.jsonl"), "--device", "cpu"]) == 2
    assert "the CPU engine needs chunked prefill" in capsys.readouterr().err
    assert not (tmp_path / "out.jsonl").exists()
    with pytest.raises(ValueError, match="the CPU engine needs chunked prefill"):
        check_engine_args({"chunked_prefill_size": -1}, "cpu")
    check_engine_args({"chunked_prefill_size": -1}, "cuda")
    assert [chunk_problem(v, "cuda") is None for v in (1, 8192, -1, "64", 0, -2, True, 1.5, "x", "007", "--5")] == \
        [True, True, True, False, False, False, False, False, False, False, False]  # strings: JSON found no number
    for value in ("--5", "007"):  # a traceback, and a string SGLang failed on at start (a probe)
        assert cli.main([*args[:-1], f"chunked_prefill_size={value}", "--plan-only", "a100"]) == 2
        assert f"chunked_prefill_size={value}: chunked_prefill_size must be a whole number" in capsys.readouterr().err


@pytest.mark.parametrize("flags, said", [
    (["--engine-arg", "max_total_tokens=10"], "use --max-total-tokens instead"),
    (["--engine-arg", "schedule_policy=fcfs"], "use --policy instead"),
    (["--engine-arg", "=1"], "expected KEY=VALUE"),
    (["--engine-arg", "nonexistent_knob=1"], "nonexistent_knob: not an argument of sglang.Engine"),
    (["--replicas", "2"], "apply to --ray runs"),
])
def test_run_plan_only_refuses_what_run_refuses(user_file, capsys, flags, said, tiny_llama):
    """The same command without --plan-only stops with exit 2; with it, a plan was printed (a KV
    pool of 10 tokens planned as the default pool)."""
    if "nonexistent_knob=1" in flags:
        pytest.importorskip("sglang")
    model_dir = tiny_llama
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blendserve run --plan-only: error:") and said in err


def test_run_plan_only_on_cpu_plans_the_cpu_engines_chunk(user_file, monkeypatch, tiny_llama):
    """The CPU engine chunks prefills at 4,096 tokens; the plan assumed a GPU's 8,192, so it
    admitted twice the prompts a step and under-counted prefix hits between steps."""
    seen = []
    monkeypatch.setattr(plan, "main", lambda argv: seen.append(argv) or 0)
    model_dir = tiny_llama
    for extra in ([], ["--engine-arg", "chunked_prefill_size=256"]):
        assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "cpu", *extra]) == 0
    assert seen[0][seen[0].index("--chunk") + 1] == "4096"
    assert seen[1].count("--chunk") == 1 and seen[1][seen[1].index("--chunk") + 1] == "256"
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "h100"]) == 0
    assert "--chunk" not in seen[2]  # a GPU's default


def test_run_plan_only_plans_ray_replicas(user_file, tmp_path, capsys, monkeypatch, tiny_llama):
    """--ray --replicas N was planned as one engine: N times the wall time a Ray run takes."""
    pytest.importorskip("ray")
    model_dir = tiny_llama
    monkeypatch.chdir(tmp_path)
    assert cli.main(["run", str(user_file), "--model", str(model_dir), "--plan-only", "a100", "--ray", "--replicas",
                     "4", "--gpus-per-replica", "2"]) == 0
    assert " on 4 x 2xa100" in capsys.readouterr().out


def test_run_refuses_a_trace_file_at_once(tmp_path, capsys):
    """Every line of a trace became an error record (`custom_id is missing`) and the run ended 0."""
    trace = tmp_path / "trace.jsonl"
    trace.write_text('{"timestamp": 0, "input_length": 600, "output_length": 20, "hash_ids": [1, 2]}\n')
    assert cli.main(["run", str(trace), "-o", str(tmp_path / "out.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "reads as a trace of token counts" in err and f"blendserve plan --workload {trace}" in err
    assert not (tmp_path / "out.jsonl").exists()


def test_cpu_preset_carries_the_recorded_fit():
    """The `cpu` preset is the calibration `bench/plan_file.py` recorded: its CPU figures and the
    overhead terms, which the least squares over the recorded logged steps gives again here; the
    GPU presets carry no overheads."""
    from pathlib import Path

    import numpy as np

    from bench import plan_file as pf
    from blendserve_sgl.core import CostModel, ModelSpec, specs

    fit = json.loads((Path(__file__).resolve().parent.parent / "bench" / "results" / "plan_file.json")
                     .read_text())["overhead_fit"]
    assert specs.CPU_PRESET == {k: fit[k] for k in specs.CPU_PRESET}
    cpu = specs.hardware("cpu")
    assert {k: getattr(cpu, k) for k in specs.CPU_PRESET} == specs.CPU_PRESET
    for name in ("a100", "h100", "h200"):
        assert all(getattr(specs.hardware(name), k) == 0.0 for k in pf.OVERHEAD_TERMS)
    hw = specs.HardwareSpec("cpu", flops=fit["flops"], mem_bandwidth=fit["mem_bandwidth"], mem_capacity=1e9)
    xs, ys = [], []
    for run in fit["runs"]:
        ops, feats = pf.step_features(CostModel(ModelSpec(**fit["model_specs"][run["model"]]), hw), run["steps"])
        for a, b, gap in pf.step_intervals(run["steps"]):
            xs.append(feats[a:b].sum(axis=0))
            ys.append(gap - ops[a:b].sum())
    assert len(ys) == fit["intervals"] > 100
    coef = pf.nonnegative_lstsq(np.array(xs), np.array(ys))
    assert list(coef) == pytest.approx([fit[k] for k in pf.OVERHEAD_TERMS], abs=1e-7)


def test_engine_log_parsed_into_steps():
    """SGLang's per-batch log lines become steps with their gaps (new tokens / input throughput,
    decoding requests / gen throughput); each gap covers the steps since the previous batch of
    its kind."""
    from bench import plan_file as pf

    log = "\n".join([
        "[t] Prefill batch, #new-seq: 2, #new-token: 512, #cached-token: 0, token usage: 0.00, #running-req: 0, "
        "#queue-req: 3, #pending-token: 0, cpu graph: False, input throughput (token/s): 10.00",
        "[t] Prefill batch, #new-seq: 1, #new-token: 100, #cached-token: 12, token usage: 0.01, #running-req: 2, "
        "#queue-req: 2, #pending-token: 0, cpu graph: False, input throughput (token/s): 1000.00",
        "[t] Decode batch, #running-req: 3, #token: 640, token usage: 0.04, cpu graph: False, "
        "gen throughput (token/s): 5.00, #queue-req: 2",
        "[t] Decode batch, #running-req: 3, #token: 643, token usage: 0.04, cpu graph: False, "
        "gen throughput (token/s): 300.00, #queue-req: 2",
        "[t] Prefill batch, #new-seq: 2, #new-token: 50, #cached-token: 0, token usage: 0.04, #running-req: 3, "
        "#queue-req: 0, #pending-token: 0, cpu graph: False, input throughput (token/s): 1000.00",
        "[t] some other line",
    ])
    steps = pf.parse_engine_log(log)
    assert steps == [["P", 2, 512, 0, None], ["P", 1, 100, 12, 0.1], ["D", 3, 640, None], ["D", 3, 643, 0.01],
                     ["P", 2, 50, 0, 0.05]]
    assert pf.step_intervals(steps) == [(1, 2, 0.1), (3, 4, 0.01), (2, 5, 0.05)]


def test_estimate_follows_the_generated_sample(user_file):
    """`sampled_fractions` hands the seeded sample to the generator and keeps generated /
    max_tokens; the estimate scenario gives each request round(max_tokens x a drawn fraction),
    and the plan says the lengths were generated."""
    records = load_batch_file(user_file, ByteTokenizer(), 4096, 256).records  # max_tokens 8, 48, 88, 16, 300
    seen = []

    def stand_in(chosen):  # half of max_tokens for even ids, a quarter for the others; q0 fails
        seen.append([r.rid for r in chosen])
        return [None if r.rid == "q0" else r.output_len // (2 if int(r.rid[1:]) % 2 == 0 else 4) for r in chosen]

    fr = plan.sampled_fractions(records, 6, 5, stand_in)
    assert seen == [[r.rid for r in plan.sample(records, 6, 5)]]
    assert set(fr) <= {0.25, 0.5} and len(fr) == 6 - ("q0" in seen[0])
    est = plan.scenario_records(records, 0.9, fr, seed=5)["estimate"]
    for r, e in zip(records, est):  # a quarter or a half
        assert e.output_len in ({8: (2, 4), 16: (4, 8), 48: (12, 24), 88: (22, 44), 300: (75, 150)}[r.max_tokens])
    assert plan.scenario_records(records, 0.9, [0.25], seed=5)["estimate"] == \
        [r._replace(output_len={8: 2, 16: 4, 48: 12, 88: 22, 300: 75}[r.max_tokens]) for r in records]
    engine = EngineConfig.for_cost(COST, kv_gb=0.3, max_running=16, chunked_prefill=256)
    timing = ExecModel("sequential")
    out, _ = plan.plan(records, COST, engine, ("fcfs",), timing=timing, seed=5, fractions=fr)
    res = simulate(Workload(est, COST), "fcfs", RunSpec(COST, engine, known_lengths=False, seed=5))
    assert out["policies"][0]["wall_s"]["estimate"] == round(res.time(timing), 4)
    assert out["output_lengths"]["estimate"].startswith(f"generated: {len(fr)} requests of this file ran on this "
                                                        f"machine (model {COST.model.name})")
    assert out["generated_sample"]["fractions"] == fr
    assert plan.plan(records, COST, engine, ("fcfs",))[0]["output_lengths"]["estimate"].endswith("(assumed)")
    with pytest.raises(ValueError, match="--output-fraction"):
        plan.sampled_fractions(records, 3, 0, lambda chosen: [None] * len(chosen))


def test_generate_sample_flag(user_file, tmp_path, capsys, monkeypatch):
    """More than the file's accepted requests: all of them run; a negative N is refused by the
    parser; a directory without weights or a preset model (nothing to run here) is an error
    naming --output-fraction."""
    from blendserve_sgl.batch import runner

    _config_dir(tmp_path)
    monkeypatch.setattr(runner, "prepare_environment", lambda device="auto": "cpu")
    ran = []

    def fake_generate_here(path, model_dir, tokenizer, ctx, default_max_tokens, device, seed=0):
        return lambda chosen: ran.extend(chosen) or [r.output_len // 4 for r in chosen]

    monkeypatch.setattr(plan, "generate_here", fake_generate_here)
    args = [str(user_file), "--model", str(tmp_path), "--hardware", "a100", "--policies", "fcfs", "--json",
            "--plot", str(tmp_path / "p.png")]
    assert cli.main(["plan", *args, "--generate-sample", "4"]) == 2  # a config without weights: nothing to run
    err = capsys.readouterr().err
    assert "no weights" in err and "--output-fraction" in err and ran == []
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert cli.main(["plan", *args, "--generate-sample", "1000"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert len(ran) == data["requests"] == 38 and data["generated_sample"]["requests"] == 38
    assert data["output_lengths"]["estimate"].startswith("generated: 38 requests")
    with pytest.raises(SystemExit):
        cli.main(["plan", *args, "--generate-sample", "-2"])
    assert "must be a positive integer" in capsys.readouterr().err
    assert cli.main(["plan", str(user_file), "--model", "llama-3.1-8b", "--generate-sample", "4"]) == 2
    err = capsys.readouterr().err
    assert "--generate-sample" in err and "--output-fraction" in err and "Traceback" not in err
    # `run --plan-only` passes the sample through; without --plan-only the flag is refused
    monkeypatch.chdir(tmp_path)  # the plot lands here
    ran.clear()
    assert cli.main(["run", str(user_file), "--model", str(tmp_path), "--plan-only", "a100",
                     "--generate-sample", "5"]) == 0
    assert len(ran) == 5 and "generated: 5 requests" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["run", str(user_file), "--model", str(tmp_path), "-o", str(tmp_path / "o.jsonl"),
                  "--generate-sample", "5"])
    assert "--plan-only" in capsys.readouterr().err


@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1", reason="BLENDSERVE_SKIP_ENGINE=1")
def test_generate_sample_on_the_real_engine(tiny_llama, tmp_path):
    """`blendserve plan --generate-sample 4` with the tiny model: four requests of a ten-line file
    run through SGLang on CPU, their fractions in [0, 1]."""
    import sys

    from blendserve_sgl.harness import cpu_engine_env, kill_group, start

    path = tmp_path / "ten.jsonl"
    path.write_text("\n".join(_line(f"r{i}", f"question {i}?", max_tokens=4 + i, temperature=0) for i in range(10)))
    out = tmp_path / "plan.json"
    proc = start([sys.executable, "-m", "blendserve_sgl.cli", "plan", str(path), "--model", tiny_llama, "--hardware",
                  "cpu", "--policies", "fcfs", "--generate-sample", "4", "--out", str(out), "--workers", "1"],
                 log_path=tmp_path / "log", env=cpu_engine_env())
    try:
        proc.wait(timeout=600)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, (tmp_path / "log").read_text()[-4000:]
    data = json.loads(out.read_text())
    assert data["generated_sample"]["requests"] == 4
    assert all(0 <= f <= 1 for f in data["generated_sample"]["fractions"])
    assert data["output_lengths"]["estimate"].startswith("generated: 4 requests of this file ran on this machine")


def test_a_request_that_ignores_eos_generates_its_limit_in_every_scenario(tmp_path, capsys):
    """It generates exactly max_tokens; the estimate scenario halved it, so the plan's low end was
    a time no run can reach (found by a probe: 1,200-token ignore_eos requests planned at 600)."""
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(_line(f"q{i}", f"question {i}", max_tokens=64, ignore_eos=i % 2 == 0)
                              for i in range(6)) + "\n")
    got = load_batch_file(path, ByteTokenizer(), 4096, 256)
    assert [r.exact for r in got.records] == [True, False] * 3
    est = plan.scenario_records(got.records, 0.5)["estimate"]
    assert [r.output_len for r in est] == [64, 32] * 3
    assert plan.sampled_fractions(got.records, 10, 0, lambda chosen: [
        None if r.exact else 16 for r in chosen]) == [0.25] * 3  # only the open-ended ones are sampled
    assert plan.sampled_fractions(got.records[:1], 10, 0, lambda chosen: pytest.fail("nothing to sample")) == [1.0]


def test_a_file_of_bad_lines_only_names_them(tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    path.write_text(_line("q1", "three answers", n=3) + "\n" + "{not json\n")
    assert cli.main(["plan", str(path), "--model", "llama-3.1-8b", "--hardware", "h100"]) == 2
    err = capsys.readouterr().err
    assert "no valid request to plan (2 bad lines)" in err and "requests.jsonl line 1:" in err
    assert "requests.jsonl line 2:" in err


def test_a_workload_beyond_the_models_context_is_named_and_not_planned(tmp_path, capsys):
    """A trace row's prompt longer than the model's context was planned as if it ran (Mooncake's
    synthetic trace holds prompts of 191,378 tokens; Llama-3.1-8B takes 131,072). Its recorded
    output lengths are what the requests generate: no halved scenario either."""
    trace = tmp_path / "t.csv"
    trace.write_text("ContextTokens,GeneratedTokens\n200000,10\n100,10\n131072,3\n300,20\n")
    out = tmp_path / "p.json"
    assert cli.main(["plan", "--workload", str(trace), "--model", "llama-3.1-8b", "--policies", "fcfs,blend",
                     "--out", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    text = capsys.readouterr().out
    assert "2 requests not planned (they do not fit the model's context)" in text
    assert "t.csv data row 1: the prompt is 200,000 tokens" in text and "t.csv data row 3:" in text
    data = json.loads(out.read_text())
    assert data["requests"] == 2 and data["bad_lines"] == 2
    assert data["output_lengths"]["estimate"].startswith("each request generates its recorded output length")
    row = data["policies"][0]
    assert row["wall_s"]["low"] == row["wall_s"]["high"]  # one length per request: no range from lengths
    trace.write_text("ContextTokens,GeneratedTokens\n200000,10\n")
    assert cli.main(["plan", "--workload", str(trace), "--model", "llama-3.1-8b"]) == 2
    assert "no request fits llama-3.1-8b's context of 131,072 tokens" in capsys.readouterr().err


def test_the_plans_sample_keeps_small_prefix_groups_whole():
    """Prompts sharing in pairs (a document, two questions) under one system prompt: a uniform
    sample of a tenth keeps a pair only when both are drawn, so the plan read the file's sharing
    as a tenth of it (4.5% for 44.6%) and its time 49% long (a probe). The sample takes whole
    groups; the system prompt above them all stays shared."""
    from blendserve_sgl.workloads import Record

    records = [Record(f"q{i}", 4000, (("sys", 500), (f"doc{i // 2}", 3000)), 20) for i in range(4000)]
    part = plan.sample(records, 400, seed=1, cost=COST)
    chosen = {r.rid for r in part}
    assert 400 <= len(part) < 400 + max(1, 400 // plan.GROUPS_PER_SAMPLE) + 2
    assert all(f"q{int(rid[1:]) ^ 1}" in chosen for rid in chosen)  # each pair whole
    assert [r.rid for r in part] == [r.rid for r in records if r.rid in chosen]  # in file order
    assert [r.rid for r in plan.sample(records, 400, seed=1, cost=COST)] == [r.rid for r in part]  # seeded
    whole = Workload(records, COST).sharing
    assert abs(Workload(part, COST).sharing - whole) < 0.05 * whole
    uniform = Workload(plan.sample(records, 400, seed=1), COST).sharing
    assert uniform < 0.5 * whole  # what the plan simulated before


def test_plan_runs_tell_how_far_they_are(monkeypatch, capsys):
    """A batch of long outputs planned for 15 minutes without a word (a probe): each run tells
    stderr its progress (every 30 s; every step here)."""
    from blendserve_sgl.sim import cli as sim_cli
    from blendserve_sgl.workloads import Record

    monkeypatch.setattr(sim_cli, "PROGRESS_EVERY_S", 0.0)
    records = [Record(f"r{i}", 50, (), 8) for i in range(6)]
    engine = EngineConfig.for_cost(COST, kv_gb=0.3, max_running=16, chunked_prefill=256)
    plan.run_jobs([(Workload(records, COST), "fcfs", RunSpec(COST, engine, known_lengths=False))])
    assert "planning fcfs: " in capsys.readouterr().err


def test_a_presets_vocabulary_checks_token_id_prompts_without_a_tokenizer(tmp_path, capsys):
    """`plan FILE --model PRESET` without `--tokenizer` planned token ids past the model's
    vocabulary that `run` and `plan --tokenizer` refuse (a probe): the preset's vocabulary
    size is known, so the byte approximation checks ids against it."""
    src = tmp_path / "ids.jsonl"
    src.write_text("".join(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": ids, "max_tokens": 4}}) + "\n"
                           for cid, ids in (("over", [1, 128256]), ("ok", [1, 128255]))))
    assert plan.main([str(src), "--model", "llama-3.1-8b", "--no-plot", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "2 lines, 1 planned, 1 bad" in out
    assert "ids.jsonl line 1: \"prompt\" has token id 128256, outside the model's vocabulary of 128256" in out
    config = tmp_path / "config.json"  # a config.json given as --model: its vocabulary (a probe)
    config.write_text(json.dumps({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "vocab_size": 128200, "max_position_embeddings": 4096}))
    assert plan.main([str(src), "--model", str(config), "--no-plot", "--workers", "1"]) == 2
    assert "no valid request to plan (2 bad lines)" in capsys.readouterr().err


@pytest.mark.parametrize("flag,value", [("--output-fraction", "0.1"), ("--default-max-tokens", "5"),
                                        ("--tokenizer", "/nonexistent")])
def test_flags_of_a_requests_file_are_refused_with_a_workload(tmp_path, capsys, flag, value):
    """`plan --workload TRACE` took these and changed nothing (a probe): a trace's rows carry
    their output lengths and token counts."""
    trace = tmp_path / "t.csv"
    trace.write_text("ContextTokens,GeneratedTokens\n100,10\n")
    assert cli.main(["plan", "--workload", str(trace), "--model", "llama-3.1-8b", "--no-plot", flag, value]) == 2
    assert f"{flag} applies to a requests file; the rows of --workload {trace} are token counts" in \
        capsys.readouterr().err


def test_plan_on_the_cpu_preset_plans_the_engine_run_starts_there(user_file, tmp_path, capsys):
    """`--hardware cpu` plans the KV pool and chunk size `blendserve run` gives the CPU engine
    (what `run --plan-only` plans), not a pool sized to the machine's RAM (a probe: 10.8 million
    tokens against 32,768, and blend read 1.107x the best other policy where `--plan-only` read
    1.015x); `--kv-gb` and `--chunk` still choose."""
    from blendserve_sgl.batch.runner import CPU_MAX_TOTAL_TOKENS

    def engine(hw, *flags):
        assert cli.main(["plan", str(user_file), "--model", "llama-3.1-8b", "--hardware", hw, "--json",
                         "--policies", "fcfs", *flags]) == 0
        return json.loads(capsys.readouterr().out)["engine"]

    got = engine("cpu")
    assert (got["kv_tokens"], got["chunked_prefill"]) == (CPU_MAX_TOTAL_TOKENS, plan.CPU_CHUNKED_PREFILL)
    got = engine("cpu", "--kv-gb", "1", "--chunk", "512")
    assert got["chunked_prefill"] == 512 and got["kv_tokens"] == int(1e9 // COST.kv_bytes_per_token)
    assert engine("a100")["chunked_prefill"] == plan.GPU_CHUNKED_PREFILL


@pytest.mark.parametrize("args, said", [
    ([""], "the requests file is an empty name; pass a file path"),  # a TypeError traceback (a probe)
    (["--workload", " "], "--workload is an empty name"),
    (["--workload", "trace1", "--requests", "50", "--out", ""], "--out is an empty name; pass a file path"),
])
def test_plan_names_an_empty_path(capsys, args, said):
    """`blendserve plan "$REQS"` with the variable unset: one message, as `run` gives, no traceback."""
    assert cli.main(["plan", "--policies", "fcfs", "--no-plot", *args]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err, err
