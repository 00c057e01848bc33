"""Multi-SLERP and the Karcher mean: spherical means of n models, computed on Gram matrices."""

from __future__ import annotations

import math

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _multislerp_direct(tensors, weights, eps=1e-8):
    """Multi-SLERP written directly in tensor space (the algorithm as mergekit states it)."""
    flat = torch.stack([t.reshape(-1).double() for t in tensors])
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    norms = flat.norm(dim=1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    mean = mean / mean.norm()
    tangent = units - (units @ mean)[:, None] * mean
    step = (tangent * w[:, None]).sum(0)
    size = step.norm() + eps
    result = mean * torch.cos(size) + step * torch.sin(size) / size
    return (result * (norms.squeeze(1) * w).sum()).reshape(tensors[0].shape).float()


def test_multislerp_matches_the_direct_tensor_space_computation(tmp_path):
    models = random_models(["x", "a", "b", "c"], {"w": (6, 5), "v": (4,)}, scale=1.0)
    del models["x"]
    weights = {"a": 1.0, "b": 2.0, "c": 0.5}
    out = merge(
        tmp_path,
        "multislerp",
        models,
        base=None,
        fused={k: {"weight": w} for k, w in weights.items()},
    )
    for key in ("w", "v"):
        expected = _multislerp_direct([models[m][key] for m in weights], list(weights.values()))
        assert torch.allclose(out[key], expected, atol=1e-5)


def test_spherical_means_of_two_orthogonal_vectors_bisect_them(tmp_path):
    models = {"a": {"w": torch.tensor([1.0, 0.0])}, "b": {"w": torch.tensor([0.0, 3.0])}}
    for method in ("multislerp", "karcher"):
        out = merge(tmp_path, method, models, base=None)
        # direction (1, 1) / sqrt(2), norm = mean of the norms (2)
        assert torch.allclose(out["w"], torch.tensor([math.sqrt(2), math.sqrt(2)])), method


def test_karcher_mean_of_three_orthonormal_vectors_is_their_centre(tmp_path):
    models = {name: {"w": torch.eye(3)[i]} for i, name in enumerate("abc")}
    out = merge(tmp_path, "karcher", models, base=None, params={"max_iter": 50})
    assert torch.allclose(out["w"], torch.full((3,), 1 / math.sqrt(3)), atol=1e-5)


def test_spherical_means_of_identical_models_are_the_model(tmp_path):
    models = random_models(["base", "a"], {"w": (5, 3)}, scale=1.0)
    models["b"] = models["a"]
    for method in ("multislerp", "karcher"):
        out = merge(tmp_path, method, models, base=None, fused=["a", "b"])
        assert torch.allclose(out["w"], models["a"]["w"], atol=1e-5), method
        with_base = merge(tmp_path, method, models, fused=["a", "b"])
        assert torch.allclose(with_base["w"], models["a"]["w"], atol=1e-5), method


def test_spherical_means_chunked_equal_whole(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (8, 3), "v": (6,)}, scale=1.0)
    for method in ("multislerp", "karcher"):
        whole, chunked = chunked_equals_whole(tmp_path, method, models)
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (method, key)
