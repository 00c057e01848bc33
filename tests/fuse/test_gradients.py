"""A gradient (a list where a number is expected) works on every numeric parameter of every
per-tensor method, set in ``fuse.params`` as well as in a rule: both give the same output.

mergekit's most common SLERP configuration (top-level ``parameters: {t: [0, 0.5, 1]}``)
translates to a gradient in ``fuse.params``; it used to crash when the plan was made.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
import yaml
from pydantic import TypeAdapter, ValidationError

from merge_cli.engine.method import TensorMethod
from merge_cli.engine.params import is_numeric
from merge_cli.fuse import METHODS
from tests.conftest import load_safetensors_dir

CANDIDATES = ([0.4, 0.6, 0.8], [1, 3, 5])


def _gradient(schema, key: str) -> list[Any]:
    """A gradient whose every value the field accepts."""
    field = schema.model_fields[key]
    adapter = TypeAdapter(field.annotation)
    for values in CANDIDATES:
        try:
            for value in values:
                adapter.validate_python(value)
                schema.model_validate({key: value} | _required(schema, key))
        except ValidationError:
            continue
        return values
    raise AssertionError(f"no gradient fits {schema.__name__}.{key}")


def _required(schema, skip: str) -> dict[str, Any]:
    return {k: 0.5 for k, f in schema.model_fields.items() if f.is_required() and k != skip}


def _cases() -> list[tuple[str, str]]:
    cases = []
    for name, method in METHODS.items():
        if not isinstance(method, TensorMethod) or method.plan_tensors is not None:
            continue
        for schema in (method.params, method.model_params):
            cases += [(name, key) for key in schema.model_fields if is_numeric(schema, key)]
    return cases


def _recipe(tmp_path, models, method, params, rules, name, base=False) -> str:
    entry = METHODS[method]
    fused = ["math", "code"][: entry.max_models or 2]
    if base:
        fused = fused[: (entry.max_models or 3) - 1]
    fuse: dict[str, Any] = {"method": method, "models": fused, "params": params, "rules": rules}
    if entry.needs_base or base:
        fuse["base"] = "base"
    recipe = {
        "models": {k: str(v) for k, v in models.items()},
        "fuse": fuse,
        "save": {"path": str(tmp_path / name), "dtype": "float32"},
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


@pytest.mark.parametrize(("method", "key"), _cases(), ids=lambda v: v)
def test_gradient_in_params_equals_the_same_gradient_as_a_rule(
    method, key, tmp_path, tiny_llamas, cli
):
    entry = METHODS[method]
    schema = entry.params if key in entry.params.model_fields else entry.model_params
    gradient = _gradient(schema, key)
    required = _required(entry.params, key)
    as_param = _recipe(tmp_path, tiny_llamas, method, {**required, key: gradient}, [], "param")
    rule = [{"match": "*", "params": {key: gradient}}]
    # a required parameter (slerp's t) needs a value in fuse.params; the rule overrides it
    as_rule = _recipe(tmp_path, tiny_llamas, method, _required(entry.params, ""), rule, "rule")
    for command in ("validate", "plan"):
        code, out, err = cli(command, as_param, "--json")
        assert code == 0, out + err
        assert json.loads(out)
    for recipe in (as_param, as_rule):
        code, out, err = cli("run", recipe, "--json")
        assert code == 0, out + err
    from_param = load_safetensors_dir(tmp_path / "param")
    from_rule = load_safetensors_dir(tmp_path / "rule")
    assert from_param.keys() == from_rule.keys()
    for name, tensor in from_param.items():
        assert torch.equal(tensor, from_rule[name]), name


def test_slerp_gradient_in_params_runs_from_base_to_model(tmp_path, tiny_llamas, cli):
    """``t: [0, 0.5, 1]``: the first layer is the base's, the last the fine-tune's."""
    recipe = _recipe(tmp_path, tiny_llamas, "slerp", {"t": [0, 0.5, 1]}, [], "out", base=True)
    code, out, err = cli("run", recipe, "--json")
    assert code == 0, out + err
    merged = load_safetensors_dir(tmp_path / "out")
    base = {k: v.float() for k, v in load_safetensors_dir(tiny_llamas["base"]).items()}
    math = {k: v.float() for k, v in load_safetensors_dir(tiny_llamas["math"]).items()}
    layers = sorted({int(n.split(".")[2]) for n in merged if n.startswith("model.layers.")})
    first = f"model.layers.{layers[0]}.mlp.up_proj.weight"
    last = f"model.layers.{layers[-1]}.mlp.up_proj.weight"
    torch.testing.assert_close(merged[first], base[first], rtol=0, atol=1e-6)
    torch.testing.assert_close(merged[last], math[last], rtol=0, atol=1e-6)
    middle = f"model.layers.{layers[len(layers) // 2]}.mlp.up_proj.weight"
    assert not torch.allclose(merged[middle], base[middle], atol=1e-4)
    assert not torch.allclose(merged[middle], math[middle], atol=1e-4)
    assert torch.equal(merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], math["lm_head.weight"])


def test_gradient_on_a_parameter_that_is_not_a_number_is_refused(tmp_path, tiny_llamas, cli):
    recipe = _recipe(tmp_path, tiny_llamas, "ties", {"normalize": [True, False]}, [], "out")
    code, out, _ = cli("validate", recipe, "--json")
    assert code == 2
    error = json.loads(out)["error"]
    assert "fuse.params.normalize: takes one value, not a list" in error


def test_moe_refuses_a_gradient_on_a_plan_level_parameter(tmp_path):
    from merge_cli.config import recipe_from_dict
    from merge_cli.errors import RecipeError

    with pytest.raises(RecipeError, match="num_experts_per_tok cannot be a gradient"):
        recipe_from_dict(
            {
                "models": {"base": "b", "a": "a", "c": "c"},
                "fuse": {
                    "method": "moe",
                    "base": "base",
                    "models": {
                        "a": {"positive_prompts": ["x"], "negative_prompts": []},
                        "c": {"positive_prompts": ["y"], "negative_prompts": []},
                    },
                    "params": {"num_experts_per_tok": [1, 2]},
                },
                "save": {"path": str(tmp_path / "out")},
            }
        )


def test_mergekit_slerp_with_a_top_level_gradient_runs(tmp_path, tiny_llamas, cli):
    """mergekit's usual SLERP configuration: ``parameters: {t: [0, 0.5, 1]}`` at the top."""
    config = {
        "merge_method": "slerp",
        "base_model": str(tiny_llamas["base"]),
        "models": [{"model": str(tiny_llamas["base"])}, {"model": str(tiny_llamas["math"])}],
        "parameters": {"t": [0, 0.5, 1]},
        "dtype": "float32",
    }
    path = tmp_path / "mergekit.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = cli("run", path, "--out", tmp_path / "mk", "--json")
    assert code == 0, out + err
    native = _recipe(tmp_path, tiny_llamas, "slerp", {"t": [0, 0.5, 1]}, [], "native", base=True)
    assert cli("run", native, "--json")[0] == 0
    from_mergekit = load_safetensors_dir(tmp_path / "mk")
    native = load_safetensors_dir(tmp_path / "native")
    # (the translation gives tensors outside the layers mergekit's first value, t = 0)
    layers = [name for name in native if ".layers." in name]
    assert len(layers) > 8
    for name in layers:
        assert torch.equal(from_mergekit[name], native[name]), name
