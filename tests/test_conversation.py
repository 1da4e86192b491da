"""The multi-turn conversation class: reader, token counts and chained-prefix records."""

import json

import numpy as np
import pytest

from blendserve_sgl.workloads import conversation as conv


def _write_dataset(path, torn=True):
    items = [
        {"id": "a", "conversations": [{"from": "human", "value": "one two"}, {"from": "gpt", "value": "three"},
                                      {"from": "human", "value": "four five six"}, {"from": "gpt", "value": "x y"}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "starts with the model"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r s"},
                                      {"from": "gpt", "value": "broken alternation"}]},
        {"id": "d", "conversations": [{"from": "human", "value": "unanswered"}]},
    ]
    text = json.dumps(items, indent=1)
    if torn:  # the packaged file ends inside a record
        text = text[:-1] + ', {"id": "e", "conversations": [{"from": "human", "value": "cut he'
    path.write_text(text)


def _whitespace_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def test_reader_keeps_whole_alternating_conversations_and_stops_at_a_torn_record(tmp_path):
    _write_dataset(tmp_path / "d.json")
    got = list(conv.iter_conversations(tmp_path / "d.json"))
    assert got == [("a", ["one two", "three", "four five six", "x y"]), ("c", ["q", "r s"])]


def test_token_counts_match_the_tokenizer_and_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("BLENDSERVE_MODEL_CACHE", str(tmp_path / "cache"))
    _write_dataset(tmp_path / "d.json")
    tok = _whitespace_tokenizer(tmp_path / "tok.json")
    offsets, counts = conv.token_counts(tmp_path / "d.json", tok)
    assert offsets.tolist() == [0, 4, 6] and counts.tolist() == [2, 1, 3, 2, 1, 2]
    assert len(list((tmp_path / "cache").glob("sharegpt-tokens-*.npz"))) == 1
    again = conv.token_counts(tmp_path / "d.json", tok)
    assert again[0].tolist() == offsets.tolist() and again[1].tolist() == counts.tolist()


def test_the_token_count_cache_follows_an_edited_dataset_and_another_tokenizer(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("BLENDSERVE_MODEL_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.json"
    _write_dataset(data, torn=False)
    tok = _whitespace_tokenizer(tmp_path / "tok.json")
    assert conv.token_counts(data, tok)[1].tolist() == [2, 1, 3, 2, 1, 2]
    text = data.read_text()
    data.write_text(text.replace('"one two"', '"one-two"'))  # same size, one token fewer
    st = data.stat()
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert conv.token_counts(data, tok)[1].tolist() == [1, 1, 3, 2, 1, 2]
    # two tokenizer files that differ only past their first MiB are two cache entries
    head = b"{" + b" " * (1 << 20)
    (tmp_path / "a.json").write_bytes(head + b'"a"}')
    (tmp_path / "b.json").write_bytes(head + b'"b"}')
    assert conv._cache_path(data, tmp_path / "a.json") != conv._cache_path(data, tmp_path / "b.json")


def test_each_turn_extends_the_previous_turns_prompt():
    counts = (np.array([0, 6, 8]), np.array([10, 20, 30, 40, 50, 60, 7, 8], dtype=np.int32))
    recs = conv.conversation_records(4, np.random.default_rng(1), counts=counts)
    by_conv: dict = {}
    for r in recs:
        assert r.prompt_len == sum(length for _, length in r.prefix) + conv.GENERATION_MARKER
        assert r.prefix[0] == ("system:chat", conv.SYSTEM_TOKENS)
        by_conv.setdefault(r.prefix[1][0].split(":")[0], []).append(r)
    for turns in by_conv.values():
        for a, b in zip(turns, turns[1:]):
            assert b.prefix[: len(a.prefix)] == a.prefix and len(b.prefix) == len(a.prefix) + 2
    long = by_conv["conv0"]
    assert [r.output_len for r in long] == [20, 40, 60][: len(long)]
    assert long[-1].prompt_len == conv.SYSTEM_TOKENS + sum(c + conv.MESSAGE_OVERHEAD for c in (10, 20, 30, 40, 50)
                                                           [: 2 * len(long) - 1]) + conv.GENERATION_MARKER


def test_more_requests_than_turns_takes_other_users_copies_and_respects_max_prompt():
    counts = (np.array([0, 2, 4]), np.array([5, 6, 100, 8], dtype=np.int32))
    recs = conv.conversation_records(5, np.random.default_rng(0), counts=counts, max_prompt=conv.SYSTEM_TOKENS + 40)
    assert len(recs) == 5 and len({r.rid for r in recs}) == 5
    assert all(r.prompt_len <= conv.SYSTEM_TOKENS + 40 for r in recs)  # the 100-token turn never fits
    assert len({r.prefix[1][0] for r in recs}) == 5  # each copy is its own conversation
    with pytest.raises(ValueError, match="max_prompt"):
        conv.conversation_records(1, np.random.default_rng(0), counts=counts, max_prompt=conv.SYSTEM_TOKENS + 5)
    a = conv.conversation_records(5, np.random.default_rng(3), counts=counts, max_prompt=conv.SYSTEM_TOKENS + 40)
    b = conv.conversation_records(5, np.random.default_rng(3), counts=counts, max_prompt=conv.SYSTEM_TOKENS + 40)
    assert a == b
