"""Per-tensor parameter resolution: rules (glob / regex, first match wins) and gradients."""

from __future__ import annotations

import pytest

from merge_cli.engine.params import (
    count_layers,
    interpolate,
    layer_index,
    layer_position,
    resolve_params,
)
from merge_cli.fuse import METHODS
from merge_cli.recipe import FuseSpec


def test_layer_index_and_position():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert layer_index("model.embed_tokens.weight") is None
    assert layer_position("model.layers.2.mlp.up_proj.weight", 5) == 0.5
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("lm_head.weight", 5) == 1.0
    assert count_layers(["model.layers.0.x", "model.layers.7.y", "lm_head.weight"]) == 8


@pytest.mark.parametrize(
    ("values", "position", "expected"),
    [
        ([0.2, 0.8], 0.0, 0.2),
        ([0.2, 0.8], 1.0, 0.8),
        ([0.2, 0.8], 0.5, 0.5),
        ([0.0, 1.0, 0.0], 0.25, 0.5),
        ([0.0, 1.0, 0.0], 0.5, 1.0),
        ([3.0], 0.7, 3.0),
    ],
)
def test_interpolate(values, position, expected):
    assert interpolate(values, position) == pytest.approx(expected)


def test_rules_first_match_wins_and_gradients_interpolate():
    spec = FuseSpec.model_validate(
        {
            "method": "linear",
            "models": {"a": {"weight": 2.0}, "b": None},
            "params": {"normalize": False},
            "rules": [
                {"match": "*.mlp.*", "params": {"weight": [0.0, 1.0]}},
                {"match": "re:mlp|attn", "params": {"weight": 9.0}},
                {"match": "*.self_attn.*", "models": {"b": {"weight": 5.0}}},
            ],
        }
    )
    method = METHODS["linear"]
    mlp = resolve_params(spec, method, ["a", "b"], "model.layers.3.mlp.up_proj.weight", 0.75)
    assert [m.weight for m in mlp.models] == [0.75, 0.75]
    assert mlp.method.normalize is False
    attn = resolve_params(spec, method, ["a", "b"], "model.layers.3.self_attn.q_proj.weight", 0.75)
    assert [m.weight for m in attn.models] == [9.0, 9.0]  # regex rule matches first
    other = resolve_params(spec, method, ["a", "b"], "model.norm.weight", 1.0)
    assert [m.weight for m in other.models] == [2.0, 1.0]
