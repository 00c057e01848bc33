"""mergekit compatibility: translate a mergekit configuration into a recipe v1 mapping.

A YAML file with ``merge_method:`` is a mergekit configuration (mergekit 0.1.5's
``MergeConfiguration``). :func:`translate_mergekit` turns it into the mapping that
:func:`merge_cli.recipe.recipe_from_dict` validates, so ``merge-cli run mergekit.yaml --out DIR``
runs it as it is and ``merge-cli convert mergekit.yaml`` prints the equivalent recipe.

What carries over, with mergekit's semantics:

* ``models`` (with per-model ``parameters``), ``base_model``, top-level ``parameters``;
* parameter values: scalars, gradients (lists interpolated over the layers) and conditional
  lists (``- filter: self_attn`` / ``value: ...``, first entry whose ``filter`` is a substring
  of the tensor name wins, a missing filter or ``*`` matches all). Precedence is mergekit's:
  a model's own value, else the slice's, else the top-level one, else the method default.
  Filters become per-tensor ``fuse.rules``; one rule per combination of filters that changes
  a value, most specific first, so the first-match rules give exactly mergekit's values;
* mergekit 0.1.5 evaluates gradients at t=0 for the tensors outside the layers (embeddings,
  final norm, lm_head); merge-cli's own gradients give the tensors after the layers the last
  value, so a translated gradient gets a rule that pins the non-layer tensors to its first value;
* ``slices``: one ``layer_range`` per slice with ``passthrough`` is layer stacking
  (passthrough ``slices``); one slice whose sources all cover every layer is the ``models`` form;
* ``dtype`` (mergekit's load/compute dtype, merge-cli always computes in float32) and
  ``out_dtype`` give ``save.dtype``; ``int8_mask`` (a mask storage option) has no effect here.

Anything else (``modules``, ``tokenizer``, ``chat_template``, LoRA references, partial-range
merges, ``residual_weight``, unknown methods or keys) fails with a :class:`RecipeError` that
names the key. Model references: a path that exists stays local, ``org/name[@rev]`` becomes
``hf://org/name[@rev]``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from merge_cli.errors import RecipeError
from merge_cli.fuse.params import LAYER_PATTERN

#: How a mergekit method uses ``base_model`` (mergekit's ``InputContract.base``).
BaseUse = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergekitMethod:
    """What merge-cli needs to know of one mergekit 0.1.5 method."""

    base: BaseUse
    shared: tuple[str, ...] = ()
    per_model: tuple[str, ...] = ()


_TASK_VECTOR_SHARED = ("normalize", "rescale", "lambda", "int8_mask")

#: mergekit 0.1.5 methods merge-cli runs, with their parameters (shared / per model).
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("ignored", ("normalize",), ("weight",)),
    "passthrough": MergekitMethod("ignored", (), ("scale",)),
    "task_arithmetic": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density")),
    "ties": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density")),
    "dare_ties": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density")),
    "dare_linear": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density")),
    "breadcrumbs": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density", "gamma")),
    "breadcrumbs_ties": MergekitMethod(
        "required", _TASK_VECTOR_SHARED, ("weight", "density", "gamma")
    ),
    "della": MergekitMethod("required", _TASK_VECTOR_SHARED, ("weight", "density", "epsilon")),
    "della_linear": MergekitMethod(
        "required", _TASK_VECTOR_SHARED, ("weight", "density", "epsilon")
    ),
    "slerp": MergekitMethod("required", ("t",)),
    "nuslerp": MergekitMethod("optional", ("nuslerp_row_wise", "nuslerp_flatten"), ("weight",)),
    "multislerp": MergekitMethod("optional", ("normalize_weights", "eps"), ("weight",)),
    "karcher": MergekitMethod("ignored", ("max_iter", "tol")),
    "model_stock": MergekitMethod("required", ("filter_wise",)),
    "sce": MergekitMethod("required", ("select_topk", "int8_mask")),
}

#: Accepted and dropped: mergekit stores TIES/DARE masks as int8 to save memory; merge-cli
#: never materialises a whole-model mask, and the result is the same either way.
_NO_EFFECT = {"int8_mask"}
#: Top-level keys of a mergekit configuration that merge-cli does not support.
_UNSUPPORTED_TOP = {
    "modules": "per-module merges (multimodal models) are not supported",
    "tokenizer": "tokenizer surgery (added tokens, pad_to_multiple_of) is not supported",
    "chat_template": "setting a chat template is not supported; edit tokenizer_config.json",
}
_KNOWN_TOP = {
    "merge_method",
    "models",
    "slices",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    *_UNSUPPORTED_TOP,
}
_SAVE_DTYPES = {"float32", "float16", "bfloat16"}
_COMPUTE_DTYPES = _SAVE_DTYPES | {"float64"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
#: More distinct filters than this would need too many combined rules.
MAX_FILTERS = 8

# A non-layer tensor (embeddings, final norm, lm_head): no ``layers.N.`` in its name.
_NON_LAYER = f"(?!.*{LAYER_PATTERN.pattern})"


def is_mergekit_config(raw: Any) -> bool:
    return isinstance(raw, dict) and "merge_method" in raw


def translate_mergekit(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe v1 mapping equivalent to mergekit configuration ``raw``.

    Raises :class:`RecipeError` naming every key merge-cli cannot honour.
    """
    return _Translator(raw, source).translate()


