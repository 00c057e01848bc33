"""Recipe checks for the ``fuse`` section, given its method's registry entry.

Called by :mod:`merge_cli.checks` with the rest of the recipe's checks (so ``validate``
reports every problem before a tensor is read), and by distillation for the merge that
initialises its student.
"""

from __future__ import annotations

from typing import Any

from merge_cli.engine.method import Method, ModelMethod, TensorMethod
from merge_cli.engine.params import check_fuse_params, is_gradient
from merge_cli.recipe import FuseSpec, Recipe


def check_fuse_section(recipe: Recipe, method: Method) -> list[str]:
    """Problems with ``recipe.fuse`` for ``method``: base, model counts, the method's own
    check, parameters, and what a whole-model method cannot take (rules, gradients)."""
    spec = recipe.fuse
    assert spec is not None
    problems: list[str] = []
    fused = spec.model_names(list(recipe.models))
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
    if isinstance(method, ModelMethod):
        if spec.tokenizer_source == "union":
            problems.append(
                f"fuse.tokenizer_source: union needs a per-tensor method; {method.name!r} "
                "builds whole models from their own config.json"
            )
        if method.needs_task and not any(recipe.task_for(n) for n in fused):
            problems.append(f"task: method {method.name!r} needs a task (model, data, loss)")
        problems += _whole_model_problems(recipe, method)
    elif method.plan_tensors is not None:
        problems += _plan_level_gradients(spec, method)
    problems += check_fuse_params(spec, method)
    return problems


def _whole_model_problems(recipe: Recipe, method: ModelMethod) -> list[str]:
    """A whole-model method has one value per parameter: no per-tensor rules, no gradients."""
    spec = recipe.fuse
    assert spec is not None
    problems = []
    if spec.rules:
        problems.append(
            f"fuse.rules: {method.name} is a whole-model method; per-tensor rules do not apply"
        )
    values: list[tuple[str, dict[str, Any]]] = [("fuse.params", spec.params)]
    values += [(f"fuse.models.{name}", spec.model_values(name)) for name in spec.models or {}]
    for where, mapping in values:
        for key, value in mapping.items():
            schema = next(
                (s for s in (method.params, method.model_params) if key in s.model_fields), None
            )
            if schema is not None and is_gradient(schema, key, value):
                problems.append(
                    f"{where}.{key}: {method.name} is a whole-model method; "
                    f"{key} cannot be a gradient"
                )
    return problems


def _plan_level_gradients(spec: FuseSpec, method: TensorMethod) -> list[str]:
    """A method that chooses its output tensors from its parameters (passthrough, MoE) reads
    them once, for the plan: they cannot vary over the layers."""
    where = [("fuse.params", spec.params)]
    where += [(f"fuse.rules[{i}].params", rule.params) for i, rule in enumerate(spec.rules)]
    return [
        f"{place}.{key}: {method.name} chooses its output tensors from {key}; "
        f"{key} cannot be a gradient"
        for place, values in where
        for key, value in values.items()
        if key in method.params.model_fields and is_gradient(method.params, key, value)
    ]
