"""Method parameters: validation against a method's schema, and per-tensor resolution.

A parameter can be set for the method (``fuse.params``), per model (``fuse.models.NAME``), and
per tensor by ``fuse.rules`` (the first rule whose ``match`` fits the tensor name wins). A list
where the schema expects a number is a *gradient*: it is interpolated piecewise-linearly over
the layer index, as mergekit does — tensors before the first layer (embeddings) take the
first value and tensors after the last layer (final norm, lm_head) the last.
"""

from __future__ import annotations

import fnmatch
import math
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from merge_cli.engine.heads import HeadsParams
from merge_cli.engine.method import MethodInfo, TensorMethod
from merge_cli.recipe import FuseSpec, Rule

LAYER_PATTERN = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")
PRE_LAYER_PATTERN = re.compile(r"embed|wte|wpe|tok_embeddings")


def layer_index(name: str) -> int | None:
    """Index of the transformer layer / block a tensor belongs to, if any."""
    found = LAYER_PATTERN.search(name)
    return int(found.group(1)) if found else None


def layer_position(name: str, num_layers: int) -> float:
    """Where a tensor sits in the depth of the model, in [0, 1] (for gradients)."""
    index = layer_index(name)
    if index is None:
        return 0.0 if PRE_LAYER_PATTERN.search(name) else 1.0
    return index / (num_layers - 1) if num_layers > 1 else 0.0


def count_layers(names: list[str]) -> int:
    indices = [i for i in map(layer_index, names) if i is not None]
    return max(indices) + 1 if indices else 0


def rule_matches(rule: Rule, name: str) -> bool:
    if rule.match.startswith("re:"):
        return re.search(rule.match[3:], name) is not None
    return fnmatch.fnmatchcase(name, rule.match)


def interpolate(values: list[float], position: float) -> float:
    """Piecewise-linear value of an evenly spaced gradient at ``position`` in [0, 1]."""
    if len(values) == 1:
        return values[0]
    scaled = position * (len(values) - 1)
    low = min(int(scaled), len(values) - 2)
    frac = scaled - low
    return values[low] + (values[low + 1] - values[low]) * frac


# ---------------------------------------------------------------------------------------
# Validation (at recipe load)


def _field_adapter(schema: type[BaseModel], key: str) -> TypeAdapter:
    field = schema.model_fields[key]
    return TypeAdapter(Annotated[field.annotation, field])


def _accepts_list(schema: type[BaseModel], key: str) -> bool:
    annotation = schema.model_fields[key].annotation
    origins = {typing.get_origin(arg) for arg in typing.get_args(annotation)} | {
        typing.get_origin(annotation)
    }
    return bool(origins & {list, tuple})


def is_gradient(schema: type[BaseModel], key: str, value: Any) -> bool:
    """Whether ``value`` for ``schema``'s field ``key`` is a gradient (a list where the field
    takes none)."""
    return isinstance(value, list) and not _accepts_list(schema, key)


def is_numeric(schema: type[BaseModel], key: str) -> bool:
    """Whether ``schema``'s field ``key`` takes one number (so a list there is a gradient)."""
    annotation = schema.model_fields[key].annotation
    return annotation in (int, float)


def _gradient_value(schema: type[BaseModel], key: str, values: list[Any], position: float) -> Any:
    """A gradient's value at ``position``; an integer parameter (karcher's ``max_iter``)
    takes the nearest integer."""
    value = interpolate([float(v) for v in values], position)
    return round(value) if schema.model_fields[key].annotation is int else value


