"""DARE (Yu et al. 2024): drop with probability 1 - density, rescale by 1 / density."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.engine.method import ChunkPasses, TensorJob
from merge_cli.fuse import METHODS
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _job(base: torch.Tensor, models: list[torch.Tensor], seed: int = 0) -> TensorJob:
    return TensorJob("w", [m.clone() for m in models], base, (0, base.shape[0]), base.shape, seed)


def _run(method: str, job: TensorJob, params: dict, per_model: list[dict]) -> torch.Tensor:
    entry = METHODS[method]
    method_params = entry.params.model_validate(params)
    models = [entry.model_params.model_validate(p) for p in per_model]
    stats = entry.statistics(ChunkPasses.over([job]), method_params, models)
    return entry.merge(job, method_params, models, stats)


@settings(max_examples=10, deadline=None)
@given(density=st.floats(0.1, 0.9), seed=st.integers(0, 2**40))
def test_dare_preserves_the_expected_task_vector(density, seed):
    base = torch.zeros(400, 500)
    tau = torch.ones(400, 500) * 0.5
    out = _run("dare_linear", _job(base, [base + tau], seed), {}, [{"density": density}])
    kept = out != 0
    n = out.numel()
    # each entry is tau / density with probability density, else 0
    assert abs(float(kept.float().mean()) - density) < 5 * (density * (1 - density) / n) ** 0.5
    assert torch.allclose(out[kept], torch.full_like(out[kept], 0.5 / density))
    std = 0.5 * ((1 - density) / density / n) ** 0.5
    assert abs(float(out.mean()) - 0.5) < 5 * std


def test_dare_with_density_one_is_task_arithmetic_and_seeded_masks_are_reproducible():
    base = torch.randn(30, 20, generator=torch.Generator().manual_seed(0))
    models = [base + 0.1, base - 0.2]
    dense = _run("dare_linear", _job(base, models), {}, [{"density": 1.0}] * 2)
    assert torch.allclose(dense, base - 0.1, atol=1e-6)
    first = _run("dare_ties", _job(base, models, seed=5), {}, [{"density": 0.5}] * 2)
    again = _run("dare_ties", _job(base, models, seed=5), {}, [{"density": 0.5}] * 2)
    other = _run("dare_ties", _job(base, models, seed=6), {}, [{"density": 0.5}] * 2)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_dare_l1_rescale_matches_the_unpruned_l1_norm_as_mergekit():
    base = torch.zeros(50, 40)
    tau = torch.randn(50, 40, generator=torch.Generator().manual_seed(1))
    out = _run("dare_linear", _job(base, [tau]), {"rescale": "l1"}, [{"density": 0.3}])
    assert torch.allclose(out.abs().sum(), tau.abs().sum(), rtol=1e-5)
    plain = _run("dare_linear", _job(base, [tau]), {"rescale": False}, [{"density": 0.3}])
    kept = plain != 0
    assert torch.equal(plain[kept], tau[kept])
    assert torch.allclose(out[kept], plain[kept] * tau.abs().sum() / plain.abs().sum())


def test_dare_ties_elects_signs_after_the_drop(tmp_path):
    models = {
        "base": {"w": torch.zeros(4)},
        "a": {"w": torch.tensor([1.0, -1.0, 2.0, 0.5])},
        "b": {"w": torch.tensor([-3.0, -1.0, 1.0, 0.5])},
    }
    # density 1: no drop; elected signs [-, -, +, +]; disjoint means
    out = merge(tmp_path, "dare_ties", models, params={"density": 1.0})
    assert torch.equal(out["w"], torch.tensor([-3.0, -1.0, 1.5, 0.5]))


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_chunked_equals_whole(tmp_path, method):
    models = random_models(["base", "a", "b"], {"w": (11, 7), "v": (13,), "s": ()})
    for rescale in (True, "l1"):
        whole, chunked = chunked_equals_whole(
            tmp_path, method, models, params={"density": 0.4, "rescale": rescale}, seed=3
        )
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (key, rescale)
