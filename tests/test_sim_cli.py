"""`blendserve simulate` end to end (small), and its errors on bad input."""

import json

import pytest

from blendserve_sgl import cli


def test_simulate_prints_the_table_and_writes_json_and_png(capsys, tmp_path):
    out = tmp_path / "sim.json"
    rc = cli.main(["simulate", "--workload", "mixed", "--requests", "300", "--policy", "blend,dfs,fcfs",
                   "--hardware", "a100", "--model", "llama-3.1-8b", "--kv-gb", "6", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "of optimal" in text and "blend" in text and "fcfs" in text
    data = json.loads(out.read_text())
    assert data["command"].startswith("blendserve simulate") and data["machine"]
    rows = {r["policy"]: r for r in data["results"]}
    assert set(rows) == {"blend", "dfs", "fcfs"} and rows["dfs"]["overlapped_speedup_vs_dfs"] == 1.0
    for label in ("overlapped", "sequential"):  # against the best other policy, not only dfs
        best = data["blend_vs_best_other"][label]
        fastest = min(("dfs", "fcfs"), key=lambda p: rows[p][f"{label}_time_s"])
        assert best["policy"] == fastest and f"blend vs the best other policy ({label}):" in text
        assert best["speedup"] == pytest.approx(rows[fastest][f"{label}_time_s"] / rows["blend"][f"{label}_time_s"],
                                                rel=1e-3)
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert data["interference"] == 0.1  # `assumed`, the default


def test_a_long_run_tells_stderr_how_far_it_is(capsys, tmp_path, monkeypatch):
    """Every PROGRESS_EVERY_S seconds a run prints its finished requests and step to stderr (0 here:
    every step), and a line when each policy is done; stdout keeps the table alone."""
    from blendserve_sgl.sim import cli as sim_cli

    monkeypatch.setattr(sim_cli, "PROGRESS_EVERY_S", 0.0)
    rc = cli.main(["simulate", "--workload", "mixed", "--requests", "200", "--policy", "fcfs,blend",
                   "--kv-gb", "6", "--out", str(tmp_path / "sim.json")])
    assert rc == 0
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    for policy in ("fcfs", "blend"):
        seen = [ln for ln in lines if ln.startswith(f"  {policy}: ") and "of 200 requests finished" in ln]
        assert seen and f"  {policy}: done in" in captured.err
    assert "requests finished" not in captured.out


@pytest.mark.parametrize("setting", ["0.3", "h200-measured"])
def test_simulate_takes_a_named_interference(tmp_path, setting):
    from blendserve_sgl.core.specs import interference

    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", "trace1", "--requests", "200", "--policy", "fcfs",
                     "--interference", setting, "--out", str(out)]) == 0
    assert json.loads(out.read_text())["interference"] == interference(setting)


