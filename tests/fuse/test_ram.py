"""RAM / RAM+ (mergekit's ram, ramplus_tl): each entry averages the changes of the models
that changed it; RAM+ boosts each model's unique changes by its shared/unique ratio."""

from __future__ import annotations

import torch

from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models


def _models():
    base = torch.zeros(2, 3)
    a = torch.tensor([[1.0, 2.0, 0.0], [4.0, 0.0, 1e-6]])
    b = torch.tensor([[3.0, 0.0, 0.0], [2.0, 0.0, 5.0]])
    return {"base": {"w": base}, "a": {"w": a}, "b": {"w": b}}


def test_ram_averages_over_the_models_that_changed_an_entry(tmp_path):
    out = merge(tmp_path, "ram", _models())
    # both changed: mean; one changed: its change (1e-6 is below epsilon 1e-5); none: base
    expected = torch.tensor([[2.0, 2.0, 0.0], [3.0, 0.0, 5.0]])
    assert torch.equal(out["w"], expected)


def test_ramplus_boosts_unique_changes_by_the_shared_ratio(tmp_path):
    out = merge(tmp_path, "ramplus_tl", _models(), params={"r": 0.5, "alpha": 1.0})
    # a: shared 2 (entries [0,0], [1,0]), unique 1 ([0,1]): rho 2 -> clamp 1 -> lambda 1.5
    # b: shared 2, unique 1 ([1,2]): lambda 1.5
    expected = torch.tensor([[2.0, 3.0, 0.0], [3.0, 0.0, 7.5]])
    assert torch.equal(out["w"], expected)
    # alpha bounds the ratio: 1 + 0.5 * 0.2 = 1.1
    out = merge(tmp_path, "ramplus_tl", _models(), params={"r": 0.5})
    assert torch.allclose(out["w"], torch.tensor([[2.0, 2.2, 0.0], [3.0, 0.0, 5.5]]))


def test_ram_chunked_equals_whole(tmp_path):
    models = random_models(["base", "a", "b", "c"], {"w": (9, 4), "v": (7,)})
    for name in models:
        for key, tensor in models[name].items():
            tensor[tensor.abs() < 0.5] = models["base"][key][tensor.abs() < 0.5]
    for method in ("ram", "ramplus_tl"):
        whole, chunked = chunked_equals_whole(tmp_path, method, models)
        assert all(torch.equal(whole[k], chunked[k]) for k in whole), method