def validate_values(
    values: dict[str, Any], schemas: list[type[BaseModel]], where: str
) -> list[str]:
    """Problems with ``values`` against the union of ``schemas``' fields (gradients allowed)."""
    problems = []
    known = {key: schema for schema in reversed(schemas) for key in schema.model_fields}
    for key, value in values.items():
        schema = known.get(key)
        if schema is None:
            allowed = ", ".join(sorted(known)) or "none"
            problems.append(f"{where}.{key}: unknown parameter (this method takes: {allowed})")
            continue
        adapter = _field_adapter(schema, key)
        items = [value]
        if is_gradient(schema, key, value):
            if not is_numeric(schema, key):
                problems.append(
                    f"{where}.{key}: takes one value, not a list (only a numeric parameter "
                    f"can be a gradient), got {value!r}"
                )
                continue
            if not value:
                problems.append(f"{where}.{key}: a gradient needs at least one value")
                continue
            items = value
        for item in items:
            shown = repr(item) if len(repr(item)) <= 60 else repr(item)[:57] + "..."
            try:
                valid = adapter.validate_python(item)
            except ValidationError as error:
                detail = error.errors()[0]["msg"]
                problems.append(f"{where}.{key}: {detail}, got {shown}")
                break
            # pydantic reads "nan", "inf" and "1e309" (YAML strings) as floats
            if isinstance(valid, float) and not math.isfinite(valid):
                problems.append(f"{where}.{key}: must be a finite number, got {shown}")
                break
    return problems


def stage_params(method: MethodInfo) -> list[type[BaseModel]]:
    """Parameters the fuse stage takes for ``method`` besides the method's own: ``heads`` for
    every per-tensor method whose output tensors are the inputs' (not passthrough, MoE)."""
    if isinstance(method, TensorMethod) and method.plan_tensors is None:
        return [HeadsParams]
    return []


def check_fuse_params(spec: FuseSpec, method: MethodInfo, where: str = "fuse") -> list[str]:
    """Every parameter problem in a fuse section, for the recipe's error report."""
    both = [method.params, method.model_params]
    problems = validate_values(spec.params, [*both, *stage_params(method)], f"{where}.params")
    for name, values in (spec.models or {}).items():
        problems += validate_values(values, [method.model_params], f"{where}.models.{name}")
    for i, rule in enumerate(spec.rules):
        problems += validate_values(rule.params, both, f"{where}.rules[{i}].params")
        for name, values in rule.models.items():
            problems += validate_values(
                values, [method.model_params], f"{where}.rules[{i}].models.{name}"
            )
    # Required fields must be set somewhere (method- or model-level).
    for field_name, field in method.params.model_fields.items():
        if field.is_required() and field_name not in spec.params:
            problems.append(f"{where}.params.{field_name}: required parameter is missing")
    return problems


# ---------------------------------------------------------------------------------------
# Resolution (per tensor, at run time)


@dataclass(frozen=True)
class TensorParams:
    """The parameters in force for one tensor: the method's, and each fused model's."""

    method: BaseModel
    models: list[BaseModel]


def _evaluate(values: dict[str, Any], schema: type[BaseModel], position: float) -> dict[str, Any]:
    resolved = {}
    for key, value in values.items():
        if key not in schema.model_fields:
            continue
        if is_gradient(schema, key, value):
            value = _gradient_value(schema, key, value, position)
        resolved[key] = value
    return resolved


def plan_params(spec: FuseSpec, method: MethodInfo) -> BaseModel:
    """The method-level parameters a plan is made with (``plan_tensors``, ``derived_inputs``).

    A gradient takes its first value here: the recipe checks refuse gradients on the
    parameters of methods that choose their output tensors from them, and every other
    method resolves its parameters per tensor (:func:`resolve_params`).
    """
    values = {k: v for k, v in spec.params.items() if k in method.params.model_fields}
    return method.params.model_validate(_evaluate(values, method.params, 0.0))


def resolve_params(
    spec: FuseSpec, method: MethodInfo, model_names: list[str], name: str, position: float
) -> TensorParams:
    """Parameters for tensor ``name`` at depth ``position`` (already validated values)."""
    rule = next((r for r in spec.rules if rule_matches(r, name)), None)
    method_values = dict(spec.params)
    if rule is not None:
        method_values.update(rule.params)
    method_params = method.params.model_validate(_evaluate(method_values, method.params, position))
    models = []
    for model in model_names:
        values = {**spec.params, **spec.model_values(model)}
        if rule is not None:
            values.update(rule.params)
            values.update(rule.models.get(model, {}))
        models.append(
            method.model_params.model_validate(_evaluate(values, method.model_params, position))
        )
    return TensorParams(method_params, models)
