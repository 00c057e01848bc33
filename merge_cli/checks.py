"""Cross-field recipe checks: names that must exist, methods that must be available, and
each stage's own checks (:mod:`merge_cli.align.checks`, :mod:`merge_cli.fuse.checks`,
:func:`merge_cli.evaluate.registry.check_eval_spec`).

Called by :mod:`merge_cli.config` after the schema has been validated, so every problem in
a recipe is reported at once and before any tensor is read.
"""

from __future__ import annotations

from typing import Any

from merge_cli import align, evaluate, fuse
from merge_cli.align.checks import check_align
from merge_cli.evaluate.registry import MERGED, check_eval_spec
from merge_cli.fuse.adapters.combine import check_adapter_fuse
from merge_cli.fuse.checks import check_fuse_section
from merge_cli.io.hub import repo_id_problem
from merge_cli.recipe import Recipe


def _unknown(kind: str, name: str, available: dict[str, Any]) -> str:
    names = ", ".join(sorted(available)) or "none"
    return f"unknown {kind} {name!r} (available: {names})"


def check_recipe(recipe: Recipe) -> list[str]:
    """Every problem in ``recipe`` that needs more than one key, or a registry, to see."""
    problems = _check_align(recipe) + _check_fuse(recipe) + _check_evaluate(recipe)
    problems += _check_extract(recipe)
    if recipe.fuse is not None and recipe.save is None:
        problems.append("save.path: required to run a fuse stage (or pass --out DIR)")
    push = recipe.save.push_to_hub if recipe.save is not None else None
    if push is not None:
        problem = repo_id_problem(push.repo_id)
        if problem is not None:
            problems.append(f"save.push_to_hub.repo_id: {problem}")
        if recipe.fuse is None:
            problems.append("save.push_to_hub: needs a fuse stage (nothing is written without)")
    return problems


def _missing_model(
    recipe: Recipe, where: str, name: str | None, allow_merged: bool = False
) -> list[str]:
    names = list(recipe.models)
    if name is None or name in names or (allow_merged and name == MERGED):
        return []
    return [f"{where}: no model named {name!r} in models (have: {', '.join(names)})"]


def _check_align(recipe: Recipe) -> list[str]:
    if recipe.align is None:
        return []
    problems = []
    if recipe.align.method not in align.ALIGNERS:
        problems.append(
            "align.method: " + _unknown("alignment method", recipe.align.method, align.ALIGNERS)
        )
    problems += _missing_model(recipe, "align.reference", recipe.align.reference)
    if not problems:
        problems += check_align(recipe)
    return problems


def _check_fuse(recipe: Recipe) -> list[str]:
    spec = recipe.fuse
    if spec is None:
        return []
    if spec.output == "adapter":
        return check_adapter_fuse(recipe) + [
            p
            for name in spec.models or {}
            for p in _missing_model(recipe, f"fuse.models.{name}", name)
        ]
    problems = []
    method = fuse.METHODS.get(spec.method)
    if method is None:
        problems.append("fuse.method: " + _unknown("fuse method", spec.method, fuse.METHODS))
    problems += _missing_model(recipe, "fuse.base", spec.base)
    for name in spec.models or {}:
        problems += _missing_model(recipe, f"fuse.models.{name}", name)
    for i, rule in enumerate(spec.rules):
        for name in rule.models:
            problems += _missing_model(recipe, f"fuse.rules[{i}].models.{name}", name)
    if method is not None:
        problems += check_fuse_section(recipe, method)
    return problems


def _check_extract(recipe: Recipe) -> list[str]:
    spec = recipe.extract
    if spec is None:
        return []
    problems = _missing_model(recipe, "extract.model", spec.model)
    problems += _missing_model(recipe, "extract.base", spec.base)
    if recipe.fuse is not None:
        problems.append(
            "extract: a recipe either fuses (fuse) or extracts an adapter (extract), not both; "
            "extract from the fused output in a second recipe"
        )
    if recipe.align is not None or recipe.evaluate:
        problems.append("extract: align and evaluate are not available with extract")
    if recipe.save is None:
        problems.append("save.path: required to extract an adapter (or pass --out DIR)")
    return problems


def _check_evaluate(recipe: Recipe) -> list[str]:
    problems = []
    for i, item in enumerate(recipe.evaluate):
        if item.metric not in evaluate.METRICS:
            problems.append(
                f"evaluate[{i}].metric: " + _unknown("metric", item.metric, evaluate.METRICS)
            )
        for name in item.models or []:
            problems += _missing_model(recipe, f"evaluate[{i}].models", name, allow_merged=True)
        for name in item.between or []:
            problems += _missing_model(recipe, f"evaluate[{i}].between", name, allow_merged=True)
        if item.metric in evaluate.METRICS:
            problems += check_eval_spec(recipe, i, item, evaluate.METRICS[item.metric])
    return problems
