"""The recipe schema: pydantic models for format v1, YAML parsing, ``--set`` overrides and
schema error reports.

This module imports nothing of merge-cli but its errors. Reading a recipe file (mergekit
detection and translation, this schema, the cross-field checks) is
:mod:`merge_cli.config`'s; everything is validated there, once, before any tensor is read.
Errors name the file, the key path and what was expected, and one report lists every
problem in the file. The core receives a valid :class:`Recipe` and does not re-check it.
"""

from __future__ import annotations

import copy
import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from merge_cli.errors import RecipeError


class Strict(BaseModel):
    """Base of every recipe model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class TaskSpec(Strict):
    """What the models compute: needed by data-aware stages (alignment, evaluation, ...)."""

    model: str | None = Field(
        None,
        description='"module:function" or "file.py:function" returning an nn.Module, '
        'or "transformers" to build it from config.json',
    )
    data: str | None = Field(None, description='"module:function"(split) -> (inputs, targets)')
    loss: str = Field("cross_entropy", description="a built-in loss name or a function")
    params: dict[str, Any] = Field(default_factory=dict, description="keyword arguments")


class ModelEntry(Strict):
    """One input model: where it is, optionally a LoRA adapter applied to it on read, and
    optionally its own task."""

    path: str
    lora: str | None = Field(
        None, description="a PEFT LoRA adapter of `path` (a directory or hf://org/name@rev)"
    )
    task: TaskSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_reference(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value


class AlignSpec(Strict):
    method: str
    reference: str | None = None
    spec: str = "auto"
    repair: bool = False
    params: dict[str, Any] = Field(default_factory=dict)


class Rule(Strict):
    """Per-tensor parameter override; the first rule whose ``match`` fits a tensor wins."""

    match: str = Field(description='glob on the tensor name, or "re:" + a regular expression')
    params: dict[str, Any] = Field(default_factory=dict)
    models: dict[str, dict[str, Any]] = Field(default_factory=dict)

    @field_validator("match")
    @classmethod
    def _valid_regex(cls, value: str) -> str:
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as error:
                raise ValueError(f"invalid regular expression ({error})") from None
        return value


class FuseSpec(Strict):
    method: str
    base: str | None = None
    #: Fused models and their per-model parameters; a list of names is read as a mapping
    #: to empty parameters. When absent: every model except the base.
    models: dict[str, dict[str, Any]] | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    seed: int = 0
    #: Models with different vocabularies (added tokens): keep the base's, or merge them into
    #: their union (see fuse/vocab.py).
    tokenizer_source: Literal["base", "union"] | None = None
    #: What the fuse stage writes: a model (the default), or, when every fused model is a
    #: LoRA adapter of one base, one adapter combining them (PEFT's combinations).
    output: Literal["model", "adapter"] = "model"

    @field_validator("models", mode="before")
    @classmethod
    def _names_to_mapping(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(name, str) for name in value):
            return {name: {} for name in value}
        if isinstance(value, dict):
            return {name: {} if params is None else params for name, params in value.items()}
        return value

    def model_names(self, all_models: list[str]) -> list[str]:
        """Names of the fused models (all inputs except the base when not listed)."""
        if self.models is None:
            return [name for name in all_models if name != self.base]
        return list(self.models)

    def model_values(self, name: str) -> dict[str, Any]:
        return dict((self.models or {}).get(name) or {})


class ExtractSpec(Strict):
    """``merge-cli extract-lora`` as a recipe section: the LoRA adapter of ``base`` that best
    approximates ``model`` (truncated SVD of each weight matrix's task vector)."""

    model: str = Field(description="the fine-tuned (or merged) model: a name in models")
    base: str = Field(description="the base the adapter applies to: a name in models")
    rank: int = Field(ge=1, description="largest rank per matrix")
    sv_epsilon: float = Field(
        0.0, ge=0, lt=1, description="drop singular values below this fraction of the largest"
    )
    embeddings: bool = Field(False, description="LoRA pairs for embeddings (else kept whole)")


class EvalSpec(Strict):
    metric: str
    models: list[str] | None = None
    between: list[str] | None = None
    points: int = Field(11, ge=2)
    path: str = "linear"
    params: dict[str, Any] = Field(default_factory=dict)


class PushSpec(Strict):
    """Where ``save.push_to_hub`` uploads the finished output (a Hub model repository).

    ``save.push_to_hub: org/name`` is short for ``{repo_id: org/name}``."""

    repo_id: str = Field(description="the Hub model repository, org/name (created if absent)")
    private: bool | None = Field(
        None, description="create the repository private (absent: the Hub's default)"
    )
    revision: str | None = Field(None, description="branch to commit to (absent: main)")
    commit_message: str | None = Field(None, description="message of the upload's commit")


class SaveSpec(Strict):
    path: str
    dtype: Literal["float32", "float16", "bfloat16", "keep"] = "keep"
    shard_size: ByteSize = Field(ByteSize(5_000_000_000))
    copy_files: list[str] = Field(
        default_factory=lambda: [
            "config.json",
            "generation_config.json",
            "tokenizer*",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
            "*.model",
        ]
    )
    model_card: bool = True
    push_to_hub: PushSpec | None = None
    #: Requantize merged weights: ``fp8_block`` writes those the config source stores as
    #: block-scaled FP8 (DeepSeek-V3 layout) in that layout, with scales and
    #: quantization_config; unset writes plain floating point (``dtype``).
    quantize: Literal["fp8_block"] | None = None

    @field_validator("push_to_hub", mode="before")
    @classmethod
    def _repo_id_alone(cls, value: Any) -> Any:
        return {"repo_id": value} if isinstance(value, str) else value

    @field_validator("shard_size")
    @classmethod
    def _positive(cls, value: ByteSize) -> ByteSize:
        if value <= 0:
            raise ValueError("must be a positive size such as 5GB or 500MB")
        return value


@dataclass
class RecipeOrigin:
    """What a recipe was read from, set by :mod:`merge_cli.config`: the user's own files as
    written (name in the output directory -> text, saved beside the weights) and notes for
    the user (a mergekit value that has no effect in merge-cli, as in mergekit)."""

    files: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class Recipe(Strict):
    """A whole recipe (format v1)."""

    models: dict[str, ModelEntry] = Field(min_length=1)
    task: TaskSpec | None = None
    align: AlignSpec | None = None
    fuse: FuseSpec | None = None
    extract: ExtractSpec | None = None
    evaluate: list[EvalSpec] = Field(default_factory=list)
    save: SaveSpec | None = None
    _origin: RecipeOrigin = PrivateAttr(default_factory=RecipeOrigin)

    @property
    def origin(self) -> RecipeOrigin:
        """The files the recipe was read from and the warnings for the user (not schema)."""
        return self._origin

    def task_for(self, name: str | None) -> TaskSpec | None:
        """A model's own task if it has one, else the recipe's."""
        if name is not None and name in self.models and self.models[name].task is not None:
            return self.models[name].task
        return self.task


# ---------------------------------------------------------------------------------------
# Parsing (schema only; cross-field checks: merge_cli.checks, via merge_cli.config)


#: The deepest nesting a recipe may have (a real one has fewer than ten levels).
MAX_DEPTH = 64
#: The most values a recipe may hold once YAML aliases are expanded: an alias bomb (a few
#: lines whose aliases expand to billions of values) is refused before anything walks it.
MAX_VALUES = 100_000


class BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents nested deeper than MAX_DEPTH or holding more
    than MAX_VALUES values once aliases are expanded (and recursive aliases)."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"nested deeper than {MAX_DEPTH} levels",
                    self.peek_event().start_mark,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self) -> Any:
        node = super().compose_document()
        _expanded_size(node, 1, {}, set())
        return node


