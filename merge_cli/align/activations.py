"""Activation statistics at a spec's sites, for the data-driven aligners and REPAIR.

Each group names the modules (``sites``) whose output (or ``module:input``) carries its
units on ``site_dim``. Running several models on the same batches, this module accumulates,
per group, the first and second moments of the models' features side by side
(``[features of model 0, features of model 1, ...]``), from which correlations between units
of different models (activation matching, ZipIt!) or per-unit mean and variance (REPAIR)
follow. Memory is the moment matrices, never the activations of the whole data set.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import nn

from merge_cli.align.spec import Group
from merge_cli.errors import PlanError
from merge_cli.task import model_outputs


@dataclass
class Moments:
    """Sums over samples of ``z``, ``z**2`` and (optionally) ``z z^T``, where ``z``
    concatenates the models' units."""

    count: int
    total: torch.Tensor
    square: torch.Tensor
    outer: torch.Tensor | None

    @property
    def mean(self) -> torch.Tensor:
        return self.total / self.count

    def covariance(self) -> torch.Tensor:
        assert self.outer is not None
        mean = self.mean
        return self.outer / self.count - torch.outer(mean, mean)

    def correlation(self, eps: float = 1e-8) -> torch.Tensor:
        covariance = self.covariance()
        std = covariance.diagonal().clamp(min=0).sqrt()
        return covariance / (torch.outer(std, std) + eps)

    def variance(self) -> torch.Tensor:
        return self.square / self.count - self.mean**2


def _module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise PlanError(f"spec site {name!r} is not a module of task.model") from None


def _attach(model: nn.Module, group: Group, store: list[torch.Tensor]) -> list[Any]:
    handles = []
    for site in group.sites:
        name, _, kind = site.partition(":")
        module = _module(model, name)

        def keep(value: torch.Tensor, group: Group = group) -> None:
            store.append(value.detach().movedim(group.site_dim, -1).reshape(-1, group.size))

        if kind == "input":
            handles.append(module.register_forward_pre_hook(lambda _m, args, f=keep: f(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _a, out, f=keep: f(out)))
    return handles


@torch.no_grad()
def feature_moments(
    models: list[nn.Module],
    groups: list[Group],
    batches: Iterable[tuple[Any, torch.Tensor]],
    max_batches: int | None = None,
    outer: bool = True,
    device: str = "cpu",
) -> dict[str, Moments]:
    """Moments of the units of ``groups`` in every model, over ``batches``' inputs."""
    missing = [g.name for g in groups if not g.sites]
    if missing:
        raise PlanError(
            "these spec groups have no activation site, so data-driven alignment cannot "
            f"observe them: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
            "(use weight_matching, or add sites to the spec)"
        )
    stores = {(m, g.name): [] for m in range(len(models)) for g in groups}
    handles = [
        h
        for m, model in enumerate(models)
        for g in groups
        for h in _attach(model, g, stores[m, g.name])
    ]
    moments: dict[str, Moments] = {}
    try:
        for inputs, _targets in islice(batches, max_batches):
            for model in models:
                model_outputs(model, inputs, device)
            for group in groups:
                z = torch.cat(
                    [torch.cat(stores[m, group.name]) for m in range(len(models))], dim=1
                ).double()
                for m in range(len(models)):
                    stores[m, group.name].clear()
                current = moments.get(group.name)
                total, square = z.sum(0), (z * z).sum(0)
                product = z.T @ z if outer else None
                if current is None:
                    moments[group.name] = Moments(len(z), total, square, product)
                else:
                    current.count += len(z)
                    current.total += total
                    current.square += square
                    if product is not None:
                        current.outer += product
    finally:
        for handle in handles:
            handle.remove()
    if not moments:
        raise PlanError("task.data('train') yielded no batches")
    return moments
