"""Workloads from the real traces, and the `blendserve plan` command end to end (small)."""

import pytest

from blendserve_sgl import cli, workloads
from blendserve_sgl.core import CostModel


def test_mixed_workload_is_seeded_and_shaped():
    a = workloads.mixed_workload(2000, seed=3)
    b = workloads.mixed_workload(2000, seed=3)
    assert a == b and len(a) == 2000
    assert len({r.rid for r in a}) == 2000
    kinds = {r.kind for r in a}
    assert kinds == {"mmlu", "azure-code", "azure-conv", "long-output"}
    for r in a:
        assert r.prompt_len >= sum(n for _, n in r.prefix) and r.output_len >= 1
    mmlu = [r for r in a if r.kind == "mmlu"]
    assert all(len(r.prefix) == 2 for r in mmlu)  # system prompt + per-subject 5-shot prefix
    assert workloads.mixed_workload(2000, seed=4) != a


def test_trace_lengths_match_the_published_means():
    """The data README gives Azure code context mean 2,048 / output 28, conv 1,155 / 211."""
    p, d = workloads.load_azure("code")
    assert abs(p.mean() - 2048) < 5 and abs(d.mean() - 28) < 1
    p, d = workloads.load_azure("conv")
    assert abs(p.mean() - 1155) < 5 and abs(d.mean() - 211) < 2


def test_missing_data_names_the_file_and_its_source(monkeypatch, tmp_path):
    monkeypatch.setenv("BLENDSERVE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="AzureLLMInferenceTrace_code.csv.*AzurePublicDataset"):
        workloads.load_azure("code")


def test_bad_mix_is_rejected():
    with pytest.raises(ValueError, match="bad mix"):
        workloads.mixed_workload(10, mix={"video": 1.0})
    with pytest.raises(ValueError, match=">= 1"):
        workloads.mixed_workload(0)


def test_build_tree_holds_every_record():
    recs = workloads.mixed_workload(500, seed=1)
    tree = workloads.build_tree(recs, CostModel.from_names("llama-3.1-8b", "a100"))
    tree.check_integrity()
    assert len(tree) == 500 and tree.root.saved > 0


def test_plan_command_runs_and_reports(capsys, tmp_path):
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--requests", "600", "--kv-gb", "4", "--slots", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "blend vs dfs: prefix sharing kept" in text
    import json

    data = json.loads(out.read_text())
    assert data["command"].startswith("blendserve plan") and 0 < data["sharing_vs_dfs"] <= 1.0 + 1e-9
    assert 0 < data["blend_fraction_of_overlap"] <= 1.0


def test_cli_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
