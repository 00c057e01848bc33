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
    """One input model: where it is and, optionally, its own task."""

    path: str
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


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "?"
        raise RecipeError(source, [f"{where}: invalid YAML: {error.problem}"]) from None
    except yaml.YAMLError as error:
        raise RecipeError(source, [f"invalid YAML: {error}"]) from None


def parse_recipe(
    raw: Any, source: str = "<recipe>", overrides: list[str] | None = None, out: str | None = None
) -> Recipe:
    """The schema-valid :class:`Recipe` of a mapping (after applying ``--set`` and ``--out``).

    Checks that need more than one key or a registry (model names, methods, parameters) are
    :func:`merge_cli.config.recipe_from_dict`'s."""
    if not isinstance(raw, dict):
        raise RecipeError(source, [f"expected a mapping of sections, got {type(raw).__name__}"])
    raw = apply_overrides(raw, overrides or [], source)
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
            value = yaml.safe_load(text)
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
        loc = [str(part) for part in item["loc"]]
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
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _suggest(key: str, candidates: list[str] | None = None) -> str:
    if candidates is None:
        candidates = _known_keys()
    match = difflib.get_close_matches(key, candidates, n=1, cutoff=0.75)
    return f"; did you mean {match[0]!r}?" if match else ""


def _known_keys() -> list[str]:
    keys: set[str] = set()
    for model in (
        Recipe,
        TaskSpec,
        ModelEntry,
        AlignSpec,
        Rule,
        FuseSpec,
        EvalSpec,
        SaveSpec,
        PushSpec,
    ):
        keys.update(model.model_fields)
    return sorted(keys)
