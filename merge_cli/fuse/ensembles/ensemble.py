"""Output ensembles: combine the predictions of several models instead of their weights.

Combination rules (``fuse.params.combine``), each over the last axis of the members' logits:

* ``mean_logits``: the (weighted) mean of the logits;
* ``mean_probs``: the (weighted) mean of the predicted probabilities — the deep ensembles
  of Lakshminarayanan et al. 2017, "Simple and scalable predictive uncertainty estimation
  using deep ensembles" (NeurIPS);
* ``vote``: plurality vote of the members' predicted classes, as in bagging (Breiman 1996,
  "Bagging predictors"); ties go to the class with the higher mean probability;
* ``weighted``: a convex mixture of the probabilities with per-model ``weight``\\ s or, when
  no weight is given, weights fitted on the task's ``val`` split (``fit``):

  - ``selection`` (default): greedy ensemble selection with replacement (Caruana et al. 2004,
    "Ensemble selection from libraries of models"; the weighted ensemble of AutoGluon and
    auto-sklearn), started from the uniform mean, on held-out accuracy;
  - ``nll``: the mixture weights that minimise the held-out negative log-likelihood over the
    probability simplex — linear stacking with non-negative weights (Wolpert 1992, "Stacked
    generalization"; Breiman 1996, "Stacked regressions"). The objective is convex, so this
    is its global optimum. It gives the best-calibrated mixture, but tends to concentrate on
    few members, which can cost accuracy (see docs/results-ensembles.md).

``mean_logits`` returns logits; the other rules return log-probabilities, so ``argmax`` and
``cross_entropy`` apply to every rule's output alike.

The result is an *ensemble directory*: ``ensemble.json`` (members, rule, weights, each
member's task) and ``members/NAME/`` (each member's weights, written by the streaming
writer, with its config files). :func:`merge_cli.load` returns it as one ``nn.Module``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from merge_cli import save
from merge_cli.engine.method import ModelMethod
from merge_cli.errors import PlanError, TaskError
from merge_cli.fuse.datamerge.model_data import method_params
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.writer import staged_directory
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe, TaskSpec
from merge_cli.task import Batch, Task, logits_of
from merge_cli.task.ensemble import FORMAT, MANIFEST, Combine


class EnsembleParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    combine: Combine = Field("mean_probs", description="how the members' outputs are combined")
    fit: Literal["selection", "nll"] = Field(
        "selection",
        description="how `weighted` fits weights when none are given: greedy ensemble "
        "selection on held-out accuracy, or the NLL-optimal mixture",
    )
    fit_split: Literal["train", "val"] = Field(
        "val", description="split on which `weighted` fits weights when none are given"
    )


class EnsembleModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float | None = Field(
        None, ge=0, description="this member's weight (normalised); `weighted` fits it if absent"
    )


# ---------------------------------------------------------------------------------------
# Fitting weights


def flat_outputs(
    logits: torch.Tensor, targets: torch.Tensor, loss: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[examples, classes]`` logits and ``[examples]`` targets (next-token: one per token)."""
    if loss == "causal_lm":
        logits, targets = logits[..., :-1, :], targets[..., 1:]
    elif loss != "cross_entropy":
        raise TaskError(
            f"ensemble weights can be fitted only for classification (task.loss cross_entropy "
            f"or causal_lm), not {loss!r}; give every member a weight instead"
        )
    logits = logits.reshape(-1, logits.shape[-1]).float()
    targets = targets.reshape(-1)
    keep = targets != -100
    return logits[keep], targets[keep]


