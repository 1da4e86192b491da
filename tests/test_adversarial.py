"""Hostile inputs to `blendserve run`, `blendserve plan` and the workload loaders: each test is
one input that once crashed a run, lost a result or named the wrong cause, and what it must do
now (an error naming the input and the fix; the valid lines still run)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blendserve_sgl.batch import cli
from blendserve_sgl.batch.reader import read_store
from blendserve_sgl.batch.requests import BatchRequest, LineError, check_readable, parse_line, read_requests
from blendserve_sgl.batch.results import record_key
from _helpers import prepared_reference
from test_batch_unit import _batch, stand_in  # noqa: F401 (the command with a stand-in engine)


def chat(cid: str, content: str = "hi", **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "system", "content": "be brief"},
                                             {"role": "user", "content": content}], **body}})


def completion(cid: str, prompt="hi", **body) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions", "body": {"prompt": prompt, **body}})


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    from transformers import AutoTokenizer

    return Path(tiny_llama), AutoTokenizer.from_pretrained(tiny_llama)


# ------------------------------------------------------------------ sampling values SGLang holds in fixed-width tensors
def test_top_k_beyond_int32_means_all_tokens_not_a_scheduler_crash():
    """SGLang packs top_k into an int32 tensor inside the scheduler: 10**20 there overflows and
    kills the engine (and every other request with it). Any top_k above SGLang's whole-vocabulary
    value means the whole vocabulary."""
    for big in (2**31, 10**20):
        req = parse_line(completion("k", top_k=big), 1)
        assert isinstance(req, BatchRequest) and req.sampling["top_k"] == -1
    assert parse_line(completion("k", top_k=40), 1).sampling["top_k"] == 40
    assert parse_line(completion("k", top_k=-1), 1).sampling["top_k"] == -1


@pytest.mark.parametrize("seed", [2**63, 2**70, -1])
def test_seed_outside_int64_is_that_lines_error(seed):
    err = parse_line(completion("s", seed=seed), 4, "in.jsonl")
    assert isinstance(err, LineError) and err.custom_id == "s"
    assert err.message.startswith('in.jsonl line 4: "seed" must be an integer from 0 to 2**63 - 1'), err.message
    assert parse_line(completion("s", seed=2**63 - 1), 4).sampling["sampling_seed"] == 2**63 - 1


@pytest.mark.parametrize("raw,what", [
    (b'{"custom_id": "a\x01"}\n', "Invalid control character at column 17)"),
    (b'{"custom_id": "x"\n', "the line ends before its JSON does: is it cut short, or is the file indented JSON?)"),
    (b'{"custom_id": "x",\r\n', "the line ends before its JSON does"),
    (b"{\n", "the line ends before its JSON does"),
    (b'{} {"a": 1}\r\n', "Extra data at column 4: more than one JSON value; end each request's line with a "
                        "newline (\\n))"),
    (b'{"a": 1}\r{"b": 2}\r', "Extra data at column 10: more than one JSON value"),
    (b'{"a": 1,,}\n', "Expecting property name enclosed in double quotes at column 9)"),
])
def test_invalid_json_names_the_column_on_its_own_line(raw, what):
    """The line's newline is not part of its JSON: columns count on the line, and a line that
    stops mid-object (a truncated file, or indented JSON instead of JSONL) says so."""
    err = parse_line(raw, 3, "in.jsonl")
    assert isinstance(err, LineError) and err.message.startswith("in.jsonl line 3: invalid JSON (")
    assert what in err.message, err.message


def test_a_json_list_line_says_one_request_per_line():
    err = parse_line(json.dumps([json.loads(completion("a")), json.loads(completion("b"))]), 1, "in.jsonl")
    assert "got a list (write one request per line, not a JSON list)" in err.message, err.message


# ------------------------------------------------------------------ the reader
def test_huge_max_tokens_names_the_models_context_and_keeps_the_fast_path(tiny, tmp_path):
    """A max_tokens beyond any context on a chat line among the reader's checked sample: the
    error names the model's real context (as the plain path does), and the piece-wise encoding
    stays on for the lines after it."""
    model, tok = tiny
    rows = [chat("huge", max_tokens=10**30)] + [chat(f"r{i}", f"question {i}", max_tokens=4) for i in range(40)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows) + "\n")
    got = read_store(path, tok, 2048, 16, model_dir=model, workers=0)
    want = prepared_reference(path, tok, 2048)
    assert [e.message for e in got.errors] == [w.message for w in want if isinstance(w, LineError)]
    assert "of the model's 2048-token context" in got.errors[0].message
    assert not got.whole_text_fallback
    assert [got.store.prepared(i).input_ids for i in range(len(got.store))] == \
        [w.input_ids for w in want if not isinstance(w, LineError)]


# ------------------------------------------------------------------ the command's arguments
def test_dash_is_standard_input(stand_in, tmp_path, monkeypatch):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert check_readable("-") == Path("/dev/stdin")
    r, w = os.pipe()
    os.write(w, src.read_bytes())
    os.close(w)
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        assert cli.main(["-", "-o", str(out), "--model", str(stand_in["model"])]) == 0
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(r)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 17 and {record_key(r) for r in recs} >= {f"q{i}" for i in range(12)}
    assert "stdin line 13: invalid JSON" in next(r for r in recs if record_key(r) == ("line", 13))["error"]["message"]


@pytest.mark.parametrize("args,fragment", [
    (["--workers", "-3"], "argument --workers: -3 must be 0 or a positive integer"),
    (["--workers", str((os.cpu_count() or 1) + 1)], f"is more than the {os.cpu_count() or 1} cores of this machine"),
    (["--log-level", "loud"], "argument --log-level: invalid choice: 'loud'"),
    (["--window", str(2**63)], f"argument --window: {2**63} is more requests than any batch holds; pass 0 for all"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or a positive integer"),  # NumPy's seeding in SGLang's
    (["--seed", "4294967296"], "argument --seed: 4294967296 must be at most 2**32 - 1"),  # scheduler refused these
    (["--ray", "--gpus-per-replica", "-1"], "--gpus-per-replica must be 0 or more, got -1.0"),
    (["--ray", "--gpus-per-replica", "1", "--device", "cpu"],  # was refused after reading and starting Ray
     "--gpus-per-replica 1: this run's engines run on the CPU"),
    (["--engine-arg", "context_length=16"], "--engine-arg 'context_length=16': use --context-length instead"),
    (["--engine-arg", "schedule-policy=fcfs"], "use --policy instead"),
    (["--engine-arg", "enable_mixd_chunk=true"], "--engine-arg enable_mixd_chunk: not an argument of sglang.Engine; "
                                                 "did you mean enable_mixed_chunk?"),
    (["--attention-backend", "flashinfr"], "--attention-backend 'flashinfr' is not an SGLang attention backend; "
                                           "choose one of triton, torch_native"),
    (["-o", ""], "-o/--output is an empty name; pass a file path"),  # was "PosixPath('.') has an empty name"
    (["--errors", " "], "--errors is an empty name"),
])
def test_bad_arguments_stop_before_reading_or_any_engine(stand_in, tmp_path, capsys, args, fragment):  # noqa: F811
    pytest.importorskip("sglang")
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    try:
        code = cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), *args])
    except SystemExit as exc:  # an argparse error
        code = exc.code
    assert code == 2 and fragment in capsys.readouterr().err
    assert not stand_in["engines"] and not out.exists()


@pytest.mark.parametrize("name", ["torch_native", "cascade", None])
def test_known_attention_backends_pass_the_early_check(name):
    pytest.importorskip("sglang")
    cli._check_attention_backend(name)  # raises on a name SGLang does not know


@pytest.mark.parametrize("args,fragment", [
    (["--kv-gb", "0.00001"], "kv_gb (--kv-gb) 1e-05 holds no token of the KV cache"),
    (["--kv-gb", "0.0005"], "beside the prompt), more than the KV pool of 3 tokens; pass a larger --kv-gb or a smaller max_tokens"),
    (["--out", "{tmp}"], "--out {tmp} is a directory; pass the name of a file in it"),
    (["--out", "{tmp}/no/plan.json"], "--out {tmp}/no/plan.json: the folder {tmp}/no does not exist"),
    (["--plot", "{tmp}/no/plan.png"], "--plot {tmp}/no/plan.png: the folder {tmp}/no does not exist"),
])
def test_plan_output_and_pool_mistakes_are_one_line_errors_before_any_simulation(tmp_path, capsys, args, fragment):
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert plan.main([str(src), "--model", "llama-3.1-8b", *args]) == 2
    err = capsys.readouterr().err
    assert fragment.replace("{tmp}", str(tmp_path)) in err and "Traceback" not in err
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("text", ["", "\n \n\t\r\n"])
def test_plan_of_an_empty_file_says_it_holds_no_requests(tmp_path, capsys, text):
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(text)
    assert plan.main([str(src), "--model", "llama-3.1-8b"]) == 2
    assert "in.jsonl holds no requests (it is empty or has only blank lines)" in capsys.readouterr().err


def test_summary_json_in_a_missing_folder_fails_before_the_run(stand_in, tmp_path, capsys):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]),
                     "--summary-json", str(tmp_path / "no" / "s.json")]) == 2
    assert "the folder" in capsys.readouterr().err and not stand_in["engines"] and not out.exists()


# ------------------------------------------------------------------ CSV traces (`workloads/data.py`)
AZURE = "traces/AzureLLMInferenceTrace_code.csv"


def _trace(tmp_path, monkeypatch, text: str, rel: str = AZURE) -> None:
    monkeypatch.setenv("BLENDSERVE_DATA", str(tmp_path))
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_text(text)


@pytest.mark.parametrize("text,prompts,outputs", [
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,10,2\n", [10], [2]),  # one row
    ("\ufeffGeneratedTokens,Extra,ContextTokens,TIMESTAMP\n2,x,10,t\n\n,,,\n5,y,0,t\n", [10, 0], [2, 5]),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\r\nt,10.0,0\r\n", [10], [0]),
])
def test_a_trace_reads_its_columns_by_name_skipping_blank_rows(tmp_path, monkeypatch, text, prompts, outputs):
    from blendserve_sgl.workloads import classes, data

    _trace(tmp_path, monkeypatch, text)
    p, o = data.load_azure("code")
    assert p.tolist() == prompts and o.tolist() == outputs
    recs = classes.azure("code", 5, __import__("numpy").random.default_rng(0))
    assert all(r.output_len >= 1 and r.prompt_len >= data.SYSTEM_PROMPT_TOKENS for r in recs)


@pytest.mark.parametrize("text,fragment", [
    ("", "no column ContextTokens or GeneratedTokens in its header (empty)"),
    ("TIMESTAMP,Context,GeneratedTokens\nt,1,2\n", "no column ContextTokens in its header (TIMESTAMP,Context,"
                                                   "GeneratedTokens); a trace needs the columns ContextTokens and "
                                                   "GeneratedTokens"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\n", "holds no rows under its header"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1,2\nt,-3,2\n", "line 3: ContextTokens must be a whole token count "
                                                                 "from 0 to 10,000,000, got '-3'; fix or delete that row"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1,NaN\n", "line 2: GeneratedTokens must be a whole token count"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1,inf\n", "got 'inf'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1,2.5\n", "got '2.5'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,1e30,2\n", "got '1e30'"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,7\n", "line 2: GeneratedTokens must be a whole token count"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt,,2\n", "got ''"),
])
def test_a_bad_trace_is_one_error_naming_file_row_and_column(tmp_path, monkeypatch, text, fragment):
    from blendserve_sgl.workloads import data

    _trace(tmp_path, monkeypatch, text)
    with pytest.raises(ValueError) as exc:
        data.load_azure("code")
    assert fragment in str(exc.value) and "AzureLLMInferenceTrace_code.csv" in str(exc.value), str(exc.value)


def test_simulate_names_a_request_larger_than_the_kv_pool_instead_of_stalling(tmp_path, capsys):
    from blendserve_sgl.sim import cli as sim_cli
    from blendserve_sgl.workloads import data

    if not (data.data_dir() / "mmlu").is_dir():
        pytest.skip("the MMLU files of shared/data are not here")
    code = sim_cli.main(["--workload", "mixed", "--requests", "50", "--policy", "fcfs", "--kv-gb", "0.01",
                         "--out", str(tmp_path / "sim.json")])
    err = capsys.readouterr().err
    assert code == 2 and "more than the KV pool of 76 tokens; pass a larger --kv-gb" in err, err
    assert "Traceback" not in err and not (tmp_path / "sim.json").exists()


def test_a_bad_trace_reaches_the_simulate_command_as_one_line(tmp_path, monkeypatch, capsys):
    from blendserve_sgl.sim import cli as sim_cli
    from blendserve_sgl.workloads import data

    mmlu = data.data_dir() / "mmlu"
    if not mmlu.is_dir():
        pytest.skip("the MMLU files of shared/data are not here")
    (tmp_path / "mmlu").symlink_to(mmlu)
    _trace(tmp_path, monkeypatch, "TIMESTAMP,ContextTokens,GeneratedTokens\nt,10,2\nt,12,oops\n")
    (tmp_path / "traces" / "AzureLLMInferenceTrace_conv.csv").write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                                                                         "t,10,2\n")
    code = sim_cli.main(["--workload", "mixed", "--requests", "200", "--policy", "fcfs"])
    err = capsys.readouterr().err
    assert code != 0 and "AzureLLMInferenceTrace_code.csv line 3: GeneratedTokens" in err, err
    assert "Traceback" not in err


def test_a_short_mmlu_row_is_named(tmp_path, monkeypatch):
    from blendserve_sgl.workloads import data

    monkeypatch.setenv("BLENDSERVE_DATA", str(tmp_path))
    for part in ("dev", "test"):
        (tmp_path / "mmlu" / part).mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n\nq2,a,b,c,d,B\n")
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b,c,d,A\nq,a\n")
    with pytest.raises(ValueError, match=r"x_test.csv line 2: 2 columns, an MMLU row has 5"):
        data.load_mmlu()
    (tmp_path / "mmlu" / "test" / "x_test.csv").write_text("q,a,b,c,d\n\n")
    prefix, questions = data.load_mmlu()["x"]
    assert len(questions) == 1 and prefix > questions[0]


# ------------------------------------------------------------------ ShareGPT files (`workloads/conversation.py`)
def test_sharegpt_items_that_are_not_conversations_are_skipped(tmp_path):
    from blendserve_sgl.workloads.conversation import iter_conversations

    good = {"id": "g", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    items = [7, None, "text", ["a"], {"id": "n", "conversations": 5}, {"id": "d", "conversations": {"from": "human"}},
             {"id": "s", "conversations": "human: hi"}, good]
    path = tmp_path / "sg.json"
    path.write_text("\ufeff\n " + json.dumps(items))
    assert list(iter_conversations(path)) == [("g", ["hi", "hello"])]


@pytest.mark.parametrize("text", ["", "{}", '{"conversations": []}', "   "])
def test_a_file_that_is_not_a_sharegpt_list_is_named(tmp_path, text):
    from blendserve_sgl.workloads.conversation import iter_conversations

    path = tmp_path / "sg.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="sg.json: not a ShareGPT file"):
        list(iter_conversations(path))


# ------------------------------------------------------------------ an engine process that dies mid-run
def _dies_once(at: int):
    """A `dies` for `_dying_engines`: the first engine to have answered `at` requests dies, once."""
    once = [True]

    def dies(engine, ids):
        if once[0] and engine.answered == at:
            once[0] = False
            return True
        return False

    return dies


def _dying_engines(monkeypatch, dies, quit_at_shutdown=False, starts=None):
    """`runner.start_engine` giving stand-in engines whose process "dies" (SIGQUIT to this process,
    as SGLang's processes send it, then no answer) when `dies(engine, input_ids)` says so; with
    `quit_at_shutdown` a second SIGQUIT arrives while a dead engine shuts down (a second rank);
    with `starts`, the start after that many raises."""
    import signal

    from blendserve_sgl.batch import runner
    from test_batch_unit import FakeEngine

    class DyingEngine(FakeEngine):
        dead = False

        async def async_generate(self, input_ids, sampling_params):
            if dies(self, input_ids):
                self.dead = True
                os.kill(os.getpid(), signal.SIGQUIT)
                await __import__("asyncio").sleep(5)  # a dead scheduler answers nothing
            return await super().async_generate(input_ids, sampling_params)

        def shutdown(self):
            if quit_at_shutdown and self.dead:
                os.kill(os.getpid(), signal.SIGQUIT)
            super().shutdown()

    start, started = runner.start_engine, [0]

    def dying(cfg):
        started[0] += 1
        if starts is not None and started[0] > starts:
            raise RuntimeError("no GPU memory left")
        e = start(cfg)
        e.__class__ = DyingEngine
        return e

    monkeypatch.setattr(runner, "start_engine", dying)


def test_an_engine_process_dying_mid_run_starts_the_engine_again_and_loses_nothing(stand_in, tmp_path, capsys,  # noqa: F811
                                                                                   monkeypatch):
    """SGLang's processes send SIGQUIT to this one when one of them dies (its handler would kill
    this process, traceback and all, exit 137). While requests run `blendserve run` takes SIGQUIT
    over, starts the engine again and runs what was in flight once more: a failure that does not
    come back (a passing fault) costs one restart, every request gets its record, SIGQUIT's handler
    is restored after."""
    import signal

    dies = _dies_once(at=4)

    _dying_engines(monkeypatch, dies)
    seen = []
    sglang_handler = lambda *a: seen.append(a)  # noqa: E731 (stands in for SGLang's: it would kill this process)
    previous = signal.signal(signal.SIGQUIT, sglang_handler)
    try:
        src, out = _batch(tmp_path), tmp_path / "results.jsonl"
        args = [str(src), "-o", str(out), "--model", str(stand_in["model"]), "--window", "1"]
        assert cli.main(args) == 0
        assert signal.getsignal(signal.SIGQUIT) is sglang_handler and not seen
    finally:
        signal.signal(signal.SIGQUIT, previous)
    text = capsys.readouterr().out
    assert "an SGLang process failed with 1 request in flight" in text and "started again once after" in text
    engines = stand_in["engines"]
    assert len(engines) == 2 and all(e.shut for e in engines)
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({json.dumps(record_key(r)) for r in records}) == len(records) == 17
    culprit = [r for r in records if (r.get("error") or {}).get("code") == "engine_crash"]
    assert len(culprit) == 1  # window 1: the one in flight is taken for the culprit (it ran alone)
    assert cli.main(args + ["--retry-failed"]) == 0  # the passing fault does not come back
    again = [json.loads(x) for x in out.read_text().splitlines()]
    assert not [r for r in again if (r.get("error") or {}).get("code") == "engine_crash"]


def test_a_kv_pool_too_small_for_a_prompt_names_max_total_tokens(stand_in, tmp_path, monkeypatch):  # noqa: F811
    """With --max-total-tokens 16 SGLang refuses most prompts as longer than its "maximum allowed
    length" and suggests --allow-auto-truncate, which would cut the prompts; the record names the
    flag that set that limit."""
    from blendserve_sgl.batch import runner
    from test_batch_unit import FakeEngine

    class SmallPool(FakeEngine):
        async def async_generate(self, input_ids, sampling_params):
            raise ValueError(f"Input length ({len(input_ids)} tokens) exceeds the maximum allowed length (10 tokens). "
                             "Use a shorter input or enable --allow-auto-truncate.")

    start = runner.start_engine

    def small(cfg):
        e = start(cfg)
        e.__class__ = SmallPool
        return e

    monkeypatch.setattr(runner, "start_engine", small)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--max-total-tokens", "16"]) == 0
    messages = [json.loads(x)["error"]["message"] for x in out.read_text().splitlines()]
    refused = [m for m in messages if "exceeds the maximum allowed length" in m]
    assert len(refused) == 14 and all("--max-total-tokens 16: raise it" in m for m in refused)

def test_a_request_that_stops_the_engine_is_found_and_fails_alone(stand_in, tmp_path, capsys, monkeypatch):  # noqa: F811
    """A request whose every run kills an engine process (a sampler fault no check foresaw) made
    the whole run stop, and every rerun stop at it again: one request lost the batch. Now the
    requests in flight run again in halves until the one that fails runs alone; it gets an error
    record naming its line, every other request its answer."""
    src = _batch(tmp_path)
    poison = None

    def dies(engine, ids):
        return poison is not None and ids == poison

    _dying_engines(monkeypatch, dies)
    from blendserve_sgl.batch import cli as batch_cli

    tok = batch_cli._load_tokenizer(None)
    poison = tok.encode("complete this 4")
    out = tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0  # window: all at once
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({json.dumps(record_key(r)) for r in records}) == len(records) == 17
    crashed = [r for r in records if (r.get("error") or {}).get("code") == "engine_crash"]
    assert [r["custom_id"] for r in crashed] == ["q4"]
    assert "requests.jsonl line 5: this request stopped the engine" in crashed[0]["error"]["message"]
    ok = {r["custom_id"] for r in records if r.get("response") and r["response"]["status_code"] == 200}
    assert {f"q{i}" for i in range(12)} - {"q4"} <= ok
    assert len(stand_in["engines"]) >= 3  # the first failure, then at least one group, then the culprit alone
    assert all(e.shut for e in stand_in["engines"])


def test_several_requests_that_stop_the_engine_each_fail_alone_also_on_a_retry(stand_in, tmp_path, capsys,  # noqa: F811
                                                                             monkeypatch):
    """Three requests that each kill the engine: each gets its error record and the run ends with
    0; `--retry-failed` runs them again, they fail alone one after another with nothing answered
    between, and as nothing else is left that is the end of the run, not a broken engine (it ended
    with 1 and "rerun the same command", with nothing left to run)."""
    from blendserve_sgl.batch import cli as batch_cli

    tok = batch_cli._load_tokenizer(None)
    poison = [tok.encode(f"complete this {i}") for i in (0, 4, 8)]
    _dying_engines(monkeypatch, lambda engine, ids: ids in poison)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"])]
    for extra in ([], ["--retry-failed"]):
        assert cli.main(args + extra) == 0, capsys.readouterr().err
        records = [json.loads(x) for x in out.read_text().splitlines()]
        assert len({json.dumps(record_key(r)) for r in records}) == len(records) == 17
        assert sorted(r["custom_id"] for r in records if (r.get("error") or {}).get("code") == "engine_crash") == \
            ["q0", "q4", "q8"]


def test_a_second_process_reporting_while_the_dead_engine_shuts_down_does_not_end_the_run(stand_in, tmp_path,  # noqa: F811
                                                                                          monkeypatch):
    """A second engine process (another rank) may send its SIGQUIT while the dead engine shuts
    down, after `generate` put back the handler it found, SGLang's, which kills this process: the
    run ignores SIGQUIT until the next engine starts, and puts the caller's handler back at the end."""
    import signal

    dies = _dies_once(at=3)

    _dying_engines(monkeypatch, dies, quit_at_shutdown=True)
    killed = []
    kill_handler = lambda *a: killed.append(a)  # noqa: E731 (stands in for SGLang's, which kills this process)
    previous = signal.signal(signal.SIGQUIT, kill_handler)
    try:
        src, out = _batch(tmp_path), tmp_path / "results.jsonl"
        assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
        assert not killed and signal.getsignal(signal.SIGQUIT) is kill_handler
    finally:
        signal.signal(signal.SIGQUIT, previous)
    assert len(out.read_text().splitlines()) == 17


