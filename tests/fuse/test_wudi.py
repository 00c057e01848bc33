"""WUDI merging (Cheng et al. 2025) in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _loss(merged: np.ndarray, deltas: list[np.ndarray]) -> float:
    """Eq. 9: sum_i ||(tau_m - tau_i) tau_i^T||_F^2 / ||tau_i||_F^2."""
    return sum(np.sum(((merged - d) @ d.T) ** 2) / np.sum(d**2) for d in deltas)


def _paper_minimiser(deltas: list[np.ndarray]) -> np.ndarray:
    """argmin of Eq. 9 as a least-squares problem: tau_m [c_i^.5 tau_i^T]_i = [c_i^.5 tau_i
    tau_i^T]_i, solved with numpy's lstsq (no normal equations, no ridge)."""
    weights = [1 / np.sqrt(np.sum(d**2)) for d in deltas]
    lhs = np.concatenate([w * d.T for w, d in zip(weights, deltas, strict=True)], axis=1)
    rhs = np.concatenate([w * d @ d.T for w, d in zip(weights, deltas, strict=True)], axis=1)
    solution, *_ = np.linalg.lstsq(lhs.T, rhs.T, rcond=None)
    return solution.T


@pytest.mark.parametrize("shape", [(6, 8), (12, 5)])
def test_wudi_is_the_minimiser_of_the_papers_objective(tmp_path, shape):
    models = random_models(["base", "a", "b", "c"], {"w": shape, "b": (shape[0],)}, seed=8)
    out = merge(tmp_path, "wudi", models, params={"alpha": 0.9, "epsilon": 1e-9})
    base = models["base"]["w"].double().numpy()
    deltas = [models[n]["w"].double().numpy() - base for n in "abc"]
    want = _paper_minimiser(deltas)
    got = (out["w"].double().numpy() - base) / 0.9
    np.testing.assert_allclose(got, want, atol=5e-4)
    # it interferes less than task arithmetic's sum, which is where the paper's descent starts
    assert _loss(got, deltas) < 0.5 * _loss(sum(deltas), deltas)
    mean = sum(models[n]["b"] - models["base"]["b"] for n in "abc") / 3
    torch.testing.assert_close(out["b"], models["base"]["b"] + 0.9 * mean)


def test_wudi_of_tasks_on_orthogonal_inputs_is_their_sum(tmp_path):
    # task a acts on input coordinates 0-1, task b on 2-3: no interference, so the sum
    generator = torch.Generator().manual_seed(0)
    a = torch.zeros(3, 4)
    a[:, :2] = torch.randn(3, 2, generator=generator)
    b = torch.zeros(3, 4)
    b[:, 2:] = torch.randn(3, 2, generator=generator)
    base = torch.randn(3, 4, generator=generator)
    models = {"base": {"w": base}, "a": {"w": base + a}, "b": {"w": base + b}}
    out = merge(tmp_path, "wudi", models, params={"epsilon": 1e-9})
    torch.testing.assert_close(out["w"], base + a + b, atol=1e-5, rtol=0)


def test_wudi_ridge_damps_only_the_weak_directions(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (5, 7)}, seed=9)
    tight = merge(tmp_path, "wudi", models, params={"epsilon": 1e-9})
    loose = merge(tmp_path, "wudi", models, params={"epsilon": 1.0})
    base = models["base"]["w"]
    assert (loose["w"] - base).norm() < (tight["w"] - base).norm()


def test_wudi_is_deterministic_and_never_split_into_chunks(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (16, 6)}, seed=5)
    whole, chunked = chunked_equals_whole(tmp_path, "wudi", models)
    assert torch.equal(whole["w"], chunked["w"])
