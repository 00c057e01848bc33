"""Distillation: train one student to reproduce an ensemble's outputs.

Knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the knowledge in a neural
network"): the student minimises ``T^2 * KL(softmax(t / T) || softmax(s / T))`` between the
teacher's outputs ``t`` — here the ensemble of ``fuse.models`` combined by ``combine`` (see
:mod:`merge_cli.fuse.ensembles.ensemble`) — and its own ``s``, softened by the temperature
``T``, plus
``alpha`` times the task's own loss on the labels. The student has one member's size; it is
initialised from a merge of the members (``init: linear`` or any fuse method, with
``init_params``; the members must then share an architecture) or from one named model.

Training runs on the task's ``train`` split; after every epoch the student is checked on
``val`` (task loss, accuracy and agreement with the teacher), and with ``keep_best`` the
epoch with the lowest val loss is kept.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from merge_cli.engine.method import Method, ModelFuseResult, ModelMethod
from merge_cli.errors import PlanError, RecipeError, TaskError
from merge_cli.fuse.checks import check_fuse_section
from merge_cli.fuse.datamerge import DATA_METHODS
from merge_cli.fuse.ensembles.ensemble import (
    EnsembleModelParams,
    EnsembleParams,
    data_task,
    ensemble_weights,
    load_members,
)
from merge_cli.fuse.stage import fuse_models
from merge_cli.fuse.tensorwise import TENSOR_METHODS
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint
from merge_cli.io.resolve import open_checkpoint
from merge_cli.options import RunOptions
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import Recipe, parse_recipe
from merge_cli.task import Batch, LossFn, Task, logits_of
from merge_cli.task.ensemble import Combine, Ensemble


class DistillParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    combine: Combine = Field("mean_probs", description="how the teacher ensemble combines")
    init: str = Field(
        "linear", description="student initialisation: a fuse method merging the members, "
        "or the name of one model"
    )  # fmt: skip
    init_params: dict[str, Any] = Field(
        default_factory=dict, description="fuse.params of the init method"
    )
    init_models: list[str] | None = Field(
        None, description="members merged for the init (default: all fuse.models)"
    )
    temperature: float = Field(2.0, gt=0, description="softening temperature T")
    alpha: float = Field(0.0, ge=0, le=1, description="weight of the task loss on the labels")
    epochs: int = Field(10, ge=1, description="passes over the train split")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    keep_best: bool = Field(True, description="keep the epoch with the lowest val loss")


def distillation_loss(
    student: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` at temperature ``T``, averaged over examples."""
    classes = student.shape[-1]
    log_student = (student.float() / temperature).log_softmax(-1).reshape(-1, classes)
    log_teacher = (teacher.float() / temperature).log_softmax(-1).reshape(-1, classes)
    kl = F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean")
    return kl * temperature**2


def _to(inputs: Any, device: str) -> Any:
    return inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs


@torch.no_grad()
def held_out_check(
    student: nn.Module,
    teacher: nn.Module,
    batches: list[Batch],
    loss: LossFn,
    device: str,
    causal: bool = False,
) -> dict[str, float]:
    """Student's val loss, and (for class outputs) accuracy and agreement with the teacher.

    With ``causal`` (next-token loss) the prediction at position t is scored against the
    token at t + 1.
    """
    student.eval()
    total = examples = correct = agree = positions = 0.0
    classify = True
    for inputs, targets in batches:
        inputs, targets = _to(inputs, device), targets.to(device)
        logits = logits_of(student(inputs))
        total += float(loss(logits, targets)) * len(targets)
        examples += len(targets)
        if logits.shape[:-1] != targets.shape:
            classify = False
            continue
        teacher_logits = teacher(inputs)
        if causal:
            logits, teacher_logits = logits[..., :-1, :], teacher_logits[..., :-1, :]
            targets = targets[..., 1:]
        scored = targets != -100
        predicted = logits.argmax(-1)
        correct += float(((predicted == targets) & scored).sum())
        agree += float(((predicted == teacher_logits.argmax(-1)) & scored).sum())
        positions += float(scored.sum())
    result = {"val_loss": total / max(examples, 1)}
    if classify and positions:
        result |= {"val_accuracy": correct / positions, "val_agreement": agree / positions}
    return result


