"""The curve method on real data: two digits MLPs from different initialisations."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_cli.config import recipe_from_dict
from merge_cli.connect.path import BEND_FILE, curve_point
from merge_cli.errors import RecipeError
from merge_cli.pipeline import run

REPO = Path(__file__).resolve().parents[2]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _set_models(paths, *names):
    return [arg for name in names for arg in ("--set", f"models.{name}={paths[name]}")]


def _rows(payload, path):
    return {r["metric"]: r["value"] for r in payload["evaluation"] if r.get("path") == path}


def test_curve_recipe_finds_a_path_with_under_a_tenth_of_the_linear_barrier(
    cli, connectivity_models, tmp_path, monkeypatch
):
    monkeypatch.chdir(REPO)
    out = tmp_path / "curve"
    models = _set_models(connectivity_models, "mlp_a", "mlp_b")
    code, stdout, stderr = cli("run", "recipes/connect/curve.yaml", *models, "--out", out, "--json")
    assert code == 0, stderr
    payload = json.loads(stdout)
    linear, curve = _rows(payload, "linear"), _rows(payload, "curve")
    assert linear["loss_barrier"] > 0.3  # a clear barrier on the straight line
    assert curve["loss_barrier"] < 0.1 * linear["loss_barrier"]
    assert curve["error_barrier"] < linear["error_barrier"]

    # The plot holds both paths; the report holds every point of both.
    plot = out / "barrier_mlp_a_mlp_b.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC
    report = json.loads((out / "evaluation.json").read_text())
    details = report["evaluations"][0]["details"]
    assert len(details["linear"]["loss"]) == len(details["curve"]["loss"]) == 11
    assert details["curve"]["loss"][0] == pytest.approx(details["linear"]["loss"][0])
    assert report["evaluations"][0]["plots"] == [str(plot)]

    # The saved model is the curve's point at t = 0.5 through the saved bend.
    with safe_open(str(out / BEND_FILE), framework="pt") as handle:
        assert handle.metadata()["curve"] == "bezier"
    bend = load_file(str(out / BEND_FILE))
    a = load_file(str(connectivity_models["mlp_a"]))
    b = load_file(str(connectivity_models["mlp_b"]))
    expected = curve_point(a, bend, b, 0.5, "bezier")
    merged = load_file(str(out / "model.safetensors"))
    assert merged.keys() == expected.keys()
    for name in merged:
        torch.testing.assert_close(merged[name], expected[name], rtol=0, atol=0)
    assert payload["report"]["bend_file"] == BEND_FILE
    accuracy = {r["model"]: r["value"] for r in payload["evaluation"] if r["metric"] == "accuracy"}
    assert accuracy["merged"] > 0.9

    # `merge-cli eval` scores the saved curve again, from the bend beside the output.
    report_path = tmp_path / "again" / "evaluation.json"
    code, stdout, stderr = cli(
        "eval", "recipes/connect/curve.yaml", *models, "--merged", out,
        "--report", report_path, "--json",
    )  # fmt: skip
    assert code == 0, stderr
    again = json.loads(stdout)
    assert _rows(again, "curve") == pytest.approx(curve)
    assert (report_path.parent / "barrier_mlp_a_mlp_b.png").exists()


def _bn_recipe(tmp_path, paths, **fuse_params):
    return recipe_from_dict(
        {
            "models": {name: str(path) for name, path in paths.items()},
            "task": {
                "model": f"{REPO}/recipes/tasks/digits.py:build_mlp",
                "data": f"{REPO}/recipes/tasks/digits.py:data",
                "params": {"hidden": 16, "depth": 1, "batchnorm": True},
            },
            "fuse": {"method": "curve", "params": {"epochs": 1, **fuse_params}},
            "save": {"path": str(tmp_path / "out")},
        }
    )


def test_batchnorm_statistics_are_recomputed_for_the_saved_point(tmp_path, digits_task):
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        model = digits_task.build_mlp(16, 1, batchnorm=True)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(model.state_dict(), str(paths[name]))
    result = run(_bn_recipe(tmp_path, paths, curve="polychain", t=0.25))
    merged = load_file(str(result.output / "model.safetensors"))
    # Independent check: running stats = the average over training batches of each batch's
    # mean and unbiased variance of the first layer's outputs (cumulative average).
    means, variances = [], []
    with torch.no_grad():
        for images, _ in digits_task.data("train"):
            hidden = images @ merged["layers.0.weight"].T + merged["layers.0.bias"]
            means.append(hidden.mean(0))
            variances.append(hidden.var(0, unbiased=True))
    torch.testing.assert_close(merged["layers.1.running_mean"], torch.stack(means).mean(0))
    torch.testing.assert_close(merged["layers.1.running_var"], torch.stack(variances).mean(0))
    bend = load_file(str(result.output / BEND_FILE))
    assert "layers.1.running_mean" not in bend and "layers.1.weight" in bend
    assert result.report["curve"] == "polychain"


def test_curve_recipe_errors_name_the_problem(tmp_path):
    paths = {"a": tmp_path / "a", "b": tmp_path / "b", "c": tmp_path / "c"}
    with pytest.raises(RecipeError, match="takes at most 2 model"):
        _bn_recipe(tmp_path, paths)
    with pytest.raises(
        RecipeError, match=r"fuse.params.t: Input should be less than or equal to 1"
    ):
        _bn_recipe(tmp_path, {"a": "a", "b": "b"}, t=1.5)
    with pytest.raises(RecipeError, match="needs a task"):
        recipe_from_dict(
            {
                "models": {"a": "a", "b": "b"},
                "fuse": {"method": "curve"},
                "save": {"path": str(tmp_path / "out")},
            }
        )


def test_curve_training_is_deterministic(tmp_path, digits_task):
    paths = {}
    for name, seed in (("a", 1), ("b", 2)):
        torch.manual_seed(seed)
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(digits_task.build_mlp(16, 1).state_dict(), str(paths[name]))
    outputs = []
    for attempt in ("one", "two"):
        recipe = _bn_recipe(tmp_path / attempt, paths, epochs=2)
        recipe.task.params["batchnorm"] = False
        outputs.append(run(recipe).output)
    for file in ("model.safetensors", BEND_FILE):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes()