def convert_mergekit(path: str | Path, out: str | None = None) -> dict[str, Any]:
    """Read a mergekit configuration file and return the validated recipe v1 mapping.

    ``save.path`` is ``out`` when given; without it the recipe is checked as if an output
    directory had been given, and printed without one (``merge-cli run --out`` sets it).
    """
    from merge_cli.recipe import parse_yaml, recipe_from_dict

    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise RecipeError(source, [f"cannot read the file ({error.strerror or error})"]) from None
    raw = parse_yaml(text, source)
    if not is_mergekit_config(raw):
        raise RecipeError(source, ["merge_method: not a mergekit configuration (no merge_method)"])
    recipe = translate_mergekit(raw, source)
    if out is not None:
        recipe["save"]["path"] = out
    recipe_from_dict(recipe, source, out=out or recipe["save"].get("path") or "OUT")
    return recipe


# ---------------------------------------------------------------------------------------


class _Translator:
    def __init__(self, raw: dict[str, Any], source: str):
        self.raw = raw
        self.source = source
        self.problems: list[str] = []

    def fail_if_problems(self) -> None:
        if self.problems:
            raise RecipeError(self.source, self.problems)

    def translate(self) -> dict[str, Any]:
        raw = self.raw
        for key in raw:
            if key in _UNSUPPORTED_TOP and raw[key] is not None:
                self.problems.append(f"{key}: {_UNSUPPORTED_TOP[key]} by merge-cli")
            elif key not in _KNOWN_TOP:
                self.problems.append(f"{key}: unknown key in a mergekit configuration")
        method_name = raw.get("merge_method")
        method = MERGEKIT_METHODS.get(method_name) if isinstance(method_name, str) else None
        if method is None:
            supported = ", ".join(sorted(MERGEKIT_METHODS))
            self.problems.append(
                f"merge_method: {method_name!r} is not supported by merge-cli "
                f"(supported mergekit methods: {supported})"
            )
        self.fail_if_problems()
        assert method is not None and isinstance(method_name, str)

        names = _ModelNames()
        base_ref = (
            self.reference(raw["base_model"], "base_model") if raw.get("base_model") else None
        )
        inputs: list[tuple[str, dict[str, Any]]] = []
        slice_params: dict[str, Any] = {}
        passthrough_slices = None
        if raw.get("models") and raw.get("slices"):
            self.problems.append("slices: give either models or slices, not both")
        elif raw.get("slices"):
            inputs, slice_params, passthrough_slices = self.slices(raw["slices"], method_name)
        elif raw.get("models"):
            inputs = self.models(raw["models"])
        else:
            self.problems.append("models: a mergekit configuration needs models or slices")
        self.fail_if_problems()

        # Model names in mergekit's order (its listed models, then the base if not listed).
        references = [ref for ref, _ in inputs]
        if base_ref is not None and base_ref not in references:
            references.append(base_ref)
        for ref in references:
            names.add(ref)
        model_params = {names[ref]: params for ref, params in inputs}

        uses_base = method.base == "required" or (method.base == "optional" and base_ref)
        if method.base == "required" and base_ref is None:
            self.problems.append(f"base_model: mergekit's {method_name} needs a base_model")
        base = names[base_ref] if uses_base and base_ref is not None else None
        fused = [names[ref] for ref in references if names[ref] != base]

        top_params = raw.get("parameters") or {}
        if not isinstance(top_params, dict):
            self.problems.append("parameters: expected a mapping of parameter names to values")
            top_params = {}
        self.check_names(top_params, "parameters", method_name, method, per_model=False)
        for i, (_ref, params) in enumerate(inputs):
            where = (
                f"slices[0].sources[{i}].parameters"
                if raw.get("slices")
                else f"models[{i}].parameters"
            )
            self.check_names(params, where, method_name, method, per_model=True)
        self.fail_if_problems()

        fuse: dict[str, Any] = {"method": method_name}
        if base is not None:
            fuse["base"] = base
        if passthrough_slices is not None:
            fuse["params"] = {"slices": [
                {"model": names[ref], "layers": list(layers)} for ref, layers in passthrough_slices
            ]}  # fmt: skip
            if (
                len(passthrough_slices) > 1
                and passthrough_slices[-1][0] != passthrough_slices[0][0]
            ):
                fuse["params"]["head_from"] = names[passthrough_slices[-1][0]]
        else:
            shared_chain = [
                _drop_no_effect(slice_params),
                _drop_no_effect(top_params),
            ]
            per_model = {name: _drop_no_effect(model_params.get(name, {})) for name in fused}
            try:
                params, models, rules = _parameter_tables(shared_chain, per_model)
            except _ParamError as error:
                raise RecipeError(self.source, [str(error)]) from None
            fuse["models"] = models
            if params:
                fuse["params"] = params
            if rules:
                fuse["rules"] = rules

        save: dict[str, Any] = {}
        dtype = self.save_dtype()
        if dtype is not None:
            save["dtype"] = dtype
        self.tokenizer_source()
        self.fail_if_problems()
        recipe: dict[str, Any] = {
            "models": {names[ref]: ref for ref in references},
            "fuse": fuse,
        }
        recipe["save"] = save
        return recipe

    # -- pieces ---------------------------------------------------------------------------

    def reference(self, value: Any, where: str) -> str:
        """A mergekit model reference as a merge-cli reference (local path or hf://)."""
        if isinstance(value, dict):
            if value.get("lora"):
                self.problems.append(f"{where}.lora: LoRA adapters are not supported")
            if value.get("override_architecture"):
                self.problems.append(f"{where}.override_architecture: not supported")
            extra = set(value) - {"model", "lora", "override_architecture"}
            if extra:
                self.problems.append(f"{where}.{sorted(extra)[0]}: unknown key")
            model = value.get("model")
            if isinstance(model, dict):
                path, revision = model.get("path"), model.get("revision")
                if not isinstance(path, str):
                    self.problems.append(f"{where}.model.path: expected a path or repo id")
                    return "?"
                return _as_reference(path, revision)
            value = model
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where}: expected a model path or Hugging Face repo id")
            return "?"
        if "+" in value:
            self.problems.append(
                f"{where}: {value!r}: LoRA references (model+lora) are not supported"
            )
            return "?"
        if value.count("@") > 1:
            self.problems.append(f"{where}: {value!r}: more than one @revision")
            return "?"
        path, _, revision = value.partition("@")
        return _as_reference(path, revision or None)

    def models(self, entries: Any) -> list[tuple[str, dict[str, Any]]]:
        if not isinstance(entries, list):
            self.problems.append("models: expected a list of {model: ..., parameters: ...}")
            return []
        inputs = []
        for i, entry in enumerate(entries):
            if isinstance(entry, str):
                entry = {"model": entry}
            if not isinstance(entry, dict) or "model" not in entry:
                self.problems.append(f"models[{i}]: expected a mapping with a model key")
                continue
            for key in set(entry) - {"model", "parameters"}:
                self.problems.append(f"models[{i}].{key}: unknown key")
            ref = self.reference(entry["model"], f"models[{i}].model")
            params = entry.get("parameters") or {}
            if not isinstance(params, dict):
                self.problems.append(f"models[{i}].parameters: expected a mapping")
                params = {}
            inputs.append((ref, params))
        return inputs

    def slices(
        self, slices: Any, method_name: str
    ) -> tuple[
        list[tuple[str, dict[str, Any]]], dict[str, Any], list[tuple[str, tuple[int, int]]] | None
    ]:
        if not isinstance(slices, list):
            self.problems.append("slices: expected a list of {sources: [...]}")
            return [], {}, None
        parsed: list[list[tuple[str, tuple[int, int], dict[str, Any]]]] = []
        slice_params: dict[str, Any] = {}
        for i, piece in enumerate(slices):
            where = f"slices[{i}]"
            if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list):
                self.problems.append(f"{where}.sources: expected a list of sources")
                continue
            for key in set(piece) - {"sources", "parameters", "base_model", "residual_weight"}:
                self.problems.append(f"{where}.{key}: unknown key")
            if piece.get("residual_weight") is not None:
                self.problems.append(f"{where}.residual_weight: not supported by merge-cli")
            if piece.get("base_model") is not None:
                slice_base = self.reference(piece["base_model"], f"{where}.base_model")
                top_base = (
                    self.reference(self.raw["base_model"], "base_model")
                    if self.raw.get("base_model")
                    else None
                )
                if slice_base != top_base:
                    self.problems.append(
                        f"{where}.base_model: a per-slice base model is not supported "
                        "(set the top-level base_model)"
                    )
            if piece.get("parameters"):
                if len(slices) > 1:
                    self.problems.append(
                        f"{where}.parameters: per-slice parameters need a single slice"
                    )
                slice_params = dict(piece["parameters"])
            sources = []
            for j, src in enumerate(piece["sources"]):
                swhere = f"{where}.sources[{j}]"
                if not isinstance(src, dict) or "model" not in src:
                    self.problems.append(f"{swhere}: expected a mapping with model and layer_range")
                    continue
                for key in set(src) - {"model", "layer_range", "parameters"}:
                    self.problems.append(f"{swhere}.{key}: unknown key")
                layers = src.get("layer_range")
                if (
                    not isinstance(layers, list | tuple)
                    or len(layers) != 2
                    or not all(isinstance(x, int) for x in layers)
                ):
                    self.problems.append(f"{swhere}.layer_range: expected [start, end]")
                    continue
                ref = self.reference(src["model"], f"{swhere}.model")
                params = src.get("parameters") or {}
                if not isinstance(params, dict):
                    self.problems.append(f"{swhere}.parameters: expected a mapping")
                    params = {}
                sources.append((ref, (layers[0], layers[1]), params))
            parsed.append(sources)
        if self.problems:
            return [], {}, None

        if all(len(sources) == 1 for sources in parsed) and method_name == "passthrough":
            stacked = []
            for i, sources in enumerate(parsed):
                ref, layers, params = sources[0]
                if params:
                    key = next(iter(params))
                    self.problems.append(
                        f"slices[{i}].sources[0].parameters.{key}: passthrough parameters "
                        "(scale) are not supported by merge-cli"
                    )
                stacked.append((ref, layers))
            refs = list(dict.fromkeys(ref for ref, _ in stacked))
            return [(ref, {}) for ref in refs], {}, stacked

        if len(parsed) > 1:
            self.problems.append(
                f"slices: merging several slices with {method_name} is not supported "
                "(only passthrough stacks slices; give one slice covering all layers, "
                "or use models:)"
            )
            return [], {}, None
        sources = parsed[0]
        for j, (ref, layers, _params) in enumerate(sources):
            total = _layer_count(ref)
            if layers != (0, total):
                self.problems.append(
                    f"slices[0].sources[{j}].layer_range: {list(layers)} does not cover all "
                    f"{total} layers of {ref}; merging a layer sub-range is not supported "
                    "(only passthrough stacks layer ranges)"
                )
        return [(ref, params) for ref, _layers, params in sources], slice_params, None

    def check_names(
        self,
        params: dict[str, Any],
        where: str,
        method_name: str,
        method: MergekitMethod,
        per_model: bool,
    ) -> None:
        allowed = method.per_model if per_model else method.shared + method.per_model
        for key in params:
            if key in allowed:
                continue
            if per_model and key in method.shared:
                self.problems.append(
                    f"{where}.{key}: a method-wide parameter of mergekit's {method_name}; "
                    "mergekit ignores it here, set it under the top-level parameters"
                )
            else:
                known = ", ".join(allowed) or "none"
                self.problems.append(
                    f"{where}.{key}: mergekit's {method_name} has no such parameter "
                    f"(it takes: {known})"
                )

    def save_dtype(self) -> str | None:
        for key in ("out_dtype", "dtype"):
            value = self.raw.get(key)
            if value is None:
                continue
            name = str(value).removeprefix("torch.")
            if name not in _COMPUTE_DTYPES:
                self.problems.append(
                    f"{key}: {value!r} is not a dtype merge-cli supports "
                    f"({', '.join(sorted(_SAVE_DTYPES))})"
                )
                return None
            if key == "out_dtype" or self.raw.get("out_dtype") is None:
                if name not in _SAVE_DTYPES:
                    self.problems.append(
                        f"{key}: merge-cli cannot save {name} (use out_dtype: float32, "
                        "float16 or bfloat16)"
                    )
                    return None
                return name
        return None

    def tokenizer_source(self) -> None:
        value = self.raw.get("tokenizer_source")
        if value is not None:
            self.problems.append(
                f"tokenizer_source: {value!r} is not supported by merge-cli yet; the models "
                "must share one vocabulary (remove the key to keep the base model's tokenizer)"
            )


