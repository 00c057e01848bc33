"""Linear merge end to end: equals a direct torch computation; streaming invariants."""

from __future__ import annotations

import json

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.fuse.tensorwise import linear as linear_module
from merge_cli.fuse.tensorwise.linear import linear, linear_blocked
from merge_cli.options import RunOptions
from merge_cli.pipeline import run
from tests.conftest import load_safetensors_dir


def test_linear_hand_computed():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=True), torch.tensor([2.5, -1.0]))
    assert torch.equal(linear([a, b], [1.0, 3.0], normalize=False), torch.tensor([10.0, -4.0]))
    with pytest.raises(ValueError, match="sum to zero"):
        linear([a, b], [1.0, -1.0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32])
def test_blocked_linear_is_bit_identical_to_linear_on_float32_copies(dtype, out_dtype, monkeypatch):
    monkeypatch.setattr(linear_module, "BLOCK_ELEMENTS", 7)  # blocks that straddle rows
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(5, 6, generator=generator).to(dtype) for _ in range(3)]
    originals = [x.clone() for x in inputs]
    weights = [0.7, 0.2, 0.35]
    merged = linear_blocked(inputs, weights, normalize=True, out_dtype=out_dtype)
    expected = linear([x.float() for x in inputs], weights, normalize=True).to(out_dtype)
    assert merged.dtype == out_dtype and merged.shape == (5, 6)
    assert torch.equal(merged, expected)
    assert all(torch.equal(x, y) for x, y in zip(inputs, originals, strict=True))  # untouched
    unnormalized = linear_blocked(inputs, weights, normalize=False, out_dtype=torch.float32)
    assert torch.equal(unnormalized, linear([x.float() for x in inputs], weights, False))
    with pytest.raises(ValueError, match="sum to zero"):
        linear_blocked(inputs[:2], [1.0, -1.0], normalize=True, out_dtype=out_dtype)


def linear_recipe(paths, out, **fuse):
    return recipe_from_dict(
        {
            "models": {name: str(path) for name, path in paths.items()},
            "fuse": {
                "method": "linear",
                "models": {"math": {"weight": 0.7}, "code": {"weight": 0.3}},
                **fuse,
            },
            "save": {"path": str(out), "dtype": "float32"},
        }
    )


def test_merged_tensors_equal_direct_computation(tiny_llamas, tmp_path):
    recipe = linear_recipe(tiny_llamas, tmp_path / "out")
    result = run(recipe)
    merged = load_safetensors_dir(result.output)
    math = load_safetensors_dir(tiny_llamas["math"])
    code = load_safetensors_dir(tiny_llamas["code"])
    assert merged.keys() == math.keys()
    for name, tensor in merged.items():
        expected = 0.7 * math[name].float() + 0.3 * code[name].float()
        torch.testing.assert_close(tensor, expected, rtol=0, atol=1e-6)
    # two bf16 inputs read, one float32 output written: the same number of bytes
    assert result.plan["bytes_read"] == result.plan["bytes_written"]


def test_chunked_equals_unchunked_and_is_deterministic(tiny_llamas, tmp_path):
    whole = run(linear_recipe(tiny_llamas, tmp_path / "whole"))
    chunked = run(linear_recipe(tiny_llamas, tmp_path / "chunked"), RunOptions(chunk_bytes=1024))
    again = run(linear_recipe(tiny_llamas, tmp_path / "again"))
    for name in ("model.safetensors",):
        assert (whole.output / name).read_bytes() == (chunked.output / name).read_bytes()
        assert (whole.output / name).read_bytes() == (again.output / name).read_bytes()


def test_integer_tensors_are_carried_from_the_base(tmp_path):
    from safetensors.torch import save_file

    for name, value in (("base", 1.0), ("a", 2.0), ("b", 4.0)):
        (tmp_path / name).mkdir()
        save_file(
            {
                "w": torch.full((2, 2), value),
                "bn.num_batches_tracked": torch.tensor(int(value * 10)),
            },
            str(tmp_path / name / "model.safetensors"),
        )
    recipe = recipe_from_dict(
        {
            "models": {n: str(tmp_path / n) for n in ("base", "a", "b")},
            "fuse": {"method": "linear", "base": "base", "models": ["a", "b"]},
            "save": {"path": str(tmp_path / "out")},
        }
    )
    merged = load_safetensors_dir(run(recipe).output)
    assert torch.equal(merged["w"], torch.full((2, 2), 3.0))
    assert merged["bn.num_batches_tracked"].item() == 10
    assert merged["bn.num_batches_tracked"].dtype == torch.int64


def test_output_is_a_loadable_hf_checkpoint(tiny_llamas, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = linear_recipe(tiny_llamas, tmp_path / "out")
    recipe.save.dtype = "bfloat16"
    recipe.save.shard_size = 100_000
    output = run(recipe).output
    index = json.loads((output / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert (output / "tokenizer_config.json").exists() and (
        output / "generation_config.json"
    ).exists()
    card = (output / "README.md").read_text()
    assert "method: linear" in card and "merge-cli" in card
    model = AutoModelForCausalLM.from_pretrained(output)
    logits = model(torch.tensor([[1, 5, 9, 42]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
