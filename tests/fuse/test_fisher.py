"""Fisher merging (Matena & Raffel 2022) against hand and independent computations."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch
import yaml

from merge_cli.config import recipe_from_dict
from merge_cli.fuse.datamerge.fisher import diagonal_fisher, fisher_average
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from merge_cli.save import REPORT_FILE
from tests.conftest import single_thread
from tests.fuse import datamerge_models as dm
from tests.fuse.datamerge_models import one_thread  # noqa: F401 - autouse fixture

TASKS = {"left": "parity", "right": "mod3"}


def autograd_fisher(model: torch.nn.Module, batches, labels: str) -> dict[str, torch.Tensor]:
    """Independent per-example loop: squared gradients of log p(y|x), one backward each."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for inputs, targets in batches:
        for x, y in zip(inputs, targets, strict=True):
            log_p = torch.log_softmax(model(x[None])[0], -1)
            classes = range(len(log_p)) if labels == "expected" else [int(y)]
            for c in classes:
                grads = torch.autograd.grad(log_p[c], list(params.values()), retain_graph=True)
                weight = log_p[c].exp().detach() if labels == "expected" else 1.0
                for name, g in zip(params, grads, strict=True):
                    total[name] += weight * g.square()
            count += 1
    return {n: t / count for n, t in total.items()}


def test_expected_fisher_of_softmax_regression_is_closed_form(tmp_path):
    # For p = softmax(W x + b): sum_c p_c (d log p_c / dW_kj)^2 = p_k (1 - p_k) x_j^2.
    torch.manual_seed(0)
    model = dm.build("mod3", depth=0).eval()
    batches = dm.gauss_data(tmp_path, "train", "mod3")
    fisher = diagonal_fisher(model, batches, "expected")
    x = torch.cat([b[0] for b in batches])
    with torch.no_grad():
        p = torch.softmax(model(x), -1)
    variance = p * (1 - p)
    expected_weight = (variance[:, :, None] * x[:, None, :].square()).mean(0)
    assert set(fisher) == {"head.weight", "head.bias"}
    torch.testing.assert_close(fisher["head.weight"], expected_weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(fisher["head.bias"], variance.mean(0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("labels", ["expected", "empirical"])
def test_fisher_matches_per_example_autograd(tmp_path, labels):
    torch.manual_seed(1)
    model = dm.build("mod3", hidden=6, depth=2).eval()
    batches = dm.gauss_data(tmp_path, "train", "mod3")
    fisher = diagonal_fisher(model, batches, labels)
    reference = autograd_fisher(model, batches, labels)
    for name in reference:
        torch.testing.assert_close(fisher[name], reference[name], atol=1e-6, rtol=1e-4)


def test_sampled_fisher_is_seeded_and_estimates_the_expected_fisher(tmp_path):
    torch.manual_seed(2)
    model = dm.build("wine", hidden=6, depth=1).eval()
    batches = [(x, y) for _ in range(8) for x, y in dm.gauss_data(tmp_path, "train", "wine")]
    first = diagonal_fisher(model, batches, "sampled", seed=3)
    again = diagonal_fisher(model, batches, "sampled", seed=3)
    expected = diagonal_fisher(model, batches, "expected")
    for name in first:
        assert torch.equal(first[name], again[name])
    flat = torch.cat([first[n].flatten() for n in first])
    exact = torch.cat([expected[n].flatten() for n in expected])
    assert torch.corrcoef(torch.stack([flat, exact]))[0, 1] > 0.9


def test_fisher_average_floors_and_weights():
    tensors = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0])]
    fishers = [torch.tensor([1.0, 0.0, 0.0]), torch.tensor([3.0, 0.0, 1.0])]
    merged = fisher_average(tensors, fishers, [1.0, 1.0], epsilon=1e-6)
    # (1*1 + 3*3)/(1+3) = 2.5; both floored -> plain mean 2; (1e-6*1 + 1*3)/(1 + 1e-6) ~ 3
    torch.testing.assert_close(merged, torch.tensor([2.5, 2.0, 3.0]), atol=1e-5, rtol=0)
    weighted = fisher_average(tensors, fishers, [3.0, 1.0], epsilon=1e-6)
    torch.testing.assert_close(weighted[:2], torch.tensor([2.0, 1.5]))


@pytest.fixture
def models(tmp_path):
    return dm.task_models(tmp_path / "models", TASKS, hidden=6)


def test_fisher_merge_equals_direct_computation_with_per_model_tasks(tmp_path, models):
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    recipe["fuse"]["models"] = {"left": {"weight": 2.0}, "right": {"weight": 1.0}}
    result = run(recipe_from_dict(recipe), RunOptions())
    merged = dm.state(result.output)

    states = {name: dm.state(models[name]) for name in TASKS}
    fishers, weights = {}, {"left": 2.0, "right": 1.0}
    for name, task in TASKS.items():  # each model on its own task's data, with its own head
        model = dm.build(task, hidden=6)
        model.load_state_dict(states[name])
        fishers[name] = autograd_fisher(
            model.eval(), dm.gauss_data(tmp_path, "train", task), "expected"
        )
    for tensor in ("trunk.0.weight", "trunk.0.bias"):
        precision = {n: weights[n] * fishers[n][tensor].clamp_min(1e-6) for n in TASKS}
        direct = sum(precision[n] * states[n][tensor] for n in TASKS) / sum(precision.values())
        torch.testing.assert_close(merged[tensor], direct, atol=1e-6, rtol=1e-4)
    # Heads are kept per model, never merged; the base's head is dropped.
    assert sorted(k for k in merged if "head" in k) == [
        "heads.left.head.bias", "heads.left.head.weight",
        "heads.right.head.bias", "heads.right.head.weight",
    ]  # fmt: skip
    assert torch.equal(merged["heads.right.head.weight"], states["right"]["head.weight"])
    report = json.loads((result.output / REPORT_FILE).read_text())
    assert report == result.report and report["method"] == "fisher"


