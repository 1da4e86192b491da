"""A user's trace file as a workload (`workloads.trace_file`): CSV token counts and Mooncake-style
JSONL with shared blocks, through `blendserve simulate` and `blendserve plan`, and its errors."""

import gzip
import os
import json

import pytest

from blendserve_sgl import cli, workloads
from blendserve_sgl.core import CostModel
from blendserve_sgl.workloads.trace_file import TRACE_COLUMNS, is_trace_file, load_trace_file

COST = CostModel.from_names("llama-3.1-8b", "a100")


def _csv(path, header, rows):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return path


def _mooncake(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("pair", TRACE_COLUMNS)
def test_every_known_column_pair_is_read_among_other_columns(tmp_path, pair):
    path = _csv(tmp_path / "t.csv", ["TIMESTAMP", pair[1], "note", pair[0]],
                [["2023-11-16", 40, "x", 300], ["2023-11-17", 0, "y", 0], ["2023-11-18", 7, "z", 12]])
    recs = load_trace_file(path)
    assert [(r.prompt_len, r.output_len, r.prefix) for r in recs] == [(300, 40, ()), (1, 1, ()), (12, 7, ())]
    assert len({r.rid for r in recs}) == 3
    assert [r.prompt_len for r in load_trace_file(path, n=2)] == [300, 1]


def test_mooncake_blocks_become_shared_prefix_groups(tmp_path):
    """Equal hash ids are one shared prefix: full blocks are groups of 512 tokens, a partial last
    block a group named by its id and length; the tree sees the sharing."""
    path = _mooncake(tmp_path / "m.jsonl", [
        {"timestamp": 0, "input_length": 1500, "output_length": 20, "hash_ids": [0, 1, 2]},
        {"timestamp": 0, "input_length": 1300, "output_length": 30, "hash_ids": [0, 1, 3]},
        {"timestamp": 5, "input_length": 700, "output_length": 0, "hash_ids": [0, 4]},
        {"timestamp": 9, "input_length": 100, "output_length": 5},
    ])
    recs = load_trace_file(path)
    assert [r.prefix for r in recs] == [(("h0", 512), ("h1", 512), ("h2/476", 476)),
                                        (("h0", 512), ("h1", 512), ("h3/276", 276)), (("h0", 512), ("h4/188", 188)), ()]
    assert [r.output_len for r in recs] == [20, 30, 1, 5]
    tree = workloads.build_tree(recs, COST)
    tree.check_integrity()
    assert tree.root.saved == 2 * 512 + 512  # h0 computed once for three requests, h1 once for two


def test_mooncake_ids_are_equal_only_to_the_same_json_value(tmp_path):
    """Hash id 1 and "1" are two blocks (they were one group, h1, for both): no shared prefix
    between the first two rows; equal strings still share."""
    path = _mooncake(tmp_path / "m.jsonl", [
        {"input_length": 1500, "output_length": 2, "hash_ids": [1, 2, 3]},
        {"input_length": 1500, "output_length": 2, "hash_ids": ["1", "2", "3"]},
        {"input_length": 1500, "output_length": 2, "hash_ids": ["1", "2", "4"]},
    ])
    recs = load_trace_file(path)
    assert recs[0].prefix[:2] == (("h1", 512), ("h2", 512))  # integer ids keep their names
    assert not set(recs[0].prefix) & set(recs[1].prefix)
    assert recs[1].prefix[:2] == recs[2].prefix[:2]
    tree = workloads.build_tree(recs, COST)
    assert tree.root.saved == 2 * 512  # only the two string rows share their two blocks


def test_identical_mooncake_prompts_share_their_last_block_too(tmp_path):
    """The last block was always a request's own tail (probe 24): 200 copies of one prompt read
    "sharing 0.000" in `simulate`. Now a full last block is the same group as that block anywhere
    (a later turn's prompt holds it), a partial one is shared by the same id and length only, and
    tokens beyond the hashed blocks stay the request's own."""
    path = _mooncake(tmp_path / "m.jsonl", [
        {"input_length": 512, "output_length": 2, "hash_ids": [7]},
        {"input_length": 512, "output_length": 2, "hash_ids": [7]},
        {"input_length": 1024, "output_length": 2, "hash_ids": [7, 8]},  # a later turn: block 7 full
        {"input_length": 700, "output_length": 2, "hash_ids": [9, 10]},
        {"input_length": 700, "output_length": 2, "hash_ids": [9, 10]},  # identical: 188-token block shared
        {"input_length": 600, "output_length": 2, "hash_ids": [9, 8]},  # id 8 partial, 8 full above: two blocks
        {"input_length": 1300, "output_length": 2, "hash_ids": [9]},  # 788 tokens past its one block: its own
    ])
    recs = load_trace_file(path)
    assert recs[0].prefix == recs[1].prefix == (("h7", 512),)
    assert recs[2].prefix == (("h7", 512), ("h8", 512))
    assert recs[3].prefix == recs[4].prefix == (("h9", 512), ("h10/188", 188))
    assert recs[5].prefix == (("h9", 512), ("h8/88", 88))
    assert recs[6].prefix == (("h9", 512),) and recs[6].prompt_len == 1300
    tree = workloads.build_tree(recs, COST)
    tree.check_integrity()
    assert tree.root.saved == 2 * 512 + 188 + 3 * 512  # h7 twice again, h10/188 once again, h9 three times again


@pytest.mark.parametrize("content, message", [
    ("a,b\n1,2\n", "names no known pair of token-count columns; rename"),
    ("ContextTokens,GeneratedTokens\n", "holds no rows"),
    ("ContextTokens,GeneratedTokens\n10,abc\n", "line 2: GeneratedTokens must be a whole token count"),
    ("ContextTokens,GeneratedTokens\n1_000,5\n", "line 2: ContextTokens must be a whole token count"),  # Python's int
    ("ContextTokens,GeneratedTokens\n10,\u0661\u0660\n", "line 2: GeneratedTokens must be a whole token count"),
    ('{"input_length": 10}\n', "line 1: no 'output_length'"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n',
     "line 1: no 'input_length'; .* this is a file of requests, not a trace of token counts: `blendserve plan"),
    ('{"input_length": 10, "output_length": 2}\n[1, 2]\n', "line 2: a trace line must be a JSON object"),
    ('{"input_length": 10, "output_length": 2}\n{"input_length": 1\n', "line 2: not a JSON object"),
    ('{"input_length": -3, "output_length": 2}\n', "line 1: input_length must be a whole number"),
    ('{"input_length": 10, "output_length": 2.5}\n', "line 1: output_length must be a whole number"),
    ('{"input_length": 600, "output_length": 2, "hash_ids": [1, 2, 3]}\n', "3 hash_ids for input_length 600"),
    ('{"input_length": 600, "output_length": 2, "hash_ids": [1, null]}\n', "hash_ids items must be integers"),
    ('{"input_length": 600, "output_length": 2, "hash_ids": 7}\n', "hash_ids must be a list"),
    ('{"input_length": 600, "output_length": 2, "hash_ids": 0}\n', "hash_ids must be a list"),
    ('{"input_length": 600, "output_length": 2, "hash_ids": ""}\n', "hash_ids must be a list"),
    ('{"input_length": 10, "output_length": 2}\n{"input_length": 10, "output_length": 2, "x": ' + "[" * 100000
     + "]" * 100000 + '}\n', "line 2: JSON nested too deeply"),
    ('{"input_length": ' + "9" * 5000 + ', "output_length": 2}\n', "line 1: not a JSON object .a number of more "
     "than 4,300 digits"),
    ('[{"input_length": 10, "output_length": 2}]\n', "starts with '[': a JSON list; a JSONL trace has one JSON object"),
    # the fix it names writes elsewhere: `> t.jsonl` would have emptied the input before jq read it
    ('[{"input_length": 10, "output_length": 2}]\n', "jq -c '.[]' .*t.jsonl > t.lines.jsonl$"),
    # a key twice was read silently, the last one counting
    ('{"input_length": 10, "output_length": 2}\n{"input_length": 2048, "input_length": 10, "output_length": 2}\n',
     'line 2: the key "input_length" appears twice in one object; keep one'),
    ('{"input_length": 600, "output_length": 2, "hash_ids": [1], "hash_ids": [2]}\n',
     'line 1: the key "hash_ids" appears twice'),
    # a column read twice: the first one was read silently
    ("ContextTokens,GeneratedTokens,ContextTokens\n10,2,30\n",
     "header names the column 'ContextTokens' 2 times .columns 1, 3.; keep one ContextTokens column"),
    ("Request tokens, Response tokens,Response tokens \n10,2,30\n", "the column 'Response tokens' 2 times .columns 2, 3."),
])
def test_bad_trace_rows_are_named_with_the_fix(tmp_path, content, message):
    path = tmp_path / ("t.jsonl" if content.startswith(("{", "[")) else "t.csv")
    path.write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_trace_file(path)


def test_trace_file_errors_for_the_file_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_trace_file(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="is a directory; pass the path of a trace file in it"):
        load_trace_file(tmp_path)
    (tmp_path / "gone.csv").symlink_to(tmp_path / "nowhere.csv")
    with pytest.raises(FileNotFoundError, match="gone.csv is a symbolic link that leads to no file"):
        load_trace_file(tmp_path / "gone.csv")
    fifo = tmp_path / "pipe.csv"  # `--workload <(zcat t.csv.gz)`: said how to pass it (a probe)
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match=r"not a regular file \(a trace is read from a file, not a pipe\); save it to "
                                         r"a file first \(e\.g\. zcat trace\.csv\.gz > trace\.csv\)"):
        load_trace_file(fifo)
    gz = tmp_path / "t.csv"
    gz.write_bytes(gzip.compress(b"ContextTokens,GeneratedTokens\n1,2\n"))
    with pytest.raises(ValueError, match="gzip-compressed; decompress it first"):
        load_trace_file(gz)
    wide = tmp_path / "wide.csv"
    wide.write_bytes("ContextTokens,GeneratedTokens\n1,2\n".encode("utf-16"))
    with pytest.raises(ValueError, match="wide.csv is UTF-16 text, not UTF-8; save it as UTF-8"):
        load_trace_file(wide)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no requests"):
        load_trace_file(tmp_path / "empty.jsonl")
    assert is_trace_file("x.csv") and is_trace_file(str(gz)) and not is_trace_file("trace1")
    bad = tmp_path / "latin.jsonl"  # text mode decodes ahead: the line is found again
    bad.write_bytes(b'{"input_length": 10, "output_length": 2}\n{"input_length": 10, "output_length": 2, "n": "\xe9"}\n')
    with pytest.raises(ValueError, match="latin.jsonl line 2: not UTF-8 text"):
        load_trace_file(bad)
    deep = tmp_path / "deep.csv"  # far into the file: the line, not the decoder chunk's offset (a probe)
    deep.write_bytes(b"ContextTokens,GeneratedTokens\n" + b"10,2\n" * 20_000 + b"1\xe9,2\n")
    with pytest.raises(ValueError, match=r"deep.csv line 20002: not UTF-8 text \(byte b'\\xe9'\)"):
        load_trace_file(deep)


