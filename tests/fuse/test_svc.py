"""Singular value calibration (Li et al. 2026) after a task-vector merge: ``<method>_svc``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_cli.engine.method import TensorMethod
from merge_cli.fuse import METHODS
from tests.fuse.fuse_harness import merge, random_models


def _paper_svc(merged: np.ndarray, deltas: list[np.ndarray], alpha: float) -> np.ndarray:
    """Alg. 1: a_r = u_r^T Delta; s_r^i = <a_r^m, a_r^i> / ||a_r^i||^2;
    gamma_r = K / sum_i max(alpha, s_r^i); sigma_r <- gamma_r sigma_r."""
    u, s, vt = np.linalg.svd(merged, full_matrices=False)
    gammas = []
    for r in range(len(s)):
        merged_response = u[:, r] @ merged
        coefficients = []
        for delta in deltas:
            response = u[:, r] @ delta
            coefficients.append(merged_response @ response / (response @ response))
        gammas.append(len(deltas) / sum(max(alpha, c) for c in coefficients))
    return u @ np.diag(np.array(gammas) * s) @ vt


def test_svc_undoes_the_double_count_of_identical_tasks(tmp_path):
    # two identical task vectors: task arithmetic's sum is 2 tau, every s_r^i = 2, so
    # gamma = 2 / (2 + 2) = 1/2 and the calibrated update is tau itself
    base = torch.zeros(3, 4)
    tau = torch.arange(12.0).reshape(3, 4) / 10
    models = {"base": {"w": base, "b": torch.zeros(3)}, "a": {"w": tau, "b": torch.ones(3)}}
    models["c"] = models["a"]
    out = merge(tmp_path, "task_arithmetic_svc", models)
    torch.testing.assert_close(out["w"], tau, atol=1e-6, rtol=0)
    torch.testing.assert_close(out["b"], torch.full((3,), 2.0))  # not a matrix: unchanged


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("task_arithmetic", {"lambda": 0.7}),
        ("ties", {"density": 0.5}),
        ("tsv", {}),
        ("iso_c", {"alpha": 1.2}),
    ],
)
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_svc_equals_the_papers_algorithm_after_any_merge(tmp_path, method, params, alpha):
    models = random_models(["base", "a", "b", "c"], {"w": (8, 6), "n": (6,)}, seed=12)
    plain = merge(tmp_path, method, models, params=params)
    calibrated = merge(tmp_path, f"{method}_svc", models, params={**params, "svc_alpha": alpha})
    base = models["base"]["w"].double().numpy()
    deltas = [models[n]["w"].double().numpy() - base for n in "abc"]
    merged = plain["w"].double().numpy() - base
    want = base + _paper_svc(merged, deltas, alpha)
    np.testing.assert_allclose(calibrated["w"].double().numpy(), want, atol=2e-5)
    assert not np.allclose(want, plain["w"].double().numpy(), atol=1e-3)  # SVC changed it
    assert torch.equal(calibrated["n"], plain["n"])


def test_every_task_vector_method_has_an_svc_variant():
    for name, method in METHODS.items():
        if not isinstance(method, TensorMethod) or name.endswith("_svc"):
            continue
        several = method.max_models is None or method.max_models > 1
        if method.needs_base and method.plan_tensors is None and several:
            assert f"{name}_svc" in METHODS, name
