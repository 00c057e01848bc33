"""REPAIR: the fused units' statistics become the interpolation of the endpoints'."""

from __future__ import annotations

import torch

from merge_cli.align.repair import repair_state_dict
from merge_cli.align.spec import chain_spec
from merge_cli.connect.interpolate import interpolate_state_dicts
from merge_cli.io import InMemoryCheckpoint
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task
from tests.align.conftest import REPO

DIGITS = REPO / "recipes" / "tasks" / "digits.py"


def _task(batchnorm: bool) -> Task:
    return Task(
        TaskSpec(
            model=f"{DIGITS}:build_mlp", data=f"{DIGITS}:data", params={"batchnorm": batchnorm}
        )
    )


@torch.no_grad()
def _pre_activations(digits_task, state, batchnorm=False) -> dict[str, torch.Tensor]:
    """Outputs of every Linear layer on the whole train split, by module name."""
    model = digits_task.build_mlp(256, 3, batchnorm=batchnorm)
    model.load_state_dict(state)
    model.eval()
    images, _ = digits_task.split_arrays("train")
    outputs = {}
    x = images
    for name, module in model.layers.named_children():
        x = module(x)
        outputs[f"layers.{name}"] = x
    return outputs


def test_repair_matches_interpolated_statistics(digits_task, digits_pairs):
    a, b = digits_pairs[False]
    weights = [0.25, 0.75]
    merged = interpolate_state_dicts(a, b, 0.75)
    checkpoints = [InMemoryCheckpoint(a), InMemoryCheckpoint(b)]
    spec = chain_spec(checkpoints[0])
    repaired = repair_state_dict(_task(False), spec, merged, checkpoints, weights)
    ends = [_pre_activations(digits_task, s) for s in (a, b)]
    after = _pre_activations(digits_task, repaired)
    before = _pre_activations(digits_task, merged)
    for layer in ("layers.0", "layers.2", "layers.4"):
        target_mean = sum(w * e[layer].mean(0) for w, e in zip(weights, ends, strict=True))
        target_std = sum(
            w * e[layer].std(0, unbiased=False) for w, e in zip(weights, ends, strict=True)
        )
        torch.testing.assert_close(after[layer].mean(0), target_mean, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            after[layer].std(0, unbiased=False), target_std, atol=1e-4, rtol=1e-3
        )
        # the collapse REPAIR undoes: the naive average has smaller unit variance
        assert before[layer].std(0).mean() < target_std.mean()
    assert torch.equal(repaired["layers.6.weight"], merged["layers.6.weight"])


def test_repair_resets_batchnorm_statistics(digits_task, digits_pairs):
    a, b = digits_pairs[True]
    merged = interpolate_state_dicts(a, b, 0.5)
    checkpoints = [InMemoryCheckpoint(a), InMemoryCheckpoint(b)]
    model = digits_task.build_mlp(256, 3, batchnorm=True)
    spec = chain_spec(checkpoints[0], [n for n, _ in model.named_modules()])
    assert all(g.producer is None for g in spec.groups)  # BatchNorm everywhere: reset only
    repaired = repair_state_dict(_task(True), spec, merged, checkpoints, [1.0, 1.0])
    model.load_state_dict(merged)
    # expected: the cumulative average over train batches of the batch statistics
    batch_means, batch_vars = [], []
    with torch.no_grad():
        for images, _ in digits_task.data("train"):
            z = model.layers[0](images)
            batch_means.append(z.mean(0))
            batch_vars.append(z.var(0, unbiased=True))
    torch.testing.assert_close(repaired["layers.1.running_mean"], torch.stack(batch_means).mean(0))
    torch.testing.assert_close(repaired["layers.1.running_var"], torch.stack(batch_vars).mean(0))
    assert torch.equal(repaired["layers.0.weight"], merged["layers.0.weight"])
    assert int(repaired["layers.1.num_batches_tracked"]) == len(batch_means)