def test_blank_lines_before_a_csv_header_are_skipped(tmp_path):
    """The header after blank lines was read as an empty header ("rename the columns", a probe)."""
    path = tmp_path / "t.csv"
    path.write_text("\n  \nContextTokens,GeneratedTokens\n10,2\n\n11,3\n")
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path)] == [(10, 2), (11, 3)]
    path.write_text("\n\n")
    with pytest.raises(ValueError, match=r"holds no requests \(it is empty or blank\)"):
        load_trace_file(path)


def test_a_csv_trace_is_read_only_up_to_the_rows_asked_for(tmp_path):
    """`--requests N` takes the first N rows: a bad row after them is not read (it stopped a
    CSV trace, not a JSONL one); asked for all rows, it is named."""
    path = tmp_path / "t.csv"
    path.write_text("ContextTokens,GeneratedTokens\n10,2\n\n11,3\n12,nan\n")
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path, 2)] == [(10, 2), (11, 3)]
    with pytest.raises(ValueError, match="line 5: GeneratedTokens must be a whole token count"):
        load_trace_file(path)


def test_a_csv_row_spanning_lines_is_named_by_the_line_it_starts_on(tmp_path):
    """A quoted cell may hold line breaks: the row's error named its last line, where nothing of
    the bad count stands; a quote left open names the lines it ran over."""
    path = tmp_path / "t.csv"
    path.write_text('Note,ContextTokens,GeneratedTokens\n"one\ntwo\nthree",10,2\n"a\nb",11,x\n')
    with pytest.raises(ValueError, match="t.csv line 5: GeneratedTokens must be a whole token count"):
        load_trace_file(path)
    path.write_text('Note,ContextTokens,GeneratedTokens\n"a\nb",11,4\n' + '"open,1,2\nmore\nmore\n' + "x" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"t.csv line 4: a double quote opened in this row is not closed"):
        load_trace_file(path)