def test_a_sigquit_while_a_finished_run_stops_its_engine_does_not_end_it(stand_in, tmp_path, capsys,  # noqa: F811
                                                                          monkeypatch):
    """The engine installs SGLang's SIGQUIT handler (it kills this process); with no failure in
    the run it stayed in force while the run stopped the engine at the end, so a SIGQUIT then (a
    process reporting its end, a stray Ctrl-\\) ended a finished run with exit 137 and no summary
    (probe 28). Now ignored while the engine stops; the caller's handler is put back after."""
    import signal

    from blendserve_sgl.batch import runner
    from test_batch_unit import FakeEngine

    killed = []
    sglang_handler = lambda *a: killed.append(a)  # noqa: E731 (stands in for SGLang's, which kills this process)

    class QuitsAtShutdown(FakeEngine):
        def shutdown(self):
            os.kill(os.getpid(), signal.SIGQUIT)
            super().shutdown()

    start = runner.start_engine

    def starting(cfg):
        e = start(cfg)
        e.__class__ = QuitsAtShutdown
        signal.signal(signal.SIGQUIT, sglang_handler)  # what sglang.Engine leaves installed
        return e

    monkeypatch.setattr(runner, "start_engine", starting)
    before = signal.getsignal(signal.SIGQUIT)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    assert not killed and signal.getsignal(signal.SIGQUIT) is before
    assert len(out.read_text().splitlines()) == 17 and "done: 17 requests" in capsys.readouterr().out


