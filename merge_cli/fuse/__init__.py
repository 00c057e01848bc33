"""Fuse stage: the method registry.

Adding a method: write ``merge_cli/fuse/NAME.py`` with a plain function and a ``METHOD``
entry (:class:`~merge_cli.fuse.registry.Method`), then add it to ``_MODULES`` below.
"""

from __future__ import annotations

from merge_cli.fuse import (
    adamerging,
    curve,
    distill,
    ensemble,
    fisher,
    greedy_soup,
    linear,
    moe,
    passthrough,
    regmean,
)
from merge_cli.fuse.registry import Method, TensorJob

_MODULES = [
    linear, passthrough, fisher, regmean, adamerging, greedy_soup, curve, ensemble, moe, distill,
]  # fmt: skip

#: Every available fuse method by name.
METHODS: dict[str, Method] = {module.METHOD.name: module.METHOD for module in _MODULES}

#: Methods from the design that are not built yet: the recipe check says so by name.
PLANNED: set[str] = {
    "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "multislerp", "karcher", "nuslerp", "model_stock", "sce",
}  # fmt: skip

__all__ = ["METHODS", "PLANNED", "Method", "TensorJob"]
