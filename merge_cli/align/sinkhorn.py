"""Soft alignment by entropy-regularised optimal transport (Singh & Jaggi 2020, "Model
Fusion via Optimal Transport", NeurIPS).

Per group, the units of the model are transported onto the reference's units with uniform
marginals; the transport plan ``T`` (from :func:`ot.sinkhorn`, Cuturi 2013) gives a soft
map ``A = n T`` whose rows sum to one: reference unit ``i`` receives the barycentre
``sum_j A[i, j] w_j`` of the model's units. Layers are processed in forward order and the
incoming weights of a layer are first mapped by the previous layer's plan, as in the paper's
weight-based variant; ``cost: activations`` uses ``1 - correlation`` of the units'
activations on ``task.data("train")`` instead (the paper's activation-based variant).
As ``reg`` goes to 0 the plan becomes a permutation (hard matching).
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.align.activations import feature_moments
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import UnitMap, apply_maps
from merge_cli.align.spec import Group, PermutationSpec
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint


class SinkhornParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reg: float = Field(0.01, gt=0, description="entropic regularisation (cost scaled to [0, 1])")
    cost: Literal["weights", "activations"] = Field(
        "weights", description="ground cost: weight distances or activation correlations"
    )
    max_iter: int = Field(10_000, ge=1, description="Sinkhorn iterations at most")
    max_batches: int | None = Field(None, ge=1, description="train batches (cost: activations)")


def transport_map(cost: torch.Tensor, reg: float, max_iter: int) -> torch.Tensor:
    """``n * T`` for the entropic OT plan ``T`` between uniform marginals under ``cost``."""
    import ot  # POT takes a second to import; only Sinkhorn runs need it

    n = cost.shape[0]
    scaled = (cost / cost.max().clamp(min=1e-12)).double().numpy()
    uniform = torch.full((n,), 1.0 / n, dtype=torch.float64).numpy()
    plan = ot.sinkhorn(uniform, uniform, scaled, reg, numItermax=max_iter)
    return torch.from_numpy(plan).float() * n


def _weight_cost(
    group: Group,
    reference: dict[str, torch.Tensor],
    model: dict[str, torch.Tensor],
    spec: PermutationSpec,
    maps: dict[str, UnitMap],
) -> torch.Tensor:
    """Squared distances between the units' outgoing-role weights (other axes mapped)."""
    axes_of = spec.axes_of()
    a_parts, b_parts = [], []
    for axis in group.axes:
        if axis.role != "out":
            continue
        other = apply_maps(axis.tensor, model[axis.tensor], axes_of[axis.tensor], maps, axis.axis)
        a_parts.append(reference[axis.tensor].movedim(axis.axis, 0).reshape(group.size, -1))
        b_parts.append(other.movedim(axis.axis, 0).reshape(group.size, -1))
    return torch.cdist(torch.cat(a_parts, 1).double(), torch.cat(b_parts, 1).double()) ** 2


def sinkhorn(
    checkpoints: dict[str, Checkpoint],
    reference: str,
    spec: PermutationSpec,
    params: SinkhornParams,
    context: AlignContext,
) -> dict[str, dict[str, UnitMap]]:
    """Soft maps bringing every non-reference model onto ``reference``'s units."""
    nested = [g.name for g in spec.groups if g.within is not None]
    if nested:
        raise PlanError(
            f"sinkhorn: soft alignment of nested groups ({nested[0]}, ...) is not supported; "
            "use weight_matching or activation_matching for grouped-query attention"
        )
    result = {}
    for name, checkpoint in checkpoints.items():
        if name == reference:
            continue
        started = time.perf_counter()
        maps: dict[str, UnitMap] = {}
        if params.cost == "activations":
            assert context.task is not None
            models = [
                context.task.load_model(c, context.device)
                for c in (checkpoints[reference], checkpoint)
            ]
            moments = feature_moments(
                models,
                list(spec.groups),
                context.task.data("train"),
                params.max_batches,
                device=context.device,
            )
            for group in spec.groups:
                correlation = moments[group.name].correlation()[: group.size, group.size :]
                matrix = transport_map(1 - correlation, params.reg, params.max_iter)
                maps[group.name] = UnitMap(out_matrix=matrix, in_matrix=matrix)
        else:
            for groups in spec.components():
                tensors = list(dict.fromkeys(a.tensor for g in groups for a in g.axes))
                ref = {t: checkpoints[reference].read(t).float() for t in tensors}
                mod = {t: checkpoint.read(t).float() for t in tensors}
                for group in groups:
                    cost = _weight_cost(group, ref, mod, spec, maps)
                    matrix = transport_map(cost, params.reg, params.max_iter)
                    maps[group.name] = UnitMap(out_matrix=matrix, in_matrix=matrix)
        context.note(
            f"sinkhorn {name} -> {reference}: {len(spec.groups)} groups in "
            f"{time.perf_counter() - started:.2f} s"
        )
        result[name] = maps
    return result