def test_a_long_text_column_is_read_and_extra_cells_are_refused(tmp_path):
    """A trace exported with its prompt text beside the counts (a field over csv's own 128 KiB)
    is read; a row with more cells than the header (a comma in an unquoted value) shifted every
    count one column, silently; empty trailing cells are harmless (a probe)."""
    path = tmp_path / "t.csv"
    path.write_text('prompt,input_tokens,output_tokens\n"' + "x" * 200_000 + '",100,10\n7,8,9,,\n')
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path)] == [(100, 10), (8, 9)]
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n1700000000,0,374,44\n")
    with pytest.raises(ValueError, match=r"t.csv line 2: 4 cells under a header of 3 columns.*double quotes"):
        load_trace_file(path)


def test_an_unreadable_trace_is_named(tmp_path, monkeypatch):
    """Permission denied was a traceback through `blendserve simulate` and `plan`."""
    import builtins

    path = tmp_path / "t.csv"
    path.write_text("ContextTokens,GeneratedTokens\n1,2\n")
    real = builtins.open

    def denied(file, *a, **kw):
        if str(file) == str(path):
            raise PermissionError(13, "Permission denied", str(file))
        return real(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", denied)
    with pytest.raises(ValueError, match=f"cannot read trace {path} \\(Permission denied\\); check the path"):
        load_trace_file(path)


def test_simulate_and_plan_run_a_trace_file(tmp_path, capsys):
    """`--workload PATH`: every row by default, the first N with --requests."""
    path = _mooncake(tmp_path / "m.jsonl", [
        {"input_length": 1100 + 7 * i, "output_length": 5 + (i % 13) * 9, "hash_ids": [0, 1 + i % 3, 100 + i]}
        for i in range(60)])
    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", str(path), "--policy", "blend,fcfs", "--kv-gb", "4",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["workload"]["requests"] == 60 and data["workload"]["sharing"] > 0.3
    assert cli.main(["simulate", "--workload", str(path), "--requests", "25", "--policy", "fcfs",
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text())["workload"]["requests"] == 25
    before = path.read_bytes()
    for argv in (["simulate", "--workload", str(path), "--out", str(path)],
                 ["plan", "--workload", str(path), "--out", str(path)],
                 ["plan", "--workload", str(path), "--out", str(tmp_path / "p.json"), "--plot", str(path)]):
        assert cli.main(argv) == 2, argv  # the trace is never written over
    assert path.read_bytes() == before and "is the --workload file, which it would overwrite" in capsys.readouterr().err
    plan_out = tmp_path / "plan.json"
    assert cli.main(["plan", "--workload", str(path), "--policies", "blend,fcfs", "--kv-gb", "4",
                     "--out", str(plan_out), "--json"]) == 0
    assert json.loads(plan_out.read_text())["input"] == str(path)
    assert json.loads(plan_out.read_text())["token_counts"] == "the trace file's token counts"
    capsys.readouterr()
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n")
    assert cli.main(["simulate", "--workload", str(bad), "--out", str(out)]) == 2
    assert "names no known pair of token-count columns" in capsys.readouterr().err


def test_a_trace_passed_to_plan_as_a_batch_file_gets_a_hint(tmp_path, capsys):
    path = _mooncake(tmp_path / "m.jsonl", [{"input_length": 900, "output_length": 9, "hash_ids": [0, 1]}] * 3)
    assert cli.main(["plan", str(path), "--model", "llama-3.1-8b"]) == 2
    assert f"it reads as a trace of token counts: plan it with --workload {path}" in capsys.readouterr().err
    csv_path = _csv(tmp_path / "t.csv", ["ContextTokens", "GeneratedTokens"], [[10, 2]])
    from blendserve_sgl.workloads.trace_file import looks_like_trace

    assert looks_like_trace(csv_path) and looks_like_trace(path)
    (tmp_path / "req.jsonl").write_text('{"custom_id": "a", "method": "POST"}\n')
    assert not looks_like_trace(tmp_path / "req.jsonl") and not looks_like_trace(tmp_path / "missing")


def test_rows_beyond_the_models_context_are_not_simulated(tmp_path, capsys):
    """`simulate --workload FILE` and the benchmarks' `trace_or_file` ran a trace's rows whose prompt
    fills the model's context (Mooncake's synthetic trace: 10 of 3,993 past Llama-3.1-8B's 131,072
    tokens) as if SGLang took them; now, as `plan`, they are left out and counted."""
    from blendserve_sgl.workloads.trace_file import trace_or_file

    path = _csv(tmp_path / "t.csv", ["ContextTokens", "GeneratedTokens"],
                [[200_000, 10], [100, 10], [131_072, 3], [300, 20], [131_066, 1], [131_065, 5], [131_065, 6],
                 [100, 130_973]])
    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", str(path), "--policy", "fcfs", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "5 requests not simulated (they do not fit llama-3.1-8b's context of 131,072 tokens)" in err
    assert "t.csv data row 1: the prompt is 200,000 tokens" in err and "simulate a model with a longer context" in err
    assert json.loads(out.read_text())["workload"]["requests"] == 3
    assert json.loads(out.read_text())["workload"]["not_simulated_beyond_context"] == 5
    name, records, counts = trace_or_file(str(path), 10, COST)
    assert (name, [r.prompt_len for r in records], counts["beyond_context"]) == ("t", [100, 300, 131_065], 5)


def test_a_trace_row_is_checked_against_the_context_as_sglang_checks_a_request():
    """A prompt over SGLang's input limit (context - 7), or a prompt and output that need more
    than SGLang runs in the context (it keeps 2 tokens), cannot run as recorded: `run` refuses such a line, so `plan --workload` and
    `simulate` left them in (a probe: a 100-token prompt decoding 9,000 tokens in an 8,192-token
    context) and now name each; a row that just fits is kept."""
    from blendserve_sgl.batch.prompts import input_limit
    from blendserve_sgl.workloads import Record
    from blendserve_sgl.workloads.trace_file import within_context

    ctx = 8192
    rows = [(input_limit(ctx), 1), (input_limit(ctx) + 1, 1), (100, ctx - 102), (100, ctx - 101), (8190, 10)]
    kept, bad = within_context([Record(f"r{i}", p, (), d) for i, (p, d) in enumerate(rows)], ctx, "t.csv", "m")
    assert [r.rid for r in kept] == ["r0", "r2"]
    assert [e.line for e in bad] == [2, 4, 5]
    assert "t.csv data row 2: the prompt is 8,186 tokens, too long for m's context of 8,192 tokens (SGLang takes " \
           "prompts of at most 8,185); not planned" in bad[0].message
    assert "t.csv data row 4: the prompt of 100 tokens and the output of 8,091 need 8,191 tokens, more than SGLang " \
           "runs in m's context of 8,192 tokens (it keeps 2); not planned" in bad[1].message


def test_zero_token_counts_run_as_one_token_and_are_counted(tmp_path, capsys):
    """BurstGPT logs a failed request with 0 response tokens: it ran, silently, as a prefill and
    one token (a probe). It still does (an engine reads and writes at least one), said with counts."""
    path = tmp_path / "b.csv"
    path.write_text("Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
                    "5,ChatGPT,1087,0,1087,Conversation log\n6,ChatGPT,0,0,0,Conversation log\n7,GPT-4,20,9,29,x\n")
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path)] == [(1087, 1), (1, 1), (20, 9)]
    assert "b.csv: 1 rows with a 0-token prompt and 2 with a 0-token output run as 1 token each" in capsys.readouterr().err
    path = tmp_path / "m.jsonl"
    path.write_text('{"input_length": 0, "output_length": 3}\n{"input_length": 4, "output_length": 0}\n')
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path)] == [(1, 3), (4, 1)]
    assert "1 rows with a 0-token prompt and 1 with a 0-token output" in capsys.readouterr().err
    path.write_text('{"input_length": 2, "output_length": 3}\n')
    load_trace_file(path)
    assert capsys.readouterr().err == ""


