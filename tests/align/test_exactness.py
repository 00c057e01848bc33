"""A network and a randomly permuted copy of it are aligned back exactly."""

from __future__ import annotations

import pytest
import torch

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.spec import (
    chain_spec,
    llama_spec,
    permute_state_dict,
    random_permutations,
    resnet_spec,
)
from merge_cli.errors import PlanError
from merge_cli.io import InMemoryCheckpoint, open_checkpoint
from merge_cli.io.checkpoint import read_state_dict
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task
from tests.align.conftest import MODELS_FILE, REPO

DIGITS = REPO / "recipes" / "tasks" / "digits.py"


def _networks(digits_task, test_models):
    """name -> (model, spec builder, task spec for data-driven methods)."""
    torch.manual_seed(0)
    mlp_task = TaskSpec(model=f"{DIGITS}:build_mlp", data=f"{DIGITS}:data", params={"hidden": 32})
    image = f"{MODELS_FILE}:image_data"
    return {
        "mlp": (digits_task.build_mlp(32, 3), "mlp", mlp_task),
        "bn_mlp": (
            test_models.randomize_norms(digits_task.build_mlp(32, 3, batchnorm=True)),
            "mlp",
            TaskSpec(
                model=f"{DIGITS}:build_mlp",
                data=f"{DIGITS}:data",
                params={"hidden": 32, "batchnorm": True},
            ),
        ),
        "cnn": (
            test_models.randomize_norms(test_models.build_cnn()),
            "cnn",
            TaskSpec(model=f"{MODELS_FILE}:build_cnn", data=image),
        ),
        "resnet": (
            test_models.randomize_norms(test_models.build_resnet()),
            "resnet",
            TaskSpec(model=f"{MODELS_FILE}:build_resnet", data=image),
        ),
    }


def _spec(kind, model, checkpoint):
    if kind == "resnet":
        return resnet_spec(checkpoint)
    return chain_spec(checkpoint, [n for n, _ in model.named_modules()])


def _align(method, checkpoints, spec, task_spec=None, **params):
    aligner = ALIGNERS[method]
    task = Task(task_spec) if task_spec is not None else None
    maps = aligner.align(
        checkpoints, "ref", spec, aligner.params.model_validate(params), AlignContext(task, print)
    )
    return {
        n: PermutedCheckpoint(c, spec, maps[n]) if n in maps else c for n, c in checkpoints.items()
    }


@pytest.mark.parametrize("name", ["mlp", "bn_mlp", "cnn", "resnet"])
@pytest.mark.parametrize("method", ["weight_matching", "activation_matching"])
def test_permuted_copy_is_aligned_back_exactly(digits_task, test_models, name, method):
    model, kind, task_spec = _networks(digits_task, test_models)[name]
    state = model.state_dict()
    spec = _spec(kind, model, InMemoryCheckpoint(state))
    permuted = permute_state_dict(state, spec, random_permutations(spec, seed=7))
    assert any(not torch.equal(permuted[k], state[k]) for k in state)
    checkpoints = {"ref": InMemoryCheckpoint(state), "other": InMemoryCheckpoint(permuted)}
    views = _align(method, checkpoints, spec, task_spec)
    assert views["ref"] is checkpoints["ref"]
    aligned = read_state_dict(views["other"])
    assert all(torch.equal(aligned[k], state[k]) for k in state)


def test_llama_with_grouped_kv_heads_is_aligned_back_exactly(tmp_path, tiny_llamas, example_models):
    reference = open_checkpoint(str(tiny_llamas["base"]))
    spec = llama_spec(reference)
    state = read_state_dict(reference)
    perms = random_permutations(spec, seed=5)
    assert not torch.equal(perms["model.layers.0.attn.heads"], torch.arange(4))
    example_models.save_hf_directory(
        permute_state_dict(state, spec, perms), tmp_path / "permuted", example_models.CONFIG
    )
    checkpoints = {"ref": reference, "other": open_checkpoint(str(tmp_path / "permuted"))}
    views = _align("weight_matching", checkpoints, spec)
    aligned = read_state_dict(views["other"])
    assert all(torch.equal(aligned[k], state[k]) for k in state)
    # rows of a head-permuted tensor read through the view equal the aligned tensor's rows
    q = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(views["other"].read(q, (10, 37)), state[q][10:37])
    # data-driven methods need an activation site on every group
    with pytest.raises(PlanError, match="no activation site"):
        _align(
            "activation_matching",
            checkpoints,
            spec,
            TaskSpec(model="transformers", data=f"{DIGITS}:data"),
        )


def test_sinkhorn_with_small_regularisation_recovers_the_permutation(digits_task, test_models):
    model, _, task_spec = _networks(digits_task, test_models)["mlp"]
    state = model.state_dict()
    spec = chain_spec(InMemoryCheckpoint(state))
    permuted = permute_state_dict(state, spec, random_permutations(spec, seed=1))
    checkpoints = {"ref": InMemoryCheckpoint(state), "other": InMemoryCheckpoint(permuted)}
    for cost in ("weights", "activations"):
        views = _align("sinkhorn", checkpoints, spec, task_spec, cost=cost, reg=0.001)
        aligned = read_state_dict(views["other"])
        for k in state:
            torch.testing.assert_close(aligned[k], state[k], atol=1e-5, rtol=0)


def test_zipit_of_a_network_and_its_permuted_copy_is_the_network(digits_task, test_models):
    model, _, task_spec = _networks(digits_task, test_models)["mlp"]
    state = model.state_dict()
    spec = chain_spec(InMemoryCheckpoint(state))
    permuted = permute_state_dict(state, spec, random_permutations(spec, seed=2))
    checkpoints = {"ref": InMemoryCheckpoint(state), "other": InMemoryCheckpoint(permuted)}
    views = _align("zipit", checkpoints, spec, task_spec, beta=0.5)
    a, b = read_state_dict(views["ref"]), read_state_dict(views["other"])
    for k in state:  # every feature is zipped with its twin: the average is the network
        torch.testing.assert_close((a[k] + b[k]) / 2, state[k], atol=1e-5, rtol=1e-5)
