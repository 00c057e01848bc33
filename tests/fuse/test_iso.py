"""Isotropic merging (Marczak et al. 2025): Iso-C and Iso-CTS."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merge_cli.fuse.tensorwise.iso import subspace_sizes
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _polar(matrix: np.ndarray) -> np.ndarray:
    p, _, q = np.linalg.svd(matrix, full_matrices=False)
    return p @ q


def _paper_iso_c(deltas: list[np.ndarray]) -> np.ndarray:
    """Eq. 6-7: sigma_bar U V^T of the task-vector sum, sigma_bar the mean singular value."""
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    return s.mean() * u @ vt


def _paper_iso_cts(deltas: list[np.ndarray], k: int, s_per_task: int) -> np.ndarray:
    """Eq. 8-11: top-k of the sum, then each task's top s outside that common subspace;
    orthogonalise the stacked bases; flatten the spectrum to the mean kept singular value."""
    u, s, vt = np.linalg.svd(sum(deltas), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vt[:k].T]
    projector = u[:, :k] @ u[:, :k].T
    for delta in deltas:
        ut, st, vtt = np.linalg.svd(delta - projector @ delta, full_matrices=False)
        us.append(ut[:, :s_per_task])
        ss.append(st[:s_per_task])
        vs.append(vtt[:s_per_task].T)
    sigma = np.concatenate(ss).mean()
    return sigma * _polar(np.concatenate(us, 1)) @ _polar(np.concatenate(vs, 1)).T


def _deltas(models, names, key="w"):
    return [(models[n][key] - models["base"][key]).double().numpy() for n in names]


def test_iso_c_flattens_the_spectrum_of_the_sum(tmp_path):
    # the task-vector sum is diag(3, 1): U V^T = I and the mean singular value is 2
    base = torch.ones(2, 2)
    a = base + torch.diag(torch.tensor([2.0, 0.0]))
    b = base + torch.diag(torch.tensor([1.0, 1.0]))
    out = merge(tmp_path, "iso_c", {"base": {"w": base}, "a": {"w": a}, "b": {"w": b}})
    torch.testing.assert_close(out["w"], base + 2 * torch.eye(2))


def test_iso_c_equals_the_papers_equations_on_small_matrices(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (8, 5), "n": (5,)}, seed=1)
    out = merge(tmp_path, "iso_c", models, params={"alpha": 1.3})
    base = models["base"]["w"].double().numpy()
    want = base + 1.3 * _paper_iso_c(_deltas(models, "abc"))
    np.testing.assert_allclose(out["w"].double().numpy(), want, atol=2e-5)
    mean = sum(models[n]["n"] - models["base"]["n"] for n in "abc") / 3
    torch.testing.assert_close(out["n"], models["base"]["n"] + 1.3 * mean)


@pytest.mark.parametrize(
    ("rank", "tasks", "fraction", "sizes"),
    [(8, 3, 0.8, (5, 1)), (10, 4, 0.5, (6, 1)), (5, 3, 0.8, (5, 0)), (768, 8, 0.8, (616, 19))],
)
def test_iso_cts_splits_the_rank_evenly_among_the_tasks(rank, tasks, fraction, sizes):
    # 10 x 0.5 = 5 common; 5 / 4 = 1.25 -> 1 each; common grows to 6
    # 768 x 0.8 = 614.4 -> 614 common; 154 / 8 = 19.25 -> 19 each; common grows to 616
    assert subspace_sizes(rank, tasks, fraction) == sizes


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0])
def test_iso_cts_equals_the_papers_equations_on_small_matrices(tmp_path, fraction):
    models = random_models(["base", "a", "b", "c"], {"w": (7, 10), "n": (7,)}, seed=2)
    params = {"alpha": 0.9, "common_space_fraction": fraction}
    out = merge(tmp_path, "iso_cts", models, params=params)
    k, s = subspace_sizes(7, 3, fraction)
    assert k + 3 * s == 7
    base = models["base"]["w"].double().numpy()
    want = base + 0.9 * _paper_iso_cts(_deltas(models, "abc"), k, s)
    np.testing.assert_allclose(out["w"].double().numpy(), want, atol=2e-5)
    mean = sum(models[n]["n"] - models["base"]["n"] for n in "abc") / 3
    torch.testing.assert_close(out["n"], models["base"]["n"] + 0.9 * mean)


def test_iso_cts_with_the_whole_rank_common_is_iso_c(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (6, 9)}, seed=4)
    cts = merge(tmp_path, "iso_cts", models, params={"common_space_fraction": 1.0})
    iso_c = merge(tmp_path, "iso_c", models)
    torch.testing.assert_close(cts["w"], iso_c["w"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_is_deterministic_and_never_split_into_chunks(tmp_path, method):
    models = random_models(["base", "a", "b"], {"w": (16, 6)}, seed=5)
    whole, chunked = chunked_equals_whole(tmp_path, method, models)
    assert torch.equal(whole["w"], chunked["w"])