def test_fisher_cache_is_reused_and_keyed_on_params(tmp_path, models, monkeypatch):
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    first = run(recipe_from_dict(recipe), RunOptions())
    first_state = dm.state(first.output)
    files = sorted((models["left"] / ".merge-cli-cache").glob("fisher-*.safetensors"))
    assert len(files) == 1
    assert [s["cached"] for s in first.report["statistics"].values()] == [False, False]

    def fail(*args, **kwargs):
        raise AssertionError("the Fisher was recomputed despite a cache")

    monkeypatch.setattr("merge_cli.fuse.datamerge.fisher.diagonal_fisher", fail)
    second = run(recipe_from_dict(recipe), RunOptions(overwrite=True))
    assert [s["cached"] for s in second.report["statistics"].values()] == [True, True]
    second_state = dm.state(second.output)
    assert second_state.keys() == first_state.keys()
    assert all(torch.equal(second_state[name], first_state[name]) for name in first_state)
    recipe["fuse"]["params"]["num_examples"] = 20  # another key: must recompute
    with pytest.raises(AssertionError, match="recomputed"):
        run(recipe_from_dict(recipe), RunOptions(overwrite=True))


def test_fisher_cache_falls_back_when_the_model_directory_is_not_writable(
    tmp_path, models, monkeypatch
):
    fallback = tmp_path / "fallback"
    monkeypatch.setenv("MERGE_CLI_CACHE", str(fallback))
    for name in TASKS:  # a file where the cache directory should go: it cannot be created
        (models[name] / ".merge-cli-cache").write_text("not a directory")
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    result = run(recipe_from_dict(recipe), RunOptions())
    assert len(list(fallback.glob("fisher-*.safetensors"))) == 2
    assert all(str(fallback) in s["file"] for s in result.report["statistics"].values())
    again = run(recipe_from_dict(recipe), RunOptions(overwrite=True))
    assert all(s["cached"] for s in again.report["statistics"].values())


def test_plan_states_the_cache_size(tmp_path, models, cli):
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    path = tmp_path / "fisher.yaml"
    path.write_text(yaml.safe_dump(recipe))
    code, out, _ = cli("plan", path, "--json")
    assert code == 0
    summary = json.loads(out)
    floats = sum(t.numel() * 4 for n in TASKS for t in dm.state(models[n]).values())
    assert summary["cache_bytes"] == floats and summary["streaming"] is False
    code, out, _ = cli("plan", path)
    assert "statistics caches need" in out


def test_models_with_different_heads_need_the_heads_param(tmp_path, models):
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    del recipe["fuse"]["params"]["heads"]
    from merge_cli.errors import PlanError

    with pytest.raises(PlanError, match=r"head\.weight.*set the method's `heads`"):
        run(recipe_from_dict(recipe), RunOptions())


def test_read_only_copy_is_not_needed_for_a_rerun(tmp_path, models):
    # The cache travels with the model directory.
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    run(recipe_from_dict(recipe), RunOptions())
    moved = {name: tmp_path / "moved" / name for name in models}
    for name, path in models.items():
        shutil.copytree(path, moved[name])
    recipe = dm.recipe(tmp_path, moved, TASKS, "fisher", tmp_path / "out2", hidden=6)
    result = run(recipe_from_dict(recipe), RunOptions())
    assert all(s["cached"] for s in result.report["statistics"].values())


def test_cache_false_writes_no_cache(tmp_path, models, monkeypatch):
    """`cache: false`: same merge, and no statistics file anywhere (beside the models or in
    the fallback directory)."""
    fallback = tmp_path / "fallback-cache"
    monkeypatch.setenv("MERGE_CLI_CACHE", str(fallback))
    uncached = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "a", hidden=6, cache=False)
    result = run(recipe_from_dict(uncached), RunOptions())
    assert not list(tmp_path.rglob(".merge-cli-cache")) and not fallback.exists()
    assert [s["file"] for s in result.report["statistics"].values()] == [None, None]
    cached = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "b", hidden=6)
    reference = dm.state(run(recipe_from_dict(cached), RunOptions()).output)
    assert list(tmp_path.rglob(".merge-cli-cache"))  # the default does cache
    merged = dm.state(result.output)
    assert all(torch.equal(merged[name], reference[name]) for name in reference)


def test_threads_option_reaches_whole_model_methods(tmp_path, models, monkeypatch):
    """--threads sets torch's threads for a whole-model method's fuse too."""
    from merge_cli.fuse import METHODS

    seen = []
    fisher = METHODS["fisher"]

    def fuse(recipe, checkpoints, options):
        seen.append(torch.get_num_threads())
        return fisher.fuse(recipe, checkpoints, options)

    monkeypatch.setitem(METHODS, "fisher", dataclasses.replace(fisher, fuse=fuse))
    recipe = dm.recipe(tmp_path, models, TASKS, "fisher", tmp_path / "out", hidden=6)
    with single_thread():  # torch's threads outside the run: 1
        run(recipe_from_dict(recipe), RunOptions(threads=2))
        assert torch.get_num_threads() == 1  # restored afterwards
    assert seen == [2]
