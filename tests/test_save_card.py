"""The save stage's files beside the weights: config.json's dtype, the model card (Hub front
matter, model-index), the user's original recipe."""

from __future__ import annotations

import json

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.pipeline import run


def _linear(tiny_llamas, out, **save):
    return recipe_from_dict(
        {
            "models": {name: str(path) for name, path in tiny_llamas.items()},
            "fuse": {"method": "linear", "models": ["math", "code"]},
            "save": {"path": str(out), **save},
        }
    )


@pytest.mark.parametrize(
    ("dtype", "expected"), [("float16", torch.float16), ("float32", torch.float32)]
)
def test_save_dtype_is_written_to_config(tiny_llamas, tmp_path, dtype, expected):
    """The inputs' config says bfloat16; the shards hold save.dtype, and so does config.json,
    so from_pretrained(dtype="auto") loads what was written."""
    from transformers import AutoModelForCausalLM

    assert json.loads((tiny_llamas["base"] / "config.json").read_text())["torch_dtype"] == (
        "bfloat16"
    )
    output = run(_linear(tiny_llamas, tmp_path / "out", dtype=dtype)).output
    config = json.loads((output / "config.json").read_text())
    assert config["torch_dtype"] == dtype and config["dtype"] == dtype
    assert config["hidden_size"] == 64  # the rest of the base's config is kept
    model = AutoModelForCausalLM.from_pretrained(output, dtype="auto")
    assert model.dtype == expected
    assert model.model.layers[0].mlp.up_proj.weight.dtype == expected


def test_save_dtype_keep_leaves_config_as_copied(tiny_llamas, tmp_path):
    output = run(_linear(tiny_llamas, tmp_path / "out")).output
    copied = json.loads((tiny_llamas["base"] / "config.json").read_text())
    assert json.loads((output / "config.json").read_text()) == copied


def _hub_inputs(tiny_llamas, tmp_path, monkeypatch, licenses):
    """The tiny Llamas as if downloaded from the Hub: ``hf://org/NAME`` resolves to a copy
    of the local checkpoint whose own card gives ``licenses[NAME]``."""
    import shutil

    from merge_cli.io import resolve

    hub = {}
    for name, path in tiny_llamas.items():
        copy = tmp_path / "hub" / name
        shutil.copytree(path, copy)
        if licenses.get(name):
            (copy / "README.md").write_text(f"---\nlicense: {licenses[name]}\n---\n# {name}\n")
        hub[f"hf://org/{name}-model@abc123"] = copy
    monkeypatch.setattr(resolve, "download_hub_repo", lambda reference: hub[reference])
    return {name: f"hf://org/{name}-model@abc123" for name in tiny_llamas}


def _ties(models, out, **fuse):
    return recipe_from_dict(
        {
            "models": models,
            "fuse": {"method": "ties", "base": "base", "params": {"density": 0.5}, **fuse},
            "save": {"path": str(out), "dtype": "bfloat16"},
        }
    )