@pytest.mark.parametrize("args, message", [
    (["--policy", "blend,lpn"], "unknown policy 'lpn'; choose from fcfs, sglang-lpm, sglang-dfs-weight, dfs, balance, blend "
                                "(SGLang's names lpm and dfs-weight are taken too)"),
    # an empty entry was skipped while an empty list was refused
    (["--policy", "fcfs,,blend"], "--policy 'fcfs,,blend': entry 2 of 3 is empty; separate the names with single commas"),
    (["--policy", "fcfs, "], "--policy 'fcfs, ': entry 2 of 2 is empty"),
    (["--policy", " , "], "--policy ' , ' names no policy; choose from fcfs"),
    (["--workload", "burstgpt"], "unknown workload 'burstgpt'; choose one of trace1, trace2, trace3, trace4, "
                                 "conversation, mixed"),
    (["--workload", " "], "--workload is an empty name; pass one of trace1"),  # was "trace . is not a regular file"
    (["--out", "."], "--out . is a directory; pass the name of a file in it"),  # these three: "PosixPath('.') has
    (["--out", "/"], "--out / is a directory"),  # an empty name" (a probe)
    (["--out", ""], "--out is an empty name; pass a file path"),
    (["--workload", "mix:1.2"], "mix:DENSITY,SHARING"),
    (["--hardware", "tpu"], "unknown hardware preset 'tpu'; choose one of"),
    (["--model", "gpt-5"], "unknown model preset 'gpt-5'; choose one of"),
    (["--out", "no-such-folder-here/x.json"], "the folder no-such-folder-here does not exist"),
    (["--interference", "huge"], "unknown interference 'huge': a number in [0, 1] or one of ['assumed', 'h200-measured']"),
    (["--kv-gb", "nan"], "argument --kv-gb: nan must be a positive number"),
    (["--kv-gb", "0.0000001"], "kv_gb (--kv-gb) 1e-07 holds no token of the KV cache"),
    (["--seed", "-1"], "argument --seed: -1 must be 0 or a positive integer"),
    (["--chunk", "0"], "argument --chunk: 0 must be a positive integer"),
    (["--requests", "3000000"], "--requests 3,000,000: a built-in workload (trace1) is built in memory"),
    (["--out", "{tmp}"], "is a directory; pass the name of a file in it"),
    (["--out", "{tmp}/x.png"], "the plot goes next to the JSON with the suffix .png, so both would be one file"),
    (["--out", "/proc/x.json"], "--out /proc/x.json: cannot write in /proc"),
])
def test_bad_input_is_named_with_the_choices(capsys, tmp_path, args, message):
    try:
        code = cli.main(["simulate", "--requests", "200", "--out", str(tmp_path / "x.json"),
                         *[a.replace("{tmp}", str(tmp_path)) for a in args]])
    except SystemExit as exc:  # argparse's own refusal of a flag's value
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_sglangs_policy_names_are_taken_as_the_simulators(tmp_path):
    """`run --policy` takes SGLang's lpm and dfs-weight; simulate took only sglang-lpm and
    sglang-dfs-weight. Both spellings now run the same picker, once, under the simulator's name."""
    from blendserve_sgl.sim.cli import parse_policies

    assert parse_policies("lpm, dfs-weight,fcfs") == ["sglang-lpm", "sglang-dfs-weight", "fcfs"]
    assert parse_policies("lpm,sglang-lpm") == ["sglang-lpm"]
    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", "trace1", "--requests", "200", "--policy", "dfs-weight,lpm",
                     "--out", str(out)]) == 0
    assert [r["policy"] for r in json.loads(out.read_text())["results"]] == ["sglang-dfs-weight", "sglang-lpm"]


def test_a_trace_of_long_block_chains_runs_under_every_policy(tmp_path):
    """Two Mooncake rows sharing 1,999 blocks: chunked prefill publishes them as a chain of
    about 2,000 cache nodes, which sglang-dfs-weight walked recursively (a RecursionError). The
    prompts (1,024,000 tokens) need a model whose context holds them: `simulate` leaves out rows
    beyond it."""
    from blendserve_sgl.core.specs import _MODEL_CONFIGS

    config = tmp_path / "long" / "config.json"
    config.parent.mkdir()
    config.write_text(json.dumps({**_MODEL_CONFIGS["llama-3.1-8b"], "max_position_embeddings": 1 << 21}))
    path = tmp_path / "deep.jsonl"
    path.write_text("".join(json.dumps({"input_length": 2000 * 512, "output_length": 4,
                                        "hash_ids": [*range(1999), 10**6 + i]}) + "\n" for i in range(2)))
    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", str(path), "--model", str(config), "--hardware", "8xh200", "--kv-gb", "800", "--chunk", "512",
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 6 and all(r["sharing"] > 0.49 for r in rows)  # the second row finds the chain cached


@pytest.mark.parametrize("field, value", [("hidden_size", 0), ("num_attention_heads", "abc"), ("vocab_size", None),
                                          ("num_hidden_layers", 2.5), ("intermediate_size", True)])
