"""Model stock (Jang et al. 2024): t = N cos / (1 + (N - 1) cos) toward the fine-tuned mean."""

from __future__ import annotations

import math

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _models(tau_a, tau_b, base=(1.0, -1.0)):
    base = torch.tensor(base)
    return {
        "base": {"w": base},
        "a": {"w": base + torch.tensor(tau_a)},
        "b": {"w": base + torch.tensor(tau_b)},
    }


def test_model_stock_ratio_follows_the_angle_between_task_vectors(tmp_path):
    base = torch.tensor([1.0, -1.0])
    # orthogonal task vectors: cos 0 -> t 0 -> the base
    assert torch.allclose(merge(tmp_path, "model_stock", _models([1, 0], [0, 1]))["w"], base)
    # parallel task vectors: cos 1 -> t 1 -> the fine-tuned average
    out = merge(tmp_path, "model_stock", _models([1, 1], [2, 2]))
    assert torch.allclose(out["w"], base + torch.tensor([1.5, 1.5]))
    # 60 degrees: cos 1/2 -> t = 2 * 0.5 / 1.5 = 2/3
    tau_b = [0.5, math.sqrt(3) / 2]
    out = merge(tmp_path, "model_stock", _models([1.0, 0.0], tau_b))
    mean = (torch.tensor([1.0, 0.0]) + torch.tensor(tau_b)) / 2
    assert torch.allclose(out["w"], base + 2 / 3 * mean, atol=1e-6)


def test_model_stock_filter_wise_uses_one_ratio_per_row(tmp_path):
    base = torch.zeros(2, 2)
    models = {
        "base": {"w": base},
        "a": {"w": torch.tensor([[1.0, 0.0], [1.0, 1.0]])},
        "b": {"w": torch.tensor([[0.0, 1.0], [2.0, 2.0]])},
    }
    out = merge(tmp_path, "model_stock", models, params={"filter_wise": True})
    assert torch.allclose(out["w"], torch.tensor([[0.0, 0.0], [1.5, 1.5]]))


def test_model_stock_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (9, 4), "v": (7,)})
    for params in ({}, {"filter_wise": True}):
        whole, chunked = chunked_equals_whole(tmp_path, "model_stock", models, params=params)
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (params, key)


def test_model_stock_filter_wise_4d_takes_the_cosine_along_the_last_dimension(tmp_path):
    """mergekit reduces over dim=-1: a conv kernel [out, in, kh, kw] gets one ratio per
    [out, in, kh, :] vector, not one per output channel."""
    base = torch.zeros(2, 1, 2, 2)
    a = torch.tensor([[[[1.0, 0.0], [1.0, 1.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    b = torch.tensor([[[[0.0, 1.0], [2.0, 2.0]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    models = {"base": {"w": base}, "a": {"w": a}, "b": {"w": b}}
    out = merge(tmp_path, "model_stock", models, params={"filter_wise": True})
    # channel 0: kh 0 orthogonal (t 0: the base), kh 1 parallel (t 1: the mean);
    # per output channel the cosine would be 0.77 for both rows
    expected = torch.tensor([[[[0.0, 0.0], [1.5, 1.5]]], [[[1.0, 2.0], [3.0, 4.0]]]])
    assert torch.allclose(out["w"], expected, atol=1e-6)
    models = random_models(["base", "a", "b", "c"], {"conv": (6, 3, 2, 5)})
    whole, chunked = chunked_equals_whole(
        tmp_path, "model_stock", models, params={"filter_wise": True}
    )
    assert torch.equal(whole["conv"], chunked["conv"])
