"""What a whole-model method cannot take is refused when the recipe is read, as `run` would."""

from __future__ import annotations

import json

import pytest
import yaml

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError

TASK = {"model": "mypkg.models:build", "data": "mypkg.data:batches"}


def whole_model_recipe(method: str, **fuse: object) -> dict:
    return {
        "models": {"a": "a.safetensors", "b": "b.safetensors", "c": "c.safetensors"},
        "task": TASK,
        "fuse": {"method": method, **fuse},
        "save": {"path": "out"},
    }


@pytest.mark.parametrize("method", ["greedy_soup", "curve", "fisher", "regmean", "ensemble"])
def test_rules_are_refused_for_whole_model_methods(method):
    extra = {"models": ["a", "b"]} if method == "curve" else {}
    raw = whole_model_recipe(method, rules=[{"match": "*", "params": {}}], **extra)
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert (
        f"fuse.rules: {method} is a whole-model method; per-tensor rules do not apply"
        in error.value.problems
    )


def test_a_gradient_is_refused_for_a_whole_model_method():
    raw = whole_model_recipe("fisher", models={"a": {"weight": [0.2, 0.8]}, "b": {}})
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert error.value.problems == [
        "fuse.models.a.weight: fisher is a whole-model method; weight cannot be a gradient"
    ]


def test_a_list_valued_parameter_is_not_taken_for_a_gradient():
    """distill's init_models is a list by definition."""
    raw = whole_model_recipe("distill", params={"init": "linear", "init_models": ["a", "b"]})
    assert recipe_from_dict(raw).fuse.params["init_models"] == ["a", "b"]


def test_validate_refuses_rules_for_a_whole_model_method_with_exit_2(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    raw = whole_model_recipe("greedy_soup", rules=[{"match": "*", "params": {}}])
    recipe.write_text(yaml.safe_dump(raw))
    code, out, _ = cli("validate", str(recipe), "--json")
    assert code == 2
    report = json.loads(out)
    assert report["ok"] is False
    assert "per-tensor rules do not apply" in report["error"]
