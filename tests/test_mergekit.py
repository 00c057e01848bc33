"""mergekit configurations: translation to recipe v1 and end-to-end runs on tiny Llamas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from unittest.mock import patch

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict

from merge_cli.config import load_recipe, recipe_from_dict
from merge_cli.engine.method import MethodInfo as Method
from merge_cli.engine.params import layer_index, layer_position, resolve_params
from merge_cli.errors import RecipeError
from merge_cli.fuse import METHODS
from merge_cli.mergekit import MERGEKIT_METHODS, MergekitMethod, translate_mergekit
from merge_cli.recipe import FuseSpec
from tests.conftest import load_safetensors_dir

REPO = Path(__file__).resolve().parents[1]
MERGEKIT_RECIPES = sorted((REPO / "recipes" / "mergekit").glob("*.yaml"))


def translate(config: dict[str, Any]) -> dict[str, Any]:
    return translate_mergekit(config, "mk.yaml")


def problems_of(config: dict[str, Any]) -> str:
    with pytest.raises(RecipeError) as caught:
        translate(config)
    return str(caught.value)


TWO = [{"model": "org/math"}, {"model": "org/code"}]


# ---------------------------------------------------------------------------------------
# Models, base model, references


def test_models_form_names_references_and_parameters():
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "org/base@v1",
            "models": [
                {"model": "org/base"},
                {"model": "org/math", "parameters": {"weight": 0.6, "density": 0.5}},
                {"model": "other/math", "parameters": {"weight": 0.4}},
            ],
            "parameters": {"normalize": False, "int8_mask": True, "density": 0.7},
        }
    )
    assert recipe["models"] == {
        "base": "hf://org/base",
        "math": "hf://org/math",
        "math_2": "hf://other/math",
        "base_2": "hf://org/base@v1",
    }
    fuse = recipe["fuse"]
    assert fuse["method"] == "ties"
    assert fuse["base"] == "base_2"
    # org/base (no revision) is a different model from the base org/base@v1: it is fused.
    assert fuse["models"] == {
        "base": {},
        "math": {"weight": 0.6, "density": 0.5},
        "math_2": {"weight": 0.4},
    }
    assert fuse["params"] == {"normalize": False, "density": 0.7}  # int8_mask: no effect
    assert "rules" not in fuse
    assert "save" not in recipe  # the output directory comes from --out


def test_lora_references_translate_to_path_and_lora():
    recipe = translate(
        {
            "merge_method": "ties",
            "base_model": "org/base",
            "models": [
                {"model": "org/base+org/math-lora", "parameters": {"weight": 0.5}},
                {"model": "org/base@v2+org/code-lora@r1"},
                {"model": {"model": {"path": "org/base"}, "lora": {"path": "org/chat-lora"}}},
                {"model": {"model": "org/base", "lora": "org/plain-lora"}},
            ],
        }
    )
    assert recipe["models"] == {
        "math-lora": {"path": "hf://org/base", "lora": "hf://org/math-lora"},
        "code-lora": {"path": "hf://org/base@v2", "lora": "hf://org/code-lora@r1"},
        "chat-lora": {"path": "hf://org/base", "lora": "hf://org/chat-lora"},
        "plain-lora": {"path": "hf://org/base", "lora": "hf://org/plain-lora"},
        "base": "hf://org/base",
    }
    assert recipe["fuse"]["base"] == "base"
    assert set(recipe["fuse"]["models"]) == {"math-lora", "code-lora", "chat-lora", "plain-lora"}


def test_mergekit_lora_run_equals_merged_models(cli, tmp_path):
    """``base+adapter`` in a mergekit configuration runs on the fly, as PEFT merges it."""
    from safetensors.torch import save_file

    from tests.peft_models import build_adapter, build_base, merged_and_unloaded

    base = build_base(tmp_path / "base")
    adapters = [build_adapter(base, tmp_path / f"lora{i}", seed=i + 1) for i in range(2)]
    merged = []
    for i, adapter in enumerate(adapters):
        merged.append(tmp_path / f"merged{i}")
        merged[-1].mkdir()
        state = {k: v.contiguous() for k, v in merged_and_unloaded(base, adapter).items()}
        save_file(state, str(merged[-1] / "model.safetensors"))
    for refs, out in (([f"{base}+{a}" for a in adapters], "a"), ([str(m) for m in merged], "b")):
        config = {
            "merge_method": "ties",
            "base_model": str(base),
            "models": [
                {"model": ref, "parameters": {"weight": 1.0, "density": 0.5}} for ref in refs
            ],
            "dtype": "float32",
        }
        (tmp_path / f"{out}.yaml").write_text(yaml.safe_dump(config))
        assert cli("run", tmp_path / f"{out}.yaml", "--out", tmp_path / out)[0] == 0
    got, expected = load_safetensors_dir(tmp_path / "a"), load_safetensors_dir(tmp_path / "b")
    assert set(got) == set(expected)
    assert max((got[n] - expected[n]).abs().max().item() for n in expected) <= 1e-6
    base_state = load_safetensors_dir(base)
    assert sum(not torch.equal(expected[n], base_state[n]) for n in expected) == 8


def test_base_model_listed_in_models_is_the_base_not_a_fused_model():
    recipe = translate(
        {
            "merge_method": "task_arithmetic",
            "base_model": "org/base",
            "models": [{"model": "org/base", "parameters": {"weight": 1.0}}, *TWO],
        }
    )
    assert recipe["fuse"]["base"] == "base"
    assert list(recipe["fuse"]["models"]) == ["math", "code"]
    assert list(recipe["models"]) == ["base", "math", "code"]


def test_methods_that_ignore_the_base_fuse_it_like_mergekit():
    recipe = translate({"merge_method": "linear", "base_model": "org/base", "models": TWO})
    assert "base" not in recipe["fuse"]
    assert list(recipe["fuse"]["models"]) == ["math", "code", "base"]


@pytest.mark.parametrize("with_base", [True, False])
def test_optional_base_methods_use_it_only_when_given(with_base):
    config = {"merge_method": "nuslerp", "models": TWO}
    if with_base:
        config["base_model"] = "org/base"
    fuse = translate(config)["fuse"]
    assert fuse.get("base") == ("base" if with_base else None)
    assert list(fuse["models"]) == ["math", "code"]


def test_local_paths_stay_local_and_hub_ids_become_hf(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    recipe = translate(
        {
            "merge_method": "linear",
            "models": [
                {"model": "org/local"},
                {"model": "org/remote@abc123"},
                {"model": {"model": {"path": "org/dict", "revision": "main"}}},
                {"model": "./some/missing/dir"},
            ],
        }
    )
    assert recipe["models"] == {
        "local": "org/local",
        "remote": "hf://org/remote@abc123",
        "dict": "hf://org/dict@main",
        "dir": "./some/missing/dir",
    }


# ---------------------------------------------------------------------------------------
# mergekit's defaults and behaviours


def with_base(method: str, **parameters: Any) -> dict[str, Any]:
    config = {"merge_method": method, "base_model": "org/base", "models": TWO}
    if parameters:
        config["parameters"] = parameters
    return translate(config)["fuse"]


def test_dare_uses_mergekits_normalize_default_and_l1_rescale():
    # mergekit's dare_ties: normalize false, rescale true = match the L1 norm of the task vector.
    assert with_base("dare_ties")["params"] == {"normalize": False, "rescale": "l1"}
    assert with_base("dare_linear")["params"] == {"rescale": "l1"}
    assert with_base("dare_ties", rescale=False, normalize=True)["params"] == {
        "rescale": False,
        "normalize": True,
    }
    assert with_base("della")["params"] == {"rescale": "l1"}
    assert with_base("della_linear")["params"] == {"rescale": "l1"}


def test_breadcrumbs_keeps_mergekits_empty_tensor_behaviour():
    assert with_base("breadcrumbs")["params"] == {"empty_without_outliers": True}
    assert with_base("breadcrumbs_ties")["params"] == {
        "normalize": False,  # mergekit's breadcrumbs_ties does not normalize
        "empty_without_outliers": True,
    }


def test_settings_without_effect_are_dropped_and_the_rest_rejected():
    assert "params" not in with_base("ties", rescale=False, int8_mask=True)
    fuse = translate(
        {
            "merge_method": "task_arithmetic",
            "base_model": "org/base",
            "models": [{"model": "org/a", "parameters": {"weight": 1.0, "density": 0.3}}],
            "parameters": {"rescale": True},
        }
    )["fuse"]
    assert fuse["models"] == {"a": {"weight": 1.0}}  # mergekit ignores density here too
    assert "params" not in fuse
    message = problems_of(
        {"merge_method": "ties", "base_model": "org/b", "models": TWO,
         "parameters": {"rescale": True}}
    )  # fmt: skip
    assert "parameters.rescale: True is not supported by merge-cli's ties" in message


def test_tokenizer_source_base_keeps_the_base_vocabulary():
    fuse = with_base("ties")
    assert "tokenizer_source" not in fuse
    config = {"merge_method": "ties", "base_model": "org/base", "models": TWO}
    assert translate({**config, "tokenizer_source": "base"})["fuse"]["tokenizer_source"] == "base"
    linear = {"merge_method": "linear", "base_model": "org/base", "tokenizer_source": "base"}
    message = problems_of({**linear, "models": TWO})
    assert "tokenizer_source: base with linear, which fuses the base_model" in message
    fuse = translate({**linear, "models": [{"model": "org/base"}, *TWO]})["fuse"]
    assert fuse["tokenizer_source"] == "base"


def test_tokenizer_source_union_merges_the_vocabularies():
    config = {"merge_method": "ties", "base_model": "org/base", "models": TWO}
    fuse = translate({**config, "tokenizer_source": "union"})["fuse"]
    assert fuse["tokenizer_source"] == "union" and fuse["base"] == "base"
    # without a base_model the reference vocabulary is the first model's, as in mergekit
    linear = {"merge_method": "linear", "models": TWO, "tokenizer_source": "union"}
    assert translate(linear)["fuse"]["tokenizer_source"] == "union"
    # the base_model's vocabulary is the reference: it must be merge-cli's reference too
    message = problems_of({**linear, "base_model": "org/base"})
    assert "tokenizer_source: union with linear, which fuses the base_model" in message
    recipe = recipe_from_dict(
        {**translate({**linear, "models": [{"model": "org/base"}, *TWO]}), "save": {"path": "o"}}
    )
    assert recipe.fuse is not None and recipe.fuse.tokenizer_source == "union"


# ---------------------------------------------------------------------------------------
# dtypes


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({}, None),
        ({"dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "torch.float16"}, "float16"),
        ({"dtype": "float64", "out_dtype": "bfloat16"}, "bfloat16"),
        ({"dtype": "float32", "out_dtype": "float16"}, "float16"),
    ],
)
def test_dtype_and_out_dtype_give_the_save_dtype(keys, expected):
    recipe = translate({"merge_method": "linear", "models": TWO, **keys})
    assert recipe.get("save", {}).get("dtype") == expected


# ---------------------------------------------------------------------------------------
# Slices


def test_passthrough_slices_become_layer_stacking():
    recipe = translate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "org/a", "layer_range": [0, 3]}]},
                {"sources": [{"model": "org/b", "layer_range": [1, 4]}]},
                {"sources": [{"model": "org/a", "layer_range": [3, 4]}]},
            ],
        }
    )
    assert recipe["models"] == {"a": "hf://org/a", "b": "hf://org/b"}
    assert recipe["fuse"] == {
        "method": "passthrough",
        "params": {
            "slices": [
                {"model": "a", "layers": [0, 3]},
                {"model": "b", "layers": [1, 4]},
                {"model": "a", "layers": [3, 4]},
            ]
        },
    }


def test_passthrough_head_comes_from_the_last_slice_model():
    recipe = translate(
        {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [{"model": "org/a", "layer_range": [0, 2]}]},
                {"sources": [{"model": "org/b", "layer_range": [2, 4]}]},
            ],
        }
    )
    assert recipe["fuse"]["params"]["head_from"] == "b"


def test_one_slice_over_all_layers_is_the_models_form(tiny_llamas):
    recipe = translate(
        {
            "merge_method": "slerp",
            "base_model": str(tiny_llamas["base"]),
            "slices": [
                {
                    "sources": [
                        {"model": str(tiny_llamas["base"]), "layer_range": [0, 4]},
                        {"model": str(tiny_llamas["math"]), "layer_range": [0, 4]},
                    ],
                    "parameters": {"t": 0.3},
                }
            ],
            "parameters": {"t": 0.9},
        }
    )
    assert recipe["fuse"]["base"] == "base"
    assert recipe["fuse"]["models"] == {"math": {}}
    assert recipe["fuse"]["params"] == {"t": 0.3}  # the slice's value comes before the top's


# ---------------------------------------------------------------------------------------
# Errors name the key


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"merge_method": "arcee_fusion", "models": TWO}, "merge_method: 'arcee_fusion' is not"),
        ({"merge_method": "linear", "models": TWO, "modules": {}}, "modules: per-module"),
        ({"merge_method": "linear", "models": TWO, "tokenizer": {"source": "base"}}, "tokenizer:"),
        ({"merge_method": "linear", "models": TWO, "chat_template": "chatml"}, "chat_template:"),
        ({"merge_method": "linear", "models": TWO, "output": "x"}, "output: unknown key"),
        (
            {"merge_method": "linear", "models": [{"model": "org/a+org/lora+org/more"}]},
            "models[0].model: 'org/a+org/lora+org/more': expected MODEL+LORA",
        ),
        (
            {
                "merge_method": "linear",
                "models": [{"model": {"model": "org/a", "lora": {"revision": "x"}}}],
            },
            "models[0].model.lora.path: expected a path or repo id",
        ),
        (
            {"merge_method": "linear", "models": [{"model": "org/a", "weight": 1}]},
            "models[0].weight: unknown key",
        ),
        (
            {
                "merge_method": "ties",
                "base_model": "org/b",
                "models": [{"model": "org/a", "parameters": {"normalize": True}}],
            },
            "models[0].parameters.normalize: a method-wide parameter",
        ),  # fmt: skip
        (
            {
                "merge_method": "ties",
                "base_model": "org/b",
                "models": TWO,
                "parameters": {"densty": 0.5},
            },
            "parameters.densty: mergekit's ties has no such parameter",
        ),  # fmt: skip
        ({"merge_method": "ties", "models": TWO}, "base_model: mergekit's ties needs a base_model"),
        ({"merge_method": "linear"}, "models: a mergekit configuration needs models or slices"),
        (
            {"merge_method": "linear", "models": TWO, "parameters": {"weight": [True, False]}},
            "parameters.weight: [True, False]: a list of non-numbers",
        ),
        (
            {
                "merge_method": "linear",
                "models": TWO,
                "parameters": {"weight": [{"filter": "mlp", "value": 1, "when": 2}]},
            },
            "parameters.weight[0].when: unknown key",
        ),  # fmt: skip
        ({"merge_method": "linear", "models": TWO, "dtype": "int8"}, "dtype: 'int8' is not"),
        ({"merge_method": "linear", "models": TWO, "dtype": "float64"}, "dtype: merge-cli cannot"),
        (
            {"merge_method": "linear", "models": TWO, "tokenizer_source": "org/math"},
            "tokenizer_source: 'org/math' is not supported",
        ),
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {"sources": [{"model": "org/a", "layer_range": [0, 2]}], "residual_weight": 0.5}
                ],
            },
            "slices[0].residual_weight: not supported",
        ),  # fmt: skip
        (
            {
                "merge_method": "passthrough",
                "slices": [
                    {
                        "sources": [
                            {"model": "org/a", "layer_range": [0, 2], "parameters": {"scale": 0.0}}
                        ]
                    }
                ],
            },
            "slices[0].sources[0].parameters.scale: passthrough parameters",
        ),  # fmt: skip
        (
            {
                "merge_method": "linear",
                "slices": [
                    {"sources": [{"model": "org/a", "layer_range": [0, 2]}]},
                    {"sources": [{"model": "org/a", "layer_range": [2, 4]}]},
                ],
            },
            "slices: merging several slices with linear is not supported",
        ),  # fmt: skip
        (
            {"merge_method": "passthrough", "slices": [{"sources": [{"model": "org/a"}]}]},
            "slices[0].sources[0].layer_range: expected [start, end]",
        ),
    ],
)
def test_unsupported_keys_fail_naming_the_key(config, message):
    assert f"mk.yaml: {message}" in problems_of(config)


def test_a_layer_sub_range_merge_fails_naming_the_key(tiny_llamas):
    message = problems_of(
        {
            "merge_method": "linear",
            "slices": [
                {
                    "sources": [
                        {"model": str(tiny_llamas["math"]), "layer_range": [0, 2]},
                        {"model": str(tiny_llamas["code"]), "layer_range": [0, 2]},
                    ]
                }
            ],
        }
    )
    assert "slices[0].sources[0].layer_range: [0, 2] does not cover all 4 layers" in message


def test_method_parameters_unknown_to_merge_cli_fail_at_validation():
    raw = translate({"merge_method": "linear", "models": TWO, "parameters": {"normalize": "maybe"}})
    with pytest.raises(RecipeError, match="fuse.params.normalize"):
        recipe_from_dict(raw, "mk.yaml", out="out")


# ---------------------------------------------------------------------------------------
# Filters and gradients: translated rules give mergekit's value for every tensor

LAYERS = 4
NAMES = [
    "model.embed_tokens.weight",
    *(
        f"model.layers.{i}.{part}"
        for i in range(LAYERS)
        for part in (
            "self_attn.q_proj.weight",
            "self_attn.o_proj.weight",
            "mlp.up_proj.weight",
            "mlp.down_proj.weight",
            "input_layernorm.weight",
        )
    ),
    "model.norm.weight",
    "lm_head.weight",
]


class Shared(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = -1.0
    u: float = -2.0


class PerModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = -3.0
    density: float = -4.0


FAKE_MERGEKIT = MergekitMethod("ignored", ("t", "u"), ("weight", "density"))
FAKE = Method(
    name="fake", family="weight_average", summary="", reference="", params=Shared,
    model_params=PerModel,
)  # fmt: skip


def mergekit_value(setting: Any, name: str, t: float) -> Any:
    """mergekit 0.1.5's ``evaluate_setting`` (independent re-statement, numbers only)."""
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list) and setting and isinstance(setting[0], dict):
        for cond in setting:
            flt = cond.get("filter")
            if flt is None or flt == "*" or flt in name:
                return mergekit_value(cond["value"], name, t)
        return None
    if isinstance(setting, list):
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        return (1 - (scaled - i0)) * setting[i0] + (scaled - i0) * setting[i1]
    return setting


