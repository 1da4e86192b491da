"""Large batches in `blendserve run`: the compact store, the streaming reader, the global plan,
the bounded feed, and (marked `engine`) the window feed against all-at-once on the real engine."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blendserve_sgl.batch import cli, runner
from blendserve_sgl.batch.feed import FACTOR, MIN_WINDOW, pending, window_size
from blendserve_sgl.batch.order import build_tree, check_plan, cost_for, dual_order, plan
from blendserve_sgl.batch.prompts import Prepared
from blendserve_sgl.batch.reader import read_store
from blendserve_sgl.batch.requests import BatchRequest, LineError, read_requests
from blendserve_sgl.batch.store import REQUEST_BYTES, TokenStore
from blendserve_sgl.harness import cpu_engine_env

from _helpers import prepared_reference

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny random Llama's directory and its (byte-level BPE, chat-template) tokenizer."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from cpu_smoke import write_tiny_llama
    from transformers import AutoTokenizer

    d = write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    return Path(d), AutoTokenizer.from_pretrained(str(d))


def corpus(path: Path, n: int, seed: int = 0, max_tokens=(1, 8), bad: bool = True) -> Path:
    """Chat requests behind 3 system prompts, some with two few-shot turns; a completion every
    7th; with `bad`, an invalid line, a repeated custom_id and an over-long max_tokens."""
    r = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "theta"]
    systems = [f"You are assistant {k}. " + " ".join(words[:k + 3]) for k in range(3)]
    rows = []
    for i in range(n):
        text = " ".join(r.choice(words) for _ in range(r.randint(2, 25)))
        body = {"max_tokens": r.randint(*max_tokens), "temperature": 0}
        if i % 7 == 6:
            rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                         "body": {**body, "prompt": text}})
            continue
        msgs = [{"role": "system", "content": systems[i % 3]}]
        if i % 2:
            msgs += [{"role": "user", "content": f"example {i % 4}"}, {"role": "assistant", "content": "fine"}]
        msgs.append({"role": "user", "content": text})
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {**body, "messages": msgs}})
    lines = [json.dumps(x) for x in rows]
    if bad:
        lines[5:5] = ['{"custom_id": "broken", ', json.dumps(rows[0]),
                      json.dumps({**rows[1], "custom_id": "long", "body": {**rows[1]["body"], "max_tokens": 10**6}})]
    path.write_text("\n".join(lines) + "\n")
    return path


# ------------------------------------------------------------------ the store
def test_store_byte_count_is_fixed_fields_plus_token_ids():
    """nbytes = REQUEST_BYTES per request + 4 per tail token and per piece reference + the custom
    id, + each distinct piece once (4 per token, 8 per offset), + the leading zero offsets."""
    s = TokenStore()
    s.add_piece(11, [1, 2, 3, 4, 5])
    s.add_piece(12, [6, 7])
    assert s.add_piece(11, [9, 9, 9]) == 0  # known digest: stored once, the first ids kept
    n, tails, refs, cid = 1000, 0, 0, 0
    for i in range(n):
        tail = list(range(i % 13))
        pieces = [11, 12][: i % 3]
        if not tail and not pieces:
            tail = [42]
        s.add(line=i + 1, custom_id=f"id-{i}", kind="chat", model=None, sampling={"temperature": 0.0},
              max_tokens=4, piece_digests=pieces, tail=tail)
        tails, refs, cid = tails + len(tail), refs + len(pieces), cid + len(f"id-{i}")
    s.check_integrity()
    pieces_bytes = 4 * 7 + 8 * (2 + 1)
    assert s.nbytes() == REQUEST_BYTES * n + 4 * (tails + refs) + cid + pieces_bytes + 3 * 8
    assert REQUEST_BYTES <= 64
    assert s.prompt_lengths().tolist() == [len(s.input_ids(i)) for i in range(n)]
    assert s.input_ids(2) == [1, 2, 3, 4, 5, 6, 7, 0, 1]


def test_store_rejects_an_empty_prompt():
    with pytest.raises(ValueError, match="line 3: a request needs at least one prompt token"):
        TokenStore().add(line=3, custom_id="x", kind="chat", model=None, sampling={}, max_tokens=1,
                         piece_digests=[], tail=[])


# ------------------------------------------------------------------ the reader
@pytest.mark.parametrize("workers,small", [(0, False), (1, False), (0, True)])
def test_reader_matches_the_plain_path(tiny, tmp_path, monkeypatch, workers, small):
    """Same token ids, max_tokens, sampling and custom ids as read_requests + prepare for every
    good line, the same error messages for the bad ones; shared pieces stored once. `small`: the
    tokenizer given a few texts a call and caches of a few hundred bytes, emptied all the time."""
    from blendserve_sgl.batch import reader

    if small:
        monkeypatch.setattr(reader, "ENCODE_CHARS", 60)
        monkeypatch.setattr(reader, "CACHE_BYTES", 700)
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 120)
    got = read_store(path, tok, 2048, 16, model_dir=model_dir, workers=workers, batch_lines=17)
    got.store.check_integrity()
    ref = prepared_reference(path, tok)
    ok = [x for x in ref if isinstance(x, Prepared)]
    assert [(e.message, e.digest) for e in got.errors] == [(x.message, x.digest) for x in ref
                                                            if isinstance(x, LineError)]
    assert len(got.errors) == 3 and got.lines == len(ref) and not got.whole_text_fallback
    assert len(got.store) == len(ok)
    for i, p in enumerate(ok):
        q = got.store.prepared(i)
        assert (q.input_ids, q.max_tokens, q.sampling_params, q.request.custom_id, q.request.line, q.request.kind,
                q.request.digest) == (p.input_ids, p.max_tokens, p.sampling_params, p.request.custom_id,
                                      p.request.line, p.request.kind, p.request.digest)
    assert got.store.pieces < 40  # system prompts, few-shot turns and template text, not per request
    assert got.store.piece_tokens.n + got.store.tail_tokens.n < 0.7 * sum(len(p.input_ids) for p in ok)


def test_reader_caches_are_bounded_in_entries_and_bytes():
    """A cache empties itself before it would pass either bound, and keeps nothing larger than
    its byte bound."""
    from blendserve_sgl.batch.reader import _Cache, _text_bytes

    c = _Cache(3, limit=100)
    assert c.add("a", 1, 40) == 1 and c.add("b", 2, 40) == 2 and dict(c) == {"a": 1, "b": 2} and c.held == 80
    c.add("c", 3, 30)  # 110 bytes: emptied first
    assert dict(c) == {"c": 3} and c.held == 30
    c.add("d", 4, 1), c.add("e", 5, 1)
    c.add("f", 6, 1)  # a fourth entry: emptied first
    assert dict(c) == {"f": 6}
    assert c.add("big", 7, 101) == 7 and "big" not in c and c.held == 0
    assert _text_bytes("abc") == 3 and _text_bytes("ab\u00e9") == 12


def test_reader_marks_done_requests_and_keeps_them_in_the_store(tiny, tmp_path):
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 30)
    got = read_store(path, tok, 2048, 16, workers=0)
    got.mark_done({"r3", "r4", ("line", 6)})
    assert got.skipped == 3 and len(got.errors) == 3 and got.lines == 33  # line 6 is one of the 3 bad lines
    assert [got.store.custom_id(i) for i in np.flatnonzero(got.done)] == ["r3", "r4"]


def test_pieces_of_a_rejected_request_reach_the_next_request_using_them(tiny, tmp_path):
    """The first request behind a system prompt is too long for the context: its pieces are not
    stored with it, yet the next request behind the same prompt gets them."""
    model_dir, tok = tiny
    system = {"role": "system", "content": "You are a precise assistant."}
    rows = [{"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [system, {"role": "user", "content": text}], "max_tokens": 2}}
            for cid, text in (("long", "alpha " * 400), ("short", "beta gamma"))]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_store(path, tok, 300, 16, workers=0)
    assert [e.code for e in got.errors] == ["context_length_exceeded"] and len(got.store) == 1
    want = [x for x in prepared_reference(path, tok, ctx=300) if isinstance(x, Prepared)]
    assert got.store.input_ids(0) == want[0].input_ids


def test_piece_encoding_falls_back_to_whole_text_when_pieces_differ(tiny, tmp_path):
    """A tokenizer whose piece ids do not concatenate to the whole text's: every request is
    still encoded exactly as prepare() does."""
    model_dir, tok = tiny

    class Shifted:  # encodes each call's text with the first id changed: pieces differ from the whole
        chat_template = tok.chat_template
        added_tokens_encoder = tok.added_tokens_encoder

        def apply_chat_template(self, *a, **k):
            return tok.apply_chat_template(*a, **k)

        def encode(self, text, add_special_tokens=True):
            ids = tok.encode(text, add_special_tokens=add_special_tokens)
            return [(ids[0] + 1) % len(tok)] + ids[1:] if ids else ids

        def __len__(self):
            return len(tok)

    path = corpus(tmp_path / "in.jsonl", 40, bad=False)
    got = read_store(path, Shifted(), 2048, 16, workers=0)
    assert got.whole_text_fallback
    ref = [x for x in prepared_reference(path, Shifted()) if isinstance(x, Prepared)]
    assert [got.store.prepared(i).input_ids for i in range(len(ref))] == [p.input_ids for p in ref]


OPAQUE = "{% for m in messages %}<|im_start|>{{ m['role'] + '\\n' + m['content'] }}<|im_end|>\n{% endfor %}"
@pytest.mark.parametrize("template, opaque", [
    (OPAQUE, True),
    ("{% for m in messages %}{{ m.content ~ '|' }}{% if loop.last %}{{ messages[-1]['content'] }}{% endif %}"
     "{% endfor %}", True),
    (OPAQUE.replace("m['content'] }}", "m['content'] | trim }}"), False),  # filtered
    ("{% for m in messages %}{% if m.content %}x{% endif %}{% endfor %}", False),  # tested
    ("{% for m in messages %}{% set c = m['content'] %}{{ c }}{% endfor %}", False),  # assigned
    ("{{ messages | map(attribute='content') | join }}", False),  # reached by name
    ("{{ messages[0]['content'][:5] }}", False),  # sliced
    ("{% for m in messages %", False),  # not a template
    (None, False),
])
def test_template_shapes_use_substitution_only_where_content_is_opaque(template, opaque):
    from blendserve_sgl.batch.reader import TemplateShapes

    assert TemplateShapes.opaque(template) is opaque


@pytest.mark.parametrize("template", [None, OPAQUE.replace("m['content'] }}", "m['content'] | trim }}")])
def test_reader_matches_the_plain_path_on_awkward_contents(tiny, tmp_path, template):
    """Contents holding special tokens (also first and last), template text, blanks, repeats,
    under the model's template (substituted) and a template that filters content (rendered by
    Jinja every time): the ids of `prepare` every time."""
    model_dir, tok = tiny
    if template is not None:
        tok = copy.deepcopy(tok)
        tok.chat_template = template
    texts = ["<|im_start|>user\nhi", "hi<|im_end|>", " spaced ", "", "\n", "<|im_end|><|im_start|>", "alpha beta",
             "alpha beta", "user\nalpha", "<|endoftext|>tail"]
    rows = []
    for i, t in enumerate(texts * 4):
        msgs = [{"role": "system", "content": texts[(i + 3) % len(texts)]}, {"role": "user", "content": t}]
        if i % 3 == 0:
            msgs[1:1] = [{"role": "user", "content": "shot"}, {"role": "assistant", "content": t or "x"}]
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": msgs, "max_tokens": 2}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from blendserve_sgl.batch.reader import TemplateShapes

    assert TemplateShapes(tok).on is (template is None)
    got = read_store(path, tok, 2048, 16, workers=0)
    ref = prepared_reference(path, tok)
    assert len(got.store) == len(ref) and not got.errors
    assert [got.store.input_ids(i) for i in range(len(ref))] == [p.input_ids for p in ref]
    assert not got.whole_text_fallback


def test_a_text_the_tokenizer_rejects_is_that_lines_error(tiny, tmp_path):
    """One text of a batch fails to encode: that line gets `prepare`'s error, its neighbours in
    the batch (and a repeat of the same text) are read as the plain path reads them."""
    model_dir, tok = tiny

    class Picky:  # no fast backend: tails go through encode() one text at a time
        chat_template = tok.chat_template
        added_tokens_decoder = tok.added_tokens_decoder

        def apply_chat_template(self, *a, **k):
            return tok.apply_chat_template(*a, **k)

        def encode(self, text, add_special_tokens=True):
            if "boom" in text:
                raise TypeError("cannot encode boom")
            return tok.encode(text, add_special_tokens=add_special_tokens)

        def __len__(self):
            return len(tok)

    path = corpus(tmp_path / "in.jsonl", 30, bad=False)
    lines = path.read_text().splitlines()
    for k in (4, 9, 13):  # chat, chat with the same text, completion
        row = json.loads(lines[k])
        body = row["body"]
        if "messages" in body:
            body["messages"][-1]["content"] = "a boom here"
        else:
            body["prompt"] = "a boom here"
        lines[k] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    got = read_store(path, Picky(), 2048, 16, workers=0, batch_lines=8)
    ref = prepared_reference(path, Picky())
    assert [(e.line, e.message, e.digest) for e in got.errors] == [(x.line, x.message, x.digest) for x in ref
                                                                    if isinstance(x, LineError)]
    assert [e.line for e in got.errors] == [5, 10, 14]
    assert "cannot encode this request (TypeError" in got.errors[0].message
    ok = [x for x in ref if isinstance(x, Prepared)]
    assert [got.store.input_ids(i) for i in range(len(got.store))] == [p.input_ids for p in ok]


def test_a_template_reading_names_gets_them_on_the_plain_path(tiny, tmp_path):
    """A message's name reaches a template that reads it (the substituted shapes hold only roles and
    contents, so such requests render whole): the ids of `prepare`, with the name in them."""
    model_dir, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{% if m.name is defined %} "
                         "{{ m.name }}{% endif %}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    from blendserve_sgl.batch.reader import TemplateShapes

    assert TemplateShapes(tok).on
    rows = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
             "body": {"messages": [{"role": "system", "content": "be brief", **({"name": f"n{i % 3}"} if i % 2 else {})},
                                   {"role": "user", "content": f"q {i}"}], "max_tokens": 2}} for i in range(12)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_store(path, tok, 2048, 16, workers=0)
    ref = prepared_reference(path, tok)
    assert not got.errors and [got.store.input_ids(i) for i in range(12)] == [p.input_ids for p in ref]
    assert not got.whole_text_fallback  # no shape rendered a named message without its name
    assert "system n1" in tok.decode(got.store.input_ids(1)) and "system n" not in tok.decode(got.store.input_ids(0))


@pytest.mark.parametrize("template", [
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}",
    # content output as is, but the word "image" makes SGLang give it lists: the shapes must not substitute text
    "{# image #}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}",
])
def test_content_lists_reach_a_template_that_takes_them_on_the_plain_path(tiny, tmp_path, template):
    model_dir, tok = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = template
    rows = []
    for i in range(12):
        user = f"q {i}" if i % 3 == 0 else [{"type": "text", "text": "q"}, {"type": "text", "text": f" {i}"}]
        rows.append({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                     "body": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": user}],
                              "max_tokens": 2}})
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_store(path, tok, 2048, 16, workers=0)
    ref = prepared_reference(path, tok)
    assert not got.errors and [got.store.input_ids(i) for i in range(12)] == [p.input_ids for p in ref]
    assert not got.whole_text_fallback
    shown = tok.decode(got.store.input_ids(4))  # ["q", " 4"] as the template renders a list, not joined text
    assert ("q 4" in shown and "q  4" not in shown) if "is string" in template else "'text': ' 4'" in shown


@pytest.mark.parametrize("workers", [0, 1])
def test_token_ids_the_models_embedding_lacks_are_that_lines_error(tiny, tmp_path, workers):
    """A tokenizer given added tokens without the embedding resized: a prompt holding one (as text in
    a chat or a completion, or as an id) is its own error record at read time, as `prepare` with
    `id_limit` says, before any engine runs (the forward pass would raise on it)."""
    import shutil

    from transformers import AutoTokenizer

    from blendserve_sgl.batch.prompts import id_limit, prepare

    model_dir, _ = tiny
    extra = tmp_path / "extra-tokens"
    shutil.copytree(model_dir, extra)
    tok = AutoTokenizer.from_pretrained(str(extra))
    rows = json.loads((extra / "config.json").read_text())["vocab_size"]
    assert len(tok) <= rows
    tok.add_special_tokens({"additional_special_tokens": [f"<|extra_{k}|>" for k in range(rows - len(tok) + 4)]})
    tok.save_pretrained(str(extra))
    tok = AutoTokenizer.from_pretrained(str(extra))
    assert len(tok) == rows + 4 and id_limit(tok, extra) == rows and id_limit(tok) == rows + 4
    high = tok.convert_ids_to_tokens(rows + 2)
    path = corpus(tmp_path / "in.jsonl", 24, bad=False)
    lines = path.read_text().splitlines()
    for k, how in ((3, "chat"), (6, "completion"), (13, "ids")):
        row = json.loads(lines[k])
        if how == "ids":
            row["body"] = {"prompt": [5, 6, rows + 1], "max_tokens": 4}
            row["url"] = "/v1/completions"
        elif how == "chat":
            row["body"]["messages"][-1]["content"] = f"say {high} twice"
        else:
            row["body"]["prompt"] = f"say {high} twice"
        lines[k] = json.dumps(row)
    path.write_text("\n".join(lines) + "\n")
    got = read_store(path, tok, 2048, 16, model_dir=extra, workers=workers, batch_lines=8)
    assert [e.line for e in got.errors] == [4, 7, 14]
    assert f"encodes to token id {rows + 2}, which the model does not have (its embedding holds {rows} tokens" \
        in got.errors[0].message
    assert f"token id {rows + 1}, outside the model's vocabulary of {rows}" in got.errors[2].message
    plain = [prepare(q, tok, 2048, 16, path.name, id_limit(tok, extra)) for q in read_requests(path)]
    assert [(e.line, e.message) for e in got.errors] == [(x.line, x.message) for x in plain if isinstance(x, LineError)]
    ok = [x for x in plain if isinstance(x, Prepared)]
    assert len(ok) == 21 and [got.store.input_ids(i) for i in range(len(got.store))] == [p.input_ids for p in ok]
    # without the model's config only the tokenizer's size binds: the same file reads whole
    assert len(read_store(path, tok, 2048, 16, workers=0, batch_lines=8).errors) == 0


# ------------------------------------------------------------------ the plan
def test_plan_is_a_deterministic_permutation(tiny, tmp_path):
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 200)
    a = read_store(path, tok, 2048, 16, workers=0)
    b = read_store(path, tok, 2048, 16, workers=0)
    pa, pb = plan(a.store, cost_for(model_dir)), plan(b.store, cost_for(model_dir))
    check_plan(pa, len(a.store))
    assert pa.tolist() == pb.tolist()
    tree = build_tree(a.store, cost_for(model_dir))
    tree.check_integrity()
    assert tree.root.sharing > 0.3  # the shared pieces are shared in the tree


def test_dual_order_takes_a_prefix_from_the_left_and_a_suffix_from_the_right():
    """The merged order is the sorted leaves consumed from both ends: whatever came from the left
    is a prefix of the leaf order in order, the rest its suffix in reverse; it starts left."""
    cost = cost_for(None)
    r = random.Random(1)
    leaves = [(k, r.randint(1, 3000), r.randint(1, 500)) for k in range(300)]
    order = dual_order(leaves, cost).tolist()
    assert sorted(order) == list(range(300)) and order[0] == 0
    i, j, sides = 0, 299, set()
    for x in order:  # each next request is the leftmost or the rightmost not yet taken
        assert x in (i, j)
        sides.add(x == i)
        i, j = (i + 1, j) if x == i else (i, j - 1)
    assert sides == {True, False}


def test_resumed_run_continues_the_same_order(tiny, tmp_path):
    """Plan with the first k planned requests done: the pending requests are the rest of the
    same plan, in the same order."""
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 150)
    first = read_store(path, tok, 2048, 16, workers=0)
    order = plan(first.store, cost_for(model_dir))
    ids = [first.store.custom_id(i) for i in order]
    done = set(ids[:60]) | {ids[100]}
    again = read_store(path, tok, 2048, 16, workers=0)
    again.mark_done(done)
    left = [p.request.custom_id for p in pending(again.store, plan(again.store, cost_for(model_dir)), again.done)]
    assert left == [x for x in ids if x not in done]


# ------------------------------------------------------------------ the feed
def test_window_size_from_engine_capacity():
    assert window_size(32768, 2048, 128.0) == FACTOR * 256  # the KV pool binds
    assert window_size(32768, 100, 128.0) == FACTOR * 100  # the running slots bind
    assert window_size(1000, None, 500.0) == MIN_WINDOW
    assert window_size(None, None, 10.0) > 0


class OrderEngine:
    """Records submission order and the most requests in flight; answers after a short delay."""

    def __init__(self, stop_after=None):
        self.loop = asyncio.new_event_loop()
        self.order, self.in_flight, self.most, self.answered = [], 0, 0, 0
        self.stop_after = stop_after

    async def async_generate(self, input_ids, sampling_params):
        self.order.append(tuple(input_ids))
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        await asyncio.sleep(0.0005 * (len(input_ids) % 4))
        self.in_flight -= 1
        if self.stop_after is not None and self.answered >= self.stop_after:
            raise KeyboardInterrupt
        self.answered += 1
        return {"text": "x", "output_ids": [1], "meta_info": {"id": "i", "prompt_tokens": len(input_ids),
                                                               "completion_tokens": 1, "cached_tokens": 0}}

    def get_server_info(self):
        return {"max_total_num_tokens": 64 * 30, "max_running_requests": 64}

    def shutdown(self):
        self.loop.close()


def test_window_bounds_what_is_in_flight_and_submits_in_order():
    req = BatchRequest(1, "x", "completion", None, "x", 1)
    items = [Prepared(req, [i] * (1 + i % 5), 1) for i in range(500)]
    eng = OrderEngine()
    results = []
    runner.generate(eng, iter(items), lambda p, out: results.append(p), lambda p, exc: pytest.fail(str(exc)),
                    window=7)
    assert eng.most == 7 and len(results) == 500
    assert eng.order == [tuple(p.input_ids) for p in items]


def test_command_interrupted_and_resumed_runs_each_request_once_in_plan_order(tiny, tmp_path, monkeypatch):
    """The command (stand-in engine) stopped after 40 results, then rerun: the second run submits
    the rest of the same plan in plan order; every custom_id ends with exactly one record."""
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 150)
    engines = []

    def start(cfg):
        engines.append(OrderEngine(stop_after=40 if not engines else None))
        return engines[-1]

    monkeypatch.setattr(cli, "_load_tokenizer", lambda d: tok)
    monkeypatch.setattr(runner, "prepare_environment", lambda device: "cpu")
    monkeypatch.setattr(runner, "start_engine", start)
    out = tmp_path / "out.jsonl"
    args = [str(path), "-o", str(out), "--model", str(model_dir), "--quiet", "--window", "5"]
    assert cli.main(args) == 130
    assert cli.main(args) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    keys = [r["custom_id"] if r["custom_id"] is not None else r["error"]["line"] for r in recs]
    assert len(keys) == len(set(keys)) == 153
    read = read_store(path, tok, 2048, 256, workers=0)
    planned = [tuple(read.store.input_ids(i)) for i in plan(read.store, cost_for(model_dir))]
    first_done = {tuple(read.store.input_ids(i)) for i in range(len(read.store))
                  if read.store.custom_id(i) in {r["custom_id"] for r in recs[:43]}}
    assert engines[1].order == [x for x in planned if x not in first_done]
    assert engines[0].most <= 5 and engines[1].most <= 5


def test_rerun_of_a_finished_job_reads_no_prompt_and_a_missing_record_reads_them_all(tiny, tmp_path, monkeypatch):
    """Every line has its record: the rerun parses the input and stops (no tokenizing, no engine),
    records untouched. One record gone, or --retry-failed with error records kept: the whole read and
    the plan as before, and the missing request runs."""
    model_dir, tok = tiny
    path = corpus(tmp_path / "in.jsonl", 60)
    engines, reads = [], []

    def start(cfg):
        engines.append(OrderEngine())
        return engines[-1]

    def counted(*a, **k):
        reads.append(1)
        return read_store(*a, **k)

    monkeypatch.setattr(cli, "_load_tokenizer", lambda d: tok)
    monkeypatch.setattr(runner, "prepare_environment", lambda device: "cpu")
    monkeypatch.setattr(runner, "start_engine", start)
    monkeypatch.setattr(cli, "read_store", counted)
    out, summary = tmp_path / "out.jsonl", tmp_path / "summary.json"
    args = [str(path), "-o", str(out), "--model", str(model_dir), "--quiet", "--summary-json", str(summary)]
    assert cli.main(args) == 0 and len(reads) == len(engines) == 1
    first = out.read_bytes()
    errors = (tmp_path / "out.errors.jsonl").read_bytes()
    assert cli.main(args) == 0 and len(reads) == len(engines) == 1  # neither read nor run again
    assert out.read_bytes() == first and (tmp_path / "out.errors.jsonl").read_bytes() == errors
    said = json.loads(summary.read_text())
    assert said["requests"] == said["skipped"] == 63 and said["completed"] == 0
    lines = first.decode().splitlines(keepends=True)
    out.write_text("".join(lines[:-1]))  # the last record lost: that request runs again, after a whole read
    gone = json.loads(lines[-1])["custom_id"]
    assert cli.main(args) == 0 and len(reads) == len(engines) == 2
    assert len(out.read_text().splitlines()) == len(lines)
    assert gone in {json.loads(x)["custom_id"] for x in out.read_text().splitlines()}
    assert cli.main(args + ["--retry-failed"]) == 0 and len(reads) == 3  # error records run again: a whole read
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    keys = {r["custom_id"] if r["custom_id"] is not None else r["error"]["line"] for r in recs}
    assert len(recs) == len(keys) == len(lines) == 63


# ------------------------------------------------------------------ the real engine
@pytest.mark.engine
@pytest.mark.skipif(os.environ.get("BLENDSERVE_SKIP_ENGINE") == "1", reason="BLENDSERVE_SKIP_ENGINE=1")
def test_window_feed_matches_all_at_once_on_the_engine(tiny, tmp_path):
    """Greedy decoding: the same text for (nearly) every custom_id with a window of 16 as with
    everything submitted at once; the window keeps at least the all-at-once cached-token ratio,
    less 2 points (it tends to keep more: a prefill batch cannot share a prefix within itself,
    and the window admits fewer requests per batch). A random-weight model's logits have
    near-ties and SGLang's kernels are not batch-invariant (another batch, another summation
    order), so a greedy text may fork after a near-tie: at most 5% of the texts may differ, each
    still a complete answer; a lost, duplicated or mixed-up request would differ everywhere."""
    model_dir, _ = tiny
    path = corpus(tmp_path / "in.jsonl", 160, bad=False)
    env = cpu_engine_env()
    runs = {}
    for window in ("0", "16"):
        out, summary = tmp_path / f"out{window}.jsonl", tmp_path / f"s{window}.json"
        proc = subprocess.run([sys.executable, "-m", "blendserve_sgl.cli", "run", str(path), "-o", str(out),
                               "--model", str(model_dir), "--window", window, "--quiet", "--summary-json",
                               str(summary)], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        recs = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
        runs[window] = (recs, json.loads(summary.read_text()))
    (a, sa), (b, sb) = runs["0"], runs["16"]
    assert set(a) == set(b) and len(a) == 160
    assert sb["window"] == 16 and sa["window"] == 0
    text = lambda r: r["response"]["body"]["choices"][0].get("message", r["response"]["body"]["choices"][0])
    differ = []
    for cid in a:
        assert a[cid]["error"] is None and b[cid]["error"] is None
        assert a[cid]["custom_id"] == b[cid]["custom_id"] == cid
        if text(a[cid]) != text(b[cid]):
            differ.append(cid)
    assert len(differ) <= 0.05 * len(a), differ
    assert sa["input_tokens"] == sb["input_tokens"]
    assert sb["cache_hit_ratio"] >= sa["cache_hit_ratio"] - 0.02, (sa["cache_hit_ratio"], sb["cache_hit_ratio"])
