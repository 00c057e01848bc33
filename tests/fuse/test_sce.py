"""SCE (Wan et al. 2024, FuseChat): select by variance, weight by energy, erase minority signs."""

from __future__ import annotations

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def test_sce_matches_the_hand_computed_select_calculate_erase(tmp_path):
    base = torch.zeros(4)
    tau_a = torch.tensor([1.0, 2.0, -1.0, 0.0])
    tau_b = torch.tensor([1.0, -2.0, 3.0, 2.0])
    models = {"base": {"w": base}, "a": {"w": tau_a}, "b": {"w": tau_b}}
    # variances [0, 4, 4, 1]: 3 non-zero, select_topk 0.67 keeps floor(2.01) = 2: entries 1, 2
    # selected a [0, 2, -1, 0], b [0, -2, 3, 0]; energies 5/4 and 13/4 -> weights 5/18, 13/18
    # signs by mass: entry 1: 0 -> +, entry 2: + ; disjoint weighted means: 2, 3
    out = merge(tmp_path, "sce", models, params={"select_topk": 0.67})
    assert torch.allclose(out["w"], torch.tensor([0.0, 2.0, 3.0, 0.0]))
    # without selection: energies 6/4, 18/4 -> weights 1/4, 3/4
    # entry 0: both +1 -> 1; entry 1: mass 0 -> + -> a's 2; entry 2: + -> 3; entry 3: b's 2
    full = merge(tmp_path, "sce", models)
    assert torch.allclose(full["w"], torch.tensor([1.0, 2.0, 3.0, 2.0]))


def test_sce_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (10, 6), "v": (9,)})
    whole, chunked = chunked_equals_whole(tmp_path, "sce", models, params={"select_topk": 0.3})
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key
