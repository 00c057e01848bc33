"""ZipIt! (Stoica, Bolya, Bjorner, Ramesh, Hearn & Hoffman 2024, "ZipIt! Merging Models from
Different Tasks without Training", ICLR).

Instead of permuting one model onto the other, ZipIt! merges *features*: per group, the
``2n`` units of both models are paired greedily by activation correlation on
``task.data("train")``, and a pair may come from the same model (redundant features inside
one network are merged, freeing a slot for a feature the other model lacks). A budget
``beta`` caps the share of same-model pairs. Each pair becomes one unit of the merged model:
the merge matrix ``M`` (n x 2n) averages a pair, the unmerge matrix ``U`` (2n x n) copies the
merged unit back to both members, and a layer becomes ``W* = M_l blockdiag(W_A, W_B) U_{l-1}``.

How it plugs into the pipeline: writing ``M = [M_A, M_B]`` and ``U = [U_A; U_B]``,
``W* = 1/2 (2 M_A W_A U_A) + 1/2 (2 M_B W_B U_B)``. So ZipIt! is returned as one lazy
soft-mapped view per model (the reference included, ``out = 2 M_m``, ``in = U_m^T``) whose
uniform ``linear`` average *is* the zipped model, and the fuse step streams as usual. The
views are not meaningful models on their own, which is why the recipe check requires
``fuse: {method: linear}`` with equal weights over exactly these two models.

Partial zipping (the paper's Sec. 4.3: zip only the first groups, keep each model's later
layers as its own head) changes the architecture, so it is not a pipeline option: the
pipeline zips every group. :func:`partial_zip` builds the multi-head model in Python
(:class:`PartialZip`) for evaluation; ``scripts/align_digits.py`` reports it.
"""

from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.align.activations import feature_moments
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint, UnitMap
from merge_cli.align.spec import PermutationSpec
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint, read_state_dict
from merge_cli.task import Task, model_outputs


class ZipItParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(
        0.5,
        ge=0,
        le=1,
        description="largest share of merged units that pair two units of one model",
    )
    max_batches: int | None = Field(None, ge=1, description="train batches to use (all: None)")