# ---------------------------------------------------------------------------------------
# References and names


def _as_reference(path: str, revision: str | None) -> str:
    """A local path that exists stays local; ``org/name`` becomes ``hf://org/name``."""
    if Path(path).expanduser().exists() or not _HUB_ID.match(path):
        if revision:
            return f"{path}@{revision}"  # fails later, clearly, as a missing path
        return path
    return f"hf://{path}" + (f"@{revision}" if revision else "")


class _ModelNames:
    """Short, unique recipe names for model references (the last path component)."""

    def __init__(self) -> None:
        self._names: dict[str, str] = {}

    def add(self, reference: str) -> None:
        if reference in self._names:
            return
        stem = reference.removeprefix("hf://").partition("@")[0].rstrip("/")
        stem = re.sub(r"[^A-Za-z0-9_-]+", "_", Path(stem).name.removesuffix(".safetensors"))
        stem = stem or "model"
        name, n = stem, 2
        while name in self._names.values() or name == "merged":
            name, n = f"{stem}_{n}", n + 1
        self._names[reference] = name

    def __getitem__(self, reference: str) -> str:
        return self._names[reference]


def _layer_count(reference: str) -> int:
    from merge_cli.fuse.params import count_layers
    from merge_cli.io.resolve import open_checkpoint

    return count_layers(open_checkpoint(reference).tensor_names())