@torch.no_grad()
def member_probabilities(
    members: Sequence[nn.Module], batches: Iterable[Batch], loss: str, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``[members, examples, classes]`` predicted probabilities and ``[examples]`` targets.

    Held in memory: meant for a held-out split of moderate size.
    """
    probabilities, all_targets = [], []
    for inputs, targets in batches:
        inputs = inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
        rows = []
        for member in members:
            logits, flat = flat_outputs(logits_of(member(inputs)).cpu(), targets.cpu(), loss)
            rows.append(logits.softmax(-1))
        probabilities.append(torch.stack(rows))
        all_targets.append(flat)
    if not probabilities:
        raise TaskError("ensemble: the split used to fit the weights has no data")
    return torch.cat(probabilities, dim=1), torch.cat(all_targets)


def fit_simplex_weights(probabilities: torch.Tensor) -> tuple[list[float], float]:
    """Weights on the simplex minimising ``-mean log(sum_i w_i p_i)``, and that loss.

    ``probabilities`` is ``[members, examples]`` (each member's probability of the target).
    The objective is convex in ``w``; SLSQP with the analytic gradient finds its minimum.
    """
    p = probabilities.double().clamp_min(1e-12).numpy()
    count = p.shape[0]

    def nll(w: np.ndarray) -> tuple[float, np.ndarray]:
        mixture = np.maximum(w @ p, 1e-300)
        return float(-np.log(mixture).mean()), -(p / mixture).mean(axis=1)

    from scipy.optimize import minimize  # here: scipy.optimize is slow to import

    uniform = np.full(count, 1.0 / count)
    result = minimize(
        nll,
        uniform,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * count,
        constraints=[
            {"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}
        ],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    weights = np.clip(result.x, 0.0, None)
    weights = weights / weights.sum()
    if nll(weights)[0] > nll(uniform)[0]:  # a failed solve must never be worse than uniform
        weights = uniform
    return weights.tolist(), nll(weights)[0]


def select_weights(
    probabilities: torch.Tensor, targets: torch.Tensor, rounds: int = 40
) -> list[float]:
    """Greedy ensemble selection with replacement (Caruana et al. 2004).

    Starts from every member once — the uniform mean — and adds, ``rounds`` times at most,
    one more copy of the member that most improves the mixture's accuracy on the held-out
    split (ties: the lower negative log-likelihood); stops when no member improves it. The
    weights are the copy counts, normalised. Starting from the mean keeps the weights near
    uniform unless the held-out data clearly prefers some members.
    """
    probabilities = probabilities.double()
    index = torch.arange(len(targets))
    counts = torch.ones(probabilities.shape[0], dtype=torch.float64)
    total = probabilities.sum(0)

    def score(mixture_sum: torch.Tensor, count: float) -> tuple[float, float]:
        mixture = mixture_sum / count
        accuracy = float((mixture.argmax(-1) == targets).double().mean())
        nll = float(-mixture[index, targets].clamp_min(1e-300).log().mean())
        return accuracy, -nll

    current = score(total, float(counts.sum()))
    for _ in range(rounds):
        scores = [score(total + p, float(counts.sum()) + 1) for p in probabilities]
        best = max(range(len(scores)), key=lambda j: scores[j])
        if scores[best] <= current:
            break
        counts[best] += 1
        total = total + probabilities[best]
        current = scores[best]
    return (counts / counts.sum()).tolist()


# ---------------------------------------------------------------------------------------
# The fuse method


def member_weights(per_model: dict[str, EnsembleModelParams]) -> list[float] | None:
    """The members' given weights, or None when none is given (an error when only some are)."""
    given = [values.weight for values in per_model.values()]
    if all(w is None for w in given):
        return None
    missing = [name for name, values in per_model.items() if values.weight is None]
    if missing:
        raise PlanError(
            f"fuse.models: give a weight to every member or to none (none: fitted on val); "
            f"missing for {', '.join(missing)}"
        )
    weights = [float(w) for w in given if w is not None]
    if sum(weights) <= 0:
        raise PlanError("fuse.models: the members' weights sum to zero")
    return weights


def load_members(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], names: list[str], device: str = "cpu"
) -> dict[str, nn.Module]:
    """Each member as an ``nn.Module`` built by its task (a model's own, or the recipe's)."""
    members = {}
    for name in names:
        spec = recipe.task_for(name)
        if spec is None or spec.model is None:
            raise TaskError(f"models.{name}: the ensemble needs task.model to build this member")
        members[name] = Task(spec).load_model(checkpoints[name], device)
    return members


def data_task(recipe: Recipe, names: list[str]) -> Task:
    """The task whose data and loss the members share (the recipe's, else the first's)."""
    spec = recipe.task or recipe.task_for(names[0])
    if spec is None or spec.data is None:
        raise TaskError("task.data: fitting ensemble weights needs the task's data")
    return Task(spec)


def ensemble_weights(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    params: EnsembleParams,
    per_model: dict[str, EnsembleModelParams],
    device: str = "cpu",
    members: dict[str, nn.Module] | None = None,
) -> tuple[list[float], dict[str, Any]]:
    """The members' weights (given, fitted, or uniform) and how they were obtained."""
    names = list(per_model)
    given = member_weights(per_model)
    if given is not None:
        total = sum(given)
        return [w / total for w in given], {"weights": "given"}
    if params.combine != "weighted":
        return [1.0 / len(names)] * len(names), {"weights": "uniform"}
    task = data_task(recipe, names)
    members = members or load_members(recipe, checkpoints, names, device)
    probabilities, targets = member_probabilities(
        list(members.values()), task.data(params.fit_split), task.spec.loss, device
    )
    if params.fit == "nll":
        weights, _ = fit_simplex_weights(probabilities[:, torch.arange(len(targets)), targets])
    else:
        weights = select_weights(probabilities, targets)
    uniform = [1.0 / len(names)] * len(names)
    return weights, {
        "weights": "fitted",
        "fit": params.fit,
        "split": params.fit_split,
        "examples": len(targets),
        "held_out": held_out_scores(probabilities, targets, weights),
        "held_out_uniform": held_out_scores(probabilities, targets, uniform),
    }


def held_out_scores(
    probabilities: torch.Tensor, targets: torch.Tensor, weights: list[float]
) -> dict[str, float]:
    """Accuracy and negative log-likelihood of the weighted mixture."""
    w = torch.tensor(weights, dtype=torch.float64).reshape(-1, 1, 1)
    mixture = (w * probabilities.double()).sum(0)
    chosen = mixture[torch.arange(len(targets)), targets].clamp_min(1e-300)
    return {
        "accuracy": float((mixture.argmax(-1) == targets).double().mean()),
        "nll": float(-chosen.log().mean()),
    }


def check_members(recipe: Recipe) -> None:
    """Every member can be built (it has task.model) and the weights given are usable."""
    _, per_model = method_params(recipe, METHOD)
    for name in per_model:
        spec = recipe.task_for(name)
        if spec is None or spec.model is None:
            raise TaskError(f"models.{name}: an ensemble member needs task.model (how to build it)")
    member_weights(per_model)


def fuse_ensemble(recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions) -> Path:
    """Write the ensemble directory at ``save.path``; return its path."""
    assert recipe.fuse is not None and recipe.save is not None
    check_members(recipe)
    params, per_model = method_params(recipe, METHOD)
    names = list(per_model)
    weights, fit = ensemble_weights(recipe, checkpoints, params, per_model, options.device)
    if fit["weights"] == "fitted":
        fitted, uniform = fit["held_out"], fit["held_out_uniform"]
        options.progress.note(
            f"ensemble weights fitted ({fit['fit']}) on {fit['split']} ({fit['examples']} "
            "targets): "
            + ", ".join(f"{n} {w:.3f}" for n, w in zip(names, weights, strict=True))
            + f"; accuracy {fitted['accuracy']:.4f}, NLL {fitted['nll']:.4f} "
            f"(uniform: {uniform['accuracy']:.4f}, {uniform['nll']:.4f})"
        )
    target = Path(recipe.save.path)
    with staged_directory(target, options.overwrite) as staged:
        members = []
        for name, weight in zip(names, weights, strict=True):
            relative = f"members/{name}"
            options.progress.note(f"writing ensemble member {name}")
            member_save = recipe.save.model_copy(
                update={"path": str(staged / relative), "model_card": False}
            )
            save.save_checkpoint(
                recipe.model_copy(update={"save": member_save}),
                checkpoints[name],
                checkpoints,
                replace(options, overwrite=False),
                config_source=name,
            )
            task = recipe.task_for(name)
            assert task is not None
            members.append(
                {"name": name, "path": relative, "weight": weight, "task": portable_task(task)}
            )
        manifest = {
            "format": FORMAT,
            "version": 1,
            "combine": params.combine,
            "members": members,
            "task": portable_task(recipe.task) if recipe.task else None,
            "fit": fit,
        }
        (staged / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for file_name, text in recipe.origin.files.items():
            (staged / file_name).write_text(text)
        if recipe.save.model_card:
            (staged / "README.md").write_text(save.model_card(recipe))
    return target


def portable_task(spec: TaskSpec) -> dict[str, Any]:
    """A task spec for ``ensemble.json``, with file references made absolute."""
    data = spec.model_dump(mode="json")
    for key in ("model", "data", "loss"):
        value = data.get(key)
        if isinstance(value, str):
            target, sep, attribute = value.rpartition(":")
            if sep and target.endswith(".py") and Path(target).exists():
                data[key] = f"{Path(target).resolve()}:{attribute}"
    return data


METHOD = ModelMethod(
    name="ensemble",
    url="https://arxiv.org/abs/1612.01474",
    family="ensemble",
    summary="Combine the members' outputs (mean logits, mean probabilities, vote, or a weighted "
    "mixture fitted on val); saved as an ensemble directory.",
    reference="Lakshminarayanan et al. 2017 (deep ensembles); Breiman 1996 (bagging, stacking)",
    params=EnsembleParams,
    model_params=EnsembleModelParams,
    min_models=2,
    fuse=fuse_ensemble,
    needs_task=True,
    preflight=check_members,
)
