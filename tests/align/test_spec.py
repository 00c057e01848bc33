"""Permutation specs: built-ins and auto-derived specs are symmetries of their models."""

from __future__ import annotations

import pytest
import torch
import yaml

from merge_cli.align.fx_spec import derive_spec
from merge_cli.align.spec import (
    AxisRef,
    Group,
    PermutationSpec,
    chain_spec,
    check_spec,
    llama_spec,
    load_spec_file,
    random_permutations,
    resnet_spec,
)
from merge_cli.errors import PlanError, RecipeError
from merge_cli.io import InMemoryCheckpoint
from tests.align.conftest import REPO


def _axes(spec: PermutationSpec) -> set[tuple[str, int, int]]:
    return {(a.tensor, a.axis, a.block) for g in spec.groups for a in g.axes}


def _order(model: torch.nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules()]


@pytest.fixture
def models(digits_task, test_models):
    """name -> (model with non-trivial norm statistics, example input)."""
    torch.manual_seed(0)
    return {
        "mlp": (digits_task.build_mlp(32, 3), torch.randn(4, 64)),
        "bn_mlp": (
            test_models.randomize_norms(digits_task.build_mlp(32, 3, batchnorm=True)),
            torch.randn(4, 64),
        ),
        "cnn": (test_models.randomize_norms(test_models.build_cnn()), torch.randn(4, 1, 8, 8)),
        "resnet": (
            test_models.randomize_norms(test_models.build_resnet()),
            torch.randn(4, 1, 8, 8),
        ),
    }


@pytest.mark.parametrize("name", ["mlp", "bn_mlp", "cnn"])
def test_chain_spec_is_a_symmetry_and_matches_auto(models, name):
    model, example = models[name]
    checkpoint = InMemoryCheckpoint(model.state_dict())
    spec = chain_spec(checkpoint, _order(model))
    assert len(spec.groups) == (2 if name == "cnn" else 3)
    for seed in range(3):
        assert check_spec(spec, model, example, seed=seed) < 1e-5
    assert _axes(derive_spec(model, example)) == _axes(spec)


def test_cnn_spec_permutes_flattened_channels_in_blocks(models):
    model, _ = models["cnn"]
    spec = chain_spec(InMemoryCheckpoint(model.state_dict()), _order(model))
    assert AxisRef("7.weight", 1, 36, "in") in spec.groups[1].axes
    assert spec.groups[1].producer is None  # a BatchNorm follows: REPAIR resets it instead


def test_resnet_spec_shares_the_residual_stream(models):
    model, example = models["resnet"]
    spec = resnet_spec(InMemoryCheckpoint(model.state_dict()))
    streams = [g for g in spec.groups if g.name.startswith("stream")]
    assert [g.size for g in streams] == [8, 16]
    stream0 = {a.tensor for a in streams[0].axes}
    assert {
        "conv1.weight",
        "layer1.0.conv2.weight",
        "layer1.1.bn2.running_var",
        "layer2.0.conv1.weight",
        "layer2.0.downsample.0.weight",
    } <= stream0
    assert "fc.weight" in {a.tensor for a in streams[1].axes}
    assert len(spec.groups) == 2 + 4  # two streams, one inner group per block
    for seed in range(3):
        assert check_spec(spec, model, example, seed=seed) < 1e-5
    assert _axes(derive_spec(model, example)) == _axes(spec)


def _statistics(spec: PermutationSpec) -> set[str]:
    return {a.tensor for g in spec.groups for a in g.axes if a.statistic}


@pytest.mark.parametrize("name", ["bn_mlp", "cnn", "resnet"])
def test_running_statistics_are_marked_in_every_derived_spec(models, name):
    """BatchNorm running mean/var (and only they) are statistics, left out of weight
    matching's cost; chain/resnet (from names) and auto (from buffers) agree."""
    model, example = models[name]
    checkpoint = InMemoryCheckpoint(model.state_dict())
    built = resnet_spec(checkpoint) if name == "resnet" else chain_spec(checkpoint, _order(model))
    expected = {
        n for n, _ in model.named_buffers() if n.endswith((".running_mean", ".running_var"))
    }
    assert expected and _statistics(built) == expected
    assert _statistics(derive_spec(model, example)) == expected


def test_spec_file_statistics_default_from_names(tmp_path, models):
    model, _ = models["bn_mlp"]
    checkpoint = InMemoryCheckpoint(model.state_dict())
    axes = [
        {"tensor": "layers.0.weight", "axis": 0},
        {"tensor": "layers.1.weight", "axis": 0},
        {"tensor": "layers.1.running_mean", "axis": 0},
        {"tensor": "layers.1.running_var", "axis": 0, "statistic": False},
        {"tensor": "layers.3.weight", "axis": 1},
    ]
    path = tmp_path / "bn.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "h0", "axes": axes}]}))
    spec = load_spec_file(path, checkpoint)
    assert [a.statistic for a in spec.groups[0].axes] == [False, False, True, False, False]