def test_an_engine_that_does_not_start_again_says_so(stand_in, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The engine dies mid-run and does not start again: the message says that, with the records
    this run wrote (it blamed --model and counted only the invalid lines)."""
    dies = _dies_once(at=4)

    _dying_engines(monkeypatch, dies, starts=1)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--window", "2"]) == 1
    err = capsys.readouterr().err
    written = len(out.read_text().splitlines())
    assert "SGLang did not start again after one of its processes failed (RuntimeError: no GPU memory left)" in err
    assert f"the {written:,} records written in this run are kept" in err and "check --model" not in err

def test_an_engine_that_fails_whatever_it_runs_stops_the_run(stand_in, tmp_path, capsys, monkeypatch):  # noqa: F811
    """When every engine dies at once, the requests are not at fault: after three requests in a
    row fail alone with nothing answered between, the hunt gives up with the earlier message and
    exit 1, the records written so far kept; --retry-failed runs those three again. An engine
    that fails now and then (every third request) finishes the run."""
    _dying_engines(monkeypatch, lambda engine, ids: True)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 1
    err = capsys.readouterr().err
    assert "an SGLang process failed while requests ran" in err and "rerun the same command to finish" in err
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({json.dumps(record_key(r)) for r in records}) == len(records)  # nothing twice
    assert len([r for r in records if (r.get("error") or {}).get("code") == "engine_crash"]) == 3
    _dying_engines(monkeypatch, lambda engine, ids: engine.calls >= 2)  # each engine's third request
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--retry-failed"]) == 0
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert len({json.dumps(record_key(r)) for r in records}) == len(records) == 17


# ------------------------------------------------------------------ results files that are not ours
@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"notes without a newline", b"[1, 2"])
def test_a_results_file_of_one_foreign_unterminated_line_is_refused_not_cut(stand_in, tmp_path, capsys,  # noqa: F811
                                                                            content):
    """A crash leaves at most the start of a record after the last newline, and only that is
    cut; a file whose last line is something else was not written by `blendserve run`."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    out.write_bytes(content)
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert "neither a result record of `blendserve run` nor the start of one" in capsys.readouterr().err
    assert out.read_bytes() == content and not stand_in["engines"]
    assert not (tmp_path / "results.errors.jsonl").exists()


@pytest.mark.parametrize("cut", [1, 5, 30, 200])
def test_a_record_cut_anywhere_by_a_crash_is_removed_and_run_again(stand_in, tmp_path, capsys, cut):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    lines = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(lines[:-1]) + lines[-1][:cut])
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    assert "a partial last line from a crash was removed" in capsys.readouterr().out
    assert len({json.dumps(record_key(json.loads(x))) for x in out.read_text().splitlines()}) == 17


def test_an_errors_file_in_a_missing_folder_is_named_before_anything_is_written(stand_in, tmp_path, capsys):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]),
                     "--errors", str(tmp_path / "no" / "e.jsonl")]) == 2
    assert f"--errors {tmp_path}/no/e.jsonl: the folder {tmp_path}/no does not exist" in capsys.readouterr().err
    assert not out.exists() and not stand_in["engines"]


def test_an_integer_too_long_for_python_is_that_lines_error():
    """Python refuses to convert a string of more than 4,300 digits to int: json.loads raised a
    plain ValueError, which stopped the whole read."""
    raw = '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": ' \
          + "9" * 5000 + "}}"
    err = parse_line(raw, 2, "in.jsonl")
    assert isinstance(err, LineError) and "a number of 5,000 digits; no field takes one that large" in err.message
    assert parse_line(completion("t", prompt=[1] * 3, seed=10**30), 1).message.endswith("got 1000000000000000000000000000000")


def test_a_results_line_nested_too_deeply_is_not_a_record(stand_in, tmp_path, capsys):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    out.write_text("[" * 100000 + "]" * 100000 + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert "results.jsonl line 1 is not a result record" in capsys.readouterr().err


# ------------------------------------------------------------------ the model's config.json
@pytest.mark.parametrize("config,fragment", [
    ("[]", "not a JSON object of model settings"),
    ("not json", "cannot read it as JSON"),
    ('{"max_position_embeddings": "big"}', "max_position_embeddings must be a positive integer, got 'big'"),
    ('{"max_position_embeddings": -5}', "max_position_embeddings must be a positive integer, got -5"),
    ('{"max_position_embeddings": true}', "max_position_embeddings must be a positive integer, got True"),
    ('{"rope_scaling": {"factor": "x"}, "max_position_embeddings": 100}', "rope_scaling.factor must be a positive"),
])
def test_a_bad_config_json_names_the_file_and_the_fix(tmp_path, config, fragment):
    from blendserve_sgl.batch.prompts import context_length

    (tmp_path / "config.json").write_text(config)
    with pytest.raises(ValueError) as exc:
        context_length(tmp_path)
    assert str(exc.value).startswith(f"{tmp_path / 'config.json'}: {fragment}"), str(exc.value)
    assert "pass --context-length" in str(exc.value)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096.0, "rope_scaling": {"factor": 2.0}}')
    assert context_length(tmp_path) == 8192
    (tmp_path / "config.json").unlink()  # a folder without one: said so, not "cannot read it as JSON" (a probe)
    with pytest.raises(ValueError, match="not a Hugging Face model directory \\(no config.json in it\\)"):
        context_length(tmp_path)


