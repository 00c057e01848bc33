"""Alignment composes with every streaming fuse method: fusing aligned views of permuted
models gives bit-identical output to fusing the unpermuted models."""

from __future__ import annotations

import pytest
import torch

from merge_cli import fuse
from merge_cli.align.spec import llama_spec, permute_state_dict, random_permutations
from merge_cli.config import recipe_from_dict
from merge_cli.errors import MergeCliError
from merge_cli.io import open_checkpoint
from merge_cli.io.checkpoint import read_state_dict
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir

STREAMING = sorted(name for name, method in fuse.METHODS.items() if method.streaming)
#: Parameters some methods need to run at all on these models.
PARAMS = {"moe": {"gate_mode": "random"}}


@pytest.fixture(scope="module")
def permuted_code(tmp_path_factory, tiny_llamas, example_models):
    """The `code` model with every MLP neuron and attention head permuted."""
    code = open_checkpoint(str(tiny_llamas["code"]))
    spec = llama_spec(code)
    state = permute_state_dict(read_state_dict(code), spec, random_permutations(spec, seed=11))
    path = tmp_path_factory.mktemp("permuted") / "code"
    example_models.save_hf_directory(state, path, example_models.CONFIG)
    return path


@pytest.mark.parametrize("method", STREAMING)
def test_align_then_fuse_equals_fusing_unpermuted_models(
    method, tmp_path, tiny_llamas, permuted_code
):
    def recipe(code, out, align):
        raw = {
            "models": {
                "base": str(tiny_llamas["base"]),
                "math": str(tiny_llamas["math"]),
                "code": str(code),
            },
            "fuse": {
                "method": method,
                "base": "base",
                "models": ["math", "code"],
                "params": PARAMS.get(method, {}),
            },
            "save": {"path": str(out), "model_card": False},
        }
        if align:
            raw["align"] = {"method": "weight_matching", "reference": "base", "spec": "llama"}
        return recipe_from_dict(raw)

    try:
        run(
            recipe(tiny_llamas["code"], tmp_path / "plain", align=False),
            RunOptions(chunk_bytes=4096),
        )
    except MergeCliError as error:
        pytest.skip(f"{method} needs parameters this generic test does not give: {error}")
    run(recipe(permuted_code, tmp_path / "aligned", align=True), RunOptions(chunk_bytes=4096))
    expected = load_safetensors_dir(tmp_path / "plain")
    got = load_safetensors_dir(tmp_path / "aligned")
    assert expected.keys() == got.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
