"""Hostile inputs to `blendserve run`, `blendserve plan` and the workload loaders: each test is
one input that once crashed a run, lost a result or named the wrong cause, and what it must do
now (an error naming the input and the fix; the valid lines still run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from blendserve_sgl.batch.prompts import prepare
from blendserve_sgl.batch.reader import read_store
from blendserve_sgl.batch.requests import BatchRequest, LineError, parse_line, read_requests


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


def plain(path: Path, tok, ctx: int, default: int = 16) -> list:
    """The plain path (read_requests + prepare, one line at a time), digests as the command keeps them."""
    out = []
    for item in read_requests(path):
        p = item if isinstance(item, LineError) else prepare(item, tok, ctx, default, path.name)
        out.append(dataclasses.replace(p, digest=item.digest) if isinstance(p, LineError) else p)
    return out


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


def test_invalid_json_message_names_the_problem_once():
    err = parse_line(b'{"custom_id": "a\x01"}', 3, "in.jsonl")
    assert isinstance(err, LineError)
    assert "invalid JSON (Invalid control character at column 17)" in err.message, err.message


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
    want = plain(path, tok, 2048)
    assert [e.message for e in got.errors] == [w.message for w in want if isinstance(w, LineError)]
    assert "of the model's 2048-token context" in got.errors[0].message
    assert not got.whole_text_fallback
    assert [got.store.prepared(i).input_ids for i in range(len(got.store))] == \
        [w.input_ids for w in want if not isinstance(w, LineError)]
