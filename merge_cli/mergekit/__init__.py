"""mergekit compatibility: translate a mergekit configuration into a recipe v1 mapping.

A YAML file with ``merge_method:`` is a mergekit configuration (mergekit 0.1.5's
``MergeConfiguration``). :func:`translate_mergekit` turns it into the mapping that
:func:`merge_cli.config.recipe_from_dict` validates, so ``merge-cli run mergekit.yaml --out DIR``
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
  ``out_dtype`` give ``save.dtype``; ``int8_mask`` (a mask storage option) has no effect here;
* ``tokenizer_source: base`` keeps the base model's vocabulary (``fuse.tokenizer_source``,
  see :mod:`merge_cli.engine.vocab`: rows by token id, where mergekit maps them by token text);
  ``tokenizer_source: union`` merges the vocabularies by token text, with mergekit 0.1's
  default rows for the tokens a model lacks (same module; one difference: a ``base_model``
  of a method that fuses it as one of the models, such as ``linear``, is the reference
  vocabulary but its rows are not preferred over the mean of the models that have a token);
* mergekit's defaults where merge-cli's differ (DARE's ``normalize``, ...) are written out,
  its DARE/DELLA ``rescale: true`` becomes ``rescale: l1`` (its L1-norm matching) and its
  breadcrumbs get ``empty_without_outliers`` (see the methods' docs).

Anything else (``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source: MODEL``,
LoRA references, partial-range
merges, ``residual_weight``, unknown methods or keys) fails with a :class:`RecipeError` that
names the key. Model references: a path that exists stays local, ``org/name[@rev]`` becomes
``hf://org/name[@rev]``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from merge_cli.engine.params import LAYER_PATTERN
from merge_cli.errors import RecipeError

#: How a mergekit method uses ``base_model`` (mergekit's ``InputContract.base``).
BaseUse = Literal["required", "optional", "ignored"]


@dataclass(frozen=True)
class MergekitMethod:
    """What merge-cli needs to know of one mergekit 0.1.5 method.

    ``defaults`` are mergekit's parameter defaults (``REQUIRED`` where it has none);
    ``per_model`` names those set per input model. ``no_effect`` maps a parameter to the value
    at which it changes nothing (dropped; any other value is unsupported); ``ignored`` are
    parameters mergekit accepts and ignores for this method; ``values`` maps mergekit values
    to merge-cli's; ``fixed`` are merge-cli parameters that select mergekit's behaviour.
    """

    base: BaseUse
    defaults: dict[str, Any] = field(default_factory=dict)
    per_model: tuple[str, ...] = ()
    no_effect: dict[str, Any] = field(default_factory=dict)
    ignored: tuple[str, ...] = ()
    values: dict[str, dict[Any, Any]] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)

    @property
    def shared(self) -> tuple[str, ...]:
        return tuple(k for k in self.defaults if k not in self.per_model)


REQUIRED = object()


def _task_vectors(
    normalize: bool,
    rescale: bool,
    extra: dict[str, float] | None = None,
    *,
    ignored: tuple[str, ...] = (),
    **options: Any,
) -> MergekitMethod:
    """mergekit's ``GeneralizedTaskArithmeticMerge`` family (its defaults differ by method)."""
    extra = extra or {}
    return MergekitMethod(
        "required",
        {
            "normalize": normalize,
            "rescale": rescale,
            "lambda": 1.0,
            "int8_mask": False,
            "weight": REQUIRED,
            "density": 1.0,
            **extra,
        },
        per_model=("weight", "density", *extra),
        # The int8 mask is a storage option of mergekit's: the result is the same either way.
        ignored=("int8_mask", *ignored),
        **options,
    )


# mergekit's ``rescale: true`` after magnitude trimming (L1-norm matching) is not supported.
_SPARSE_MAGNITUDE: dict[str, Any] = {"no_effect": {"rescale": False}}
# mergekit's DARE/DELLA ``rescale: true`` matches the L1 norm of the pruned task vector.
_RESCALE_L1: dict[str, Any] = {"values": {"rescale": {True: "l1"}}}
_OUTLIERS: dict[str, Any] = {"fixed": {"empty_without_outliers": True}}