def _drop_no_effect(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k not in _NO_EFFECT}


# ---------------------------------------------------------------------------------------
# Parameters: mergekit settings -> fuse.params, fuse.models and fuse.rules


class _ParamError(ValueError):
    pass


#: A filter set: the filters (substrings) present in a tensor's name.
Present = frozenset[str]


def _conditions(setting: Any, where: str) -> list[tuple[str | None, Any]] | None:
    """A conditional list as ``(filter, value)`` pairs; None for a plain value or gradient."""
    if isinstance(setting, dict):
        setting = [setting]
    if not isinstance(setting, list) or not any(isinstance(e, dict) for e in setting):
        _check_value(setting, where)
        return None
    pairs = []
    for i, cond in enumerate(setting):
        if not isinstance(cond, dict) or "value" not in cond:
            raise _ParamError(f"{where}[{i}]: expected {{filter: ..., value: ...}}")
        extra = set(cond) - {"filter", "value"}
        if extra:
            raise _ParamError(f"{where}[{i}].{sorted(extra)[0]}: unknown key")
        flt = cond.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise _ParamError(f"{where}[{i}].filter: expected a string")
        _check_value(cond["value"], f"{where}[{i}].value")
        pairs.append((None if flt in (None, "*") else flt, cond["value"]))
    return pairs


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, list):
        if not value:
            raise _ParamError(f"{where}: an empty list")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value):
            raise _ParamError(
                f"{where}: {value!r}: a list of non-numbers (values stepped over the layers) "
                "is not supported; use numbers or filters"
            )
    elif not isinstance(value, bool | int | float | str):
        raise _ParamError(f"{where}: expected a number, a list of numbers or a string")


