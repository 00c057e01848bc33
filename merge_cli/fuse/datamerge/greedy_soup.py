"""``greedy_soup``: average the fine-tunes that help, chosen on held-out data.

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (ICML), Recipe 1: sort the fine-tuned models by
held-out accuracy; start the soup with the best one; add each next model to the soup (a
uniform average of its members) only if the soup's held-out accuracy does not get worse.
The uniform soup (all models) is the ``linear`` method; its held-out score is reported next
to the greedy soup's for comparison. Models are read one at a time and the soup is kept as a
running sum, so memory holds about three models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import ModelFuseResult, ModelMethod
from merge_cli.errors import TaskError
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint
from merge_cli.io.dtypes import is_float
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task import Task
from merge_cli.task.scoring import read_weights, score

StateDict = dict[str, torch.Tensor]


class GreedySoupParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    metric: Literal["accuracy", "loss"] = Field(
        "accuracy", description="held-out metric that decides membership"
    )
    split: Literal["train", "val", "test"] = Field("val", description="held-out data split")


def add_to(total: StateDict | None, state: StateDict) -> StateDict:
    """A running float32 sum of state dicts (non-float tensors: the first model's)."""
    if total is None:
        return {n: v.float().clone() if is_float(v.dtype) else v for n, v in state.items()}
    return {n: v.add(state[n].float()) if is_float(v.dtype) else v for n, v in total.items()}


def mean_of(total: StateDict, count: int, like: StateDict) -> StateDict:
    """``total / count`` cast back to the dtypes of ``like``."""
    return {
        n: (v / count).to(like[n].dtype) if is_float(like[n].dtype) else v for n, v in total.items()
    }


def greedy_soup(
    names: list[str],
    load: Callable[[str], StateDict],
    value: Callable[[StateDict], float],
) -> tuple[StateDict, list[str], dict[str, float], float]:
    """Greedy soup of the models ``names`` (``load(name)`` gives a state dict; ``value`` is
    the held-out metric, higher is better). Returns the soup, its members in the order they
    joined, each model's own value, and the soup's value."""
    individual = {name: value(load(name)) for name in names}
    ranked = sorted(names, key=lambda name: -individual[name])  # stable: ties keep order
    best = load(ranked[0])
    total, members, soup_value = add_to(None, best), [ranked[0]], individual[ranked[0]]
    for name in ranked[1:]:
        candidate = add_to(total, load(name))
        candidate_value = value(mean_of(candidate, len(members) + 1, best))
        if candidate_value >= soup_value:
            total, soup_value = candidate, candidate_value
            members.append(name)
    return mean_of(total, len(members), best), members, individual, soup_value


def fuse_greedy_soup(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> ModelFuseResult:
    spec = recipe.fuse
    assert spec is not None
    params = GreedySoupParams.model_validate(spec.params)
    names = spec.model_names(list(recipe.models))
    task_spec = recipe.task_for(names[0])
    if task_spec is None:
        raise TaskError("greedy_soup: needs a task (model, data, loss)")
    task = Task(task_spec)
    model = task.build_model(checkpoints[names[0]]).to(options.device)
    data = list(task.data(params.split))
    sign = 1.0 if params.metric == "accuracy" else -1.0

    def value(state: StateDict) -> float:
        model.load_state_dict(state, strict=True)
        model.to(options.device)
        scores = score(model, data, task.loss, options.device, task.spec.loss == "causal_lm")
        return sign * getattr(scores, params.metric)

    def load(name: str) -> StateDict:
        return read_weights(checkpoints[name], options.progress, name)

    options.progress.note(f"greedy soup: scoring {len(names)} models on the {params.split} split")
    soup, members, individual, soup_value = greedy_soup(names, load, value)
    uniform_total = None
    for name in names:
        uniform_total = add_to(uniform_total, load(name))
    assert uniform_total is not None
    uniform_value = value(mean_of(uniform_total, len(names), soup))
    best_single = max(individual, key=lambda name: individual[name])
    report = {
        "method": "greedy_soup",
        "metric": params.metric,
        "split": params.split,
        "members": members,
        "greedy_soup": sign * soup_value,
        "uniform_soup": sign * uniform_value,
        "best_single": best_single,
        "best_single_value": sign * individual[best_single],
        "models": {name: sign * v for name, v in individual.items()},
    }
    options.progress.note(
        f"greedy soup: kept {', '.join(members)} ({len(members)} of {len(names)}); "
        f"{params.split} {params.metric} {sign * soup_value:.4f} (uniform soup "
        f"{sign * uniform_value:.4f}, best single {sign * individual[best_single]:.4f})"
    )
    return ModelFuseResult(InMemoryCheckpoint(soup, source="greedy soup"), report)


METHOD = ModelMethod(
    name="greedy_soup",
    url="https://arxiv.org/abs/2203.05482",
    family="weight_average",
    summary="Greedy model soup: add fine-tunes in order of held-out score while the soup's "
    "held-out score does not drop.",
    reference="Wortsman et al. 2022, Model soups (ICML), greedy soup",
    params=GreedySoupParams,
    min_models=2,
    fuse=fuse_greedy_soup,
    needs_task=True,
)