def test_a_bad_model_config_field_is_named(capsys, tmp_path, field, value):
    """A field of 0, text, null, a fraction or a boolean was a ZeroDivisionError or TypeError
    traceback, or an unnamed int() message."""
    from blendserve_sgl.core.specs import _MODEL_CONFIGS

    cfg = {**_MODEL_CONFIGS["llama-3.1-8b"], field: value}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert cli.main(["simulate", "--requests", "200", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert f"{field} must be a whole number of at least 1, got {value!r}" in capsys.readouterr().err


def test_a_model_config_that_is_not_json_is_named(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{")
    assert cli.main(["simulate", "--requests", "200", "--model", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2
    assert f"model config {tmp_path / 'config.json'} is not JSON" in capsys.readouterr().err


def test_times_under_a_second_keep_three_significant_figures():
    """A simulated run of a few milliseconds read `0` s beside its throughput in the table and
    the JSON (a probe); a second or more keeps hundredths, as the benchmarks' files have them."""
    from blendserve_sgl.sim.metrics import seconds

    assert [seconds(x) for x in (0.0016489, 0.0, 0.5, 2.5, 1234.5678)] == [0.00165, 0.0, 0.5, 2.5, 1234.57]


def test_the_conversation_class_is_a_workload_of_simulate(tmp_path):
    """The workloads package builds the multi-turn conversation class (`trace("conversation")`);
    simulate and plan refused its name ("unknown workload", a probe)."""
    out = tmp_path / "sim.json"
    assert cli.main(["simulate", "--workload", "conversation", "--requests", "40", "--policy", "fcfs",
                     "--out", str(out)]) == 0
    workload = json.loads(out.read_text())["workload"]
    assert workload["name"] == "conversation" and workload["requests"] == 40 and workload["sharing"] > 0


def test_a_file_named_like_a_built_in_workload_is_not_passed_over(tmp_path, monkeypatch, capsys):
    """A trace saved as ./trace1 was ignored for the built-in trace1, silently (a probe)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "trace1").write_text("ContextTokens,GeneratedTokens\n10,2\n")
    assert cli.main(["simulate", "--workload", "trace1", "--requests", "50", "--policy", "fcfs"]) == 2
    assert "names a built-in workload and the file ./trace1 here: pass ./trace1" in capsys.readouterr().err
    assert cli.main(["simulate", "--workload", "./trace1", "--policy", "fcfs", "--out", "s.json"]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["workload"]["requests"] == 1


def test_a_device_out_gets_no_plot_and_a_pipe_nothing_reads_is_refused(tmp_path, capsys, monkeypatch):
    """`--out /dev/null` wrote a new file /dev/null.png; a named pipe that nothing read made the
    command wait for ever once the work was done, its results lost (a probe)."""
    import os

    made = []
    monkeypatch.setattr("blendserve_sgl.sim.cli.plot_steps", lambda *a, **k: made.append(a[1]))
    args = ["simulate", "--workload", "mixed", "--requests", "60", "--policy", "fcfs"]
    assert cli.main([*args, "--out", os.devnull]) == 0
    assert not made and "wrote /dev/null (no plot: --out is not a file)" in capsys.readouterr().out
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    assert cli.main([*args, "--out", str(fifo)]) == 2
    assert f"--out {fifo} is a named pipe that nothing reads (the write would wait for ever); start its reader " \
           "first" in capsys.readouterr().err
    from blendserve_sgl.sglang_plugin import settings

    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader: the results go through the pipe
    try:
        assert cli.main([*args, "--out", str(fifo)]) == 0 and not made
        data = os.read(reader, 1 << 16)  # the whole JSON (under the pipe's buffer); its end comes when the
        assert json.loads(data)["command"].startswith("blendserve simulate")  # process's held write end closes
    finally:
        os.close(reader)
        while settings._HELD_PIPES:
            os.close(settings._HELD_PIPES.pop())


def test_ctrl_c_is_one_line_and_exit_130_and_counts_beyond_python_are_refused(capsys, monkeypatch):
    """Ctrl-C in `simulate` or `plan` printed a 30-line traceback; --requests 99999999999999999999
    failed inside itertools.islice with a message that did not name the flag (a probe)."""
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr("blendserve_sgl.sim.cli.main", interrupted)
    assert cli.main(["simulate", "--workload", "mixed"]) == 130
    assert capsys.readouterr().err == "blendserve simulate: interrupted\n"
    monkeypatch.undo()
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--workload", "mixed", "--requests", "99999999999999999999"])
    assert exc.value.code == 2
    assert "argument --requests: 99999999999999999999 must be at most 2**63 - 1" in capsys.readouterr().err
