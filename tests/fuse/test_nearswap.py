"""NearSwap (mergekit's nearswap): w = clamp(t / |base - other|, 0, 1) toward the other."""

from __future__ import annotations

import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def test_nearswap_takes_near_entries_and_moves_toward_far_ones(tmp_path):
    base = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0])
    other = torch.tensor([1.05, 1.2, 0.5, 1.0, 2.0 + 1e-8])
    out = merge(tmp_path, "nearswap", {"base": {"w": base}, "b": {"w": other}}, params={"t": 0.1})
    # |a - b| = 0.05 (<= t: b's value), 0.2 (w 1/2), 0.5 (w 1/5), 0 and 1e-8 (w 1: b's value)
    expected = torch.tensor([1.05, 1.1, 0.9, 1.0, 2.0 + 1e-8])
    assert torch.allclose(out["w"], expected, atol=1e-6)
    zero = merge(tmp_path, "nearswap", {"base": {"w": base}, "b": {"w": other}}, params={"t": 0})
    assert torch.equal(zero["w"], base)


def test_nearswap_chunked_equals_whole(tmp_path):
    models = random_models(["base", "b"], {"w": (9, 4), "v": (7,)})
    whole, chunked = chunked_equals_whole(tmp_path, "nearswap", models, params={"t": 0.5})
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_nearswap_takes_exactly_one_model_besides_the_base():
    with pytest.raises(RecipeError, match="takes at most 1"):
        recipe_from_dict(
            {
                "models": {"base": "a", "b": "b", "c": "c"},
                "fuse": {"method": "nearswap", "base": "base", "params": {"t": 0.1}},
                "save": {"path": "out"},
            }
        )
