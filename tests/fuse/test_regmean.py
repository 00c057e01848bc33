"""RegMean (Jin et al. 2023) against an independent NumPy computation of its closed form."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError
from merge_cli.fuse.datamerge.regmean import gram_matrices, regmean_weight
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.fuse import datamerge_models as dm
from tests.fuse.datamerge_models import one_thread  # noqa: F401 - autouse fixture

TASKS = {"left": "parity", "middle": "wine", "right": "mod3"}
HIDDEN = 6


def layer_inputs(state: dict[str, torch.Tensor], x: torch.Tensor) -> dict[str, np.ndarray]:
    """Inputs of every linear layer of the 2-layer trunk + head, by a manual forward pass."""
    h1 = torch.relu(x @ state["trunk.0.weight"].T + state["trunk.0.bias"])
    h2 = torch.relu(h1 @ state["trunk.2.weight"].T + state["trunk.2.bias"])
    return {
        "trunk.0.weight": x.double().numpy(),
        "trunk.2.weight": h1.double().numpy(),
        "head.weight": h2.double().numpy(),
    }


def test_gram_matrices_are_input_second_moments(tmp_path):
    torch.manual_seed(0)
    model = dm.build("mod3", hidden=HIDDEN, depth=2).eval()
    batches = dm.gauss_data(tmp_path, "train", "mod3")
    grams = gram_matrices(model, batches)
    x = torch.cat([b[0] for b in batches])
    inputs = layer_inputs(model.state_dict(), x)
    assert set(grams) == set(inputs)
    for name, X in inputs.items():
        np.testing.assert_allclose(grams[name].numpy(), X.T @ X / len(X), atol=1e-5, rtol=1e-5)


def test_alpha_zero_is_a_per_input_feature_weighted_average():
    torch.manual_seed(1)
    weights = [torch.randn(3, 4), torch.randn(3, 4)]
    grams = [torch.diag(torch.tensor([1.0, 2.0, 0.5, 4.0])), torch.diag(torch.ones(4))]
    grams = [g + 0.3 * torch.ones(4, 4) for g in grams]  # off-diagonals that alpha=0 removes
    merged = regmean_weight(weights, grams, alpha=0.0)
    d0 = torch.tensor([1.3, 2.3, 0.8, 4.3])
    d1 = torch.full((4,), 1.3)
    expected = (weights[0] * d0 + weights[1] * d1) / (d0 + d1)
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)


def test_single_model_is_returned_unchanged():
    weight = torch.randn(5, 3)
    gram = torch.randn(8, 3).T @ torch.randn(8, 3)
    gram = gram @ gram.T + torch.eye(3)
    torch.testing.assert_close(regmean_weight([weight], [gram], alpha=0.7), weight)


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_regmean_merge_equals_numpy_closed_form(tmp_path, alpha):
    models = dm.task_models(tmp_path / "models", TASKS, hidden=HIDDEN, depth=2)
    recipe = dm.recipe(tmp_path, models, TASKS, "regmean", tmp_path / "out", HIDDEN, 2, alpha=alpha)
    result = run(recipe_from_dict(recipe), RunOptions())
    merged = dm.state(result.output)
    states = {name: dm.state(models[name]) for name in TASKS}
    grams = {}
    for name, task in TASKS.items():  # each model's Gram from its own task's inputs
        x = torch.cat([b[0] for b in dm.gauss_data(tmp_path, "train", task)])
        grams[name] = {k: X.T @ X / len(X) for k, X in layer_inputs(states[name], x).items()}
    for tensor in ("trunk.0.weight", "trunk.2.weight"):
        lhs, rhs = 0, 0
        for name in TASKS:
            G = grams[name][tensor]
            G = alpha * G + (1 - alpha) * np.diag(np.diag(G))
            lhs = lhs + G
            rhs = rhs + G @ states[name][tensor].double().numpy().T
        direct = (np.linalg.inv(lhs) @ rhs).T
        np.testing.assert_allclose(merged[tensor].numpy(), direct, atol=2e-5, rtol=1e-4)
    for tensor in ("trunk.0.bias", "trunk.2.bias"):  # not linear weights: plain average
        average = sum(states[n][tensor] for n in TASKS) / len(TASKS)
        torch.testing.assert_close(merged[tensor], average)
    assert sorted(result.report["regressed_tensors"]) == ["trunk.0.weight", "trunk.2.weight"]
    assert torch.equal(merged["heads.middle.head.weight"], states["middle"]["head.weight"])


def test_gram_cache_is_reused(tmp_path, monkeypatch):
    models = dm.task_models(tmp_path / "models", TASKS, hidden=HIDDEN)
    recipe = dm.recipe(tmp_path, models, TASKS, "regmean", tmp_path / "out", HIDDEN)
    first = dm.state(run(recipe_from_dict(recipe), RunOptions()).output)
    assert len(list((models["left"] / ".merge-cli-cache").glob("gram-*.safetensors"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr("merge_cli.fuse.datamerge.regmean.gram_matrices", fail)
    recipe["fuse"]["params"]["alpha"] = 0.5  # applied at merge time: same statistics
    second = run(recipe_from_dict(recipe), RunOptions(overwrite=True))
    assert all(s["cached"] for s in second.report["statistics"].values())
    assert not torch.equal(first["trunk.0.weight"], dm.state(second.output)["trunk.0.weight"])


def test_zero_input_features_fall_back_to_the_average():
    # A feature that is zero on every model's data leaves the regression undetermined.
    weights = [torch.randn(2, 3), torch.randn(2, 3)]
    x = torch.randn(10, 3)
    x[:, 2] = 0
    grams = [x.T @ x / 10, x.T @ x / 10]
    merged = regmean_weight(weights, grams, alpha=1.0)
    torch.testing.assert_close(merged[:, 2], (weights[0][:, 2] + weights[1][:, 2]) / 2)
    assert torch.isfinite(merged).all()


def test_plan_states_the_gram_cache_size(tmp_path, cli):
    models = dm.task_models(tmp_path / "models", TASKS, hidden=HIDDEN, depth=2)
    path = tmp_path / "regmean.yaml"
    recipe = dm.recipe(tmp_path, models, TASKS, "regmean", tmp_path / "o", HIDDEN, 2)
    path.write_text(yaml.safe_dump(recipe))
    code, out, _ = cli("plan", path, "--json")
    assert code == 0
    # per model: trunk.0 (64 inputs), trunk.2 and head (HIDDEN inputs), float32
    assert json.loads(out)["cache_bytes"] == len(TASKS) * (64**2 + 2 * HIDDEN**2) * 4


def test_num_examples_all_uses_every_example(tmp_path):
    """`num_examples: all` takes the whole split: the same Gram matrices as a count larger
    than the split, different ones from a smaller count."""
    models = dm.task_models(tmp_path / "models", TASKS, hidden=HIDDEN)

    def merged(name: str, count) -> dict[str, torch.Tensor]:
        recipe = dm.recipe(
            tmp_path, models, TASKS, "regmean", tmp_path / name, HIDDEN, num_examples=count
        )
        return dm.state(run(recipe_from_dict(recipe), RunOptions()).output)

    every = merged("all", "all")
    assert torch.equal(every["trunk.0.weight"], merged("many", 10**6)["trunk.0.weight"])
    assert not torch.equal(every["trunk.0.weight"], merged("few", 8)["trunk.0.weight"])
    with pytest.raises(RecipeError, match="num_examples"):
        merged("bad", "some")