def _evaluate_at(setting: Any, present: Present, where: str) -> Any:
    """mergekit's value of ``setting`` for a tensor whose name holds the ``present`` filters."""
    pairs = _conditions(setting, where)
    if pairs is None:
        return setting
    for flt, value in pairs:
        if flt is None or flt in present:
            return value
    return None


def _filters(settings: list[tuple[Any, str]]) -> list[str]:
    found: list[str] = []
    for setting, where in settings:
        for flt, _ in _conditions(setting, where) or []:
            if flt is not None and flt not in found:
                found.append(flt)
    return found


def _parameter_tables(
    shared_chain: list[dict[str, Any]], per_model: dict[str, dict[str, Any]]
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``fuse.params``, ``fuse.models`` and ``fuse.rules`` reproducing mergekit's resolution.

    ``shared_chain`` lists the method-wide settings from highest precedence (a slice's) to
    lowest (the top level); ``per_model`` each fused model's own settings, which come first.
    """
    chain_where = ["slices[0].parameters", "parameters"]
    keys = list(dict.fromkeys(k for level in shared_chain for k in level))
    all_settings = [
        (level[k], f"{chain_where[i]}.{k}") for i, level in enumerate(shared_chain) for k in level
    ] + [
        (values[k], f"models.{name}.parameters.{k}")
        for name, values in per_model.items()
        for k in values
    ]
    filters = _filters(all_settings)
    if len(filters) > MAX_FILTERS:
        raise _ParamError(
            f"parameters: {len(filters)} distinct filters; merge-cli supports at most "
            f"{MAX_FILTERS} in one configuration"
        )

    def shared_at(key: str, present: Present) -> Any:
        for i, level in enumerate(shared_chain):
            if key in level:
                value = _evaluate_at(level[key], present, f"{chain_where[i]}.{key}")
                if value is not None:
                    return value
        return None

    def model_at(name: str, key: str, present: Present) -> Any:
        setting = per_model[name].get(key)
        if setting is None:
            return None
        return _evaluate_at(setting, present, f"models.{name}.parameters.{key}")

    model_keys = {name: list(values) for name, values in per_model.items()}

    def table(present: Present) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
        shared = {k: v for k in keys if (v := shared_at(k, present)) is not None}
        models = {
            name: {k: v for k in model_keys[name] if (v := model_at(name, k, present)) is not None}
            for name in per_model
        }
        return shared, models

    def resolved(present: Present) -> dict[tuple[str | None, str], Any]:
        shared, models = table(present)
        out: dict[tuple[str | None, str], Any] = {(None, k): v for k, v in shared.items()}
        for name, values in models.items():
            for k in dict.fromkeys([*shared, *values]):
                out[(name, k)] = values.get(k, shared.get(k))
        return out

    empty: Present = frozenset()
    base_shared, base_models = table(empty)

    # Subsets of filters, most specific first; keep a rule only where it changes a value.
    order = [
        frozenset(combo)
        for size in range(len(filters), 0, -1)
        for combo in itertools.combinations(filters, size)
    ]
    kept: list[Present] = []
    for present in sorted(order, key=len):
        earlier = [s for s in order if s in kept and s < present]
        fallback = earlier[0] if earlier else empty
        if resolved(present) != resolved(fallback):
            kept.append(present)

    rules: list[dict[str, Any]] = []
    for present in [s for s in order if s in kept]:
        shared, models = table(present)
        rule_params = {k: v for k, v in shared.items() if base_shared.get(k) != v}
        rule_models = {}
        for name, values in models.items():
            entry = {
                k: v for k, v in values.items() if base_models[name].get(k) != v or k in rule_params
            }
            if entry:
                rule_models[name] = entry
        head = _non_layer_rule(present, shared, models)
        if head is not None:
            rules.append(head)
        rules.append(_rule(_match(present), rule_params, rule_models))
    head = _non_layer_rule(empty, base_shared, base_models)
    if head is not None:
        rules.append(head)
    return base_shared, base_models, rules


def _non_layer_rule(
    present: Present, shared: dict[str, Any], models: dict[str, dict[str, Any]]
) -> dict[str, Any] | None:
    """mergekit 0.1.5 reads gradients at t=0 outside the layers: pin those to the first value."""

    def first(value: Any) -> Any:
        return value[0] if isinstance(value, list) else value

    values = [*shared.values(), *(v for m in models.values() for v in m.values())]
    if not any(isinstance(v, list) for v in values):
        return None
    return _rule(
        _match(present, non_layer=True),
        {k: first(v) for k, v in shared.items()},
        {name: {k: first(v) for k, v in m.items()} for name, m in models.items() if m},
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