def zip_matching(correlation: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ZipIt! pairing of ``2n`` features; returns (merge ``n x 2n``, unmerge ``2n x n``).

    Pairs are taken in order of decreasing correlation, skipping features already used and,
    once ``floor(beta * n)`` same-model pairs exist, further same-model pairs. Merged units
    are ordered by their reference member where they have one.
    """
    total = correlation.shape[0]
    n = total // 2
    rows, cols = torch.triu_indices(total, total, offset=1)
    order = torch.argsort(correlation[rows, cols], descending=True, stable=True)
    candidates = list(zip(rows[order].tolist(), cols[order].tolist(), strict=True))
    used = [False] * total
    pairs: list[tuple[int, int]] = []
    same_budget = int(beta * n)
    same = 0
    for relax in (False, True):  # the second pass completes the pairing if the budget blocked it
        for i, j in candidates:
            if used[i] or used[j]:
                continue
            is_same = (i < n) == (j < n)
            if is_same and same >= same_budget and not relax:
                continue
            pairs.append((i, j))
            used[i] = used[j] = True
            same += is_same
            if len(pairs) == n:
                break
        if len(pairs) == n:
            break
    pairs.sort(key=lambda pair: min(pair))
    merge = torch.zeros(n, total)
    unmerge = torch.zeros(total, n)
    for k, (i, j) in enumerate(pairs):
        merge[k, i] = merge[k, j] = 0.5
        unmerge[i, k] = unmerge[j, k] = 1.0
    return merge, unmerge


def zipit(
    checkpoints: dict[str, Checkpoint],
    reference: str,
    spec: PermutationSpec,
    params: ZipItParams,
    context: AlignContext,
) -> dict[str, dict[str, UnitMap]]:
    """Soft maps for both models whose uniform average is the zipped model."""
    if len(checkpoints) != 2:
        raise PlanError(f"zipit merges exactly two models, got {len(checkpoints)}")
    nested = [g.name for g in spec.groups if g.within is not None]
    if nested:
        raise PlanError(f"zipit: nested groups ({nested[0]}, ...) are not supported")
    assert context.task is not None
    names = [reference, *(n for n in checkpoints if n != reference)]
    models = [context.task.load_model(checkpoints[n], context.device) for n in names]
    moments = feature_moments(
        models,
        list(spec.groups),
        context.task.data("train"),
        params.max_batches,
        device=context.device,
    )
    started = time.perf_counter()
    maps: dict[str, dict[str, UnitMap]] = {n: {} for n in names}
    same_pairs = 0
    for group in spec.groups:
        n = group.size
        merge, unmerge = zip_matching(moments[group.name].correlation().float(), params.beta)
        same_pairs += int(((merge[:, :n] > 0).sum(1) != 1).sum())
        for m, name in enumerate(names):
            block = slice(m * n, (m + 1) * n)
            maps[name][group.name] = UnitMap(
                out_matrix=2 * merge[:, block], in_matrix=unmerge[block, :].T.contiguous()
            )
    context.note(
        f"zipit {names[1]} + {reference}: {len(spec.groups)} groups, {same_pairs} same-model "
        f"pairs, solver {time.perf_counter() - started:.2f} s"
    )
    return maps


class PartialZip(torch.nn.Module):
    """A partially zipped multi-head model: a shared zipped trunk, one head per model.

    The trunk (the zipped network) runs up to ``boundary``, the site of the last zipped
    group; each head is its model with the trunk's features substituted at that site, and
    its first unzipped layer reading them through the unmerge matrix. Outputs are averaged.
    """

    def __init__(self, trunk: torch.nn.Module, heads: list[torch.nn.Module], boundary: str):
        super().__init__()
        self.trunk = trunk
        self.heads = torch.nn.ModuleList(heads)
        self.boundary = boundary

    def forward(self, inputs: object) -> torch.Tensor:
        features: list[torch.Tensor] = []
        keep = self.trunk.get_submodule(self.boundary).register_forward_hook(
            lambda _m, _a, out: features.append(out)
        )
        try:
            model_outputs(self.trunk, inputs)
        finally:
            keep.remove()
        outputs = []
        for head in self.heads:
            swap = head.get_submodule(self.boundary).register_forward_hook(
                lambda _m, _a, _out: features[0]
            )
            try:
                outputs.append(model_outputs(head, inputs))
            finally:
                swap.remove()
        return torch.stack(outputs).mean(0)


def partial_zip(
    task: Task,
    checkpoints: dict[str, Checkpoint],
    reference: str,
    spec: PermutationSpec,
    maps: dict[str, dict[str, UnitMap]],
    zipped_groups: int,
) -> torch.nn.Module:
    """Zip the first ``zipped_groups`` groups of ``spec`` (in forward order) with ZipIt!'s
    ``maps`` and keep the rest per model. All groups zipped gives the zipped model itself
    (one head suffices); none gives the models' output ensemble."""
    names = [reference, *(n for n in checkpoints if n != reference)]
    zipped = {g.name for g in spec.groups[:zipped_groups]}
    views = {
        n: read_state_dict(
            PermutedCheckpoint(
                checkpoints[n], spec, {g: m for g, m in maps[n].items() if g in zipped}
            )
        )
        for n in names
    }
    trunk_state = {k: sum(views[n][k] for n in names) / len(names) for k in views[reference]}
    trunk = task.build_model()
    trunk.load_state_dict(trunk_state)
    if zipped_groups == len(spec.groups):
        return trunk.eval()
    heads = []
    for name in names:
        head = task.build_model()
        head.load_state_dict(views[name])
        heads.append(head.eval())
    if zipped_groups == 0:
        return _Ensemble(heads)
    boundary = spec.groups[zipped_groups - 1].sites[-1]
    return PartialZip(trunk.eval(), heads, boundary).eval()


class _Ensemble(torch.nn.Module):
    def __init__(self, models: list[torch.nn.Module]):
        super().__init__()
        self.models = torch.nn.ModuleList(models)

    def forward(self, inputs: object) -> torch.Tensor:
        return torch.stack([model_outputs(m, inputs) for m in self.models]).mean(0)
