"""Multi-task merging on real data: the orderings the Fisher, RegMean and AdaMerging papers
report, and the example recipes under recipes/datamerge/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from merge_cli.task import load_module
from tests.conftest import single_thread
from tests.fuse.datamerge_models import one_thread  # noqa: F401 - autouse fixture

REPO = Path(__file__).resolve().parents[2]
RECIPES = sorted((REPO / "recipes" / "datamerge").glob("*.yaml"))


@pytest.fixture(scope="session")
def multitask_script():
    return load_module(REPO / "scripts" / "multitask_merging.py")


@pytest.fixture(scope="session")
def multitask(tmp_path_factory, multitask_script):
    """Pre-train, fine-tune on 5 tasks, merge with every method (the benchmark's defaults)."""
    with single_thread():  # tiny models: one thread is several times faster
        return multitask_script.benchmark(tmp_path_factory.mktemp("multitask"))


def average(outcome, method: str) -> float:
    return outcome["results"][method]["average"]


def test_every_method_is_compared_on_every_task(multitask, multitask_script):
    results = multitask["results"]
    expected = {"individual", "simple average", "task arithmetic", "fisher", "regmean"}
    assert expected | {"adamerging"} <= set(results)
    for row in results.values():
        assert set(row) == {*multitask_script.TASKS, "average"}
        assert all(0.4 <= value <= 1.0 for value in row.values())
    # merging costs accuracy against each task's own fine-tuned model
    assert max(average(multitask, m) for m in results if m != "individual") < average(
        multitask, "individual"
    )


def test_regmean_and_adamerging_beat_task_arithmetic(multitask):
    assert average(multitask, "regmean") > average(multitask, "task arithmetic")
    assert average(multitask, "adamerging") > average(multitask, "task arithmetic")


def test_fisher_is_at_least_as_good_as_the_simple_average(multitask):
    assert average(multitask, "fisher") >= average(multitask, "simple average")


def test_adamerging_reports_layer_wise_coefficients(multitask, multitask_script):
    report = multitask["reports"]["adamerging"]
    assert report["granularity"] == "layer"
    assert set(report["coefficients"]) == set(multitask_script.TASKS)
    assert set(report["coefficients"]["wine"]) == {
        "trunk.0.weight", "trunk.0.bias", "trunk.2.weight", "trunk.2.bias",
    }  # fmt: skip


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.stem)
def test_example_recipes_run(recipe, multitask, cli, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # the recipes' task files are relative to the repository
    overrides = []
    for name, path in multitask["paths"].items():
        overrides += ["--set", f"models.{name}.path={path}"]
    if recipe.stem == "adamerging":
        overrides += ["--set", "fuse.params.steps=50"]
    code, out, err = cli("plan", recipe, *overrides, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    assert json.loads(out)["cache_bytes"] >= 0
    code, out, err = cli("run", recipe, *overrides, "--out", tmp_path / "out", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["report"]["method"] == recipe.stem
    from merge_cli.io import open_checkpoint

    names = open_checkpoint(str(tmp_path / "out")).tensor_names()
    assert "trunk.0.weight" in names and "heads.wine.head.weight" in names
    assert "head.weight" not in names


PER_TENSOR_RECIPES = sorted((REPO / "recipes" / "multitask").glob("*.yaml"))


@pytest.mark.parametrize("recipe", PER_TENSOR_RECIPES, ids=lambda path: path.stem)
def test_per_tensor_recipes_keep_task_specific_heads(recipe, multitask, cli, tmp_path):
    """task_arithmetic, TIES and the simple average run on models whose heads differ in
    shape (2 and 3 classes) from the recipe alone."""
    overrides = []
    for name, path in multitask["paths"].items():
        overrides += ["--set", f"models.{name}={path}"]
    code, out, err = cli("run", recipe, *overrides, "--out", tmp_path / "out", "--json")
    assert code == 0, out + err
    assert json.loads(out)["plan"]["method"] == recipe.stem
    from merge_cli.io import open_checkpoint

    merged = open_checkpoint(str(tmp_path / "out"))
    assert merged.info("heads.wine.head.weight").shape == (3, 128)
    assert merged.info("heads.parity.head.weight").shape == (2, 128)
    assert merged.info("trunk.0.weight").shape == (128, 64)
    assert "head.weight" not in merged.tensor_names()


def test_ties_is_compared_from_its_recipe(multitask):
    assert "ties" in multitask["results"]
    assert 0.4 <= average(multitask, "ties") < average(multitask, "individual")
