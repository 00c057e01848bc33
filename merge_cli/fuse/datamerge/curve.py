"""``curve``: train a low-loss curve between two models; save the model at ``t`` and the bend.

Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs"
(NeurIPS). The training is :func:`merge_cli.connect.curve.train_bend`; this module is the
whole-model fuse method around it. The bend is saved inside the output directory as
``curve/bend.safetensors`` (metadata: the curve kind and the endpoints), so
``evaluate: [{metric: barrier, between: [a, b], path: curve}]`` scores the whole curve
against the linear path. Models with BatchNorm get their statistics recomputed at ``t``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from merge_cli.connect.batchnorm import has_batchnorm, recompute_batchnorm
from merge_cli.connect.curve import train_bend
from merge_cli.connect.path import BEND_FILE, bend_bytes, curve_point
from merge_cli.engine.method import ModelFuseResult, ModelMethod
from merge_cli.errors import TaskError
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task import Task
from merge_cli.task.scoring import read_weights


class CurveParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    curve: Literal["bezier", "polychain"] = Field("bezier", description="curve with one bend")
    t: float = Field(0.5, ge=0.0, le=1.0, description="position of the saved model")
    epochs: int = Field(30, ge=1, description="passes over the training data")
    lr: float = Field(1e-3, gt=0.0, description="Adam learning rate for the bend")
    weight_decay: float = Field(0.0, ge=0.0, description="L2 penalty on the bend (Adam)")


def fuse_curve(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> ModelFuseResult:
    """Train the bend between the two fused models; return the model at ``t`` and the bend."""
    spec = recipe.fuse
    assert spec is not None
    params = CurveParams.model_validate(spec.params)
    first, second = spec.model_names(list(recipe.models))
    task_spec = recipe.task_for(first)
    if task_spec is None:
        raise TaskError("curve: needs a task (model, data, loss)")
    task = Task(task_spec)
    start = read_weights(checkpoints[first], options.progress, first)
    end = read_weights(checkpoints[second], options.progress, second)
    model = task.build_model(checkpoints[first])
    model.load_state_dict(start, strict=True)
    batches = list(task.data("train"))
    options.progress.note(
        f"curve: training a {params.curve} bend between {first} and {second} "
        f"({params.epochs} epochs of {len(batches)} batches)"
    )
    bend, epoch_losses = train_bend(
        model, start, end, batches, task.loss, params.curve, params.epochs, params.lr,
        params.weight_decay, spec.seed, options.device, options.progress,
    )  # fmt: skip
    point = curve_point(start, bend, end, params.t, params.curve)
    if has_batchnorm(model):
        model.load_state_dict(point, strict=True)
        recompute_batchnorm(model, batches, options.device)
        point = {
            name: value.detach().cpu().to(point[name].dtype)
            for name, value in model.state_dict().items()
        }
    metadata = {"curve": params.curve, "start": first, "end": second}
    report = {
        "method": "curve",
        "curve": params.curve,
        "endpoints": [first, second],
        "t": params.t,
        "bend_file": BEND_FILE,
        "train_loss_per_epoch": epoch_losses,
    }
    return ModelFuseResult(
        InMemoryCheckpoint(point, source=f"curve({first}, {second}) at t={params.t}"),
        report,
        {BEND_FILE: bend_bytes(bend, metadata)},
    )


METHOD = ModelMethod(
    name="curve",
    url="https://arxiv.org/abs/1802.10026",
    family="connectivity",
    summary="Train a Bezier curve or polygonal chain between two models (mode connectivity); "
    "save the model at t and the bend.",
    reference="Garipov et al. 2018, Loss surfaces, mode connectivity, and fast ensembling of "
    "DNNs (NeurIPS)",
    params=CurveParams,
    min_models=2,
    max_models=2,
    fuse=fuse_curve,
    needs_task=True,
)
