"""mergekit parameter settings as merge-cli's ``fuse.params``, ``fuse.models`` and
``fuse.rules``.

A mergekit setting is a scalar, a gradient (a list stepped over the layers) or a conditional
list (``- filter: self_attn`` / ``value: ...``, the first entry whose filter is a substring of
the tensor name wins). :func:`parameter_tables` turns the settings of a configuration into
method-wide and per-model values plus first-match rules that give exactly mergekit's values.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

from merge_cli.engine.params import LAYER_PATTERN

#: More distinct filters than this would need too many combined rules.
MAX_FILTERS = 8

# A non-layer tensor (embeddings, final norm, lm_head): no ``layers.N.`` in its name.
_NON_LAYER = f"(?!.*{LAYER_PATTERN.pattern})"


def scalars(setting: Any) -> list[Any]:
    """Every plain value in a setting (scalars, gradient entries, conditional values)."""
    if isinstance(setting, dict):
        return scalars(setting.get("value"))
    if isinstance(setting, list):
        return [v for item in setting for v in scalars(item)]
    return [setting]


def map_values(setting: Any, mapping: dict[Any, Any]) -> Any:
    if isinstance(setting, dict):
        return {**setting, "value": map_values(setting.get("value"), mapping)}
    if isinstance(setting, list):
        return [map_values(item, mapping) for item in setting]
    return mapping.get(setting, setting) if isinstance(setting, bool) else setting


class ParamError(ValueError):
    pass


#: A filter set: the filters (substrings) present in a tensor's name.
Present = frozenset[str]


def conditions(setting: Any, where: str) -> list[tuple[str | None, Any]] | None:
    """A conditional list as ``(filter, value)`` pairs; None for a plain value or gradient."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not any(isinstance(e, dict) for e in setting):
        _check_value(setting, where)
        return None
    pairs = []
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond:
            raise ParamError(f"{where}[{i}]: expected {{filter: ..., value: ...}}")
        extra = set(cond) - {"filter", "value"}
        if extra:
            raise ParamError(f"{where}[{i}].{sorted(extra)[0]}: unknown key")
        flt = cond.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise ParamError(f"{where}[{i}].filter: expected a string")
        _check_value(cond["value"], f"{where}[{i}].value")
        pairs.append((None if flt in (None, "*") else flt, cond["value"]))
    return pairs


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, list):
        if not value:
            raise ParamError(f"{where}: an empty list")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise ParamError(
                f"{where}: {value!r}: a list of non-numbers (values stepped over the layers) "
                "is not supported; use numbers or filters"
            )
    elif not isinstance(value, bool | int | float | str):
        raise ParamError(f"{where}: expected a number, a list of numbers or a string")


def evaluate_at(setting: Any, present: Present, where: str) -> Any:
    """mergekit's value of ``setting`` for a tensor whose name holds the ``present`` filters."""
    pairs = conditions(setting, where)
    if pairs is None:
        return setting
    for flt, value in pairs:
        if flt is None or flt in present:
            return value
    return None


def _filters(settings: list[tuple[Any, str]]) -> list[str]:
    found: list[str] = []
    for setting, where in settings:
        for flt, _ in conditions(setting, where) or []:
            if flt is not None and flt not in found:
                found.append(flt)
    return found


