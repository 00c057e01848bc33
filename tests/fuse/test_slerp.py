"""SLERP and NuSLERP: spherical interpolation of two models (mergekit semantics)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.engine.method import ChunkPasses
from merge_cli.errors import RecipeError
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def test_slerp_of_orthogonal_vectors_follows_the_circle(tmp_path):
    models = {"base": {"w": torch.tensor([1.0, 0.0])}, "a": {"w": torch.tensor([0.0, 2.0])}}
    out = merge(tmp_path, "slerp", models, params={"t": 0.5})
    # theta = pi/2: sin(pi/4) / sin(pi/2) for both
    half = math.sin(math.pi / 4)
    assert torch.allclose(out["w"], torch.tensor([half, 2 * half]))
    third = merge(tmp_path, "slerp", models, params={"t": 1 / 3})
    assert torch.allclose(
        third["w"], torch.tensor([math.sin(math.pi / 3), 2 * math.sin(math.pi / 6)])
    )


def test_slerp_of_colinear_vectors_is_linear(tmp_path):
    base = torch.tensor([1.0, -2.0, 3.0])
    models = {"base": {"w": base}, "a": {"w": 3 * base}}
    out = merge(tmp_path, "slerp", models, params={"t": 0.25})
    assert torch.allclose(out["w"], 0.75 * base + 0.25 * 3 * base)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 1000))
def test_slerp_endpoints_and_identical_models(tmp_path_factory, seed):
    tmp_path = tmp_path_factory.mktemp("slerp")
    models = random_models(["base", "a"], {"w": (4, 3), "v": (5,)}, seed=seed, scale=1.0)
    start = merge(tmp_path, "slerp", models, params={"t": 0.0})
    end = merge(tmp_path, "slerp", models, params={"t": 1.0})
    for key in models["base"]:
        assert torch.allclose(start[key], models["base"][key], atol=1e-5)
        assert torch.allclose(end[key], models["a"][key], atol=1e-5)
    same = merge(
        tmp_path, "slerp", {"x": models["a"], "y": models["a"]}, base=None, params={"t": 0.7}
    )
    for key in models["a"]:
        assert torch.allclose(same[key], models["a"][key], atol=1e-5)


def test_slerp_needs_exactly_two_models(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (2, 2)})
    with pytest.raises(RecipeError, match="interpolates two models: 1 model"):
        merge(tmp_path, "slerp", models, params={"t": 0.5})


def test_nuslerp_takes_t_from_the_weights_and_can_interpolate_task_vectors(tmp_path):
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    models = {"a": {"w": a}, "b": {"w": b}}
    out = merge(
        tmp_path, "nuslerp", models, base=None, fused={"a": {"weight": 2.0}, "b": {"weight": 1.0}}
    )
    # t = 1 / 3
    assert torch.allclose(
        out["w"], torch.tensor([math.sin(math.pi / 3), math.sin(math.pi / 6) * 2])
    )
    base = torch.tensor([5.0, 5.0])
    with_base = merge(
        tmp_path,
        "nuslerp",
        {"base": {"w": base}, "a": {"w": base + a}, "b": {"w": base + b}},
        fused={"a": {"weight": 2.0}, "b": {"weight": 1.0}},
    )
    assert torch.allclose(with_base["w"], base + out["w"])


def test_nuslerp_row_wise_interpolates_each_row_or_column():
    from merge_cli.engine.method import TensorJob
    from merge_cli.fuse import METHODS

    entry = METHODS["nuslerp"]
    v0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    v1 = torch.tensor([[0.0, 1.0], [2.0, 2.0]])
    models = [entry.model_params(weight=1.0)] * 2
    params = entry.params(nuslerp_flatten=False)
    job = TensorJob("w", [v0, v1], None, (0, 2), (2, 2), 0)
    stats = entry.statistics(ChunkPasses.over([job]), params, models)
    out = entry.merge(job, params, models, stats)
    half = math.sin(math.pi / 4)
    # row 0: orthogonal unit vectors at t=0.5; row 1: colinear, linear interpolation
    assert torch.allclose(out, torch.tensor([[half, half], [1.5, 1.5]]))


def test_slerp_family_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (9, 4), "v": (7,), "c": (3, 2, 2)}, scale=1)
    cases = [
        ("slerp", {"t": 0.3}, "base", ["a"]),
        ("nuslerp", {}, None, ["a", "b"]),
        ("nuslerp", {"nuslerp_flatten": False}, "base", ["a", "b"]),
        ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, None, ["a", "b"]),
    ]
    for method, params, base, fused in cases:
        whole, chunked = chunked_equals_whole(
            tmp_path, method, models, params=params, base=base, fused=fused
        )
        for key in whole:
            assert torch.allclose(whole[key], chunked[key], rtol=1e-6, atol=1e-7), (params, key)
