"""Passthrough: copying one model, and stacking layer ranges into a deeper model."""

from __future__ import annotations

import json

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.errors import PlanError
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir


def test_copy_one_model(tiny_llamas, tmp_path):
    recipe = recipe_from_dict(
        {
            "models": {"math": str(tiny_llamas["math"])},
            "fuse": {"method": "passthrough"},
            "save": {"path": str(tmp_path / "out")},
        }
    )
    out = load_safetensors_dir(run(recipe).output)
    source = load_safetensors_dir(tiny_llamas["math"])
    assert out.keys() == source.keys()
    assert all(torch.equal(out[k], source[k]) for k in out)


@pytest.mark.parametrize(("method", "direct"), [("passthrough", False), ("linear", True)])
def test_only_computed_outputs_bypass_the_page_cache(
    tiny_llamas, tmp_path, monkeypatch, method, direct
):
    """A copy goes file to file in the kernel (buffered writes); a merge writes O_DIRECT."""
    from merge_cli.io import writer as writer_module

    real = writer_module.AppendFile
    asked = []

    def spy(path, buffer, direct=True):
        asked.append(direct)
        return real(path, buffer, direct)

    monkeypatch.setattr(writer_module, "AppendFile", spy)
    recipe = recipe_from_dict(
        {
            "models": {"math": str(tiny_llamas["math"])},
            "fuse": {"method": method},
            "save": {"path": str(tmp_path / "out")},
        }
    )
    out = load_safetensors_dir(run(recipe).output)
    assert asked and set(asked) == {direct}
    source = load_safetensors_dir(tiny_llamas["math"])
    assert all(torch.equal(out[k], source[k]) for k in source)


def test_layer_stacking_renumbers_and_updates_config(tiny_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = recipe_from_dict(
        {
            "models": {"math": str(tiny_llamas["math"]), "code": str(tiny_llamas["code"])},
            "fuse": {
                "method": "passthrough",
                "params": {
                    "slices": [
                        {"model": "math", "layers": [0, 3]},
                        {"model": "code", "layers": [1, 4]},
                    ]
                },
            },
            "save": {"path": str(tmp_path / "out")},
        }
    )
    output = run(recipe).output
    out = load_safetensors_dir(output)
    math = load_safetensors_dir(tiny_llamas["math"])
    code = load_safetensors_dir(tiny_llamas["code"])
    assert json.loads((output / "config.json").read_text())["num_hidden_layers"] == 6
    suffix = "mlp.up_proj.weight"
    assert torch.equal(out[f"model.layers.2.{suffix}"], math[f"model.layers.2.{suffix}"])
    assert torch.equal(out[f"model.layers.3.{suffix}"], code[f"model.layers.1.{suffix}"])
    assert torch.equal(out[f"model.layers.5.{suffix}"], code[f"model.layers.3.{suffix}"])
    assert torch.equal(out["model.embed_tokens.weight"], math["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], math["lm_head.weight"])
    names = list(out)
    assert names.index("model.embed_tokens.weight") < names.index(
        "model.layers.0.mlp.up_proj.weight"
    )
    model = AutoModelForCausalLM.from_pretrained(output)
    assert len(model.model.layers) == 6
    assert torch.isfinite(model(torch.tensor([[3, 4, 5]])).logits).all()


def test_slice_out_of_range(tiny_llamas, tmp_path):
    recipe = recipe_from_dict(
        {
            "models": {"math": str(tiny_llamas["math"])},
            "fuse": {
                "method": "passthrough",
                "params": {"slices": [{"model": "math", "layers": [2, 9]}]},
            },
            "save": {"path": str(tmp_path / "out")},
        }
    )
    with pytest.raises(
        PlanError, match=r"slices\[0\].layers: \[2, 9\] is out of range; model 'math' has 4 layers"
    ):
        run(recipe)
    assert not (tmp_path / "out").exists()


def test_stacking_takes_the_head_by_role_not_storage_order(example_models, tmp_path):
    """Indexes list names sorted, so ``lm_head.weight`` is stored before the layers: it must
    still come, with the final norm, from the last slice's model (mergekit's
    orcamini-platy-44layer frankenmerge), and the embeddings from the first slice's."""
    import yaml

    from merge_cli.config import load_recipe

    base = example_models.llama_state_dict(example_models.CONFIG, seed=0)
    paths = {}
    for name, seed in (("first", 1), ("last", 2)):
        state = dict(sorted(example_models.variant(base, seed=seed, scale=0.5).items()))
        paths[name] = tmp_path / name
        example_models.save_hf_directory(state, paths[name], example_models.CONFIG, shards=3)
    index = json.loads((paths["first"] / "model.safetensors.index.json").read_text())
    stored = list(index["weight_map"])
    assert stored.index("lm_head.weight") < stored.index("model.layers.0.mlp.up_proj.weight")
    assert index["weight_map"]["lm_head.weight"] == "model-00001-of-00003.safetensors"
    config = tmp_path / "stack.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "merge_method": "passthrough",
                "dtype": "bfloat16",
                "slices": [
                    {"sources": [{"model": str(paths["first"]), "layer_range": [0, 3]}]},
                    {"sources": [{"model": str(paths["last"]), "layer_range": [1, 4]}]},
                ],
            }
        )
    )
    output = run(load_recipe(config, out=str(tmp_path / "out"))).output
    out = load_safetensors_dir(output)
    first = load_safetensors_dir(paths["first"])
    last = load_safetensors_dir(paths["last"])
    assert not torch.equal(first["lm_head.weight"], last["lm_head.weight"])
    assert torch.equal(out["lm_head.weight"], last["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], last["model.norm.weight"])
    assert torch.equal(out["model.embed_tokens.weight"], first["model.embed_tokens.weight"])
    assert torch.equal(
        out["model.layers.3.self_attn.q_proj.weight"],
        last["model.layers.1.self_attn.q_proj.weight"],
    )
    assert len(out) == len(first) + 2 * 9
