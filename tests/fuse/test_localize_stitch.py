"""Dataless Localize-and-Stitch (He et al. 2025): global top-k% masks, overlaps averaged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _paper_stitch(models, names, tasks, sparsity, scale=1.0):
    """Localize: per task, the floor(sparsity * N) largest |tau_t| over all N entries of the
    model; stitch: theta_0 + scale * sum_t gamma_t tau_t / max(1, sum_s gamma_s)."""
    deltas = {
        t: {n: (models[t][n] - models["base"][n]).double().numpy() for n in names} for t in tasks
    }
    masks = {}
    for t in tasks:
        flat = np.concatenate([np.abs(deltas[t][n]).ravel() for n in names])
        k = int(sparsity * flat.size)
        threshold = np.sort(flat)[::-1][k - 1]
        masks[t] = {n: np.abs(deltas[t][n]) >= threshold for n in names}
    out = {}
    for n in names:
        count = np.maximum(sum(masks[t][n].astype(float) for t in tasks), 1)
        stitched = sum(masks[t][n] * deltas[t][n] for t in tasks) / count
        out[n] = models["base"][n].double().numpy() + scale * stitched
    return out


def test_localize_stitch_by_hand(tmp_path):
    # sparsity .5 of the model's 4 entries keeps 2 per task, over both tensors together
    base = {"w": torch.zeros(2), "v": torch.zeros(2)}
    a = {"w": torch.tensor([4.0, 0.1]), "v": torch.tensor([0.2, 3.0])}  # keeps w0, v1
    b = {"w": torch.tensor([2.0, 0.3]), "v": torch.tensor([5.0, 0.4])}  # keeps w0, v0
    out = merge(
        tmp_path, "localize_stitch", {"base": base, "a": a, "b": b}, params={"sparsity": 0.5}
    )
    # w0 is kept by both: (4 + 2) / 2; v0 only by b; v1 only by a; w1 by none
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 0.0]))
    torch.testing.assert_close(out["v"], torch.tensor([5.0, 3.0]))


@pytest.mark.parametrize("sparsity", [0.05, 0.3, 1.0])
def test_localize_stitch_equals_the_papers_equations(tmp_path, sparsity):
    shapes = {"w": (9, 4), "b": (9,), "u": (3, 2, 2)}
    models = random_models(["base", "a", "b", "c"], shapes, seed=4)
    out = merge(tmp_path, "localize_stitch", models, params={"sparsity": sparsity, "lambda": 0.8})
    want = _paper_stitch(models, list(shapes), "abc", sparsity, 0.8)
    for name in shapes:
        np.testing.assert_allclose(out[name].double().numpy(), want[name], atol=1e-6)


def test_the_threshold_is_global_not_per_tensor(tmp_path):
    # task a moves w a lot and v a little: with one global threshold v keeps nothing of a
    base = {"w": torch.zeros(4), "v": torch.zeros(4)}
    a = {"w": torch.tensor([5.0, 6.0, 7.0, 8.0]), "v": torch.tensor([0.1, 0.2, 0.3, 0.4])}
    out = merge(tmp_path, "localize_stitch", {"base": base, "a": a}, params={"sparsity": 0.5})
    torch.testing.assert_close(out["w"], a["w"])
    torch.testing.assert_close(out["v"], torch.zeros(4))


def test_localize_stitch_streams_in_chunks(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (16, 6), "b": (16,)}, seed=5)
    whole, chunked = chunked_equals_whole(
        tmp_path, "localize_stitch", models, params={"sparsity": 0.2}
    )
    for name in whole:
        assert torch.equal(whole[name], chunked[name])


def test_sparsity_cannot_vary_per_tensor(tmp_path):
    raw = {
        "models": {"base": "b", "a": "a"},
        "fuse": {
            "method": "localize_stitch",
            "base": "base",
            "params": {"sparsity": 0.1},
            "rules": [{"match": "*.mlp.*", "params": {"sparsity": 0.2}}],
        },
        "save": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(RecipeError, match="whole-model fraction"):
        recipe_from_dict(raw)


def test_weights_scale_each_task_after_localization(tmp_path):
    # the masks of test_localize_stitch_by_hand; a weighs 2, b 0.5: w0 = (8 + 1) / 2
    base = {"w": torch.zeros(2), "v": torch.zeros(2)}
    a = {"w": torch.tensor([4.0, 0.1]), "v": torch.tensor([0.2, 3.0])}
    b = {"w": torch.tensor([2.0, 0.3]), "v": torch.tensor([5.0, 0.4])}
    out = merge(
        tmp_path,
        "localize_stitch",
        {"base": base, "a": a, "b": b},
        params={"sparsity": 0.5},
        fused={"a": {"weight": 2.0}, "b": {"weight": 0.5}},
    )
    torch.testing.assert_close(out["w"], torch.tensor([4.5, 0.0]))
    torch.testing.assert_close(out["v"], torch.tensor([2.5, 6.0]))