def test_a_mooncake_format_trace_of_another_block_size_is_read_with_block_size(tmp_path, capsys):
    """The error said the block size did not match and no flag set it (a probe): --block-size."""
    path = tmp_path / "m.jsonl"
    path.write_text('{"input_length": 600, "output_length": 5, "hash_ids": [1, 2, 3, 4, 5]}\n'
                    '{"input_length": 600, "output_length": 5, "hash_ids": [1, 2, 3, 4, 6]}\n')
    out = tmp_path / "s.json"
    assert cli.main(["simulate", "--workload", str(path), "--policy", "fcfs", "--out", str(out)]) == 2
    assert "the block size does not match the trace: pass the trace's block size with --block-size" in capsys.readouterr().err
    assert cli.main(["simulate", "--workload", str(path), "--policy", "fcfs", "--out", str(out),
                     "--block-size", "128"]) == 0
    assert json.loads(out.read_text())["workload"]["sharing"] > 0.4  # four 128-token blocks shared: 512 of 1,200
    assert cli.main(["plan", "--workload", str(path), "--policies", "fcfs", "--no-plot", "--block-size", "128"]) == 0
    assert cli.main(["plan", str(path), "--policies", "fcfs", "--no-plot", "--block-size", "128"]) == 2
    assert "--block-size is the hash-id block of a Mooncake-format trace" in capsys.readouterr().err


