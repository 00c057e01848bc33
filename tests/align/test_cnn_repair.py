"""On real data: a BatchNorm CNN pair (digits as 1x8x8 images), aligned, then REPAIRed.

Two ``build_cnn`` networks trained from different seeds are aligned with the built-in
``cnn`` spec; the aligned midpoint beats the naive one by far, and REPAIR (resetting the
BatchNorm statistics on the train split) improves the aligned midpoint further.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.repair import repair_state_dict
from merge_cli.align.spec import BUILTIN_SPECS
from merge_cli.connect.interpolate import interpolate_state_dicts
from merge_cli.io.checkpoint import InMemoryCheckpoint, read_state_dict
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task
from tests.align.conftest import REPO
from tests.conftest import single_thread

# make test-fast skips these: the module trains a BatchNorm CNN pair
pytestmark = pytest.mark.slow

DIGITS = REPO / "recipes" / "tasks" / "digits.py"
METHODS = ("weight_matching", "activation_matching")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on a loaded shared CPU."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def rows(align_digits) -> dict[str, tuple[float, float]]:
    """(test loss, test accuracy) of the endpoints and of every midpoint, by label."""
    digits = align_digits.DIGITS
    task = Task(TaskSpec(model=f"{DIGITS}:build_cnn", data=f"{DIGITS}:data"))
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = digits.train(
            digits.build_cnn(), digits.data("train"), epochs=10, lr=3e-3, seed=seed
        )
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    @torch.no_grad()
    def metrics(state: dict[str, torch.Tensor]) -> tuple[float, float]:
        model = digits.build_cnn()
        model.load_state_dict(state)
        model.eval()
        images, labels = digits.split_arrays("test")
        logits = model(images)
        accuracy = (logits.argmax(-1) == labels).float().mean()
        return float(F.cross_entropy(logits, labels)), float(accuracy)

    out = {"endpoint a": metrics(states[0]), "endpoint b": metrics(states[1])}
    out["naive average"] = metrics(interpolate_state_dicts(states[0], states[1], 0.5))
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    order = [name for name, _ in digits.build_cnn().named_modules()]
    spec = BUILTIN_SPECS["cnn"](checkpoints["a"], order)
    for method in METHODS:
        aligner = ALIGNERS[method]
        params = aligner.params.model_validate({})
        maps = aligner.align(checkpoints, "a", spec, params, AlignContext(task, lambda _t: None))
        b = PermutedCheckpoint(checkpoints["b"], spec, maps["b"])
        merged = interpolate_state_dicts(states[0], read_state_dict(b), 0.5)
        out[method] = metrics(merged)
        repaired = repair_state_dict(task, spec, merged, [checkpoints["a"], b], [1.0, 1.0])
        out[f"{method} + REPAIR"] = metrics(repaired)
    print("\n" + "\n".join(f"| {k} | {loss:.3f} | {acc:.3f} |" for k, (loss, acc) in out.items()))
    return out


def test_cnn_spec_has_batchnorm_groups(align_digits):
    model = align_digits.DIGITS.build_cnn()
    checkpoint = InMemoryCheckpoint(model.state_dict())
    spec = BUILTIN_SPECS["cnn"](checkpoint, [name for name, _ in model.named_modules()])
    assert [g.name for g in spec.groups] == ["layers.1", "layers.4"]
    assert [g.sites for g in spec.groups] == [("layers.2",), ("layers.5",)]
    assert all(g.producer is None for g in spec.groups)  # BatchNorm: REPAIR resets it


def test_endpoints_are_trained(rows):
    assert rows["endpoint a"][1] > 0.9
    assert rows["endpoint b"][1] > 0.9


@pytest.mark.parametrize("method", METHODS)
def test_alignment_beats_naive_average(rows, method):
    naive, aligned = rows["naive average"], rows[method]
    assert aligned[0] < naive[0] / 2
    assert aligned[1] > naive[1] + 0.3


@pytest.mark.parametrize("method", METHODS)
def test_repair_improves_the_aligned_cnn_midpoint(rows, method):
    aligned, repaired = rows[method], rows[f"{method} + REPAIR"]
    assert repaired[0] < aligned[0]
    assert repaired[1] > aligned[1]
