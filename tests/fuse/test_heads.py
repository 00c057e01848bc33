"""Task-specific heads (``fuse.params.heads``) for every per-tensor method: the trunk is
merged as if the heads were absent, each fused model's head is kept under
``heads.<model>.<tensor>``, the base's head is dropped."""

from __future__ import annotations

import pytest
import torch

from merge_cli.engine.method import TensorMethod
from merge_cli.errors import PlanError, RecipeError
from merge_cli.fuse import METHODS
from tests.fuse.fuse_harness import merge, random_models

HEADS = r"re:^head\."
TRUNK = {"trunk.0.weight": (6, 5), "trunk.0.bias": (6,), "trunk.2.weight": (4, 6)}
#: Each model's head: a classifier with its own number of classes.
CLASSES = {"base": 10, "a": 2, "b": 3}


def _models() -> dict[str, dict[str, torch.Tensor]]:
    models = random_models(list(CLASSES), TRUNK, seed=3)
    generator = torch.Generator().manual_seed(4)
    for name, classes in CLASSES.items():
        models[name]["head.weight"] = torch.randn(classes, 4, generator=generator)
        models[name]["head.bias"] = torch.randn(classes, generator=generator)
    return models


def _trunks(models):
    return {n: {k: v for k, v in s.items() if k.startswith("trunk.")} for n, s in models.items()}


def _setup(method: str) -> tuple[list[str], dict]:
    entry = METHODS[method]
    # two fused models, or one beside the base for a two-model method (slerp)
    fused = ["a", "b"][: max(entry.min_models, min(2, (entry.max_models or 3) - 1))]
    required = {k: 0.5 for k, f in entry.params.model_fields.items() if f.is_required()}
    return fused, required


PER_TENSOR = [
    name
    for name, entry in METHODS.items()
    if isinstance(entry, TensorMethod) and entry.plan_tensors is None
]


@pytest.mark.parametrize("method", PER_TENSOR)
def test_every_per_tensor_method_keeps_task_specific_heads(method, tmp_path):
    models = _models()
    fused, params = _setup(method)
    with_heads = merge(tmp_path, method, models, fused=fused, params={**params, "heads": HEADS})
    trunk_only = merge(tmp_path, method, _trunks(models), fused=fused, params=params)
    assert set(with_heads) == set(TRUNK) | {
        f"heads.{model}.head.{kind}" for model in fused for kind in ("weight", "bias")
    }
    for name in TRUNK:
        assert torch.equal(with_heads[name], trunk_only[name]), name
    for model in fused:
        assert torch.equal(with_heads[f"heads.{model}.head.weight"], models[model]["head.weight"])
        assert with_heads[f"heads.{model}.head.bias"].shape == (CLASSES[model],)


def test_task_arithmetic_with_heads_matches_the_hand_computed_trunk(tmp_path):
    models = _models()
    merged = merge(
        tmp_path,
        "task_arithmetic",
        models,
        fused=["a", "b"],
        params={"lambda": 0.3, "heads": HEADS},
    )
    for name in TRUNK:
        base = models["base"][name]
        expected = base + 0.3 * ((models["a"][name] - base) + (models["b"][name] - base))
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-6)
    assert "head.weight" not in merged and "heads.base.head.weight" not in merged


def test_heads_of_different_shapes_without_heads_say_how_to_fix_it(tmp_path):
    with pytest.raises(PlanError, match=r"differs from \[10, 4\] in 'base' \(task-specific heads"):
        merge(tmp_path, "ties", _models(), fused=["a", "b"], params={"density": 0.5})


def test_heads_matching_nothing_is_an_error(tmp_path):
    with pytest.raises(PlanError, match=r"fuse.params.heads: 're:\^classifier' matches no"):
        merge(tmp_path, "linear", _trunks(_models()), params={"heads": "re:^classifier"})


def test_passthrough_takes_no_heads(tmp_path):
    with pytest.raises(RecipeError, match=r"fuse.params.heads: unknown parameter"):
        merge(tmp_path, "passthrough", _trunks(_models()), base=None, params={"heads": HEADS})