def test_plan_only_with_a_model_config_it_cannot_plan_for_is_one_line(stand_in, tmp_path, capsys):  # noqa: F811
    src = _batch(tmp_path)
    assert cli.main([str(src), "--model", str(stand_in["model"]), "--plan-only"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("blendserve run --plan-only: error: config.json") and "Traceback" not in err


# ------------------------------------------------------------------ results that cannot be written
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (every write fails: no space)")
def test_a_full_disk_stops_the_run_with_one_message(stand_in, tmp_path, capsys):  # noqa: F811
    """Every line valid: the first write is a result, from inside the engine's loop."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(completion(f"c{i}", f"say {i}") + "\n" for i in range(6)))
    assert cli.main([str(src), "-o", "/dev/full", "--model", str(stand_in["model"])]) == 2
    assert stand_in["engines"][0].shut
    err = capsys.readouterr().err
    assert "blendserve run: error: cannot write /dev/full: No space left on device; the records written before " \
           "are kept" in err and "Traceback" not in err


def test_a_results_pipe_closed_by_its_reader_stops_the_run_with_one_message(stand_in, tmp_path, capsys):  # noqa: F811
    """`blendserve run ... -o /dev/stdout | head -1`: the reader goes away after one line."""
    src = _batch(tmp_path)
    r, w = os.pipe()
    os.close(r)
    try:
        assert cli.main([str(src), "-o", f"/dev/fd/{w}", "--model", str(stand_in["model"])]) == 2
    finally:
        os.close(w)
    err = capsys.readouterr().err
    assert f"cannot write /dev/fd/{w}: Broken pipe" in err and "Traceback" not in err


def test_an_engine_process_failing_at_start_is_an_error_not_a_kill(monkeypatch):
    """SGLang's engine installs a SIGQUIT handler that kills this process when a child fails
    while it starts (bad weights: exit 137). `start_engine` raises `EngineFailed` instead, stops
    the other children, and leaves SGLang's handler installed for the engine that did start."""
    import signal
    import time

    sglang = pytest.importorskip("sglang")
    import sglang.srt.utils as sglang_utils

    from blendserve_sgl.batch import runner

    killed = []
    monkeypatch.setattr(sglang_utils, "kill_process_tree", lambda pid, include_parent=True: killed.append(
        (pid, include_parent)))
    theirs = lambda *a: pytest.fail("SGLang's handler would kill this process")  # noqa: E731

    class Failing:
        def __init__(self, **kw):
            signal.signal(signal.SIGQUIT, theirs)
            os.kill(os.getpid(), signal.SIGQUIT)  # the scheduler died loading the weights
            time.sleep(5)

    class Starting:
        def __init__(self, **kw):
            signal.signal(signal.SIGQUIT, theirs)

    before = signal.getsignal(signal.SIGQUIT)
    try:
        monkeypatch.setattr(sglang, "Engine", Failing)
        with pytest.raises(runner.EngineFailed):
            runner.start_engine(runner.EngineConfig(model_path="m"))
        assert killed == [(os.getpid(), False)]
        monkeypatch.setattr(sglang, "Engine", Starting)
        assert isinstance(runner.start_engine(runner.EngineConfig(model_path="m")), Starting)
        assert signal.getsignal(signal.SIGQUIT) is theirs and signal.signal.__module__ == "signal"
    finally:
        signal.signal(signal.SIGQUIT, before)


def test_a_context_longer_than_the_models_is_refused_before_reading(stand_in, tmp_path, capsys, monkeypatch):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    monkeypatch.delenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", raising=False)
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"])]
    assert cli.main([*args, "--context-length", "65"]) == 2
    assert "--context-length 65 is longer than the model's context of 64 tokens" in capsys.readouterr().err
    assert not out.exists() and not stand_in["engines"]
    assert cli.main([*args, "--context-length", "64"]) == 0


# ------------------------------------------------------------------ the plugin: a request's hint runs in the scheduler
@pytest.mark.parametrize("value", ["²", "१२", "9" * 5000, 1e300, 2**40, -3, "-3", float("nan"), float("inf"), [],
                                   {}, True, "12abc", ""])
def test_a_hostile_output_length_hint_is_ignored_never_raised(value):
    """`custom_params.blendserve_output_len` arrives with any request sent to `sglang serve
    --schedule-policy blend` and is read inside the scheduler process, where an exception kills
    the engine: "²" passed str.isdigit and then int() raised, as did 5,000 digits."""
    from blendserve_sgl.sglang_plugin.policy import output_len_hint

    assert output_len_hint(value, "r") is None
    assert output_len_hint(" 42 ", "r") == 42 and output_len_hint(2**31, "r") == 2**31


def test_summary_json_may_not_replace_a_file_that_holds_no_summary(stand_in, tmp_path, capsys):  # noqa: F811
    """`--summary-json` named another run's results file (locked against -o, not against this
    path): the summary replaced its 40 records at the end (a probe). A file holding anything but
    a summary is refused before the run; an earlier summary is replaced whole."""
    src, out, other = _batch(tmp_path), tmp_path / "results.jsonl", tmp_path / "other.jsonl"
    other.write_text('{"custom_id": "a", "response": null, "error": null}\n')
    before = other.read_bytes()
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--summary-json", str(other)]) == 2
    assert "holds something other than a summary" in capsys.readouterr().err
    assert other.read_bytes() == before and not out.exists() and not stand_in["engines"]
    summary = tmp_path / "s.json"
    summary.write_text('{"input": "x", "output": "y", "completed": 0}\n')
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--summary-json", str(summary)]) == 0
    assert json.loads(summary.read_text())["output"] == str(out)


@pytest.mark.parametrize("which", ["input", "output", "errors", "errors-default"])
def test_summary_json_may_not_overwrite_the_runs_other_files(stand_in, tmp_path, capsys, which):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    before = src.read_bytes()
    summary = {"input": src, "output": out, "errors": tmp_path / "e.jsonl",
               "errors-default": tmp_path / "results.errors.jsonl"}[which]
    extra = ["--errors", str(tmp_path / "e.jsonl")] if which == "errors" else []
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--summary-json", str(summary),
                     *extra]) == 2
    assert "which it would overwrite; choose another --summary-json" in capsys.readouterr().err
    assert src.read_bytes() == before and not out.exists() and not stand_in["engines"]


@pytest.mark.parametrize("args", [["--out", "{src}"], ["--plot", "{src}"], ["--out", "{tmp}/p.json", "--plot",
                                                                          "{tmp}/p.json"]])
def test_plan_never_writes_over_its_input_or_its_json(tmp_path, capsys, args):
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    before = src.read_bytes()
    args = [a.replace("{src}", str(src)).replace("{tmp}", str(tmp_path)) for a in args]
    assert plan.main([str(src), "--model", "llama-3.1-8b", *args]) == 2
    assert "which it would overwrite" in capsys.readouterr().err and src.read_bytes() == before


def test_plan_and_simulate_replace_only_their_own_files(tmp_path, capsys, monkeypatch):
    """`plan --out` and `simulate --out` (default simulate.json, and its plot beside it) replaced
    whatever was there: a probe's results file of `blendserve run` became a plan. An existing
    file must be empty or what the command wrote before (a PNG for a plot)."""
    from blendserve_sgl import plan
    from blendserve_sgl.sim import cli as sim_cli

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    trace = tmp_path / "t.csv"
    trace.write_text("ContextTokens,GeneratedTokens\n100,20\n200,30\n")
    results = tmp_path / "results.jsonl"
    results.write_text('{"id": "batch_1", "custom_id": "q0", "response": {"status_code": 200, "body": {}}, "error": null}\n')
    text_png = tmp_path / "text.png"
    text_png.write_text("notes\n")
    before = (results.read_bytes(), text_png.read_bytes())
    base = [str(src), "--model", "llama-3.1-8b", "--workers", "1"]
    sim = ["--workload", str(trace), "--policy", "fcfs", "--model", "llama-3.1-8b"]
    for run, said in (
            (lambda: plan.main([*base, "--no-plot", "--out", str(results)]),
             f"--out {results} holds something other than a plan of `blendserve plan`, which this would replace"),
            (lambda: plan.main([*base, "--plot", str(text_png)]),
             f"--plot {text_png} holds something other than a PNG image"),
            (lambda: sim_cli.main([*sim, "--out", str(results)]),
             f"--out {results} holds something other than the results"),
            (lambda: sim_cli.main([*sim, "--out", str(tmp_path / "text.json")]),
             f"--out {tmp_path / 'text.json'}: its plot {text_png} holds something other than a PNG image")):
        assert run() == 2 and said in capsys.readouterr().err
    assert (results.read_bytes(), text_png.read_bytes()) == before
    monkeypatch.chdir(tmp_path)
    (tmp_path / "simulate.json").write_text("[1, 2]\n")  # not the default's: kept
    assert sim_cli.main(sim) == 2 and "--out simulate.json holds something other" in capsys.readouterr().err
    (tmp_path / "simulate.json").unlink()
    for _ in range(2):  # the second run replaces what the first wrote
        assert sim_cli.main(sim) == 0 and plan.main([*base, "--out", "p.json"]) == 0
    assert {"simulate.json", "simulate.png", "p.json", "p.png"} <= {p.name for p in tmp_path.iterdir()}