def test_llama_spec_with_grouped_kv_heads(example_models):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(example_models.CONFIG, num_hidden_layers=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    spec = llama_spec(InMemoryCheckpoint(model.state_dict()), config)
    heads = spec.group("model.layers.0.attn.heads")
    assert (heads.size, heads.within) == (4, "model.layers.0.attn.kv")
    assert spec.group("model.layers.0.attn.kv").size == 2
    assert spec.group("model.layers.1.mlp").size == 176
    assert len(spec.components()) == 4  # per layer: MLP, attention
    perms = random_permutations(spec, seed=3)
    kv, q = perms["model.layers.0.attn.kv"], perms["model.layers.0.attn.heads"]
    assert all(int(q[2 * j + i]) // 2 == int(kv[j]) for j in range(2) for i in range(2))
    ids = torch.randint(0, 256, (2, 12))
    for seed in range(3):
        assert check_spec(spec, model, ids, seed=seed, atol=1e-5) < 1e-4


def test_a_wrong_spec_fails_the_check(models):
    model, example = models["mlp"]
    good = chain_spec(InMemoryCheckpoint(model.state_dict()), _order(model))
    first = good.groups[0]
    broken = Group(first.name, first.size, first.axes[:-1])  # forgets the next layer's columns
    with pytest.raises(PlanError, match="does not describe a symmetry"):
        check_spec(PermutationSpec((broken, *good.groups[1:])), model, example)


def test_auto_leaves_units_reaching_unknown_ops_fixed():
    class Concat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(4, 6)
            self.b = torch.nn.Linear(6, 6)
            self.c = torch.nn.Linear(12, 2)

        def forward(self, x):
            h = torch.relu(self.b(torch.relu(self.a(x))))
            return self.c(torch.cat([h, h], dim=1))

    spec = derive_spec(Concat(), torch.randn(2, 4))
    assert [g.name for g in spec.groups] == ["a"]  # b's units flow into torch.cat: fixed
    assert check_spec(spec, Concat(), torch.randn(2, 4)) < 1e-5


def test_spec_file_round_trip_and_errors(tmp_path, models):
    model, example = models["mlp"]
    checkpoint = InMemoryCheckpoint(model.state_dict())
    groups = [
        {
            "name": f"h{i}",
            "sites": [f"layers.{2 * i}"],
            "axes": [
                {"tensor": f"layers.{2 * i}.weight", "axis": 0},
                {"tensor": f"layers.{2 * i}.bias", "axis": 0},
                {"tensor": f"layers.{2 * i + 2}.weight", "axis": 1},
            ],
        }
        for i in range(3)
    ]
    path = tmp_path / "mlp.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    spec = load_spec_file(path, checkpoint)
    assert _axes(spec) == _axes(chain_spec(checkpoint, _order(model)))
    assert spec.groups[0].axes[2].role == "in" and spec.groups[0].size == 32
    check_spec(spec, model, example)

    groups[0]["axes"][0]["axes"] = 1
    path.write_text(yaml.safe_dump({"groups": groups}))
    with pytest.raises(RecipeError, match=r"groups\.0\.axes\.0\.axes: Extra inputs"):
        load_spec_file(path, checkpoint)
    del groups[0]["axes"][0]["axes"]
    groups[1]["axes"][2]["tensor"] = "layers.0.weight"
    path.write_text(yaml.safe_dump({"groups": groups}))
    with pytest.raises(PlanError, match=r"group h1: layers.0.weight axis 1 has shape \(32, 64\)"):
        load_spec_file(path, checkpoint)


def test_resolve_spec_auto_falls_back_to_llama_config(tiny_llamas, digits_task):
    from merge_cli.align.stage import resolve_spec
    from merge_cli.io import open_checkpoint
    from merge_cli.recipe import TaskSpec
    from merge_cli.task import Task

    spec = resolve_spec("auto", open_checkpoint(str(tiny_llamas["base"])), None)
    assert spec.name == "llama" and len(spec.groups) == 3 * 4
    mlp = InMemoryCheckpoint(digits_task.build_mlp(16, 2).state_dict())
    with pytest.raises(PlanError, match="auto needs task.model"):
        resolve_spec("auto", mlp, None)
    task = Task(
        TaskSpec(
            model=f"{REPO}/recipes/tasks/digits.py:build_mlp", params={"hidden": 16, "depth": 2}
        )
    )
    assert [g.size for g in resolve_spec("auto", mlp, task).groups] == [16, 16]
