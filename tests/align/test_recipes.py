"""The example recipes under recipes/align run end to end through the CLI; recipe checks."""

from __future__ import annotations

import json

import pytest
import torch

from merge_cli.connect.interpolate import interpolate_state_dicts
from merge_cli.io.checkpoint import read_state_dict
from tests.align.conftest import REPO
from tests.conftest import load_safetensors_dir

RECIPES = sorted((REPO / "recipes" / "align").glob("*.yaml"))
BATCHNORM = {"digits_activation_repair": True}


def _overrides(name, files, llamas):
    if name.startswith("llama"):
        return [f"models.{m}={llamas[m]}" for m in ("base", "math", "code")]
    prefix = "bn" if BATCHNORM.get(name) else "mlp"
    return [f"models.a={files[f'{prefix}_a']}", f"models.b={files[f'{prefix}_b']}"]


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_example_recipe_runs(
    recipe, cli, tmp_path, monkeypatch, digits_pair_files, tiny_llamas, align_digits
):
    monkeypatch.chdir(REPO)
    args = [
        a for o in _overrides(recipe.stem, digits_pair_files, tiny_llamas) for a in ("--set", o)
    ]
    code, stdout, stderr = cli("run", recipe, *args, "--out", tmp_path / "out")
    assert code == 0, stderr
    assert "align done" in stderr
    merged = load_safetensors_dir(tmp_path / "out")
    if recipe.stem.startswith("llama"):
        assert "solver" in stderr and "8 components" in stderr
        base = load_safetensors_dir(tiny_llamas["base"])
        assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in base.items()}
        return
    batchnorm = BATCHNORM.get(recipe.stem, False)
    loss, accuracy = align_digits.test_metrics(merged, batchnorm)
    assert accuracy > 0.88, (loss, accuracy)


def test_pipeline_output_is_the_aligned_average(
    cli, tmp_path, monkeypatch, digits_pair_files, digits_pairs, align_digits
):
    """align + linear through the CLI (small chunks: row reads of the permuted view) equals
    the average of the reference and the aligned model computed through the API."""
    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / "align" / "digits_weight_matching.yaml"
    args = [a for o in _overrides("x", digits_pair_files, None) for a in ("--set", o)]
    code, _, stderr = cli(
        "run",
        recipe,
        *args,
        "--out",
        tmp_path / "out",
        "--chunk-mb",
        "1",
        "--set",
        "align.spec=mlp",
    )
    assert code == 0, stderr
    merged = load_safetensors_dir(tmp_path / "out")
    _, views = align_digits.aligned_views("weight_matching", digits_pairs[False], False)
    expected = interpolate_state_dicts(
        read_state_dict(views["a"]), read_state_dict(views["b"]), 0.5
    )
    for name, tensor in expected.items():
        torch.testing.assert_close(merged[name], tensor, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["align.params.max_itr=3"], "align.params.max_itr: Extra inputs are not permitted"),
        (
            ["align.method=zipit", "align.params={}", "fuse.models.a.weight=0.3"],
            "zipit needs fuse: {method: linear}",
        ),
        (
            ["align.method=activation_matching", "align.params={}", "task.data=null"],
            "align method 'activation_matching' needs task.model and task.data",
        ),
        (["align.spec=nonexistent.yaml"], "align.spec: 'nonexistent.yaml' is neither a built-in"),
        (["align.repair=true", "task.data=null"], "align repair needs task.model and task.data"),
        (
            ["align.method=zipit", "align.params={}", "align.repair=true"],
            "align.repair: not supported with zipit",
        ),
    ],
)
def test_recipe_checks(cli, monkeypatch, tmp_path, overrides, message):
    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / "align" / "digits_weight_matching.yaml"
    args = [a for o in overrides for a in ("--set", o)]
    code, stdout, stderr = cli("validate", recipe, *args, "--json")
    assert code == 2
    assert message in json.loads(stdout)["error"]


def test_repair_in_the_pipeline_improves_the_fused_model(
    cli, tmp_path, monkeypatch, digits_pair_files, align_digits
):
    """The same recipe with and without ``align.repair``: REPAIR rewrote the output (new
    BatchNorm statistics) and lowered its test loss."""
    monkeypatch.chdir(REPO)
    recipe = REPO / "recipes" / "align" / "digits_activation_repair.yaml"
    args = [
        a
        for o in _overrides("digits_activation_repair", digits_pair_files, None)
        for a in ("--set", o)
    ]
    for repair in ("true", "false"):
        code, _, stderr = cli(
            "run", recipe, *args, "--set", f"align.repair={repair}", "--out", tmp_path / repair
        )
        assert code == 0, stderr
    repaired, plain = (load_safetensors_dir(tmp_path / r) for r in ("true", "false"))
    assert not torch.equal(repaired["layers.1.running_var"], plain["layers.1.running_var"])
    assert torch.equal(repaired["layers.0.weight"], plain["layers.0.weight"])
    assert align_digits.test_metrics(repaired, True)[0] < align_digits.test_metrics(plain, True)[0]