#: mergekit 0.1.5 methods merge-cli runs, with their parameters and defaults.
MERGEKIT_METHODS: dict[str, MergekitMethod] = {
    "linear": MergekitMethod("ignored", {"normalize": True, "weight": REQUIRED}, ("weight",)),
    "passthrough": MergekitMethod("ignored", {"scale": None}, ("scale",)),
    # Without sparsification mergekit ignores density and rescale.
    "task_arithmetic": _task_vectors(False, False, ignored=("density", "rescale")),
    "ties": _task_vectors(True, False, **_SPARSE_MAGNITUDE),
    "dare_ties": _task_vectors(False, True, **_RESCALE_L1),
    "dare_linear": _task_vectors(False, True, **_RESCALE_L1),
    "breadcrumbs": _task_vectors(False, False, {"gamma": 0.01}, **_SPARSE_MAGNITUDE, **_OUTLIERS),
    "breadcrumbs_ties": _task_vectors(
        False, False, {"gamma": 0.01}, **_SPARSE_MAGNITUDE, **_OUTLIERS
    ),
    "della": _task_vectors(True, True, {"epsilon": 0.15}, **_RESCALE_L1),
    "della_linear": _task_vectors(False, True, {"epsilon": 0.15}, **_RESCALE_L1),
    "slerp": MergekitMethod("required", {"t": REQUIRED}),
    "nuslerp": MergekitMethod(
        "optional",
        {"nuslerp_row_wise": False, "nuslerp_flatten": True, "weight": REQUIRED},
        ("weight",),
    ),
    "multislerp": MergekitMethod(
        "optional", {"normalize_weights": True, "eps": 1e-8, "weight": REQUIRED}, ("weight",)
    ),
    "karcher": MergekitMethod("ignored", {"max_iter": 10, "tol": 1e-5}),
    "model_stock": MergekitMethod("required", {"filter_wise": False}),
    "sce": MergekitMethod(
        "required", {"select_topk": 1.0, "int8_mask": False}, ignored=("int8_mask",)
    ),
}

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


# ---------------------------------------------------------------------------------------


#: A slice source: (model reference, layer range, parameters); a stacked range: (reference, range).
_Source = tuple[str, tuple[int, int], dict[str, Any]]
_Stacked = tuple[str, tuple[int, int]]


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
        self.check_names(slice_params, "slices[0].parameters", method_name, method, False)
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
                self.prepare(slice_params, "slices[0].parameters", method_name, method),
                self.prepare(top_params, "parameters", method_name, method),
                _defaults(method_name, method),
            ]
            per_model = {
                name: self.prepare(model_params.get(name, {}), where, method_name, method)
                for name, where in self.model_wheres(inputs, names, fused)
            }
            self.fail_if_problems()
            try:
                params, models, rules = _parameter_tables(shared_chain, per_model)
                rules = _drop_unmatched(rules, references[0])
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
        self.tokenizer_source(fuse, names[base_ref] if base_ref is not None else None)
        self.fail_if_problems()
        recipe: dict[str, Any] = {
            "models": {names[ref]: ref for ref in references},
            "fuse": fuse,
        }
        if save:  # mergekit has no output path: `run --out DIR` gives it
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
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], list[_Stacked] | None]:
        """Inputs and slice parameters, or the layer ranges to stack (passthrough)."""
        if not isinstance(slices, list):
            self.problems.append("slices: expected a list of {sources: [...]}")
            return [], {}, None
        parsed: list[list[_Source]] = []
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
            sources = self.slice_sources(piece["sources"], where)
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

    def slice_sources(self, sources: list[Any], where: str) -> list[_Source]:
        parsed = []
        for j, src in enumerate(sources):
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
            parsed.append((ref, (layers[0], layers[1]), params))
        return parsed

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

    def model_wheres(
        self, inputs: list[tuple[str, dict[str, Any]]], names: _ModelNames, fused: list[str]
    ) -> list[tuple[str, str]]:
        """Each fused model's name and where its parameters are in the configuration."""
        kind = "slices[0].sources" if self.raw.get("slices") else "models"
        index = {names[ref]: i for i, (ref, _) in enumerate(inputs)}
        return [(name, f"{kind}[{index.get(name, '?')}].parameters") for name in fused]

    def prepare(
        self, params: dict[str, Any], where: str, method_name: str, method: MergekitMethod
    ) -> dict[str, Any]:
        """Drop what has no effect, reject what merge-cli cannot do, map mergekit's values."""
        prepared = {}
        for key, setting in params.items():
            if key in method.ignored:
                continue
            if key in method.no_effect:
                neutral = method.no_effect[key]
                if not all(value == neutral for value in _scalars(setting)):
                    self.problems.append(
                        f"{where}.{key}: {setting!r} is not supported by merge-cli's "
                        f"{method_name} (only {neutral!r}, mergekit's default)"
                    )
                continue
            try:
                _conditions(setting, f"{where}.{key}")
            except _ParamError as error:
                self.problems.append(str(error))
                continue
            mapping = method.values.get(key)
            prepared[key] = _map_values(setting, mapping) if mapping else setting
        return prepared

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

    def tokenizer_source(self, fuse: dict[str, Any], base_name: str | None) -> None:
        """``base`` keeps the base model's vocabulary, ``union`` merges the vocabularies
        (``fuse.tokenizer_source``); a model's tokenizer is not supported."""
        value = self.raw.get("tokenizer_source")
        if value is None:
            return
        if value not in ("base", "union"):
            self.problems.append(
                f"tokenizer_source: {value!r} is not supported by merge-cli (base: keep the "
                "base model's vocabulary, and union: merge the vocabularies, are; a model's "
                "tokenizer is not)"
            )
            return
        # merge-cli's reference vocabulary is fuse.base's, or else the first fused model's.
        reference = fuse.get("base") or next(iter(fuse.get("models") or {}), None)
        if base_name is not None and reference != base_name:
            self.problems.append(
                f"tokenizer_source: {value} with {fuse['method']}, which fuses the base_model "
                "as one of the models: list the base_model first under models"
            )
            return
        fuse["tokenizer_source"] = value


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


