"""The save stage's files beside the weights: config.json's dtype, the model card, the
user's original recipe."""

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
