"""Cross-field recipe checks: names that must exist, methods that must be available.

Called by :func:`merge_cli.recipe.load_recipe` after the schema has been validated, so every
problem in a recipe is reported at once and before any tensor is read.
"""

from __future__ import annotations

from merge_cli import align, evaluate, fuse
from merge_cli.evaluate.registry import check_eval_spec
from merge_cli.fuse.params import check_fuse_params
from merge_cli.recipe import Recipe

MERGED = "merged"


def _unknown(kind: str, name: str, available: dict, planned: set[str]) -> str:
    names = ", ".join(sorted(available)) or "none yet"
    if name in planned:
        return (
            f"{kind} {name!r} is not available yet in this version of merge-cli "
            f"(available: {names})"
        )
    return f"unknown {kind} {name!r} (available: {names})"


def check_recipe_semantics(recipe: Recipe) -> list[str]:
    problems: list[str] = []
    names = list(recipe.models)

    def need_model(where: str, name: str | None, allow_merged: bool = False) -> None:
        if name is None or name in names or (allow_merged and name == MERGED):
            return
        problems.append(f"{where}: no model named {name!r} in models (have: {', '.join(names)})")

    if recipe.align is not None:
        if recipe.align.method not in align.ALIGNERS:
            problems.append(
                "align.method: "
                + _unknown("alignment method", recipe.align.method, align.ALIGNERS, align.PLANNED)
            )
        need_model("align.reference", recipe.align.reference)
        if recipe.align.method in align.ALIGNERS and not problems:
            from merge_cli.align.checks import check_align

            problems += check_align(recipe)

    spec = recipe.fuse
    if spec is not None:
        method = fuse.METHODS.get(spec.method)
        if method is None:
            problems.append(
                "fuse.method: " + _unknown("fuse method", spec.method, fuse.METHODS, fuse.PLANNED)
            )
        need_model("fuse.base", spec.base)
        for name in spec.models or {}:
            need_model(f"fuse.models.{name}", name)
        for i, rule in enumerate(spec.rules):
            for name in rule.models:
                need_model(f"fuse.rules[{i}].models.{name}", name)
        if method is not None:
            fused = spec.model_names(names)
            if method.needs_base and spec.base is None:
                problems.append(f"fuse.base: method {method.name!r} needs a base model")
            if len(fused) < method.min_models:
                problems.append(
                    f"fuse.models: method {method.name!r} needs at least {method.min_models} "
                    f"model(s) besides the base, got {len(fused)}"
                )
            if method.max_models is not None and len(fused) > method.max_models:
                problems.append(
                    f"fuse.models: method {method.name!r} takes at most {method.max_models} "
                    f"model(s) besides the base, got {len(fused)}"
                )
            if method.check is not None:
                problems += method.check(spec, fused)
            if spec.tokenizer_source == "union" and not method.streaming:
                problems.append(
                    f"fuse.tokenizer_source: union needs a per-tensor method; {method.name!r} "
                    "builds whole models from their own config.json"
                )
            if method.needs_task and not any(recipe.task_for(n) for n in fused):
                problems.append(f"task: method {method.name!r} needs a task (model, data, loss)")
            problems += check_fuse_params(spec, method)

    for i, item in enumerate(recipe.evaluate):
        if item.metric not in evaluate.METRICS:
            problems.append(
                f"evaluate[{i}].metric: "
                + _unknown("metric", item.metric, evaluate.METRICS, evaluate.PLANNED)
            )
        for name in item.models or []:
            need_model(f"evaluate[{i}].models", name, allow_merged=True)
        for name in item.between or []:
            need_model(f"evaluate[{i}].between", name, allow_merged=True)
        if item.metric in evaluate.METRICS:
            problems += check_eval_spec(recipe, i, item, evaluate.METRICS[item.metric])

    if spec is not None and recipe.save is None:
        problems.append("save.path: required to run a fuse stage (or pass --out DIR)")
    return problems
