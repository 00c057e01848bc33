"""DELLA (Deep et al. 2024): MagPrune keeps entries with probability rising with magnitude."""

from __future__ import annotations

import pytest
import torch

from merge_cli.engine.method import ChunkPasses, TensorJob
from merge_cli.errors import MergeCliError
from merge_cli.fuse import METHODS
from merge_cli.fuse.tensorwise.della import keep_probability, rank_fraction
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def test_keep_probabilities_rise_linearly_with_the_magnitude_rank():
    row = torch.tensor([[0.3, -5.0, 0.1, 2.0, -1.0]])
    # ranks by magnitude: 0.1 -> 0, 0.3 -> 1, -1 -> 2, 2 -> 3, -5 -> 4; scaled by 1/4
    assert torch.equal(rank_fraction(row.abs()), torch.tensor([[0.25, 1.0, 0.0, 0.75, 0.5]]))
    probability = keep_probability(rank_fraction(row.abs()), density=0.5, epsilon=0.2)
    assert torch.allclose(probability, torch.tensor([[0.4, 0.7, 0.3, 0.6, 0.5]]))


def test_della_keeps_large_entries_more_often_and_preserves_the_expectation():
    generator = torch.Generator().manual_seed(0)
    base = torch.zeros(200, 400)
    tau = torch.rand(200, 400, generator=generator) + 0.5
    entry = METHODS["della_linear"]
    params = entry.params.model_validate({})
    models = [entry.model_params(density=0.4, epsilon=0.3)]
    job = TensorJob("w", [tau.clone()], base, (0, 200), (200, 400), 7)
    stats = entry.statistics(ChunkPasses.over([job]), params, models)
    out = entry.merge(job, params, models, stats)
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.4) < 0.01
    large = tau > tau.median()
    assert float(kept[large].float().mean()) > float(kept[~large].float().mean()) + 0.2
    assert abs(float(out.sum() / tau.sum()) - 1) < 0.02  # survivors divided by their keep prob


def test_della_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (10, 8), "v": (30,)})
    for method, rescale in (("della", True), ("della_linear", "l1")):
        whole, chunked = chunked_equals_whole(
            tmp_path, method, models, params={"density": 0.5, "epsilon": 0.2, "rescale": rescale}
        )
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (method, key)


def test_della_rejects_probabilities_outside_zero_one(tmp_path):
    models = random_models(["base", "a"], {"w": (3, 3)})
    with pytest.raises(MergeCliError, match="density - epsilon and density \\+ epsilon"):
        merge(tmp_path, "della", models, params={"density": 0.9, "epsilon": 0.2})


@pytest.mark.parametrize("width", [2, 3, 64, 5000])
def test_rank_fraction_equals_a_stable_argsort_with_ties(width):
    generator = torch.Generator().manual_seed(width)
    magnitudes = torch.randn(7, width, generator=generator).abs()
    magnitudes[:, ::3] = magnitudes[:, :1]  # many exact ties in every row
    magnitudes[0] = 0.0  # a row of nothing but ties
    order = torch.argsort(magnitudes, dim=1, stable=True)
    expected = torch.empty_like(order)
    expected.scatter_(1, order, torch.arange(width).expand_as(order))
    assert torch.equal(rank_fraction(magnitudes), expected.float() / (width - 1))
    assert torch.equal(rank_fraction(torch.ones(4, 1)), torch.full((4, 1), 0.5))


def test_an_empty_density_gradient_is_one_message():
    """Found by the fuzz test: the range check must leave an empty gradient to the
    parameter checks, not index it."""
    from merge_cli.config import recipe_from_dict
    from merge_cli.errors import RecipeError

    raw = {
        "models": {"base": "base.safetensors", "one": "one.safetensors"},
        "fuse": {"method": "della", "base": "base", "params": {"density": []}},
        "save": {"path": "out"},
    }
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert "fuse.params.density: a gradient needs at least one value" in error.value.problems
