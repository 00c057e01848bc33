"""Fuse stage: the method registry.

Adding a method: write ``merge_cli/fuse/NAME.py`` with a plain function and a ``METHOD``
entry (:class:`~merge_cli.fuse.registry.Method`), then add it to ``_MODULES`` below.
"""

from __future__ import annotations

from merge_cli.fuse import (
    adamerging,
    breadcrumbs,
    curve,
    dare,
    della,
    distill,
    ensemble,
    fisher,
    greedy_soup,
    linear,
    model_stock,
    moe,
    multislerp,
    passthrough,
    regmean,
    sce,
    slerp,
    task_arithmetic,
    ties,
)
from merge_cli.fuse.registry import Method, TensorJob

#: Modules that define ``METHOD`` (one method) or ``METHODS`` (a family of variants).
_MODULES = [
    linear,
    passthrough,
    task_arithmetic,
    ties,
    dare,
    breadcrumbs,
    della,
    slerp,
    multislerp,
    model_stock,
    sce,
    fisher,
    regmean,
    adamerging,
    greedy_soup,
    curve,
    ensemble,
    moe,
    distill,
]


def _entries(module) -> list[Method]:
    return list(module.METHODS) if hasattr(module, "METHODS") else [module.METHOD]


#: Every available fuse method by name.
METHODS: dict[str, Method] = {
    method.name: method for module in _MODULES for method in _entries(module)
}

#: Methods from the design that are not built yet: the recipe check says so by name.
PLANNED: set[str] = set()

__all__ = ["METHODS", "PLANNED", "Method", "TensorJob"]