# ------------------------------------------------------------------ lines without end
def test_an_endless_line_is_an_error_read_in_pieces_and_the_next_lines_run(tiny, tmp_path, monkeypatch):
    """A file with no newline (or `/dev/zero`) was read as one line into memory. A line over
    MAX_LINE_BYTES is read on in pieces, never held, and is that line's error."""
    import io

    from blendserve_sgl.batch import requests

    monkeypatch.setattr(requests, "MAX_LINE_BYTES", 1000)
    lines = list(requests.iter_lines(io.BytesIO(b"\xef\xbb\xbfa\n" + b"x" * 5000 + b"\r\n\nb\n" + b"y" * 1001)))
    assert [n for n, _ in lines] == [1, 2, 4, 5] and lines[0][1] == b"a\n" and lines[2][1] == b"b\n"
    assert lines[1][1].size == 5000 and lines[3][1].size == 1001
    assert lines[1][1].digest != lines[3][1].digest

    model, tok = tiny
    path = tmp_path / "in.jsonl"
    path.write_bytes((completion("a") + "\n" + "z" * 3000 + "\n" + completion("b") + "\n").encode())
    got = read_store(path, tok, 2048, 4, model_dir=model, workers=0)
    assert [got.store.custom_id(i) for i in range(len(got.store))] == ["a", "b"]
    assert [e.message for e in got.errors] == ["in.jsonl line 2: 3,000 bytes, longer than any request can be (0 MiB); "
                                               "is the file one JSON object per line?"]
    assert [e.message for e in read_requests(path) if isinstance(e, LineError)] == [got.errors[0].message]


def test_dash_output_is_standard_output_not_a_file_named_dash(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "_main", lambda args: seen.append(args.output) or 0)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["in.jsonl", "-o", "-"]) == 0
    assert seen == ["/dev/stdout"] and not (tmp_path / "-").exists()


@pytest.mark.parametrize("record", [
    {"custom_id": [1], "response": {"status_code": 200, "body": {}}, "error": None},
    {"custom_id": "q0", "response": "x", "error": None},
    {"custom_id": "q0", "response": None, "error": "boom"},
    {"custom_id": None, "response": None, "error": {"message": "no line"}},
    {"custom_id": "q0", "response": {"status_code": 200, "body": "x"}, "error": None},
    {"custom_id": "q0", "response": {"status_code": 200, "body": {"usage": {"prompt_tokens": "abc"}}}, "error": None},
    {"custom_id": "q0", "response": {"status_code": 200, "body": {"usage": [1]}}, "error": None},
])
def test_an_edited_results_record_of_the_wrong_shape_is_named_not_a_crash(stand_in, tmp_path, capsys,  # noqa: F811
                                                                          record):
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    out.write_text(json.dumps(record) + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert "results.jsonl line 1 is not a result record of `blendserve run`" in capsys.readouterr().err
    assert out.read_text() == json.dumps(record) + "\n"


def test_more_dp_ranks_than_cores_fail_before_reading(stand_in, tmp_path, capsys):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    ranks = len(os.sched_getaffinity(0)) + 1
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--dp", str(ranks)]) == 2
    assert f"--dp {ranks} on CPU needs at least {ranks} CPU cores" in capsys.readouterr().err
    assert not out.exists() and not stand_in["engines"]


def test_generate_sample_refuses_an_input_it_cannot_read_twice(stand_in, tmp_path, capsys):  # noqa: F811
    from blendserve_sgl import plan

    assert plan.main(["-", "--model", str(stand_in["model"]), "--generate-sample", "2"]) == 2
    assert "--generate-sample reads - a second time for its sample: pass a regular file" in capsys.readouterr().err


def test_a_results_file_passed_as_input_says_so(stand_in, tmp_path, capsys):  # noqa: F811
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    first = out.read_text().splitlines()[0]
    err = parse_line(first, 1, "results.jsonl")
    assert isinstance(err, LineError) and 'this is a result record (it has "response"), not a request' in err.message
    # the whole file as the input: refused at once (it ran to exit 0, an error record per line; a probe)
    again = tmp_path / "again.jsonl"
    assert cli.main([str(out), "-o", str(again), "--model", str(stand_in["model"])]) == 2
    assert "holds result or error records (its first line has \"response\" and no \"body\")" in \
        capsys.readouterr().err
    assert not again.exists()


# ------------------------------------------------------------------ the real engine (slow)
@pytest.mark.engine
def test_hostile_values_on_the_real_engine_end_in_one_record_each(tiny_llama, tmp_path):
    """Values SGLang accepts but its scheduler could not hold (top_k 10**20 killed the engine and
    every request with it), odd custom_ids, NUL and emoji stops, among bad lines: exit 0, one
    record per line, every valid line answered."""
    from test_batch_e2e import blendserve_run, records

    rows = [completion("topk", "count: one two", top_k=10**20, max_tokens=3),
            completion("seed", "count: one two", seed=2**63 - 1, temperature=1.0, max_tokens=3),
            completion("stops", "a\u0000b", stop=["\u0000", "😀"], max_tokens=3),
            completion("ids", [0, 1, 2], max_tokens=2),
            completion("line\nbreak 日本語🎉", " ", max_tokens=2),
            chat("chat", "hi", top_k=2**31, max_tokens=2, ignore_eos=True),
            completion("bigseed", "x", seed=2**63), '{"custom_id": "cut", "method": "POST"',
            completion("huge", "x", max_tokens=10**30), "[1, 2]"]
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text("\n".join(rows) + "\n")
    blendserve_run([str(src), "-o", str(out), "--model", tiny_llama, "--quiet"], tmp_path / "log.txt", timeout=600)
    recs = records(out)
    assert len(recs) == len(rows)
    ok = {r["custom_id"] for r in recs if r["response"]["status_code"] == 200}
    assert ok == {"topk", "seed", "stops", "ids", "line\nbreak 日本語🎉", "chat"}
    assert all(r["response"]["body"]["usage"]["completion_tokens"] >= 1 for r in recs if r["custom_id"] in ok)


@pytest.mark.engine
def test_weights_that_do_not_load_are_exit_1_with_one_message(tiny_llama, tmp_path):
    """The scheduler dies loading the weights and signals this process: SGLang's handler killed
    it (exit 137, a traceback); now the engine's processes are stopped and the run says so."""
    import shutil
    import subprocess

    from test_batch_e2e import kill_group, start_run

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for weights in model.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    src, out, log = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "log.txt"
    src.write_text(completion("a") + "\n{oops\n")
    proc = start_run([str(src), "-o", str(out), "--model", str(model), "--quiet"], log)
    try:
        proc.wait(timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("the run did not end")
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 1, text[-3000:]
    assert "SGLang did not start (one of its processes failed: its error is above)" in text
    assert [json.loads(x)["response"]["status_code"] for x in out.read_text().splitlines()] == [400]


@pytest.mark.parametrize("policy, var, value, backend", [("blend", "BLENDSERVE_KEEP_SHARING", "abc", None),
                                                         ("fcfs", "BLENDSERVE_CASCADE_LEVELS", "0", "cascade")])
def test_a_bad_variable_stops_run_before_the_input_is_read(stand_in, tmp_path, capsys, monkeypatch,  # noqa: F811
                                                           policy, var, value, backend):
    """A bad BLENDSERVE_* variable started the engine (20 s on CPU, a model load on a GPU), then
    ended as "SGLang did not start ... check --model, --policy and --engine-arg", exit 1. Now one
    line naming the variable, exit 2, nothing read or written; a policy that does not read the
    variable leaves it alone."""
    monkeypatch.setenv(var, value)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    argv = [str(src), "-o", str(out), "--model", str(stand_in["model"]), "--policy", policy,
            *(["--attention-backend", backend] if backend else [])]
    assert cli.main(argv) == 2
    assert f"{var}={value!r}" in capsys.readouterr().err and not stand_in["engines"] and not out.exists()
    if policy == "blend":
        assert cli.main([*argv[:-2], "--policy", "fcfs"]) == 0  # fcfs does not read it


def test_sigterm_while_reading_stops_like_ctrl_c(stand_in, tmp_path, capsys, monkeypatch):  # noqa: F811
    """SIGTERM stopped the run with exit 130 only once the engine ran; while the input was read
    it killed the process (exit 143, no message)."""
    import signal

    from blendserve_sgl.batch import cli as batch_cli

    real = batch_cli.read_store

    def reading(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **kw)

    monkeypatch.setattr(batch_cli, "read_store", reading)
    seen = []
    recorder = lambda *a: seen.append(a)  # noqa: E731 (stands in for the default action, which kills)
    before = signal.signal(signal.SIGTERM, recorder)
    try:
        src, out = _batch(tmp_path), tmp_path / "results.jsonl"
        assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 130
        assert signal.getsignal(signal.SIGTERM) is recorder and not seen
    finally:
        signal.signal(signal.SIGTERM, before)
    assert "interrupted; nothing was lost" in capsys.readouterr().err and not stand_in["engines"]


# ------------------------------------------------------------------ the plugin: prompts the forward pass cannot take
class _Req:
    """What the enqueue hook reads of SGLang's `Req`, recording `set_finish_with_abort`."""

    def __init__(self, ids, output_ids=(), multimodal=None):
        self.rid, self.origin_input_ids, self.output_ids = "r", ids, list(output_ids)
        self.multimodal_inputs, self.to_finish, self.aborted = multimodal, None, None

    def finished(self):
        return False

    def set_finish_with_abort(self, message):
        self.aborted, self.origin_input_ids = message, [0]


@pytest.mark.parametrize("ids,fragment", [
    ([], "the prompt has no tokens"),
    ([5, 512], "token id 512, outside the model's vocabulary [0, 512)"),
    ([-1, 5], "token id -1, outside the model's vocabulary [0, 512)"),
    ([5, 2**63 - 1], "token id 9223372036854775807"),
    ([0, 511], None), ([7], None),
])
def test_a_prompt_the_forward_pass_cannot_take_ends_alone_before_the_plan(ids, fragment):
    """`sglang serve --schedule-policy blend` died on `{"text": ""}` (a tokenizer that adds no BOS
    gives no tokens) and on `input_ids` beyond the vocabulary: SGLang checks neither, and the
    forward pass raised in the scheduler, ending the server and every request in it. Now such a
    request ends as its own 400 error, with a one-token stand-in prompt the policy tracks."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req(list(ids))
    seen = []
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                            policy=SimpleNamespace(on_arrival=lambda r: seen.append(list(r.origin_input_ids))))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted
    assert seen == [[0] if fragment else list(ids)]


@pytest.mark.parametrize("top, start, fragment", [
    (1_000_000, -1, "top_logprobs_num 1000000 is more than the model's vocabulary of 512 tokens"),
    (5, -5, "logprob_start_len -5 is negative; pass -1 (the output only) or a prompt position from 0 to 1"),
    (512, -1, None), (0, 0, None), (5, -1, None),
])
def test_logprob_requests_that_would_end_the_scheduler_end_alone(top, start, fragment):
    """`top_logprobs_num` 1,000,000 ("selected index k out of range") and `logprob_start_len` -5
    on a cached prompt (an assertion) raised in the scheduler and ended the server (stock SGLang
    too, with every policy); a blend server ends such a request alone, as a 400."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req([5, 7])
    req.return_logprob, req.logprob, req.logprob_start_len = True, SimpleNamespace(top_logprobs_num=top), start
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                            policy=SimpleNamespace(on_arrival=lambda r: None))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted
    req = _Req([5, 7])  # without return_logprob the fields are not read
    req.return_logprob, req.logprob, req.logprob_start_len = False, SimpleNamespace(top_logprobs_num=top), start
    _after_enqueue(None, SimpleNamespace(**{**vars(sched), "waiting_queue": [req]}), req)
    assert req.aborted is None


@pytest.mark.parametrize("top_k, fragment", [
    (2 ** 31, "top_k 2147483648 is beyond what the sampler holds (2,147,483,647)"), (2 ** 70, "top_k 1180591620"),
    (2 ** 31 - 1, None), (1 << 30, None), (5, None),
])
def test_a_top_k_past_int32_ends_alone(top_k, fragment):
    """`top_k` 2^31 on `/generate` ended the server with every request in it ("value cannot be
    converted to type int32 without overflow" in the sampling batch; stock SGLang too; a server
    probe). A blend server ends such a request alone, as a 400."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req([5, 7])
    req.sampling_params = SimpleNamespace(repetition_penalty=1.0, top_k=top_k)
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                            policy=SimpleNamespace(on_arrival=lambda r: None))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted


@pytest.mark.parametrize("penalty, fragment", [
    (1e-40, "repetition_penalty 1e-40 is below 0.01"), (0.0, "repetition_penalty 0 is below 0.01"),
    (0.01, None), (1.0, None), (2.0, None),
])
def test_a_repetition_penalty_that_would_stop_the_sampler_ends_alone(penalty, fragment):
    """A repetition penalty of 1e-40 (SGLang takes [0, 2]) with top_k divides a positive logit
    into infinity; the sampler raised on the NaN probabilities in the scheduler and ended the
    engine with every request in it (found through `blendserve run`). A blend server ends such a
    request alone, as a 400."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req([5, 7])
    req.sampling_params = SimpleNamespace(repetition_penalty=penalty, top_k=5)
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                            policy=SimpleNamespace(on_arrival=lambda r: None))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted


@pytest.mark.parametrize("min_new, stops, fragment", [
    (2, {100000}, "stop_token_ids holds 100000, outside the model's vocabulary [0, 512)"),
    (2, {-1}, "stop_token_ids holds -1"),
    (0, {100000}, None),  # no min_new_tokens: SGLang never indexes with it
    (2, {5, 511}, None),
])
def test_min_new_tokens_with_a_stop_id_past_the_vocabulary_ends_alone(min_new, stops, fragment):
    """`min_new_tokens` 2 with `stop_token_ids` [100000] on a 512-token vocabulary raised "index
    100000 is out of bounds" in the scheduler's penalizer and ended the server (stock SGLang too);
    a blend server ends such a request alone, as a 400 (found by a server probe)."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req([5, 7])
    req.sampling_params = SimpleNamespace(repetition_penalty=1.0, min_new_tokens=min_new, stop_token_ids=stops)
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                            policy=SimpleNamespace(on_arrival=lambda r: None))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted

@pytest.mark.parametrize("rows, fragment", [
    ([[0.1] * 7] * 3, "input_embeds has rows of 7 values; this model's embeddings have 16"),
    ([[0.1] * 16, [0.2] * 15], "rows of 15 values"),
    ([[0.1] * 16] * 2, None), (None, None),
])
def test_input_embeds_of_another_width_end_alone(rows, fragment):
    """Rows of 7 values on a model of hidden size 256 (`/generate` with `input_embeds`, which
    `sglang.Engine.generate` does not take) raised in the forward pass and ended the server, found
    by a server probe; a blend server ends such a request alone, as a 400 (checked by hand on a
    `launch_server --disable-radix-cache`: the 400, then the next request answered)."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    req = _Req([5, 7])
    req.input_embeds = rows
    sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req],
                            model_config=SimpleNamespace(vocab_size=512, hidden_size=16),
                            policy=SimpleNamespace(on_arrival=lambda r: None))
    _after_enqueue(None, sched, req)
    assert (req.aborted is None) if fragment is None else (fragment in req.aborted), req.aborted
    assert (req.input_embeds is None) if fragment else (req.input_embeds == rows)  # the stand-in runs its token

def test_prompts_past_the_vocabulary_check_only_what_it_can_judge():
    """Multimodal placeholders lie beyond the vocabulary by design; a retracted request (output so
    far) or one already ending is SGLang's; with another policy the hook steps aside."""
    from types import SimpleNamespace

    from blendserve_sgl.sglang_plugin import _after_enqueue

    reqs = [_Req([5, 10**9], multimodal=object()), _Req([5, 600], output_ids=[3]), _Req([])]
    reqs[2].to_finish = "aborted already"
    for req in reqs:
        sched = SimpleNamespace(schedule_policy="blend", waiting_queue=[req], model_config=SimpleNamespace(vocab_size=512),
                                policy=SimpleNamespace(on_arrival=lambda r: None))
        _after_enqueue(None, sched, req)
        assert req.aborted is None
    req = _Req([])
    _after_enqueue(None, SimpleNamespace(schedule_policy="fcfs", waiting_queue=[req], policy=None), req)
    assert req.aborted is None


_SERVER_SCENARIO = """
import json, sys
import sglang


def main():
    engine = sglang.Engine(model_path=sys.argv[1], device="cpu", attention_backend="torch_native", schedule_policy="blend",
                           max_total_tokens=4096, random_seed=0, log_level="error")
    out = {}
    try:
        for name, kw, sp in [("empty", {"prompt": ""}, {}), ("oov", {"input_ids": [5, 100000]}, {}),
                             ("neg", {"input_ids": [-1, 5]}, {}),
                             ("penalty", {"prompt": "count: one two"},
                              {"repetition_penalty": 1e-40, "top_k": 5, "temperature": 1.0}),
                             ("min_new", {"prompt": "count: one two"}, {"min_new_tokens": 2, "stop_token_ids": [100000]}),
                             ("top_k", {"prompt": "count: one two"}, {"top_k": 2 ** 31, "temperature": 1.0}),
                             ("good", {"prompt": "count: one two"}, {})]:
            try:
                res = engine.generate(**kw, sampling_params={"max_new_tokens": 3, "temperature": 0, **sp})
                out[name] = res["meta_info"]["finish_reason"]
            except Exception as exc:  # noqa: BLE001
                out[name] = {"raised": str(exc)}
    finally:
        engine.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
"""


