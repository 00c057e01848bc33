"""TIES-merging (Yadav et al. 2023): trim to density, elect sign by mass, disjoint mean."""

from __future__ import annotations

import time

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.engine.method import ChunkPasses, TensorJob
from merge_cli.fuse import METHODS
from tests.fuse.fuse_harness import chunked_equals_whole, merge, random_models

BASE = torch.tensor([1.0, 2.0, -1.0, 0.5])
TAUS = [
    torch.tensor([1.0, -2.0, 0.5, 3.0]),
    torch.tensor([-1.5, -1.0, 0.25, -0.5]),
    torch.tensor([0.75, 2.5, -0.25, 1.0]),
]


def _models() -> dict[str, dict[str, torch.Tensor]]:
    models = {"base": {"w": BASE}}
    for name, tau in zip("abc", TAUS, strict=True):
        models[name] = {"w": BASE + tau}
    return models


def test_ties_matches_the_hand_computed_trim_elect_merge(tmp_path):
    # density 0.5 keeps 2 of 4 per task vector:
    #   a -> [0, -2, 0, 3]; b -> [-1.5, -1, 0, 0]; c -> [0, 2.5, 0, 1]
    # mass [-1.5, -0.5, 0, 4] elects signs [-, -, +, +]; disjoint means:
    #   [-1.5, (-2 - 1) / 2, nothing agrees: 0, (3 + 1) / 2]
    out = merge(tmp_path, "ties", _models(), params={"density": 0.5})
    assert torch.equal(out["w"], BASE + torch.tensor([-1.5, -1.5, 0.0, 2.0]))

    unnormalized = merge(
        tmp_path, "ties", _models(), params={"density": 0.5, "normalize": False, "lambda": 0.5}
    )
    assert torch.equal(unnormalized["w"], BASE + 0.5 * torch.tensor([-1.5, -3.0, 0.0, 4.0]))


def test_ties_weights_enter_the_sign_election_and_the_mean(tmp_path):
    out = merge(
        tmp_path,
        "ties",
        _models(),
        params={"density": 0.5},
        fused={"a": {"weight": 1.0}, "b": {"weight": 4.0}, "c": {"weight": 1.0}},
    )
    # weighted trimmed: a [0,-2,0,3], b [-6,-4,0,0], c [0,2.5,0,1]; mass [-6,-3.5,0,4]
    # entry 1: agreeing a (w 1) and b (w 4): (-2 - 4) / 5
    assert torch.allclose(out["w"], BASE + torch.tensor([-1.5, -1.2, 0.0, 2.0]))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 1000), weight=st.floats(0.1, 3), scale=st.floats(0.1, 2))
def test_ties_with_one_model_and_density_one_is_task_arithmetic(
    tmp_path_factory, seed, weight, scale
):
    tmp_path = tmp_path_factory.mktemp("ties")
    models = random_models(["base", "a"], {"w": (5, 3)}, seed=seed)
    ties = METHODS["ties"]
    ta = METHODS["task_arithmetic"]
    base, model = models["base"]["w"], models["a"]["w"]
    job = TensorJob("w", [model], base, (0, 5), (5, 3), 0)
    job2 = TensorJob("w", [model.clone()], base, (0, 5), (5, 3), 0)
    ties_params = ties.params.model_validate({"normalize": False, "lambda": scale})
    ta_params = ta.params.model_validate({"lambda": scale})
    per_model = [ties.model_params(weight=weight)]
    stats = ties.statistics(ChunkPasses.over([job]), ties_params, per_model)
    got = ties.merge(job, ties_params, per_model, stats)
    want = ta.merge(job2, ta_params, [ta.model_params(weight=weight)], None)
    assert torch.allclose(got, want, atol=1e-6)
    del tmp_path


def test_ties_of_identical_models_is_the_model(tmp_path):
    models = random_models(["base", "a"], {"w": (8, 4)})
    models["b"] = models["a"]
    out = merge(tmp_path, "ties", models, params={"density": 1.0})
    assert torch.allclose(out["w"], models["a"]["w"], atol=1e-6)


def test_ties_chunked_equals_whole_with_ties_in_magnitude(tmp_path):
    models = random_models(["base", "a", "b"], {"w": (13, 6), "v": (11,), "s": ()})
    # bf16-like quantized deltas: many equal magnitudes at the threshold
    for name in ("a", "b"):
        for key, value in models[name].items():
            base = models["base"][key]
            models[name][key] = base + torch.round((value - base) * 8) / 8
    whole, chunked = chunked_equals_whole(
        tmp_path, "ties", models, params={"density": 0.35}, fused={"a": {}, "b": {"density": 0.6}}
    )
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key


def test_ties_on_a_2048x5632_tensor_is_faster_than_sorting_its_task_vectors():
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(2048, 5632, generator=generator)
    models = [base + 0.01 * torch.randn(2048, 5632, generator=generator) for _ in range(2)]
    ties = METHODS["ties"]
    params = ties.params.model_validate({})
    per_model = [ties.model_params(density=0.2)] * 2
    job = TensorJob("w", models, base, (0, 2048), (2048, 5632), 0)
    started = time.perf_counter()
    stats = ties.statistics(ChunkPasses.over([job]), params, per_model)
    merged = ties.merge(job, params, per_model, stats)
    elapsed = time.perf_counter() - started
    kept = (merged != base).float().mean()
    assert 0.2 <= float(kept) <= 0.4
    # mergekit finds each threshold with a full argsort of the task vector's magnitudes; the
    # whole TIES merge here (two models) must beat those two sorts alone on the same machine.
    started = time.perf_counter()
    torch.argsort((models[0] - base).abs().view(-1), descending=True)
    one_sort = time.perf_counter() - started
    assert elapsed < 2 * one_sort, f"TIES {elapsed:.2f} s, one argsort {one_sort:.2f} s"
    assert elapsed < 10
