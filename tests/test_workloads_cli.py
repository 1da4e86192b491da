"""The workloads package: loaders, one generator per class, the fixed-fraction recipe, the tree builder."""

import pytest

import numpy as np

from blendserve_sgl import cli, workloads
from blendserve_sgl.core import CostModel
from blendserve_sgl.sim.policies import reference_tree
from blendserve_sgl.sim.request import from_records

COST = CostModel.from_names("llama-3.1-8b", "a100")


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
        workloads.mixed_workload(10, mix={"movies": 1.0})
    with pytest.raises(ValueError, match=">= 1"):
        workloads.mixed_workload(0)


def test_build_tree_holds_every_record():
    recs = workloads.mixed_workload(500, seed=1)
    tree = workloads.build_tree(recs, COST)
    tree.check_integrity()
    assert len(tree) == 500 and tree.root.saved > 0


@pytest.mark.parametrize("kind", workloads.CLASSES)
def test_each_class_is_seeded_and_well_formed(kind):
    a = workloads.class_records(kind, 300, np.random.default_rng(5), start=10)
    assert a == workloads.class_records(kind, 300, np.random.default_rng(5), start=10)
    assert a != workloads.class_records(kind, 300, np.random.default_rng(6), start=10)
    assert len(a) == 300 and len({r.rid for r in a}) == 300
    for r in a:
        assert r.prompt_len >= sum(n for _, n in r.prefix) >= workloads.SYSTEM_PROMPT_TOKENS and r.output_len >= 1


def test_unknown_class_is_rejected():
    with pytest.raises(ValueError, match="unknown request class 'nope'; choose one of"):
        workloads.class_records("nope", 3, np.random.default_rng(0))


def test_fixed_fraction_recipe_counts():
    recs = workloads.mixed_workload(1000, seed=2, mix={"mmlu": 0.5, "video": 0.2, "arxiv": 0.3})
    kinds = [r.kind for r in recs]
    assert (kinds.count("mmlu"), kinds.count("video"), kinds.count("arxiv")) == (500, 200, 300)


def test_synthetic_classes_are_seeded():
    assert workloads.synthetic_mix(200, 3) == workloads.synthetic_mix(200, 3) != workloads.synthetic_mix(200, 4)
    assert workloads.three_tier(90, 1) == workloads.three_tier(90, 1)
    toks = workloads.token_prompts(2, 50)
    assert toks == workloads.token_prompts(2, 50) and all(r.prompt_len == len(r.tokens) for r in toks)


def test_one_tree_builder_for_records_and_simulator_requests():
    """The simulator's reference tree is the same builder over its requests: equal aggregates."""
    for recs in (workloads.synthetic_mix(300, 0), workloads.token_prompts(1, 120)):
        a, b = workloads.build_tree(recs, COST), reference_tree(from_records(recs), COST)
        assert (a.root.count, a.root.tokens, a.root.saved) == (b.root.count, b.root.tokens, b.root.saved)
        assert [r.rid for r in a.iter_requests()] == [r.rid for r in b.iter_requests()]


def test_cli_unknown_command(capsys):
    assert cli.main(["nope"]) == 2