def mergekit_resolve(name, key, chain, default, t):
    for level in chain:
        if level and key in level:
            value = mergekit_value(level[key], name, t)
            if value is not None:
                return value
    return default


FILTERS = ["self_attn", "mlp", "proj", "layers.1.", "norm"]
values = st.one_of(
    st.integers(0, 9).map(float),
    st.lists(st.integers(0, 9).map(float), min_size=2, max_size=4),
)
conditional = st.lists(
    st.fixed_dictionaries(
        {"value": values},
        optional={"filter": st.sampled_from([*FILTERS, "*"])},
    ),
    min_size=1,
    max_size=3,
)
setting = st.one_of(values, conditional)
param_sets = st.dictionaries(st.sampled_from(["t", "u", "weight", "density"]), setting, max_size=3)
model_sets = st.dictionaries(st.sampled_from(["weight", "density"]), setting, max_size=2)


@settings(max_examples=60, deadline=None)
@given(top=param_sets, first=model_sets, second=model_sets)
def test_translated_filters_and_gradients_resolve_like_mergekit(top, first, second):
    config = {
        "merge_method": "fake",
        "models": [
            {"model": "org/a", "parameters": first},
            {"model": "org/b", "parameters": second},
        ],
        "parameters": top,
    }
    with patch.dict(MERGEKIT_METHODS, {"fake": FAKE_MERGEKIT}):
        raw = translate(config)
    spec = FuseSpec.model_validate(raw["fuse"])
    for name in NAMES:
        index = layer_index(name)
        t = 0.0 if index is None else index / (LAYERS - 1)  # mergekit: t=0 outside the layers
        ours = resolve_params(spec, FAKE, ["a", "b"], name, layer_position(name, LAYERS))
        for key, default in (("t", -1.0), ("u", -2.0)):
            expected = mergekit_resolve(name, key, [top], default, t)
            assert getattr(ours.method, key) == pytest.approx(expected), (name, key)
        for model, own in zip(ours.models, (first, second), strict=True):
            for key, default in (("weight", -3.0), ("density", -4.0)):
                expected = mergekit_resolve(name, key, [own, top], default, t)
                assert getattr(model, key) == pytest.approx(expected), (name, key, raw)