def test_hash_ids_that_cover_too_little_or_outnumber_the_tokens_are_said(tmp_path, capsys):
    """A trace of 1,024-token blocks read at 512 shared a quarter where it shares half, without a
    word (a probe): the reader says how few rows' ids cover their prompt. More ids than tokens is
    no block size's fault; the message quotes the file's own input_length."""
    path = tmp_path / "k.jsonl"
    path.write_text('{"input_length": 2048, "output_length": 10, "hash_ids": [1, 2]}\n'
                    '{"input_length": 2048, "output_length": 10, "hash_ids": [1, 3]}\n')
    load_trace_file(path)
    assert ("the hash_ids cover the whole prompt in 0 of the 2 rows that have them, at 512 tokens a block; if the "
            "trace's ids stand for larger blocks, pass its block size with --block-size") in capsys.readouterr().err
    assert [r.prefix for r in load_trace_file(path, block_size=1024)][0] == (("h1", 1024), ("h2", 1024))
    assert capsys.readouterr().err == ""
    path.write_text('{"input_length": 0, "output_length": 1, "hash_ids": [1, 2]}\n')
    with pytest.raises(ValueError, match=r"k.jsonl line 1: 2 hash_ids for input_length 0, more ids than prompt "
                                         r"tokens; fix or delete that line"):
        load_trace_file(path)


