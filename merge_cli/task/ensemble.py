"""An ensemble's runtime: several models behind one ``forward``, and ensemble directories.

An *ensemble directory* (written by the ``ensemble`` fuse method, see
:mod:`merge_cli.fuse.ensembles.ensemble`) holds ``ensemble.json`` (members, rule, weights,
each member's task) and ``members/NAME/`` (each member's weights). Evaluation and
:func:`merge_cli.load` run it through :func:`load_ensemble`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from merge_cli.errors import CheckpointError
from merge_cli.io.resolve import open_checkpoint
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task, logits_of

MANIFEST = "ensemble.json"
FORMAT = "merge-cli-ensemble"
#: How the members' outputs are combined (see :func:`combine_outputs`).
Combine = Literal["mean_logits", "mean_probs", "vote", "weighted"]


# ---------------------------------------------------------------------------------------
# Combining outputs


def combine_outputs(
    logits: Sequence[torch.Tensor], combine: Combine, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine members' logits; ``weights`` (summing to 1) default to uniform."""
    stacked = torch.stack([z.float() for z in logits])
    if weights is None:
        weights = torch.full((len(logits),), 1.0 / len(logits))
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    w = weights.to(stacked).reshape(shape)
    if combine == "mean_logits":
        return (w * stacked).sum(0)
    probs = stacked.softmax(-1)
    mixture = (w * probs).sum(0)
    if combine == "vote":
        votes = F.one_hot(stacked.argmax(-1), stacked.shape[-1]).to(stacked)
        # the tie-breaker is far below one member's vote share, so it only decides ties
        scores = (w * votes).sum(0) + 1e-6 * mixture
        return (scores / scores.sum(-1, keepdim=True)).log()
    return mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()


class Ensemble(nn.Module):
    """Several models behind one ``forward``: every member sees the same inputs."""

    def __init__(
        self,
        members: dict[str, nn.Module],
        combine: Combine = "mean_probs",
        weights: Sequence[float] | None = None,
    ):
        super().__init__()
        self.members = nn.ModuleDict(members)
        self.combine = combine
        values = [1.0] * len(members) if weights is None else list(weights)
        total = sum(values)
        self.register_buffer("weights", torch.tensor([v / total for v in values]))

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        logits = [logits_of(member(*args, **kwargs)) for member in self.members.values()]
        return combine_outputs(logits, self.combine, self.weights)


# ---------------------------------------------------------------------------------------
# Loading


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path / MANIFEST}: cannot read the ensemble ({error})") from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST}: not a merge-cli ensemble manifest")
    return manifest


def load_ensemble(path: str | Path, task: TaskSpec | None = None, device: str = "cpu") -> Ensemble:
    """An ensemble directory as one module; ``task`` overrides every member's task."""
    path = Path(path)
    manifest = read_manifest(path)
    members = {}
    for member in manifest["members"]:
        spec = task or TaskSpec.model_validate(member["task"])
        checkpoint = open_checkpoint(str(path / member["path"]))
        members[member["name"]] = Task(spec).load_model(checkpoint, device)
    weights = [member["weight"] for member in manifest["members"]]
    return Ensemble(members, manifest["combine"], weights).to(device).eval()