@pytest.mark.engine
def test_unrunnable_prompts_on_the_real_engine_fail_alone_and_the_engine_stays_up(tiny_llama, tmp_path):
    """On the real engine (blend policy): an empty prompt, ids outside the vocabulary, a repetition
    penalty of 1e-40 with top_k, min_new_tokens with a stop id past the vocabulary and a top_k past
    int32 (each of which ends a stock server) each fail with their own message, and the next
    request still generates."""
    import subprocess
    import sys

    from blendserve_sgl.harness import cpu_engine_env, kill_group, start

    script = tmp_path / "scenario.py"
    script.write_text(_SERVER_SCENARIO)
    proc = start([sys.executable, str(script), tiny_llama], env=cpu_engine_env(), stdout=subprocess.PIPE, text=True)
    try:
        text, _ = proc.communicate(timeout=600)
    finally:
        kill_group(proc)
    line = next((x for x in text.splitlines() if x.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, text[-3000:]
    res = json.loads(line[len("RESULT "):])
    assert "the prompt has no tokens" in json.dumps(res["empty"]), res
    assert "token id 100000, outside the model's vocabulary" in json.dumps(res["oov"]), res
    assert "token id -1, outside" in json.dumps(res["neg"]), res
    assert "repetition_penalty 1e-40 is below 0.01" in json.dumps(res["penalty"]), res
    assert "stop_token_ids holds 100000, outside the model's vocabulary" in json.dumps(res["min_new"]), res
    assert "top_k 2147483648 is beyond what the sampler holds" in json.dumps(res["top_k"]), res
    assert res["good"].get("type") == "length", res


@pytest.mark.parametrize("var", ["BLENDSERVE_STATS_PATH", "BLENDSERVE_TRACE_PATH", "BLENDSERVE_CASCADE_STATS_PATH"])
def test_a_stats_or_trace_path_the_scheduler_cannot_write_stops_the_launch(tmp_path, var):
    """The scheduler writes these files (trace: after the first prefill step; stats: every 32
    steps): a folder, or a file in a missing folder, raised there and ended the server mid-run.
    Now the launching process names the variable before any model loads."""
    from blendserve_sgl.sglang_plugin.cascade_backend import CascadeSettings
    from blendserve_sgl.sglang_plugin.settings import BlendSettings

    load = CascadeSettings.from_env if "CASCADE" in var else BlendSettings.load
    for value, fragment in [(str(tmp_path), "is a directory; pass the name of a file in it"),
                            (str(tmp_path / "missing" / "x.json"), f"the folder {tmp_path / 'missing'} does not exist"),
                            *([("/proc/x.json", "cannot write in /proc")] if os.path.isdir("/proc/self") else [])]:
        with pytest.raises(ValueError) as exc:
            load({var: value})
        assert f"{var}={value!r}: {fragment}" in str(exc.value), str(exc.value)
    ok = load({var: str(tmp_path / "x.json")})
    assert getattr(ok, "trace_path" if "TRACE" in var else "stats_path") == str(tmp_path / "x.json")


# ------------------------------------------------------------------ the input edited between runs
def test_a_line_removed_after_its_result_was_written_is_named_as_such(stand_in, tmp_path, capsys):  # noqa: F811
    """Interrupted, then a finished line removed from the input: the rerun said the results file
    was "the output of another input" and offered only --overwrite. Now it says the custom_id left
    this input beside the ones still in it; nothing is written; the line put back, the rerun ends."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    lines = src.read_text().splitlines()
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"])]
    stand_in["interrupt_after"] = 3
    assert cli.main(args) == 130
    stand_in["interrupt_after"] = None
    gone = next(r["custom_id"] for r in map(json.loads, out.read_text().splitlines())
                if (r["custom_id"] or "").startswith("q"))
    before = out.read_bytes()
    src.write_text("\n".join(x for x in lines if f'"custom_id": "{gone}"' not in x) + "\n")
    capsys.readouterr()
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"holds 1 results of custom_ids that are no longer in {src} (e.g. {gone!r}), beside " in err, err
    assert "lines removed, or their custom_id edited" in err and "another input" not in err
    assert out.read_bytes() == before and len(stand_in["engines"]) == 1
    src.write_text("\n".join(lines) + "\n")
    assert cli.main(args) == 0
    keys = [str(record_key(json.loads(x))) for x in out.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len([x for x in lines if x.strip()])


@pytest.mark.parametrize("content,fragment", [
    (__import__("gzip").compress(b"TIMESTAMP,ContextTokens,GeneratedTokens\nt,10,2\n"),
     "line 1: not UTF-8 text (byte b'\\x8b'); a CSV file here is plain text: decompress it"),
    ("TIMESTAMP,ContextTokens,GeneratedTokens\nt\xe9,10,2\n".encode("latin-1"), "not UTF-8 text (byte b'\\xe9'"),
    (("TIMESTAMP,ContextTokens,GeneratedTokens\n" + "t" * (64 * 2**20 + 1) + ",10,2\n").encode(),
     "line 2: a field over 64 MiB, the most this reader takes"),
    (b"TIMESTAMP,ContextTokens,GeneratedTokens\n1700000000,5,374,44\n",
     "line 2: 4 cells under a header of 3 columns, so the columns would shift; a value holding a comma"),
    (None, "is a directory; a CSV file belongs there"),
])
def test_a_trace_that_is_not_csv_text_is_one_error_naming_the_file(tmp_path, monkeypatch, capsys, content, fragment):
    """A gzip-compressed trace under its .csv name, Latin-1 bytes, a cell over the reader's field
    limit, a row with more cells than the header (a comma in a value: each count read from the
    wrong column, silently, before), a folder: each raised UnicodeDecodeError, csv.Error or
    IsADirectoryError without the file's name (a traceback from `blendserve simulate`). The same
    reader serves the MMLU files."""
    from blendserve_sgl.sim import cli as sim_cli
    from blendserve_sgl.workloads import data

    _trace(tmp_path, monkeypatch, "")
    path = tmp_path / AZURE
    if content is None:
        path.unlink()
        path.mkdir()
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as exc:
        data.load_azure("code")
    assert str(path) in str(exc.value) and fragment in str(exc.value), str(exc.value)
    for part in ("dev", "test"):
        (tmp_path / "mmlu" / part).mkdir(parents=True)
    (tmp_path / "mmlu" / "dev" / "x_dev.csv").write_text("q,a,b,c,d,A\n")
    mmlu_test = tmp_path / "mmlu" / "test" / "x_test.csv"
    if content is None:
        mmlu_test.mkdir()
    else:
        mmlu_test.write_bytes(content)
    with pytest.raises(ValueError, match=r"x_test\.csv"):
        data.load_mmlu()
    if mmlu_test.is_dir():
        mmlu_test.rmdir()
    mmlu_test.write_text("q,a,b,c,d\n")
    assert sim_cli.main(["--workload", "mixed", "--requests", "50", "--policy", "fcfs"]) != 0
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err, err


def _sharegpt_item(i):
    return {"id": f"g{i}", "score": 12.5, "ok": True,
            "conversations": [{"from": "human", "value": f"hi \u00e9 \\ {i}"}, {"from": "gpt", "value": "hello"}]}


@pytest.mark.parametrize("text,fragment", [
    ("[" + json.dumps(_sharegpt_item(0)) + ',\n {"id": "b", "conversations": [}, ' + json.dumps(_sharegpt_item(2)) + "]",
     "sg.json line 2 column 32: invalid JSON (Expecting value) before the end of the file"),
    ("[" + json.dumps(_sharegpt_item(0)) + " stray words " + json.dumps(_sharegpt_item(2)) + "]",
     "sg.json line 1 column "),
    ("[" + json.dumps(_sharegpt_item(0)) + ",\n" + "[" * 100_000 + "]" * 100_000 + "]",
     "sg.json line 2: a record nested too deeply to read"),
])
def test_invalid_json_inside_a_sharegpt_file_is_named_not_a_silent_end(tmp_path, text, fragment):
    """A broken record in the middle of the file ended the reading there as if the file were torn:
    every later conversation was dropped without a word; records nested 100,000 deep raised
    RecursionError. Now each is a ValueError naming the line."""
    from blendserve_sgl.workloads.conversation import iter_conversations

    path = tmp_path / "sg.json"
    path.write_text(text)
    with pytest.raises(ValueError) as exc:
        list(iter_conversations(path))
    assert fragment in str(exc.value), str(exc.value)


def test_a_sharegpt_file_cut_anywhere_reads_its_whole_conversations(tmp_path):
    """The packaged file ends inside a record: a file cut at any byte still reads, and yields
    exactly the conversations that were whole before the cut."""
    from blendserve_sgl.workloads.conversation import iter_conversations

    full = json.dumps([_sharegpt_item(i) for i in range(3)], indent=2, ensure_ascii=True)
    path = tmp_path / "sg.json"
    for cut in range(1, len(full) + 1):
        path.write_text(full[:cut])
        got = [cid for cid, _ in iter_conversations(path)]
        assert got == [f"g{i}" for i in range(len(got))], (cut, got)
        if cut >= len(full) - 1:
            assert got == ["g0", "g1", "g2"]


def test_a_policy_named_twice_is_planned_once(tmp_path, capsys):
    """`--policies blend,blend` raised "min() arg is an empty sequence" (a traceback): blend was
    compared with the other policies, and there were none."""
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text("".join(completion(f"r{i}", "count " * (i % 7 + 1), max_tokens=8) + "\n" for i in range(20)))
    base = [str(src), "--model", "llama-3.1-8b", "--hardware", "h100", "--workers", "1", "--json", "--plot", "/dev/null"]
    assert plan.main([*base, "--policies", "blend,blend"]) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["policies"]] == ["blend"]
    assert plan.main([*base, "--policies", "fcfs, blend,fcfs"]) == 0
    assert [r["policy"] for r in json.loads(capsys.readouterr().out)["policies"]] == ["fcfs", "blend"]
    assert plan.main([*base, "--policies", "fcfs,blend,"]) == 2  # an empty entry is named, not skipped
    assert "entry 3 of 3 is empty" in capsys.readouterr().err


@pytest.mark.parametrize("seed", ["-1", "4294967296"])
def test_plan_refuses_a_seed_the_engine_cannot_take(tmp_path, capsys, seed):
    """`plan --generate-sample` starts the engine with --seed: out of NumPy's range it failed there."""
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    with pytest.raises(SystemExit) as exc:
        plan.main([str(src), "--model", "llama-3.1-8b", "--seed", seed])
    assert exc.value.code == 2 and f"argument --seed: {seed} must be" in capsys.readouterr().err


@pytest.mark.parametrize("density,sharing", [(float("nan"), 0.3), (float("inf"), 0.3), (0.0, 0.3), (-1.0, 0.3),
                                             (1.4, 1.0), (1.4, -0.1), (1.4, float("nan"))])
def test_mix_targets_out_of_range_name_the_rule(density, sharing):
    """`simulate --workload mix:nan,0.3` (or inf) failed with numpy's "negative dimensions are not
    allowed"; now the targets' ranges are named before any class is drawn."""
    from blendserve_sgl.core.cost import CostModel
    from blendserve_sgl.workloads.recipes import mix

    with pytest.raises(ValueError, match="the density must be a positive number and the sharing a fraction from 0 "
                                         "to below 1, e.g. mix:1.2,0.25"):
        mix(200, density, sharing, CostModel.from_names("llama-3.1-8b", "a100"))


@pytest.mark.parametrize("packer,fragment", [
    ("gzip", "is gzip-compressed, not JSONL text; decompress it first (`gzip -dk "),
    ("bz2", "is bzip2-compressed, not JSONL text; decompress it first (`bzip2 -dk "),
    ("lzma", "is xz-compressed, not JSONL text; decompress it first (`xz -dk "),
    ("zip", "is a ZIP archive, not JSONL text; extract the requests file from it"),
    ("utf-16", "is UTF-16 text, not UTF-8 (its first bytes hold NUL: if it is UTF-8 after all, remove them); save it "
               "as UTF-8 (`iconv -f UTF-16 -t UTF-8 "),
    ("utf-16-le", "is UTF-16 text, not UTF-8"),  # no byte-order mark: the NUL bytes beside ASCII
    ("utf-32", "is UTF-32 text, not UTF-8"),
])
def test_a_compressed_requests_file_is_named_before_any_line_is_read(stand_in, tmp_path, capsys, packer, fragment):  # noqa: F811
    """A gzip-compressed batch file became a few "not UTF-8 text" error records and a run of
    nothing (`plan`: "no valid request"), a UTF-16 one records that did not match its lines; now
    both commands say what the file is."""
    import importlib
    import zipfile

    from blendserve_sgl import plan

    text = _batch(tmp_path).read_bytes()
    src, out = tmp_path / "requests.jsonl.x", tmp_path / "results.jsonl"
    if packer == "zip":
        with zipfile.ZipFile(src, "w") as z:
            z.writestr("requests.jsonl", text)
    elif packer.startswith("utf"):  # two requests became three "invalid JSON" records
        src.write_bytes(text.decode().encode(packer))
    else:
        src.write_bytes(importlib.import_module(packer).compress(text))
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert fragment in capsys.readouterr().err and not out.exists() and not stand_in["engines"]
    assert plan.main([str(src), "--model", "llama-3.1-8b", "--plot", "/dev/null"]) == 2
    assert fragment in capsys.readouterr().err


@pytest.mark.parametrize("how,fragment", [
    ("file", "model config {m} is not JSON (Expecting value: line 1 column 1 (char 0)); pass a model directory"),
    ("dir", "{m}/config.json: cannot read it as JSON (Expecting value"),
    ("tokenizer", "--tokenizer {m}: no such directory; pass the folder holding the model's tokenizer files"),
])
def test_plan_names_a_model_config_that_is_not_json_and_a_missing_tokenizer(tmp_path, capsys, how, fragment):
    """`plan --model bad.json` (or a folder whose config.json is not JSON) said only "Expecting
    value: line 1 column 1 (char 0)"; a missing --tokenizer folder, Hugging Face's repo-id rules."""
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    m = tmp_path / "m"
    if how == "file":
        m = tmp_path / "config.json"
        m.write_text("nonsense")
        args = ["--model", str(m)]
    elif how == "dir":
        m.mkdir()
        (m / "config.json").write_text("nonsense")
        args = ["--model", str(m)]
    else:
        args = ["--model", "llama-3.1-8b", "--tokenizer", str(m)]
    assert plan.main([str(src), *args, "--plot", "/dev/null"]) == 2
    err = capsys.readouterr().err
    assert fragment.format(m=m) in err and "Traceback" not in err, err


def test_results_that_cannot_be_written_end_the_run_once_without_stray_tracebacks(caplog):
    """A full disk under the real engine: several requests finished in one step, each write
    failed, the first error stopped the run and every other one was logged by asyncio as "Task
    exception was never retrieved", a traceback each, after the run's one message."""
    import asyncio
    import gc
    import logging
    from types import SimpleNamespace

    from blendserve_sgl.batch import runner
    from blendserve_sgl.batch.results import ResultsError

    class Instant:
        loop = asyncio.new_event_loop()

        async def async_generate(self, input_ids, sampling_params):
            return {"meta_info": {"finish_reason": {"type": "length"}}}

    def full(p, out):
        raise ResultsError("cannot write results.jsonl: No space left on device")

    engine = Instant()
    items = [SimpleNamespace(input_ids=[1], sampling_params={}) for _ in range(8)]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        with pytest.raises(ResultsError, match="No space left on device"):
            runner.generate(engine, items, full, lambda p, exc: None, window=4)
        gc.collect()
    engine.loop.close()
    assert "never retrieved" not in caplog.text, caplog.text


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder where no file can be created)")
def test_a_summary_that_cannot_be_written_is_refused_before_the_run(stand_in, tmp_path, capsys):  # noqa: F811
    """`--summary-json /proc/s.json` passed the checks before the run (the folder exists) and
    failed only at the end, with a FileNotFoundError traceback; a folder that takes no new file
    is now refused before the engine starts, with one message."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    code = cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--summary-json", "/proc/s.json"])
    err = capsys.readouterr().err
    assert code == 2 and "--summary-json /proc/s.json: cannot write in /proc" in err and "Traceback" not in err, err
    assert not stand_in["engines"] and not out.exists()


@pytest.mark.parametrize("levels,ok", [("64", True), ("65", False), ("1000000", False), ("1", True)])
def test_cascade_levels_beyond_any_prefix_tree_are_refused_at_launch(levels, ok):
    """The cascade plan holds every level at every decode step, empty or not: 10**6 levels took
    29 s a step on 8 requests and 10**9 exhausted the scheduler's memory mid-run."""
    from blendserve_sgl.sglang_plugin.cascade_backend import CascadeSettings

    env = {"BLENDSERVE_CASCADE_LEVELS": levels}
    if ok:
        assert CascadeSettings.from_env(env).levels == int(levels)
    else:
        with pytest.raises(ValueError, match=rf"BLENDSERVE_CASCADE_LEVELS='{levels}': must be in \[1, 64\]"):
            CascadeSettings.from_env(env)


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc (a folder where no file can be created)")
@pytest.mark.parametrize("flag", ["--plot", "--out"])
def test_plan_files_that_cannot_be_written_are_one_message_before_the_simulation(tmp_path, capsys, flag):
    """`plan --out /proc/p.json` passed the checks before the simulation (the folder exists) and
    ended in a traceback when written; now refused before it."""
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    other = ["--plot", "/dev/null"] if flag == "--out" else []
    assert plan.main([str(src), "--model", "llama-3.1-8b", "--workers", "1", flag, "/proc/p.png", *other]) == 2
    cap = capsys.readouterr()
    assert f"{flag} /proc/p.png: cannot write in /proc (No such file or directory); choose another path" in cap.err
    assert "blend" not in cap.out  # no policy was simulated


@pytest.mark.parametrize("name", ["p.txt", "p.PNG.x"])
def test_a_plot_type_matplotlib_cannot_write_is_named_before_the_simulation(tmp_path, capsys, name):
    """`plan --plot p.txt` simulated every policy, then matplotlib raised ValueError: a traceback."""
    from blendserve_sgl import plan

    src = tmp_path / "in.jsonl"
    src.write_text(completion("a") + "\n")
    code = plan.main([str(src), "--model", "llama-3.1-8b", "--workers", "1", "--plot", str(tmp_path / name)])
    err = capsys.readouterr().err
    suffix = name.rsplit(".", 1)[1]
    assert code == 2 and f"--plot {tmp_path / name}: matplotlib cannot write .{suffix} files; name a .png" in err, err


def test_stats_and_trace_files_that_fail_mid_run_stop_themselves_not_the_scheduler(tmp_path, caplog):
    """Checked at launch, the folder of BLENDSERVE_STATS_PATH / BLENDSERVE_TRACE_PATH can still
    vanish (or the disk fill) while the server runs: the write raised inside the scheduler and
    ended it. Now each file stops with a warning and the steps go on."""
    import logging
    from types import SimpleNamespace

    from test_plugin import FakeReq, FakeScheduler, _make_policy

    folder = tmp_path / "gone"
    folder.mkdir()
    sched = FakeScheduler()
    pol = _make_policy(sched, stats_path=str(folder / "stats.json"), trace_path=str(folder / "trace.jsonl"))
    folder.rmdir()
    with caplog.at_level(logging.WARNING, logger="blendserve_sgl.sglang_plugin.policy"):
        for step in range(40):
            r = FakeReq(f"r{step}", [1] * 20 + [step + 5], 4)
            sched.waiting_queue.append(r)
            pol.on_arrival(r)
            pol.calc_priority(sched.waiting_queue, SimpleNamespace(reqs=[]))
            sched.waiting_queue = []
            pol.end_step()
    assert pol.steps == 40 and pol.stats_path is None and pol.trace_path is None
    assert "cannot write the blend policy's counters to" in caplog.text and "the step trace stops here" in caplog.text


def test_cascade_counters_that_fail_mid_run_stop_themselves_not_the_decode_step(tmp_path, caplog):
    import logging

    import numpy as np

    from blendserve_sgl.sglang_plugin.cascade_backend import _StatsWriter

    folder = tmp_path / "gone"
    folder.mkdir()
    writer = _StatsWriter(str(folder / "cascade.json"))
    writer.record(None, np.array([3, 4]), np.array([3, 4]), 0.0)
    assert (folder / "cascade.json").is_file()
    (folder / "cascade.json").unlink()
    folder.rmdir()
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            writer.record(None, np.array([3, 4]), np.array([3, 4]), 0.0)
    assert writer.path is None and writer.stats.decode_steps == 4
    assert caplog.text.count("cannot write the cascade counters to") == 1


@pytest.mark.parametrize("args", [
    ["--kv-gb", "0.17"],  # 1,300 tokens: the prompt and output fit, the admission's reservation (4 x 100) does not
    ["--kv-gb", "0.144310272", "--known-lengths"],  # 1,101 tokens: prompt + output = 1,100, the admission needs 1,102
])
def test_simulate_refuses_what_the_admission_can_never_take_instead_of_stalling(tmp_path, capsys, args):
    """The check passed a request whose prompt + output fit the pool, but SGLang's admission also
    reserves min(max_new_tokens, clip) + 1 beside the prompt (max_new_tokens 4 x the longest output
    without known lengths): the run then stalled with a traceback (a probe)."""
    from blendserve_sgl.sim import cli as sim_cli

    trace = tmp_path / "two.csv"
    trace.write_text("input_tokens,output_tokens\n1000,100\n1000,100\n")
    code = sim_cli.main(["--workload", str(trace), "--policy", "fcfs", "--hardware", "a100", *args,
                         "--out", str(tmp_path / "sim.json")])
    err = capsys.readouterr().err
    assert code == 2 and "SGLang's admission reserves" in err and "pass a larger --kv-gb" in err, err
    assert "Traceback" not in err and not (tmp_path / "sim.json").exists()
    ok = sim_cli.main(["--workload", str(trace), "--policy", "fcfs", "--hardware", "a100", "--kv-gb", "0.25",
                       "--out", str(tmp_path / "sim.json")])
    assert ok == 0  # 1,900 tokens: room for both
