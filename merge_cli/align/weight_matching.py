"""Weight matching (Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin", Algorithm 1).

Find permutations ``pi`` of the model's units that maximise the inner product
``sum_l <W_ref_l, P_l W_l P_{l-1}^T>`` with the reference. The joint problem is NP-hard, so
it is solved by coordinate descent: fix every permutation but one group's, which then is a
linear assignment problem over ``S = sum_axes W_ref(axis) @ W_model(axis, others permuted)^T``;
sweep the groups in random order until no permutation changes. Needs weights only.

Only weights enter ``S``. Running statistics (BatchNorm's running mean and variance,
:attr:`~merge_cli.align.spec.AxisRef.statistic`) are permuted with their units but are no
part of the objective: Git Re-Basin's specs list parameters only. In the cost they act as
rank-one terms (``mu_ref mu_model^T``) that pull units towards partners with similar
statistics rather than similar weights; on a BatchNorm CNN that gave clearly worse
permutations than the paper's algorithm (docs/results-alignment.md).

Groups that share no tensor are independent (a Llama layer's MLP, its attention), so each
connected component is solved on its own, reading only its tensors: one layer at a time.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.align.assignment import (
    assignment_value,
    solve_assignment,
    solve_nested_assignment,
)
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import UnitMap, apply_maps
from merge_cli.align.spec import AxisRef, Group, PermutationSpec
from merge_cli.io.checkpoint import Checkpoint


class WeightMatchingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_iter: int = Field(100, ge=1, description="coordinate-descent sweeps over the groups")
    seed: int = Field(0, description="seed of the random group order of each sweep")


def weight_axes(group: Group) -> list[AxisRef]:
    """The group's axes that enter the objective: weights, not running statistics."""
    return [axis for axis in group.axes if not axis.statistic]


def group_similarity(
    group: Group,
    reference: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    axes_of: dict[str, list[tuple[AxisRef, Group]]],
    maps: dict[str, UnitMap],
) -> torch.Tensor:
    """``S[i, j]``: inner product of reference unit i and model unit j over the group's weight
    axes (running statistics left out), with every other axis of each tensor already mapped
    by the current ``maps``."""
    similarity = torch.zeros(group.size, group.size)
    for axis in weight_axes(group):
        other = apply_maps(axis.tensor, model[axis.tensor], axes_of[axis.tensor], maps, axis.axis)
        a = reference[axis.tensor].movedim(axis.axis, 0).reshape(group.size, -1)
        b = other.movedim(axis.axis, 0).reshape(group.size, -1)
        similarity.addmm_(a, b.T)
    return similarity


def match_component(
    groups: list[Group],
    spec: PermutationSpec,
    reference: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    params: WeightMatchingParams,
) -> dict[str, torch.Tensor]:
    """Coordinate descent over one connected component's groups."""
    axes_of = spec.axes_of()
    perms = {g.name: torch.arange(g.size) for g in groups}
    top = [g for g in groups if g.within is None]
    generator = torch.Generator().manual_seed(params.seed)
    for _ in range(params.max_iter):
        changed = False
        for index in torch.randperm(len(top), generator=generator).tolist():
            group = top[index]
            maps = {name: UnitMap(permutation=p) for name, p in perms.items()}
            similarity = group_similarity(group, reference, model, axes_of, maps)
            children = spec.children(group.name)
            if children:
                (child,) = children
                child_similarity = group_similarity(child, reference, model, axes_of, maps)
                new, new_child = solve_nested_assignment(similarity, child_similarity)
                old_value = assignment_value(similarity, perms[group.name]) + assignment_value(
                    child_similarity, perms[child.name]
                )
                new_value = assignment_value(similarity, new) + assignment_value(
                    child_similarity, new_child
                )
                if new_value > old_value + 1e-9 * abs(old_value):
                    perms[group.name], perms[child.name] = new, new_child
                    changed = True
                continue
            new = solve_assignment(similarity)
            if assignment_value(similarity, new) > assignment_value(
                similarity, perms[group.name]
            ) + 1e-9 * abs(assignment_value(similarity, new)):
                perms[group.name] = new
                changed = True
        if not changed or (len(top) == 1 and not spec.children(top[0].name)):
            break  # a lone group is solved exactly by one assignment
    return perms


def weight_matching(
    checkpoints: dict[str, Checkpoint],
    reference: str,
    spec: PermutationSpec,
    params: WeightMatchingParams,
    context: AlignContext,
) -> dict[str, dict[str, UnitMap]]:
    """Permutations bringing every non-reference model to ``reference``'s unit order."""
    result: dict[str, dict[str, UnitMap]] = {}
    components = spec.components()
    for name, checkpoint in checkpoints.items():
        if name == reference:
            continue
        started = time.perf_counter()
        solve_seconds = 0.0
        perms: dict[str, torch.Tensor] = {}
        for groups in components:
            tensors = list(dict.fromkeys(a.tensor for g in groups for a in weight_axes(g)))
            ref = {t: checkpoints[reference].read(t).float() for t in tensors}
            mod = {t: checkpoint.read(t).float() for t in tensors}
            solve_started = time.perf_counter()
            perms.update(match_component(groups, spec, ref, mod, params))
            solve_seconds += time.perf_counter() - solve_started
            del ref, mod
        context.note(
            f"weight matching {name} -> {reference}: {len(spec.groups)} groups in "
            f"{len(components)} components, solver {solve_seconds:.2f} s, "
            f"total {time.perf_counter() - started:.2f} s"
        )
        result[name] = {g: UnitMap(permutation=p) for g, p in perms.items()}
    return result