def _expanded_size(node: Any, level: int, sizes: dict[int, tuple[int, int]], open_: set[int]):
    """(values, height) of ``node`` with aliases expanded; refuses a document over the limits.

    Aliased nodes are shared, so each is measured once (``sizes``); ``open_`` holds the
    nodes on the current path, where meeting one again means a recursive alias."""
    key = id(node)
    if key in open_:
        raise yaml.composer.ComposerError(None, None, "recursive alias", node.start_mark)
    if key not in sizes:
        children: list[Any] = []
        if isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        open_.add(key)
        size, height = 1, 1
        for child in children:
            child_size, child_height = _expanded_size(child, level + 1, sizes, open_)
            size, height = size + child_size, max(height, child_height + 1)
            if size > MAX_VALUES:
                raise yaml.composer.ComposerError(
                    None,
                    None,
                    f"more than {MAX_VALUES} values once aliases are expanded",
                    node.start_mark,
                )
        open_.discard(key)
        sizes[key] = (size, height)
    if level + sizes[key][1] - 1 > MAX_DEPTH:
        raise yaml.composer.ComposerError(
            None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark
        )
    return sizes[key]


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` within MAX_DEPTH and MAX_VALUES."""
    loader = BoundedLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_yaml_documents(text: str) -> list[Any]:
    """Every document of a YAML stream, each within MAX_DEPTH and MAX_VALUES."""
    loader = BoundedLoader(text)
    try:
        documents = []
        while loader.check_data():
            documents.append(loader.get_data())
        return documents
    finally:
        loader.dispose()


def parse_yaml(text: str, source: str) -> Any:
    try:
        return load_yaml(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise RecipeError(source, [f"{where}: invalid YAML: {error.problem}"]) from None
    except yaml.YAMLError as error:
        raise RecipeError(source, [f"invalid YAML: {_cut(str(error), 200)}"]) from None


def non_finite_numbers(value: Any, where: str = "") -> list[str]:
    """A problem for every NaN or infinite number in ``value`` (a parsed recipe): ``.nan``,
    ``.inf`` and ``1e309`` are valid YAML but no valid weight, density or scale."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where or '(top level)'}: must be a finite number, got {value}"]
    problems = []
    if isinstance(value, dict):
        for key, item in value.items():
            name = _cut(str(key), 40)
            problems += non_finite_numbers(item, f"{where}.{name}" if where else name)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            problems += non_finite_numbers(item, f"{where}[{i}]")
    return problems


def parse_recipe(
    raw: Any, source: str = "<recipe>", overrides: list[str] | None = None, out: str | None = None
) -> Recipe:
    """The schema-valid :class:`Recipe` of a mapping (after applying ``--set`` and ``--out``).

    Checks that need more than one key or a registry (model names, methods, parameters) are
    :func:`merge_cli.config.recipe_from_dict`'s."""
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"expected a mapping of sections, got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides or [], source)
    problems = non_finite_numbers(raw)
    if problems:
        raise RecipeError(source, problems)
    if out is not None:
        raw.setdefault("save", {})
        if not isinstance(raw["save"], dict):
            raise RecipeError(source, ["save: expected a mapping"])
        raw["save"]["path"] = out
    try:
        return Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(source, format_validation_errors(error)) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides; values are parsed as YAML (numbers, lists, ...)."""
    raw = copy.deepcopy(raw)
    problems = []
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep or not key:
            problems.append(f"--set {override!r}: expected KEY.PATH=VALUE")
            continue
        try:
            value = load_yaml(text)
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if isinstance(child, list) and all(isinstance(x, str) for x in child):
                child = node[part] = {name: {} for name in child}  # list of names -> mapping
            if not isinstance(child, dict):
                problems.append(
                    f"--set {key}: {'.'.join(parts[: i + 1])} is not a mapping, cannot set a key"
                )
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise RecipeError(source, problems)
    return raw


def format_validation_errors(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        loc = [_cut(str(part), 40) for part in item["loc"]]
        where = ".".join(loc) or "(top level)"
        if item["type"] == "extra_forbidden":
            suggestion = _suggest(loc[-1]) if loc else ""
            problems.append(f"{where}: unknown key{suggestion}")
        elif item["type"] == "missing":
            hint = " (or pass --out DIR)" if where == "save.path" else ""
            problems.append(f"{where}: required key is missing{hint}")
        else:
            problems.append(f"{where}: {item['msg']}, got {_short(item.get('input'))}")
    return list(dict.fromkeys(problems))


def _short(value: Any) -> str:
    return _cut(repr(value), 60)


def _cut(text: str, limit: int) -> str:
    """``text``, or its first ``limit - 3`` characters and "..." when it is longer."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _suggest(key: str, candidates: list[str] | None = None) -> str:
    if candidates is None:
        candidates = _known_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return f"; did you mean {match[0]!r}?" if match else ""


def _known_keys() -> list[str]:
    keys: set[str] = set()
    models = (Recipe, TaskSpec, ModelEntry, AlignSpec, Rule, FuseSpec, ExtractSpec, EvalSpec)
    for model in (*models, SaveSpec, PushSpec):
        keys.update(model.model_fields)
    return sorted(keys)
