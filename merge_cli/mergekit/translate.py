"""The translation of one mergekit configuration into a recipe v1 mapping."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from merge_cli.engine.params import count_layers, rule_matches
from merge_cli.errors import CheckpointError, RecipeError
from merge_cli.io.resolve import HUB_PREFIX, open_checkpoint
from merge_cli.mergekit.methods import MERGEKIT_METHODS, MergekitMethod, mergekit_defaults
from merge_cli.mergekit.parameters import (
    ParamError,
    conditions,
    map_values,
    parameter_tables,
    scalars,
)
from merge_cli.recipe import Rule

#: Top-level keys of a mergekit configuration that merge-cli does not support.
_UNSUPPORTED_TOP = {
    "modules": "per-module merges (multimodal models) are not supported by merge-cli",
    "tokenizer": "tokenizer surgery (added tokens, pad_to_multiple_of) is not supported by "
    "merge-cli",
    "chat_template": "merge-cli does not write a chat template into the output; remove the "
    "key and set `chat_template` in the output's tokenizer_config.json after the merge",
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
#: mergekit's separator of a model and its LoRA adapter in a reference (``org/model+org/lora``).
LORA_SEPARATOR = "+"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


#: A slice source: (model reference, layer range, parameters); a stacked range: (reference, range).
_Source = tuple[str, tuple[int, int], dict[str, Any]]
_Stacked = tuple[str, tuple[int, int]]


class Translator:
    """Reads one configuration, collecting every problem before it raises."""

    def __init__(self, raw: dict[str, Any], source: str):
        self.raw = raw
        self.source = source
        self.problems: list[str] = []
        #: What the user should know though the configuration runs (a value with no effect).
        self.warnings: list[str] = []
        #: Key paths of the translated recipe -> where the user wrote them (for messages).
        self.key_map: dict[str, str] = {}

    def fail_if_problems(self) -> None:
        if self.problems:
            raise RecipeError(self.source, self.problems)

    def translate(self) -> dict[str, Any]:
        method_name, method = self.method()
        base_ref = (
            self.reference(self.raw["base_model"], "base_model")
            if self.raw.get("base_model")
            else None
        )
        inputs, slice_params, stacked = self.inputs(method_name)
        # Model names in mergekit's order (its listed models, then the base if not listed).
        references = [ref for ref, _ in inputs]
        if base_ref is not None and base_ref not in references:
            references.append(base_ref)
        names = _ModelNames()
        for ref in references:
            names.add(ref)

        uses_base = method.base == "required" or (method.base == "optional" and base_ref)
        if method.base == "required" and base_ref is None:
            self.problems.append(f"base_model: mergekit's {method_name} needs a base_model")
        base = names[base_ref] if uses_base and base_ref is not None else None
        top_params = self.check_all_names(inputs, slice_params, method_name, method)

        fuse: dict[str, Any] = {"method": method_name}
        if base is not None:
            fuse["base"] = base
        if stacked is not None:
            fuse["params"] = self.stacking(stacked, names)
        else:
            fused = [names[ref] for ref in references if names[ref] != base]
            shared_chain = [
                self.prepare(slice_params, "slices[0].parameters", method_name, method),
                self.prepare(top_params, "parameters", method_name, method),
                mergekit_defaults(method_name, method),
            ]
            model_params = {names[ref]: params for ref, params in inputs}
            per_model = {
                name: self.prepare(model_params.get(name, {}), where, method_name, method)
                for name, where in self.model_wheres(inputs, names, fused)
            }
            self.fail_if_problems()
            fuse.update(self.parameters(shared_chain, per_model, references[0]))

        save: dict[str, Any] = {}
        dtype = self.save_dtype()
        if dtype is not None:
            save["dtype"] = dtype
        self.tokenizer_source(fuse, names[base_ref] if base_ref is not None else None)
        self.fail_if_problems()
        self.map_keys(inputs, names, base_ref, stacked)
        recipe: dict[str, Any] = {
            "models": {names[ref]: model_entry(ref) for ref in references},
            "fuse": fuse,
        }
        if save:  # mergekit has no output path: `run --out DIR` gives it
            recipe["save"] = save
        return recipe

    def map_keys(
        self,
        inputs: list[tuple[str, dict[str, Any]]],
        names: _ModelNames,
        base_ref: str | None,
        stacked: list[_Stacked] | None,
    ) -> None:
        """Record where each translated key came from, so that a problem the recipe checks
        find names the key as the user wrote it (``models[0].parameters.scale``, not
        ``fuse.models.a.scale``)."""
        key_map = {
            "fuse.method": "merge_method",
            "fuse.params": "parameters",
            "fuse.tokenizer_source": "tokenizer_source",
            "save.dtype": "out_dtype" if self.raw.get("out_dtype") else "dtype",
        }
        kind = "slices[0].sources" if self.raw.get("slices") else "models"
        for i, (ref, _params) in enumerate(inputs):
            key_map.setdefault(f"fuse.models.{names[ref]}", f"{kind}[{i}].parameters")
            key_map.setdefault(f"models.{names[ref]}", f"{kind}[{i}].model")
        if base_ref is not None:
            key_map["fuse.base"] = "base_model"
            key_map.setdefault(f"models.{names[base_ref]}", "base_model")
        for i, _piece in enumerate(stacked or []):
            key_map[f"fuse.params.slices[{i}].layers"] = f"slices[{i}].sources[0].layer_range"
            key_map[f"fuse.params.slices[{i}]"] = f"slices[{i}].sources[0]"
        self.key_map = key_map

    # -- steps ----------------------------------------------------------------------------

    def method(self) -> tuple[str, MergekitMethod]:
        """The configuration's method (after checking its top-level keys)."""
        raw = self.raw
        for key in raw:
            if key in _UNSUPPORTED_TOP and raw[key] is not None:
                self.problems.append(f"{key}: {_UNSUPPORTED_TOP[key]}")
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
        return method_name, method

    def inputs(
        self, method_name: str
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], list[_Stacked] | None]:
        """The input models with their parameters, the slice's parameters, and the layer
        ranges to stack (passthrough slices), from ``models`` or ``slices``."""
        raw = self.raw
        inputs: list[tuple[str, dict[str, Any]]] = []
        slice_params: dict[str, Any] = {}
        stacked = None
        if raw.get("models") and raw.get("slices"):
            self.problems.append("slices: give either models or slices, not both")
        elif raw.get("slices"):
            inputs, slice_params, stacked = self.slices(raw["slices"], method_name)
        elif raw.get("models"):
            inputs = self.models(raw["models"])
        else:
            self.problems.append("models: a mergekit configuration needs models or slices")
        self.fail_if_problems()
        return inputs, slice_params, stacked

    def check_all_names(
        self,
        inputs: list[tuple[str, dict[str, Any]]],
        slice_params: dict[str, Any],
        method_name: str,
        method: MergekitMethod,
    ) -> dict[str, Any]:
        """Check every parameter name in the configuration; the top-level parameters."""
        top_params = self.raw.get("parameters") or {}
        if not isinstance(top_params, dict):
            self.problems.append("parameters: expected a mapping of parameter names to values")
            top_params = {}
        self.check_names(top_params, "parameters", method_name, method, per_model=False)
        self.check_names(slice_params, "slices[0].parameters", method_name, method, False)
        kind = "slices[0].sources" if self.raw.get("slices") else "models"
        for i, (_ref, params) in enumerate(inputs):
            where = f"{kind}[{i}].parameters"
            self.check_names(params, where, method_name, method, per_model=True)
        self.fail_if_problems()
        return top_params

    def stacking(self, stacked: list[_Stacked], names: _ModelNames) -> dict[str, Any]:
        """passthrough's ``slices`` (and ``head_from`` when the last slice's model differs)."""
        params: dict[str, Any] = {
            "slices": [{"model": names[ref], "layers": list(layers)} for ref, layers in stacked]
        }
        if len(stacked) > 1 and stacked[-1][0] != stacked[0][0]:
            params["head_from"] = names[stacked[-1][0]]
        return params

    def parameters(
        self,
        shared_chain: list[dict[str, Any]],
        per_model: dict[str, dict[str, Any]],
        reference: str,
    ) -> dict[str, Any]:
        """``models``, ``params`` and ``rules`` of the fuse section."""
        try:
            params, models, rules = parameter_tables(shared_chain, per_model)
            rules = drop_unmatched(rules, reference)
        except ParamError as error:
            raise RecipeError(self.source, [str(error)]) from None
        section: dict[str, Any] = {"models": models}
        if params:
            section["params"] = params
        if rules:
            section["rules"] = rules
        return section

    # -- pieces ---------------------------------------------------------------------------

    def reference(self, value: Any, where: str) -> str:
        """A mergekit model reference as a merge-cli reference (local path or hf://); a
        reference with a LoRA adapter (``base+lora``, or ``{model: ..., lora: ...}``) as
        ``BASE+ADAPTER`` (:func:`model_entry` turns it into ``{path, lora}``)."""
        if isinstance(value, dict):
            if value.get("override_architecture"):
                self.problems.append(f"{where}.override_architecture: not supported")
            extra = set(value) - {"model", "lora", "override_architecture"}
            if extra:
                self.problems.append(f"{where}.{sorted(extra)[0]}: unknown key")
            base = self.model_path(value.get("model"), f"{where}.model")
            lora = value.get("lora")
            if not lora:
                return base
            return f"{base}{LORA_SEPARATOR}{self.model_path(lora, f'{where}.lora')}"
        if isinstance(value, str) and LORA_SEPARATOR in value:
            base, _, lora = value.partition(LORA_SEPARATOR)
            if not base or not lora or LORA_SEPARATOR in lora:
                self.problems.append(f"{where}: {value!r}: expected MODEL+LORA")
                return "?"
            return f"{self.model_path(base, where)}{LORA_SEPARATOR}{self.model_path(lora, where)}"
        return self.model_path(value, where)

    def model_path(self, value: Any, where: str) -> str:
        """One path or repo id (``org/name@rev``, or mergekit's ``{path, revision}``)."""
        if isinstance(value, dict):
            path, revision = value.get("path"), value.get("revision")
            if not isinstance(path, str):
                self.problems.append(f"{where}.path: expected a path or repo id")
                return "?"
            return _as_reference(path, revision)
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where}: expected a model path or Hugging Face repo id")
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
            sources = self.slice_piece(piece, f"slices[{i}]")
            if sources is None:
                continue
            if piece.get("parameters"):
                if len(slices) > 1:
                    self.problems.append(
                        f"slices[{i}].parameters: per-slice parameters need a single slice"
                    )
                slice_params = dict(piece["parameters"])
            parsed.append(sources)
        if self.problems:
            return [], {}, None
        if all(len(sources) == 1 for sources in parsed) and method_name == "passthrough":
            return self.stacked_slices(parsed)
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

    def slice_piece(self, piece: Any, where: str) -> list[_Source] | None:
        """One slice's sources (None when it is not a mapping with a list of sources)."""
        if not isinstance(piece, dict) or not isinstance(piece.get("sources"), list):
            self.problems.append(f"{where}.sources: expected a list of sources")
            return None
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
        return self.slice_sources(piece["sources"], where)

    def stacked_slices(
        self, parsed: list[list[_Source]]
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any], list[_Stacked]]:
        """passthrough with one source per slice: the layer ranges to stack."""
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
            if key in method.unused:
                self.warnings.append(
                    f"{where}.{key}: has no effect with {method_name} (mergekit ignores it "
                    "too); ignored"
                )
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
            if key in method.ignored or key in method.unused:
                continue
            if key in method.no_effect:
                neutral = method.no_effect[key]
                if not all(value == neutral for value in scalars(setting)):
                    self.problems.append(
                        f"{where}.{key}: {setting!r} is not supported by merge-cli's "
                        f"{method_name} (only {neutral!r}, mergekit's default)"
                    )
                continue
            try:
                conditions(setting, f"{where}.{key}")
            except ParamError as error:
                self.problems.append(str(error))
                continue
            mapping = method.values.get(key)
            prepared[key] = map_values(setting, mapping) if mapping else setting
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


def model_entry(reference: str) -> str | dict[str, str]:
    """A recipe model entry: a reference, or ``{path, lora}`` for ``BASE+ADAPTER``."""
    base, separator, lora = reference.partition(LORA_SEPARATOR)
    return {"path": base, "lora": lora} if separator else reference


def _base_of(reference: str) -> str:
    return reference.partition(LORA_SEPARATOR)[0]


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
        # A model with a LoRA adapter is named after the adapter.
        named = reference.partition(LORA_SEPARATOR)[2] or reference
        stem = named.removeprefix("hf://").partition("@")[0].rstrip("/")
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
    reference = _base_of(reference)
    if reference.startswith(HUB_PREFIX) or not Path(reference).expanduser().exists():
        return None
    try:
        return open_checkpoint(reference).tensor_names()
    except CheckpointError:
        return None


def drop_unmatched(rules: list[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Rules that match no tensor of a local model change nothing: leave them out."""
    names = _local_tensor_names(reference) if rules else None
    if names is None:
        return rules
    return [r for r in rules if any(rule_matches(Rule(match=r["match"]), n) for n in names)]


def _layer_count(reference: str) -> int:
    return count_layers(open_checkpoint(_base_of(reference)).tensor_names())
