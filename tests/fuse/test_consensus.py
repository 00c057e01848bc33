"""Consensus merging (Wang et al. 2024): TALL masks, consensus threshold k, over TA and TIES."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _paper_consensus(deltas: list[np.ndarray], merged: np.ndarray, lam: float, k: int):
    """Eq. 3 and 5: m_t = |tau_t| > lambda |tau_MTL - tau_t|; keep where sum_t m_t >= k."""
    count = sum((np.abs(d) > lam * np.abs(merged - d)).astype(int) for d in deltas)
    return merged * (count >= k)


def _paper_ties(deltas: list[np.ndarray], density: float) -> np.ndarray:
    """TIES (Yadav et al. 2023): trim to the top density fraction, elect the sign of the
    summed mass (+ on zero), average the non-zero entries that agree with it."""
    trimmed = []
    for delta in deltas:
        keep = int(density * delta.size)
        threshold = np.sort(np.abs(delta).ravel())[::-1][keep - 1]
        trimmed.append(np.where(np.abs(delta) >= threshold, delta, 0.0))
    sign = np.where(sum(trimmed) >= 0, 1.0, -1.0)
    agree = [(np.sign(t) == sign) & (t != 0) for t in trimmed]
    count = sum(a.astype(float) for a in agree)
    return sum(t * a for t, a in zip(trimmed, agree, strict=True)) / np.maximum(count, 1)


def test_consensus_drops_selfish_entries_by_hand(tmp_path):
    # tau_a = [2, 1, .1], tau_b = [2, -1, 3]: tau_MTL = [4, 0, 3.1]. With lambda .5:
    #   m_a = [2 > 1, 1 > .5, .1 > 1.5] = [1, 1, 0];  m_b = [2 > 1, 1 > .5, 3 > .05] = [1, 1, 1]
    # entry 2 is selfish (only b selects it): k = 2 zeroes it, k = 1 keeps it.
    base = torch.tensor([1.0, 1.0, 1.0])
    models = {
        "base": {"w": base},
        "a": {"w": base + torch.tensor([2.0, 1.0, 0.1])},
        "b": {"w": base + torch.tensor([2.0, -1.0, 3.0])},
    }
    fused = {"a": {"tall_mask_lambda": 0.5}, "b": {"tall_mask_lambda": 0.5}}
    out = merge(tmp_path, "consensus_task_arithmetic", models, fused=fused)
    torch.testing.assert_close(out["w"], base + torch.tensor([4.0, 0.0, 0.0]))
    out = merge(tmp_path, "consensus_task_arithmetic", models, fused=fused, params={"k": 1})
    torch.testing.assert_close(out["w"], base + torch.tensor([4.0, 0.0, 3.1]))


def test_consensus_task_arithmetic_equals_the_papers_equations(tmp_path):
    models = random_models(["base", "a", "b", "c", "d"], {"w": (12, 5)}, seed=7)
    out = merge(
        tmp_path,
        "consensus_task_arithmetic",
        models,
        params={"lambda": 0.4, "k": 2},
        fused={n: {"tall_mask_lambda": 0.3} for n in "abcd"},
    )
    base = models["base"]["w"].double().numpy()
    deltas = [models[n]["w"].double().numpy() - base for n in "abcd"]
    want = base + 0.4 * _paper_consensus(deltas, sum(deltas), 0.3, 2)
    np.testing.assert_allclose(out["w"].double().numpy(), want, atol=1e-6)
    # some entries are removed and some kept: the mask is neither all ones nor all zeros
    kept = _paper_consensus(deltas, sum(deltas), 0.3, 2) != 0
    assert 0 < kept.mean() < 1


@pytest.mark.parametrize("density", [1.0, 0.4])
def test_consensus_ties_equals_the_papers_equations(tmp_path, density):
    models = random_models(["base", "a", "b", "c"], {"w": (10, 6)}, seed=11)
    out = merge(
        tmp_path,
        "consensus_ties",
        models,
        params={"lambda": 0.8},
        fused={n: {"density": density} for n in "abc"},
    )
    base = models["base"]["w"].double().numpy()
    deltas = [models[n]["w"].double().numpy() - base for n in "abc"]
    want = base + 0.8 * _paper_consensus(deltas, _paper_ties(deltas, density), 0.6, 2)
    np.testing.assert_allclose(out["w"].double().numpy(), want, atol=1e-6)


def test_consensus_with_k_zero_is_the_method_it_extends(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (6, 4)}, seed=2)
    ta = merge(tmp_path, "task_arithmetic", models, params={"lambda": 0.5})
    cta = merge(tmp_path, "consensus_task_arithmetic", models, params={"lambda": 0.5, "k": 0})
    torch.testing.assert_close(cta["w"], ta["w"])
    fused = {"a": {"density": 0.5}, "b": {"density": 0.5}}
    ties = merge(tmp_path, "ties", models, fused=fused)
    cties = merge(tmp_path, "consensus_ties", models, fused=fused, params={"k": 0})
    torch.testing.assert_close(cties["w"], ties["w"])


@pytest.mark.parametrize("method", ["consensus_task_arithmetic", "consensus_ties"])
def test_consensus_streams_in_chunks(tmp_path, method):
    models = random_models(["base", "a", "b", "c"], {"w": (16, 6)}, seed=5)
    fused = {n: {"density": 0.5} for n in "abc"} if method == "consensus_ties" else None
    whole, chunked = chunked_equals_whole(tmp_path, method, models, fused=fused)
    assert torch.equal(whole["w"], chunked["w"])