def test_block_size_for_a_trace_without_hash_ids_is_refused(tmp_path, capsys):
    """--block-size with a CSV trace or a built-in workload changed nothing, silently (a probe)."""
    path = tmp_path / "t.csv"
    path.write_text("ContextTokens,GeneratedTokens\n100,10\n")
    with pytest.raises(ValueError, match=r"--block-size 16 is the hash-id block of a Mooncake-format JSONL trace; "
                                         r".*t.csv is a CSV of token counts .*: drop --block-size"):
        load_trace_file(path, block_size=16)
    out = tmp_path / "s.json"
    for workload in (str(path), "trace1"):
        assert cli.main(["simulate", "--workload", workload, "--requests", "50", "--policy", "fcfs", "--out", str(out),
                         "--block-size", "16"]) == 2
        assert "drop --block-size" in capsys.readouterr().err
    assert cli.main(["plan", "--workload", str(path), "--block-size", "16", "--no-plot"]) == 2
    assert "drop --block-size" in capsys.readouterr().err


def test_a_missing_trace_path_is_not_taken_for_a_workload_name_and_a_long_header_is_cut(tmp_path):
    """/x/trace.csv.gz that does not exist read "unknown workload"; a 20 MB header was quoted
    whole in the error (a probe)."""
    from blendserve_sgl.sim.cli import load_workload
    from blendserve_sgl.core.cost import CostModel

    cost = CostModel.from_names("llama-3.1-8b", "a100")
    with pytest.raises(FileNotFoundError, match="trace.csv.gz does not exist"):
        load_workload(str(tmp_path / "trace.csv.gz"), None, cost)
    path = tmp_path / "wide.csv"
    path.write_text(",".join(["a"] * 100_000) + "\n1,2\n")
    with pytest.raises(ValueError) as exc:
        load_trace_file(path)
    assert len(str(exc.value)) < 1000 and "(199,999 characters)" in str(exc.value)


