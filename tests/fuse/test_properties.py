"""Properties every method must have, checked with hypothesis on random tensors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.engine.method import ChunkPasses, TensorJob
from merge_cli.fuse import METHODS

#: method -> (method params, per-model params, uses a base) where merging two copies of one
#: fine-tune must give that fine-tune back.
IDENTITY_CASES = {
    "linear": ({}, {}, False),
    "task_arithmetic": ({"normalize": True}, {}, True),
    "ties": ({}, {"density": 1.0}, True),
    "dare_linear": ({"normalize": True}, {"density": 1.0}, True),
    "dare_ties": ({}, {"density": 1.0}, True),
    "breadcrumbs": ({"normalize": True}, {"density": 1.0}, True),
    "breadcrumbs_ties": ({}, {"density": 1.0}, True),
    "della": ({}, {"density": 1.0}, True),
    "della_linear": ({"normalize": True}, {"density": 1.0}, True),
    "sce": ({}, {}, True),
    "slerp": ({"t": 0.4}, {}, False),
    "nuslerp": ({}, {}, True),
    "multislerp": ({}, {}, True),
    "karcher": ({}, {}, False),
    "model_stock": ({}, {}, True),
}


def _merge(method: str, job: TensorJob, params: dict, per_model: dict) -> torch.Tensor:
    entry = METHODS[method]
    method_params = entry.params.model_validate(params)
    models = [entry.model_params.model_validate(per_model) for _ in job.models]
    stats = None
    if entry.statistics is not None:
        stats = entry.statistics(ChunkPasses.over([job]), method_params, models)
    return entry.merge(job, method_params, models, stats)


@pytest.mark.parametrize("method", sorted(IDENTITY_CASES))
@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**31),
    shape=st.sampled_from([(3, 4), (7,), (2, 3, 2), ()]),
    scale=st.floats(0.01, 3.0),
)
def test_merging_copies_of_one_model_gives_the_model(method, seed, shape, scale):
    params, per_model, uses_base = IDENTITY_CASES[method]
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=generator)
    model = base + scale * torch.randn(shape, generator=generator)
    rows = (0, shape[0] if shape else 0)
    job = TensorJob(
        "w", [model.clone(), model.clone()], base if uses_base else None, rows, shape, seed
    )
    out = _merge(method, job, params, per_model)
    assert out.shape == model.shape
    torch.testing.assert_close(out, model, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["slerp", "nuslerp"])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), end=st.sampled_from([0, 1]))
def test_interpolations_return_their_endpoints(method, seed, end):
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, 5, 3, generator=generator)
    job = TensorJob("w", [first.clone(), second.clone()], None, (0, 5), (5, 3), 0)
    if method == "slerp":
        out = _merge("slerp", job, {"t": float(end)}, {})
    else:
        weights = [1.0 - end, float(end)]
        entry = METHODS["nuslerp"]
        models = [entry.model_params(weight=w) for w in weights]
        params = entry.params()
        out = entry.merge(
            job, params, models, entry.statistics(ChunkPasses.over([job]), params, models)
        )
    torch.testing.assert_close(out, (first, second)[end], rtol=1e-5, atol=1e-5)