def test_filters_become_the_fewest_rules_that_give_mergekits_values():
    fuse = translate(
        {
            "merge_method": "linear",
            "models": [
                {
                    "model": "org/a",
                    "parameters": {
                        "weight": [
                            {"filter": "self_attn", "value": 0.2},
                            {"filter": "mlp", "value": 0.7},
                            {"value": 0.5},
                        ]
                    },
                },
                {"model": "org/b", "parameters": {"weight": 0.5}},
            ],
        }
    )["fuse"]
    assert fuse["models"] == {"a": {"weight": 0.5}, "b": {"weight": 0.5}}
    # A name with both filters takes self_attn's value (listed first): no combined rule needed.
    assert fuse["rules"] == [
        {"match": "*self_attn*", "models": {"a": {"weight": 0.2}}},
        {"match": "*mlp*", "models": {"a": {"weight": 0.7}}},
    ]


# ---------------------------------------------------------------------------------------
# End to end on tiny Llama checkpoints


@pytest.fixture
def example_dir(tmp_path, monkeypatch, tiny_llamas):
    """A working directory where examples/models/{base,math,code} are the tiny Llamas."""
    models = tmp_path / "examples" / "models"
    models.mkdir(parents=True)
    for name, path in tiny_llamas.items():
        (models / name).symlink_to(path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("path", MERGEKIT_RECIPES, ids=lambda p: p.stem)
def test_every_mergekit_example_runs_and_converts(path, example_dir, cli):
    method = yaml.safe_load(path.read_text())["merge_method"]
    if method not in METHODS:
        pytest.skip(f"{method} is not in merge-cli yet")
    code, _, stderr = cli("validate", path, "--out", "out")
    assert code == 0, stderr
    code, stdout, stderr = cli("run", path, "--out", "out", "--json")
    assert code == 0, stderr + stdout
    assert json.loads(stdout)["ok"]
    merged = load_safetensors_dir(example_dir / "out")
    assert "lm_head.weight" in merged

    code, stdout, stderr = cli("convert", path)
    assert code == 0, stderr
    converted = example_dir / "converted.yaml"
    converted.write_text(stdout)
    code, _, stderr = cli("run", converted, "--out", "out2")
    assert code == 0, stderr
    again = load_safetensors_dir(example_dir / "out2")
    assert merged.keys() == again.keys()
    for name in merged:
        assert torch.equal(merged[name], again[name]), name


def test_linear_example_matches_a_hand_computed_merge(example_dir, tiny_llamas, cli):
    code, _, stderr = cli("run", REPO / "recipes/mergekit/linear.yaml", "--out", "out")
    assert code == 0, stderr
    merged = load_safetensors_dir(example_dir / "out")
    math = load_safetensors_dir(tiny_llamas["math"])
    code_model = load_safetensors_dir(tiny_llamas["code"])
    for name, tensor in merged.items():
        assert tensor.dtype == torch.bfloat16
        weight = 0.6
        if "self_attn" in name:
            weight = 0.2 + 0.6 * layer_index(name) / 3
        expected = (weight * math[name].float() + 0.4 * code_model[name].float()) / (weight + 0.4)
        torch.testing.assert_close(tensor.float(), expected, rtol=2**-8, atol=1e-6)  # bf16 rounding


def test_passthrough_example_stacks_layers_like_mergekit(example_dir, tiny_llamas, cli):
    code, _, stderr = cli("run", REPO / "recipes/mergekit/passthrough.yaml", "--out", "out")
    assert code == 0, stderr
    merged = load_safetensors_dir(example_dir / "out")
    math = load_safetensors_dir(tiny_llamas["math"])
    code_model = load_safetensors_dir(tiny_llamas["code"])
    config = json.loads((example_dir / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    q = "self_attn.q_proj.weight"
    for out_layer, (source, layer) in enumerate(
        [(math, 0), (math, 1), (math, 2), (code_model, 1), (code_model, 2), (code_model, 3)]
    ):
        assert torch.equal(
            merged[f"model.layers.{out_layer}.{q}"], source[f"model.layers.{layer}.{q}"]
        )
    assert torch.equal(merged["model.embed_tokens.weight"], math["model.embed_tokens.weight"])
    assert torch.equal(merged["lm_head.weight"], code_model["lm_head.weight"])
    assert torch.equal(merged["model.norm.weight"], code_model["model.norm.weight"])


def test_run_without_out_names_save_path(example_dir, cli):
    code, _, stderr = cli("run", REPO / "recipes/mergekit/linear.yaml")
    assert code == 2
    assert "save.path" in stderr


def test_convert_prints_json_and_overrides_apply(example_dir, cli):
    path = REPO / "recipes/mergekit/linear.yaml"
    code, stdout, _ = cli("convert", path, "--json", "--out", "merged")
    assert code == 0
    recipe = json.loads(stdout)
    assert recipe["save"] == {"dtype": "bfloat16", "path": "merged"}
    assert recipe["models"] == {"math": "examples/models/math", "code": "examples/models/code"}
    parsed = load_recipe(path, ["fuse.models.code.weight=0.9"], "out")
    assert parsed.fuse.models["code"] == {"weight": 0.9}


def test_convert_reports_errors_with_exit_code(example_dir, cli):
    bad = example_dir / "bad.yaml"
    bad.write_text("merge_method: linear\nmodels: [{model: a/b}]\nchat_template: chatml\n")
    code, _, stderr = cli("convert", bad)
    assert code == 2
    assert "chat_template" in stderr
    code, stdout, _ = cli("convert", bad, "--json")
    assert code == 2 and not json.loads(stdout)["ok"]


# ---------------------------------------------------------------------------------------
# Values mergekit accepts and ignores: the file runs, with a warning naming the key


@pytest.mark.parametrize("method", ["slerp", "karcher", "model_stock", "sce"])
def test_a_per_model_weight_mergekit_ignores_is_dropped_with_a_warning(method):
    from merge_cli.mergekit import translate_with_warnings

    config = {
        "merge_method": method,
        "base_model": "org/base",
        "models": [
            {"model": "org/math", "parameters": {"weight": 0.6}},
            {"model": "org/code", "parameters": {"weight": 0.4}},
        ],
    }
    if method == "slerp":
        config["parameters"] = {"t": 0.3}
    recipe, warnings, _ = translate_with_warnings(config, "mk.yaml")
    assert warnings == [
        f"models[{i}].parameters.weight: has no effect with {method} (mergekit ignores it too); "
        "ignored"
        for i in (0, 1)
    ]
    assert all("weight" not in params for params in recipe["fuse"]["models"].values())
    assert "weight" not in recipe["fuse"].get("params", {})
    assert translate(config) == recipe


def test_a_native_recipe_stays_strict_about_weight(tiny_llamas):
    from merge_cli.config import recipe_from_dict

    with pytest.raises(RecipeError, match=r"fuse.models.math.weight"):
        recipe_from_dict(
            {
                "models": {name: str(path) for name, path in tiny_llamas.items()},
                "fuse": {
                    "method": "slerp",
                    "base": "base",
                    "models": {"math": {"weight": 0.6}},
                    "params": {"t": 0.3},
                },
                "save": {"path": "out"},
            }
        )


def test_an_ignored_weight_runs_as_mergekit_and_warns(tiny_llamas, tmp_path, cli):
    import yaml

    def config(weights: bool) -> Path:
        models = [{"model": str(tiny_llamas[name])} for name in ("math", "code")]
        if weights:
            models[0]["parameters"] = {"weight": 0.9}
            models[1]["parameters"] = {"weight": 0.1}
        path = tmp_path / f"mk-{weights}.yml"
        path.write_text(
            yaml.safe_dump(
                {
                    "merge_method": "model_stock",
                    "base_model": str(tiny_llamas["base"]),
                    "models": models,
                    "dtype": "float32",
                }
            )
        )
        return path

    code, out, err = cli("run", config(True), "--out", tmp_path / "with", "--json")
    assert code == 0, err
    assert json.loads(out)["warnings"] == [
        f"{config(True)}: models[{i}].parameters.weight: has no effect with model_stock "
        "(mergekit ignores it too); ignored"
        for i in (0, 1)
    ]
    # validate and plan need no --out for a mergekit configuration (it has no output path)
    code, out, err = cli("validate", config(True))
    assert code == 0 and err.count("warning:") == 2
    code, out, err = cli("plan", config(True), "--json")
    assert code == 0 and len(json.loads(out)["warnings"]) == 2
    assert json.loads(out)["method"] == "model_stock"
    code, out, err = cli("plan", config(True))
    assert code == 0 and err.count("warning:") == 2
    assert "models[1].parameters.weight: has no effect" in " ".join(err.split())
    assert cli("run", config(False), "--out", tmp_path / "without")[0] == 0
    with_weight = load_safetensors_dir(tmp_path / "with")
    without = load_safetensors_dir(tmp_path / "without")
    assert with_weight.keys() == without.keys()
    assert all(torch.equal(with_weight[k], without[k]) for k in without)


def test_the_chat_template_refusal_says_merge_cli_writes_none():
    message = problems_of({"merge_method": "linear", "models": TWO, "chat_template": "chatml"})
    assert message == (
        "mk.yaml: chat_template: merge-cli does not write a chat template into the output; "
        "remove the key and set `chat_template` in the output's tokenizer_config.json after "
        "the merge"
    )


def _mergekit_file(tmp_path, config) -> Path:
    path = tmp_path / "mk.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_problems_name_the_keys_as_the_user_wrote_them(tiny_llamas, tmp_path, cli):
    config = {
        "merge_method": "passthrough",
        "models": [{"model": str(tiny_llamas["math"]), "parameters": {"scale": 0.5}}],
    }
    code, _, err = cli("validate", _mergekit_file(tmp_path, config))
    assert code == 2
    assert " ".join(err.split()) == (
        f"error: {tmp_path / 'mk.yml'}: models[0].parameters.scale: unknown parameter "
        "(this method takes: none)"
    )


@pytest.mark.parametrize(
    ("parameters", "per_model", "message"),
    [
        (
            {"density": 0.66, "epsilon": 0.5, "lambda": 0.5},
            {},
            "parameters.density and parameters.epsilon: density - epsilon and density + "
            "epsilon must lie in (0, 1), got density 0.66 and epsilon 0.5",
        ),
        (
            {"density": 0.5},
            {"epsilon": 0.6},
            "parameters.density and models[1].parameters.epsilon: density - epsilon and "
            "density + epsilon must lie in (0, 1) (model 'code'), got density 0.5 and epsilon 0.6",
        ),
        (
            {"density": [0.5, 0.9], "epsilon": 0.2},
            {},
            "parameters.density and parameters.epsilon: density - epsilon and density + "
            "epsilon must lie in (0, 1), got density 0.9 and epsilon 0.2",
        ),
    ],
)
def test_della_probability_range_is_checked_at_validate(
    tiny_llamas, tmp_path, cli, parameters, per_model, message
):
    """mergekit refuses density +- epsilon outside (0, 1) (its test_della_invalid_epsilon);
    merge-cli says so at validate, once, naming the keys as written."""
    config = {
        "merge_method": "della",
        "base_model": str(tiny_llamas["base"]),
        "models": [
            {"model": str(tiny_llamas["math"]), "parameters": {"weight": 0.6}},
            {"model": str(tiny_llamas["code"]), "parameters": {"weight": 0.4, **per_model}},
        ],
        "parameters": parameters,
    }
    code, _, err = cli("validate", _mergekit_file(tmp_path, config))
    assert code == 2
    assert " ".join(err.split()) == f"error: {tmp_path / 'mk.yml'}: {message}"


def test_della_range_in_a_native_recipe(tiny_llamas):
    recipe = {
        "models": {name: str(path) for name, path in tiny_llamas.items()},
        "fuse": {
            "method": "della",
            "base": "base",
            "params": {"density": 0.5},
            "models": {"math": {"epsilon": 0.1}, "code": {}},
            "rules": [{"match": "*.mlp.*", "models": {"math": {"epsilon": 0.5}}}],
        },
        "save": {"path": "out"},
    }
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(recipe)
    assert caught.value.problems == [
        "fuse.params.density and fuse.rules[0].models.math.epsilon: density - epsilon and "
        "density + epsilon must lie in (0, 1) (model 'math'), got density 0.5 and epsilon 0.5"
    ]
    recipe["fuse"]["rules"][0]["models"]["math"]["epsilon"] = 0.45
    assert recipe_from_dict(recipe).fuse.method == "della"


def test_mergekit_multi_and_moe_files_are_named_for_what_they_are(tmp_path, cli):
    multi = tmp_path / "multi.yml"
    multi.write_text(
        "name: first\nmerge_method: linear\nmodels: [{model: a/b}]\n---\n"
        "name: second\nmerge_method: linear\nmodels: [{model: first}]\n"
    )
    code, _, err = cli("validate", multi)
    assert code == 2 and err.count("error:") == 1
    assert "2 YAML documents: a mergekit-multi configuration" in " ".join(err.split())
    moe = tmp_path / "moe.yml"
    moe.write_text(
        "base_model: a/base\ngate_mode: hidden\ndtype: bfloat16\nexperts:\n"
        "  - source_model: a/math\n    positive_prompts: [math]\n"
    )
    for command in ("validate", "convert"):
        code, _, err = cli(command, moe)
        assert code == 2 and err.count("error:") == 1
        text = " ".join(err.split())
        assert "experts: a mergekit-moe configuration is not read by merge-cli" in text
        assert "unknown key" not in text
    broken = tmp_path / "broken.yml"
    broken.write_text("a: [\n")
    code, _, err = cli("validate", broken)
    assert code == 2 and "invalid YAML" in err and "Traceback" not in err


def test_mergekit_nearswap_test_configuration_translates():
    """mergekit's test_nearswap_merge: the base listed among the models, per-model weights
    it ignores, t 0.0001."""
    from merge_cli.mergekit import translate_with_warnings

    recipe, warnings, _ = translate_with_warnings(
        {
            "merge_method": "nearswap",
            "base_model": "org/a",
            "models": [
                {"model": "org/a", "parameters": {"weight": 0.6}},
                {"model": "org/b", "parameters": {"weight": 0.4}},
            ],
            "parameters": {"t": 0.0001},
        },
        "mk.yaml",
    )
    assert recipe["fuse"]["method"] == "nearswap"
    assert recipe["fuse"]["base"] == "a"
    assert list(recipe["fuse"]["models"]) == ["b"]
    assert recipe["fuse"]["params"] == {"t": 0.0001}
    assert len(warnings) == 2 and all("has no effect with nearswap" in w for w in warnings)


def test_mergekit_ram_test_configurations_translate():
    """mergekit's test_ram_merge / test_ramplus_tl_merge: per-model weights it ignores."""
    from merge_cli.mergekit import translate_with_warnings

    for method, params in (("ram", {}), ("ramplus_tl", {"r": 0.05, "alpha": 1.0})):
        recipe, warnings, _ = translate_with_warnings(
            {
                "merge_method": method,
                "base_model": "org/c",
                "models": [
                    {"model": "org/a", "parameters": {"weight": 0.6}},
                    {"model": "org/b", "parameters": {"weight": 0.4}},
                ],
                **({"parameters": params} if params else {}),
            },
            "mk.yaml",
        )
        assert recipe["fuse"]["method"] == method and recipe["fuse"]["base"] == "c"
        assert recipe["fuse"].get("params", {}) == params
        assert list(recipe["fuse"]["models"]) == ["a", "b"]
        assert len(warnings) == 2
