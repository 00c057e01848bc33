"""Task arithmetic (Ilharco et al. 2023): base + lambda * sum_i w_i (theta_i - base)."""

from __future__ import annotations

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def test_task_arithmetic_matches_the_hand_computed_sum(tmp_path):
    base = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    a = base + torch.tensor([[0.5, 0.0], [-1.0, 0.25]])
    b = base + torch.tensor([[0.25, 1.0], [0.5, -0.5]])
    models = {"base": {"w": base}, "a": {"w": a}, "b": {"w": b}}
    out = merge(
        tmp_path,
        "task_arithmetic",
        models,
        fused={"a": {"weight": 1.0}, "b": {"weight": 0.5}},
        params={"lambda": 0.5},
    )
    # 0.5 * (1.0 * [[.5, 0], [-1, .25]] + 0.5 * [[.25, 1], [.5, -.5]])
    expected = base + torch.tensor([[0.3125, 0.25], [-0.375, 0.0]])
    assert torch.equal(out["w"], expected)

    normalized = merge(
        tmp_path,
        "task_arithmetic",
        models,
        fused={"a": {"weight": 1.0}, "b": {"weight": 0.5}},
        params={"normalize": True},
    )
    assert torch.allclose(normalized["w"], base + (expected - base) * 2 / 1.5)


def test_task_arithmetic_of_identical_models_is_the_model(tmp_path):
    models = random_models(["base", "a"], {"w": (6, 4), "b": (4,)})
    models["b"] = dict(models["a"])
    out = merge(tmp_path, "task_arithmetic", models, params={"normalize": True})
    for name, tensor in models["a"].items():
        assert torch.allclose(out[name], tensor, atol=1e-6)


def test_task_arithmetic_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (9, 5), "v": (7,)})
    whole, chunked = chunked_equals_whole(tmp_path, "task_arithmetic", models)
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)
