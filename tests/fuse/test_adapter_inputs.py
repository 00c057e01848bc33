"""Adapters as fuse inputs: `models.NAME: {path: BASE, lora: ADAPTER}` through the whole
pipeline (plan, executor, writer) equals the same merge of PEFT's merged-and-unloaded models."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merge_cli.config import load_recipe
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir
from tests.peft_models import ATTENTION, CONFIG, build_adapter, build_base, merged_and_unloaded


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("two_adapters")
    base = build_base(root / "base")
    math = build_adapter(base, root / "math", seed=11)
    code = build_adapter(
        base, root / "code", seed=12, r=8, target_modules=[*ATTENTION, "up_proj"], use_rslora=True
    )
    merged = {}
    for name, adapter in (("math", math), ("code", code)):
        merged[name] = root / f"{name}_merged"
        merged[name].mkdir()
        state = {k: v.contiguous() for k, v in merged_and_unloaded(base, adapter).items()}
        save_file(state, str(merged[name] / "model.safetensors"))
    return base, {"math": math, "code": code}, merged


def write_recipe(path, models, method="ties", out=None):
    recipe = {
        "models": models,
        "fuse": {"method": method, "base": "base", "params": {"density": 0.5}},
        "save": {"path": str(out or path.parent / "out"), "dtype": "float32"},
    }
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


def test_ties_of_adapters_equals_ties_of_merged_models(cli, tmp_path, two_adapters):
    base, adapters, merged = two_adapters
    with_adapters = {
        "base": str(base),
        **{name: {"path": str(base), "lora": str(adapter)} for name, adapter in adapters.items()},
    }
    unloaded = {"base": str(base), **{name: str(path) for name, path in merged.items()}}
    first = write_recipe(tmp_path / "a.yaml", with_adapters, out=tmp_path / "a")
    second = write_recipe(tmp_path / "b.yaml", unloaded, out=tmp_path / "b")
    # Small chunks: the adapters are applied to row chunks of every tensor.
    recipe = load_recipe(first)
    run(recipe, RunOptions(chunk_bytes=2048))
    assert cli("run", second)[0] == 0
    got, expected = load_safetensors_dir(tmp_path / "a"), load_safetensors_dir(tmp_path / "b")
    base_state = load_safetensors_dir(base)
    assert set(got) == set(expected)
    for name in expected:
        assert (got[name] - expected[name]).abs().max() <= 1e-6, name
    changed = [n for n in expected if not torch.equal(expected[n], base_state[n])]
    assert len(changed) == 2 * 5  # q, k, v, o, up of both layers (up_proj from `code` only)
    card = (tmp_path / "a" / "README.md").read_text()
    # the model list names no local path; the recipe in the card holds the adapter's
    assert "`math`: a local checkpoint with the LoRA adapter (a local adapter)" in card
    assert f"lora: {adapters['math']}" in card


def test_linear_of_one_adapter_is_merge_and_unload(cli, tmp_path, two_adapters):
    base, adapters, merged = two_adapters
    models = {"math": {"path": str(base), "lora": str(adapters["math"])}}
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        json.dumps(
            {
                "models": models,
                "fuse": {"method": "linear"},
                "save": {"path": str(tmp_path / "out"), "dtype": "float32"},
            }
        )
    )
    assert cli("run", recipe)[0] == 0
    got, expected = load_safetensors_dir(tmp_path / "out"), load_safetensors_dir(merged["math"])
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6


def test_validate_and_plan_understand_adapters(cli, tmp_path, two_adapters):
    base, adapters, _ = two_adapters
    models = {
        "base": str(base),
        **{name: {"path": str(base), "lora": str(adapter)} for name, adapter in adapters.items()},
    }
    recipe = write_recipe(tmp_path / "r.yaml", models)
    assert cli("validate", recipe)[0] == 0
    code, out, _ = cli("plan", recipe, "--json")
    plan = json.loads(out)
    assert code == 0 and plan["tensors"] == len(load_safetensors_dir(base))
    assert not (tmp_path / "out").exists()


def bad_adapter_cases(tmp_path, two_adapters):
    base, adapters, _ = two_adapters
    other = build_base(tmp_path / "other", config={**CONFIG, "intermediate_size": 40})
    wrong_shape = build_adapter(other, tmp_path / "wrong_shape", seed=1, target_modules=["up_proj"])
    deeper = build_base(tmp_path / "deeper", config={**CONFIG, "num_hidden_layers": 3})
    absent = build_adapter(deeper, tmp_path / "absent", seed=1)
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        (adapters["math"] / "adapter_model.safetensors").read_bytes()
    )
    return {
        "shape mismatch": (
            wrong_shape,
            "B·A is [40, 32] but the base's 'model.layers.0.mlp.up_proj.weight' is [48, 32]",
        ),
        "missing adapter_config": (no_config, "adapter_config.json is missing"),
        "modules absent": (absent, "adapts modules absent from the base"),
    }


@pytest.mark.parametrize("command", ["run", "validate", "plan"])
def test_bad_adapters_one_message_exit_1_nothing_written(cli, tmp_path, two_adapters, command):
    base, adapters, _ = two_adapters
    for case, (adapter, message) in bad_adapter_cases(tmp_path, two_adapters).items():
        models = {
            "base": str(base),
            "math": {"path": str(base), "lora": str(adapters["math"])},
            "bad": {"path": str(base), "lora": str(adapter)},
        }
        recipe = write_recipe(tmp_path / f"{case}.yaml", models)
        code, out, err = cli(command, recipe)
        text = " ".join(err.split())
        assert code == 1, (case, out, err)
        assert message in text and text.count("error") == 1, (case, text)
        assert not (tmp_path / "out").exists()