def test_card_of_hub_inputs_follows_the_hub_conventions(tiny_llamas, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    models = _hub_inputs(tiny_llamas, tmp_path, monkeypatch, dict.fromkeys(tiny_llamas, "mit"))
    output = run(_ties(models, tmp_path / "out")).output
    card = ModelCard.load(output / "README.md")
    meta = card.data.to_dict()
    assert meta["base_model"] == ["org/base-model", "org/math-model", "org/code-model"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["merge", "merge-cli", "ties"]
    assert meta["license"] == "mit"
    assert "model-index" not in meta  # no evaluate stage
    body = card.text
    assert "[paper](https://arxiv.org/abs/2306.01708)" in body and "TIES-Merging" in body
    assert "Base model: `base`: [org/base-model](https://huggingface.co/org/base-model)" in body
    assert "- `math`: [org/math-model](https://huggingface.co/org/math-model)" in body
    assert "method: ties" in body and "density: 0.5" in body  # the recipe


def test_license_only_when_every_input_agrees(tiny_llamas, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    licenses = {"base": "apache-2.0", "math": "apache-2.0", "code": "mit"}
    models = _hub_inputs(tiny_llamas, tmp_path, monkeypatch, licenses)
    output = run(_ties(models, tmp_path / "out")).output
    assert "license" not in ModelCard.load(output / "README.md").data.to_dict()
    # one input without a card: no license either
    licenses = {"base": "apache-2.0", "math": "apache-2.0"}
    models = _hub_inputs(tiny_llamas, tmp_path / "again", monkeypatch, licenses)
    output = run(_ties(models, tmp_path / "out2")).output
    assert "license" not in ModelCard.load(output / "README.md").data.to_dict()


def test_card_of_local_inputs_names_no_local_path(tiny_llamas, tmp_path):
    from huggingface_hub import ModelCard

    models = {name: str(path) for name, path in tiny_llamas.items()}
    output = run(_ties(models, tmp_path / "out")).output
    text = (output / "README.md").read_text()
    meta = ModelCard.load(output / "README.md").data.to_dict()
    assert "base_model" not in meta and "base_model_relation" not in meta
    assert meta["tags"] == ["merge", "merge-cli", "ties"]
    front = text.split("---")[1]
    assert str(tiny_llamas["base"].parent) not in front
    assert "- `math`: a local checkpoint" in text


def test_evaluation_results_as_table_and_model_index(tiny_llamas, tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    from merge_cli.fuse import METHODS
    from merge_cli.save import CardInputs, update_model_card

    models = _hub_inputs(tiny_llamas, tmp_path, monkeypatch, {})
    recipe = _ties(models, tmp_path / "out")
    output = run(recipe).output
    rows = [
        {"metric": "perplexity", "model": "merged", "split": "wiki.txt", "value": 12.5},
        {"metric": "perplexity", "model": "math", "split": "wiki.txt", "value": 14.25},
        {"metric": "accuracy", "model": "merged", "split": "test", "value": 0.75},
    ]
    update_model_card(recipe, output, CardInputs(METHODS["ties"]), rows)
    card = ModelCard.load(output / "README.md")
    results = card.data.eval_results
    assert [(r.metric_type, r.metric_value, r.dataset_name) for r in results] == [
        ("perplexity", 12.5, "wiki.txt"),
        ("accuracy", 0.75, "test"),
    ]  # the merged model's rows only
    assert {r.task_type for r in results} == {"text-generation"}
    assert card.data.to_dict()["model-index"][0]["name"] == "out"
    assert "| metric | model | split | value |" in card.text
    assert "| perplexity | math | wiki.txt | 14.25 |" in card.text
    assert not list(output.glob(".README*"))


def test_the_recipe_as_written_is_saved_beside_the_weights(tiny_llamas, tmp_path):
    from merge_cli.config import load_recipe

    text = (
        f"# my merge\nmodels:\n  base: {tiny_llamas['base']}\n  math: {tiny_llamas['math']}\n"
        "fuse: {method: linear}   # flow style kept\n"
    )
    (tmp_path / "r.yaml").write_text(text)
    output = run(load_recipe(tmp_path / "r.yaml", out=str(tmp_path / "out"))).output
    assert (output / "merge_recipe.yaml").read_text() == text
    assert not (output / "mergekit_config.yml").exists()
    assert "`merge_recipe.yaml`" in (output / "README.md").read_text()


def test_a_mergekit_configuration_is_saved_as_written(tiny_llamas, tmp_path):
    import yaml

    from merge_cli.config import load_recipe

    text = (
        f"merge_method: linear\nmodels:\n  - model: {tiny_llamas['math']}\n"
        f"    parameters: {{weight: 0.25}}\n  - model: {tiny_llamas['code']}\n"
        "    parameters: {weight: 0.75}\ndtype: float32\n"
    )
    (tmp_path / "mk.yml").write_text(text)
    output = run(load_recipe(tmp_path / "mk.yml", out=str(tmp_path / "out"))).output
    assert (output / "mergekit_config.yml").read_text() == text
    translated = yaml.safe_load((output / "merge_recipe.yaml").read_text())
    assert translated["fuse"]["method"] == "linear"
    assert json.loads((output / "config.json").read_text())["torch_dtype"] == "float32"