def distill(
    student: nn.Module,
    teacher: nn.Module,
    train: list[Batch],
    val: list[Batch],
    loss: LossFn,
    params: DistillParams,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
    causal: bool = False,
) -> tuple[nn.Module, list[dict[str, float]]]:
    """Train ``student`` towards ``teacher`` on ``train``; return it and the per-epoch checks.

    ``causal``: the task's loss is next-token prediction (for the val accuracy)."""
    progress = progress or NullProgress()
    student.to(device)
    teacher.to(device).eval()
    optimizer = torch.optim.Adam(student.parameters(), lr=params.lr)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    history = [{"epoch": 0, **held_out_check(student, teacher, val, loss, device, causal)}]
    best = (history[0]["val_loss"], _snapshot(student))
    progress.start("distilling", params.epochs, unit="epochs")
    for epoch in range(1, params.epochs + 1):
        student.train()
        running = 0.0
        for index in torch.randperm(len(train), generator=generator).tolist():
            inputs, targets = train[index]
            inputs, targets = _to(inputs, device), targets.to(device)
            with torch.no_grad():
                soft = teacher(inputs)
            logits = logits_of(student(inputs))
            objective = (1 - params.alpha) * distillation_loss(logits, soft, params.temperature)
            if params.alpha:
                objective = objective + params.alpha * loss(logits, targets)
            optimizer.zero_grad()
            objective.backward()
            optimizer.step()
            running += objective.item()
        check = {"epoch": epoch, "train_loss": running / len(train)}
        check |= held_out_check(student, teacher, val, loss, device, causal)
        history.append(check)
        if check["val_loss"] < best[0]:
            best = (check["val_loss"], _snapshot(student))
        progress.advance(1)
        progress.note(
            f"epoch {epoch}: " + ", ".join(f"{k} {v:.4f}" for k, v in check.items() if k != "epoch")
        )
    progress.finish()
    if params.keep_best:
        student.load_state_dict(best[1])
    return student.eval(), history


def kept_epoch(history: list[dict[str, float]], keep_best: bool) -> int:
    """The epoch whose student :func:`distill` returns: the first with the lowest val loss
    (``keep_best``; 0 is the initial student), else the last."""
    if not keep_best:
        return int(history[-1]["epoch"])
    return int(min(history, key=lambda check: check["val_loss"])["epoch"])


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


#: Methods that can merge the members into the student's starting point.
INIT_METHODS: dict[str, Method] = {**TENSOR_METHODS, **DATA_METHODS}


def initial_student(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    params: DistillParams,
    names: list[str],
    options: RunOptions,
) -> nn.Module:
    """The student before training: one named model, or the members merged by a fuse method."""
    check_init(recipe, params)
    if params.init in recipe.models:
        spec = recipe.task_for(params.init)
        assert spec is not None
        return Task(spec).load_model(checkpoints[params.init], options.device)
    method = INIT_METHODS[params.init]
    merged_models = params.init_models or names
    with tempfile.TemporaryDirectory(prefix="merge-cli-distill-") as scratch:
        path = merge_to(recipe, checkpoints, method, merged_models, params, scratch, options)
        spec = recipe.task_for(merged_models[0])
        assert spec is not None
        return Task(spec).load_model(open_checkpoint(str(path)), options.device)


def merge_to(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    method: Method,
    models: list[str],
    params: DistillParams,
    scratch: str,
    options: RunOptions,
) -> Path:
    """Run the init merge (validated like a recipe of its own) into ``scratch``."""
    sub = init_recipe(recipe, method, models, params, Path(scratch) / "init")
    return fuse_models(sub, method, checkpoints, replace(options, overwrite=False)).output


def init_recipe(
    recipe: Recipe, method: Method, models: list[str], params: DistillParams, output: Path
) -> Recipe:
    """The recipe of the merge that initialises the student, checked like any recipe's fuse
    section (problems are reported under ``fuse.params.init``)."""
    assert recipe.fuse is not None
    source = "fuse.params.init"
    raw = recipe.model_dump(mode="json", exclude_defaults=True)
    raw.pop("evaluate", None)
    raw.pop("align", None)
    raw["fuse"] = {
        "method": method.name,
        "models": models,
        "params": params.init_params,
        "seed": recipe.fuse.seed,
    }
    if recipe.fuse.base is not None:
        raw["fuse"]["base"] = recipe.fuse.base
    raw["save"] = {"path": str(output), "dtype": "float32", "model_card": False}
    sub = parse_recipe(raw, source)
    problems = check_fuse_section(sub, method)
    if problems:
        raise RecipeError(source, problems)
    return sub


