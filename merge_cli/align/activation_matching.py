"""Activation matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", Sec. 3.1).

Run the reference and the model on the same training inputs and match each unit of the
model to the reference unit whose activations it correlates with best: per group, the
permutation maximising ``sum_i corr(ref_i, model_perm[i])`` (a linear assignment problem).
Unlike weight matching, groups are independent (activations do not depend on the other
permutations), so one assignment per group suffices. Needs ``task.model`` and ``task.data``.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.align.activations import feature_moments
from merge_cli.align.assignment import solve_assignment, solve_nested_assignment
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import UnitMap
from merge_cli.align.spec import PermutationSpec
from merge_cli.io.checkpoint import Checkpoint


class ActivationMatchingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_batches: int | None = Field(None, ge=1, description="train batches to use (all: None)")


def cross_correlation(
    reference: torch.nn.Module,
    model: torch.nn.Module,
    spec: PermutationSpec,
    context: AlignContext,
    max_batches: int | None,
) -> dict[str, torch.Tensor]:
    """Per group, ``C[i, j]`` = correlation of reference unit i and model unit j."""
    assert context.task is not None
    moments = feature_moments(
        [reference, model],
        list(spec.groups),
        context.task.data("train"),
        max_batches,
        device=context.device,
    )
    out = {}
    for group in spec.groups:
        correlation = moments[group.name].correlation()
        out[group.name] = correlation[: group.size, group.size :]
    return out


def activation_matching(
    checkpoints: dict[str, Checkpoint],
    reference: str,
    spec: PermutationSpec,
    params: ActivationMatchingParams,
    context: AlignContext,
) -> dict[str, dict[str, UnitMap]]:
    """Permutations bringing every non-reference model to ``reference``'s unit order."""
    assert context.task is not None
    reference_model = context.task.load_model(checkpoints[reference], context.device)
    result = {}
    for name, checkpoint in checkpoints.items():
        if name == reference:
            continue
        model = context.task.load_model(checkpoint, context.device)
        correlations = cross_correlation(reference_model, model, spec, context, params.max_batches)
        started = time.perf_counter()
        perms: dict[str, torch.Tensor] = {}
        for group in spec.groups:
            if group.within is not None:
                continue
            children = spec.children(group.name)
            if children:
                (child,) = children
                perms[group.name], perms[child.name] = solve_nested_assignment(
                    correlations[group.name], correlations[child.name]
                )
            else:
                perms[group.name] = solve_assignment(correlations[group.name])
        context.note(
            f"activation matching {name} -> {reference}: {len(spec.groups)} groups, "
            f"solver {time.perf_counter() - started:.2f} s"
        )
        result[name] = {g: UnitMap(permutation=p) for g, p in perms.items()}
    return result