def test_a_trace_row_beyond_the_pool_is_told_to_leave_the_trace(tmp_path, capsys):
    """A trace has no max_tokens to lower (the message said to, a probe): the fix named is the row."""
    path = tmp_path / "kv.csv"
    path.write_text("ContextTokens,GeneratedTokens\n100,10\n120000,10\n")
    assert cli.main(["plan", "--workload", str(path), "--kv-gb", "1", "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert f"pass a larger --kv-gb or leave that row out of {path}" in err and "max_tokens" not in err.split(";")[-1]


def test_a_header_in_another_case_and_a_second_pair_are_said(tmp_path, capsys):
    """A lowercase export was refused with the whole list of pairs; a header naming two known pairs
    was read by the first without a word (a probe)."""
    path = tmp_path / "t.csv"
    path.write_text("timestamp,contexttokens,generatedtokens\n0,100,10\n")
    with pytest.raises(ValueError, match="names contexttokens,generatedtokens; the columns are read by their exact "
                                         "names: rename them ContextTokens,GeneratedTokens"):
        load_trace_file(path)
    path.write_text("ContextTokens,GeneratedTokens,input_tokens,output_tokens\n100,10,5,6\n")
    assert [(r.prompt_len, r.output_len) for r in load_trace_file(path)] == [(100, 10)]
    assert ("reads the token counts of ContextTokens,GeneratedTokens; the header also names input_tokens,"
            "output_tokens") in capsys.readouterr().err