def _local_tensor_names(reference: str) -> list[str] | None:
    """The tensor names of a local checkpoint (headers only); None for a Hub reference."""
    from merge_cli.errors import CheckpointError
    from merge_cli.io.resolve import HUB_PREFIX, open_checkpoint

    if reference.startswith(HUB_PREFIX) or not Path(reference).expanduser().exists():
        return None
    try:
        return open_checkpoint(reference).tensor_names()
    except CheckpointError:
        return None


def _drop_unmatched(rules: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Rules that match no tensor of a local model change nothing: leave them out."""
    from merge_cli.engine.params import rule_matches
    from merge_cli.recipe import Rule

    names = _local_tensor_names(reference) if rules else None
    if names is None:
        return rules
    return [r for r in rules if any(rule_matches(Rule(match=r["match"]), n) for n in names)]


def _layer_count(reference: str) -> int:
    from merge_cli.engine.params import count_layers
    from merge_cli.io.resolve import open_checkpoint

    return count_layers(open_checkpoint(reference).tensor_names())


def _scalars(setting: Any) -> list[Any]:
    """Every plain value in a setting (scalars, gradient entries, conditional values)."""
    if isinstance(setting, dict):
        return _scalars(setting.get("value"))
    if isinstance(setting, list):
        return [v for item in setting for v in _scalars(item)]
    return [setting]


def _map_values(setting: Any, mapping: dict[Any, Any]) -> Any:
    if isinstance(setting, dict):
        return {**setting, "value": _map_values(setting.get("value"), mapping)}
    if isinstance(setting, list):
        return [_map_values(item, mapping) for item in setting]
    return mapping.get(setting, setting) if isinstance(setting, bool) else setting


def _defaults(method_name: str, method: MergekitMethod) -> dict[str, Any]:
    """mergekit's defaults where merge-cli's differ, and the options that pick its behaviour.

    The lowest level of the parameter chain: any value set in the configuration wins.
    """
    from merge_cli.fuse import METHODS

    ours = METHODS.get(method_name)
    if ours is None:
        return {}
    fields = {**ours.model_params.model_fields, **ours.params.model_fields}
    defaults = {}
    for key, value in method.defaults.items():
        if value is REQUIRED or key in method.ignored or key in method.no_effect:
            continue
        if key not in fields or fields[key].is_required():
            continue
        value = _map_values(value, method.values.get(key, {}))
        if fields[key].get_default(call_default_factory=True) != value:
            defaults[key] = value
    return {**defaults, **method.fixed}


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
    chain_where = ["slices[0].parameters", "parameters", "defaults"]
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

    def rule(match: str, shared: dict[str, Any], models: dict[str, dict[str, Any]]) -> Any:
        """A rule holding what differs from the top-level values (and must beat them)."""
        params = {k: v for k, v in shared.items() if base_shared.get(k) != v}
        per_model = {}
        for name, values in models.items():
            entry = {
                k: v for k, v in values.items() if base_models[name].get(k) != v or k in params
            }
            if entry:
                per_model[name] = entry
        return _rule(match, params, per_model)

    rules: list[dict[str, Any]] = []
    for present in [s for s in order if s in kept]:
        shared, models = table(present)
        if _has_gradient(shared, models):
            rules.append(rule(_match(present, non_layer=True), *_first_values(shared, models)))
        rules.append(rule(_match(present), shared, models))
    if _has_gradient(base_shared, base_models):
        last = rule(_match(empty, non_layer=True), *_first_values(base_shared, base_models))
        if len(last) > 1:
            rules.append(last)
    return base_shared, base_models, rules


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