def parameter_tables(
    shared_chain: list[dict[str, Any]], per_model: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``fuse.params``, ``fuse.models`` and ``fuse.rules`` reproducing mergekit's resolution.

    ``shared_chain`` lists the method-wide settings from highest precedence (a slice's) to
    lowest (the top level); ``per_model`` each fused model's own settings, which come first.
    """
    tables = _Tables(shared_chain, per_model)
    empty: Present = frozenset()
    base_shared, base_models = tables.base_shared, tables.base_models
    rules: list[dict[str, Any]] = []
    for present in tables.rule_filter_sets():
        shared, models = tables.at(present)
        if _has_gradient(shared, models):
            first = _first_values(shared, models)
            rules.append(tables.rule(_match(present, non_layer=True), *first))
        rules.append(tables.rule(_match(present), shared, models))
    if _has_gradient(base_shared, base_models):
        first = _first_values(base_shared, base_models)
        last = tables.rule(_match(empty, non_layer=True), *first)
        if len(last) > 1:
            rules.append(last)
    return base_shared, base_models, rules


class _Tables:
    """The values mergekit gives each parameter for a tensor whose name holds a set of
    filters (``Present``): method-wide (first level of the chain that sets it) and per model."""

    _CHAIN_WHERE = ("slices[0].parameters", "parameters", "defaults")

    def __init__(
        self, shared_chain: list[dict[str, Any]], per_model: dict[str, dict[str, Any]]
    ) -> None:
        self.shared_chain = shared_chain
        self.per_model = per_model
        self.keys = list(dict.fromkeys(k for level in shared_chain for k in level))
        all_settings = [
            (level[k], f"{self._CHAIN_WHERE[i]}.{k}")
            for i, level in enumerate(shared_chain)
            for k in level
        ] + [
            (values[k], f"models.{name}.parameters.{k}")
            for name, values in per_model.items()
            for k in values
        ]
        self.filters = _filters(all_settings)
        if len(self.filters) > MAX_FILTERS:
            raise ParamError(
                f"parameters: {len(self.filters)} distinct filters; merge-cli supports at "
                f"most {MAX_FILTERS} in one configuration"
            )
        self.base_shared, self.base_models = self.at(frozenset())

    def shared_at(self, key: str, present: Present) -> Any:
        for i, level in enumerate(self.shared_chain):
            if key in level:
                value = evaluate_at(level[key], present, f"{self._CHAIN_WHERE[i]}.{key}")
                if value is not None:
                    return value
        return None

    def model_at(self, name: str, key: str, present: Present) -> Any:
        setting = self.per_model[name].get(key)
        if setting is None:
            return None
        return evaluate_at(setting, present, f"models.{name}.parameters.{key}")

    def at(self, present: Present) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        """Method-wide and per-model values for a tensor holding the ``present`` filters."""
        shared = {k: v for k in self.keys if (v := self.shared_at(k, present)) is not None}
        models = {
            name: {k: v for k in values if (v := self.model_at(name, k, present)) is not None}
            for name, values in self.per_model.items()
        }
        return shared, models

    def resolved(self, present: Present) -> dict[tuple[str | None, str], Any]:
        """Every value in force, per model, for the ``present`` filters."""
        shared, models = self.at(present)
        out: dict[tuple[str | None, str], Any] = {(None, k): v for k, v in shared.items()}
        for name, values in models.items():
            for k in dict.fromkeys([*shared, *values]):
                out[(name, k)] = values.get(k, shared.get(k))
        return out

    def rule_filter_sets(self) -> list[Present]:
        """Subsets of filters that need a rule, most specific first: those that change a
        value relative to the most specific smaller subset kept."""
        order = [
            frozenset(combo)
            for size in range(len(self.filters), 0, -1)
            for combo in itertools.combinations(self.filters, size)
        ]
        kept: list[Present] = []
        for present in sorted(order, key=len):
            earlier = [s for s in order if s in kept and s < present]
            fallback = earlier[0] if earlier else frozenset()
            if self.resolved(present) != self.resolved(fallback):
                kept.append(present)
        return [s for s in order if s in kept]

    def rule(
        self, match: str, shared: dict[str, Any], models: dict[str, dict[str, Any]]
    ) -> dict[str, Any]:
        """A rule holding what differs from the top-level values (and must beat them)."""
        params = {k: v for k, v in shared.items() if self.base_shared.get(k) != v}
        per_model = {}
        for name, values in models.items():
            entry = {
                k: v for k, v in values.items() if self.base_models[name].get(k) != v or k in params
            }
            if entry:
                per_model[name] = entry
        return _rule(match, params, per_model)


# mergekit 0.1.5 reads gradients at t=0 outside the layers (embeddings, final norm, lm_head),
# where merge-cli's own gradients give the tensors after the layers the last value: a rule for
# non-layer tensors pins a gradient to its first value.


def _has_gradient(shared: dict[str, Any], models: dict[str, dict[str, Any]]) -> bool:
    values = [*shared.values(), *(v for m in models.values() for v in m.values())]
    return any(isinstance(v, list) for v in values)


def _first_values(
    shared: dict[str, Any], models: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list) else value

    return (
        {k: first(v) for k, v in shared.items()},
        {name: {k: first(v) for k, v in m.items()} for name, m in models.items()},
    )


def _rule(match: str, params: dict[str, Any], models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rule: dict[str, Any] = {"match": match}
    if params:
        rule["params"] = params
    if models:
        rule["models"] = models
    return rule


def _match(present: Present, non_layer: bool = False) -> str:
    """A rule pattern matching names that contain every filter in ``present``."""
    filters = sorted(present)
    if not non_layer and len(filters) == 1 and not set(filters[0]) & set("*?[]"):
        return f"*{filters[0]}*"
    lookaheads = "".join(f"(?=.*{re.escape(f)})" for f in filters)
    return "re:^" + (_NON_LAYER if non_layer else "") + lookaheads
