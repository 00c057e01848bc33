"""TSV-Merge (Gargiulo et al. 2025): per-task top r/T singular triplets, orthogonalised."""

from __future__ import annotations

import numpy as np
import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _paper_tsv(base: np.ndarray, finetuned: list[np.ndarray], alpha: float) -> np.ndarray:
    """Eq. 7-8 of the paper in float64 numpy: concatenate each task's top r/T singular
    triplets, replace U and V by their nearest orthonormal matrices, add alpha U S V^T."""
    deltas = [f - base for f in finetuned]
    k = min(base.shape) // len(deltas)
    us, ss, vs = [], [], []
    for delta in deltas:
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vt[:k].T)
    u, s, v = np.concatenate(us, 1), np.concatenate(ss), np.concatenate(vs, 1)
    pu, _, qu = np.linalg.svd(u, full_matrices=False)
    pv, _, qv = np.linalg.svd(v, full_matrices=False)
    return base + alpha * (pu @ qu) @ np.diag(s) @ (pv @ qv).T


def test_tsv_equals_the_papers_equations_on_small_matrices(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (9, 7), "b": (9,)}, seed=3)
    out = merge(tmp_path, "tsv", models, params={"alpha": 0.7})
    base = models["base"]["w"].double().numpy()
    want = _paper_tsv(base, [models[n]["w"].double().numpy() for n in "abc"], 0.7)
    np.testing.assert_allclose(out["w"].double().numpy(), want, atol=2e-5)
    # a bias is not a matrix: alpha times the mean task vector
    mean = sum(models[n]["b"] - models["base"]["b"] for n in "abc") / 3
    torch.testing.assert_close(out["b"], models["base"]["b"] + 0.7 * mean)


def test_tsv_of_tasks_in_orthogonal_subspaces_is_their_sum(tmp_path):
    # rank-1 task vectors on disjoint rows and columns of a 4x4 matrix; r / T = 1 keeps each
    # whole, their bases are already orthonormal, so TSV-M is plain task arithmetic.
    base = torch.ones(4, 4)
    tasks = {}
    for name, (row, col, value) in zip(
        "abc", [(0, 1, 3.0), (2, 3, -2.0), (3, 2, 0.5)], strict=True
    ):
        delta = torch.zeros(4, 4)
        delta[row, col] = value
        tasks[name] = delta
    models = {"base": {"w": base}} | {n: {"w": base + d} for n, d in tasks.items()}
    out = merge(tmp_path, "tsv", models)
    torch.testing.assert_close(out["w"], base + sum(tasks.values()))


def test_tsv_truncates_each_task_to_rank_r_over_t(tmp_path):
    # two tasks on a 6x6 matrix keep 3 singular triplets each: a = diag(5, 4, 3, 2, 1, .5)
    # loses 2, 1 and .5; b lives on the other three coordinates and is kept whole.
    a = torch.diag(torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.5]))
    b = torch.diag(torch.tensor([0.0, 0.0, 0.0, 6.0, 0.7, 0.2]))
    base = torch.zeros(6, 6)
    out = merge(tmp_path, "tsv", {"base": {"w": base}, "a": {"w": a}, "b": {"w": b}})
    want = torch.diag(torch.tensor([5.0, 4.0, 3.0, 6.0, 0.7, 0.2]))
    torch.testing.assert_close(out["w"], want, atol=1e-5, rtol=0)


def test_tsv_is_deterministic_and_never_split_into_chunks(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (16, 6)}, seed=5)
    whole, chunked = chunked_equals_whole(tmp_path, "tsv", models)
    assert torch.equal(whole["w"], chunked["w"])
    again = merge(tmp_path, "tsv", models)
    assert torch.equal(whole["w"], again["w"])


def test_tsv_lowrank_svd_matches_the_exact_one_when_the_spectrum_has_a_gap(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=generator)
    models = {"base": {"w": base}}
    spectrum = torch.cat([torch.linspace(1.0, 0.5, 16), torch.full((32,), 1e-3)])
    for name in "abc":  # r / T = 16 kept per task, well above the rest of the spectrum
        left, _ = torch.linalg.qr(torch.randn(64, 48, generator=generator))
        right, _ = torch.linalg.qr(torch.randn(48, 48, generator=generator))
        models[name] = {"w": base + (left * spectrum) @ right.T}
    exact = merge(tmp_path, "tsv", models)
    lowrank = merge(tmp_path, "tsv", models, params={"svd": "lowrank"})
    torch.testing.assert_close(lowrank["w"], exact["w"], atol=1e-4, rtol=0)
    again = merge(tmp_path, "tsv", models, params={"svd": "lowrank"})
    assert torch.equal(lowrank["w"], again["w"])
