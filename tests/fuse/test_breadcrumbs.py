"""Model breadcrumbs (Davari & Belilovsky 2024): drop top-gamma outliers and the smallest."""

from __future__ import annotations

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models

TAU = torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])


def test_breadcrumbs_drops_the_outliers_and_the_smallest_as_hand_computed(tmp_path):
    base = torch.linspace(-1, 1, 10)
    models = {"base": {"w": base}, "a": {"w": base + TAU}}
    # 10 entries, gamma 0.1 drops the largest (10), density 0.5 keeps the next five
    out = merge(tmp_path, "breadcrumbs", models, params={"density": 0.5, "gamma": 0.1})
    kept = torch.tensor([0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.allclose(out["w"], base + kept)


def test_breadcrumbs_without_outliers_keeps_the_largest_unless_mergekit_behaviour_asked(tmp_path):
    base = torch.zeros(10)
    models = {"base": {"w": base}, "a": {"w": TAU}}
    # floor(0.05 * 10) = 0 outliers: the paper keeps the top half ...
    out = merge(tmp_path, "breadcrumbs", models, params={"density": 0.5, "gamma": 0.05})
    assert torch.equal(out["w"], torch.where(torch.arange(10) < 5, TAU, 0.0))
    # ... mergekit keeps nothing (its slice [n_bottom:-0] is empty)
    quirk = merge(
        tmp_path,
        "breadcrumbs",
        models,
        params={"density": 0.5, "gamma": 0.05, "empty_without_outliers": True},
    )
    assert torch.equal(quirk["w"], base)


def test_breadcrumbs_ties_elects_signs_on_the_masked_vectors(tmp_path):
    base = torch.zeros(10)
    models = {"base": {"w": base}, "a": {"w": TAU}, "b": {"w": -0.5 * TAU}}
    out = merge(tmp_path, "breadcrumbs_ties", models, params={"density": 0.5, "gamma": 0.1})
    # a keeps [_, -9, 8, -7, 6, -5]; b keeps the same positions at -0.5x: a's mass wins
    expected = torch.tensor([0.0, -9.0, 8.0, -7.0, 6.0, -5.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(out["w"], expected)


def test_breadcrumbs_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (12, 9), "v": (40,)})
    for method in ("breadcrumbs", "breadcrumbs_ties"):
        whole, chunked = chunked_equals_whole(
            tmp_path, method, models, params={"density": 0.3, "gamma": 0.05}
        )
        for key in whole:
            assert torch.equal(whole[key], chunked[key]), (method, key)