def distill_params(recipe: Recipe) -> DistillParams:
    """The recipe's distillation parameters (whole-model: no per-tensor rules)."""
    spec = recipe.fuse
    assert spec is not None
    if spec.rules:
        raise PlanError(
            "fuse.rules: distill is a whole-model method; per-tensor rules do not apply"
        )
    return DistillParams.model_validate(
        {k: v for k, v in spec.params.items() if k in DistillParams.model_fields}
    )


def check_init(recipe: Recipe, params: DistillParams | None = None) -> None:
    """The student's starting point exists: a model with task.model, or a merge method over
    models of the recipe."""
    assert recipe.fuse is not None
    params = params or distill_params(recipe)
    for name in params.init_models or []:
        if name not in recipe.models:
            raise PlanError(f"fuse.params.init_models: no model named {name!r}")
    if params.init in recipe.models:
        spec = recipe.task_for(params.init)
        if spec is None or spec.model is None:
            raise TaskError(f"models.{params.init}: the student needs task.model")
    elif params.init not in INIT_METHODS:
        raise PlanError(
            f"fuse.params.init: {params.init!r} is neither a model ({', '.join(recipe.models)}) "
            f"nor a merge method ({', '.join(INIT_METHODS)})"
        )
    else:
        models = params.init_models or recipe.fuse.model_names(list(recipe.models))
        init_recipe(recipe, INIT_METHODS[params.init], models, params, Path("init"))


def fuse_distill(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> ModelFuseResult:
    """Build the teacher ensemble and the student, distil; the student and its history."""
    spec = recipe.fuse
    assert spec is not None
    params = distill_params(recipe)
    check_init(recipe, params)
    per_model = {
        name: EnsembleModelParams.model_validate(spec.model_values(name))
        for name in spec.model_names(list(recipe.models))
    }
    names = list(per_model)
    members = load_members(recipe, checkpoints, names, options.device)
    ensemble_params = EnsembleParams(combine=params.combine)
    weights, _ = ensemble_weights(
        recipe, checkpoints, ensemble_params, per_model, options.device, members
    )
    teacher = Ensemble(members, params.combine, weights)
    # trained in float32 whatever the checkpoints' dtype; saved in save.dtype
    student = initial_student(recipe, checkpoints, params, names, options).float()
    task = data_task(recipe, names)
    train, val = list(task.data("train")), list(task.data("val"))
    if not train:
        raise TaskError("task.data: the train split is empty; distillation needs data")
    student, history = distill(
        student,
        teacher,
        train,
        val,
        task.loss,
        params,
        recipe.fuse.seed,
        options.device,
        options.progress,
        causal=task.spec.loss == "causal_lm",
    )
    state = {name: tensor.detach().cpu() for name, tensor in student.state_dict().items()}
    kept = kept_epoch(history, params.keep_best)
    if kept == 0:
        options.progress.note(
            f"distill: no epoch improved on the initial student's val loss (init: "
            f"{params.init}); keep_best kept epoch 0, the initial student unchanged"
        )
    report = {
        "teacher": {"combine": params.combine, "weights": dict(zip(names, weights, strict=True))},
        "init": params.init,
        "history": history,
        "kept_epoch": kept,
    }
    return ModelFuseResult(InMemoryCheckpoint(state, source="<distilled student>"), report)


METHOD = ModelMethod(
    name="distill",
    url="https://arxiv.org/abs/1503.02531",
    family="ensemble",
    summary="Train one student (from a merge of the members or one model) to match the "
    "ensemble's softened outputs on the task's train data, checking val each epoch.",
    reference="Hinton, Vinyals & Dean 2015, Distilling the knowledge in a neural network",
    params=DistillParams,
    model_params=EnsembleModelParams,
    min_models=2,
    fuse=fuse_distill,
    needs_task=True,
    preflight=check_init,
)
