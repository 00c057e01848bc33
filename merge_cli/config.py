"""Reading a recipe: the file, mergekit detection and translation, the schema, and the
cross-field checks, in that order; the result is a :class:`~merge_cli.recipe.Recipe` that
every stage can trust.

``merge-cli run``, ``validate``, ``plan`` and ``eval`` all read their recipe here, so they
refuse the same recipes with the same report (one message per problem, naming the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from merge_cli.checks import check_recipe
from merge_cli.errors import RecipeError
from merge_cli.mergekit import (
    is_mergekit_config,
    is_mergekit_moe_config,
    translate_with_warnings,
    user_keys,
)
from merge_cli.recipe import Recipe, load_yaml_documents, parse_recipe, parse_yaml
from merge_cli.save import MERGEKIT_FILE, RECIPE_FILE


def load_recipe(
    path: str | Path,
    overrides: list[str] | None = None,
    out: str | None = None,
    push_to_hub: str | None = None,
    require_output: bool = True,
) -> Recipe:
    """Read, translate (a mergekit configuration), override and validate a recipe file;
    raise :class:`RecipeError` listing every problem.

    ``push_to_hub`` (``run --push-to-hub``) sets ``save.push_to_hub``'s repository, keeping
    the file's other upload settings. The file as written is kept on the recipe
    (:attr:`Recipe.origin`) and saved beside the weights: ``merge_recipe.yaml``, or, for a
    mergekit configuration, ``mergekit_config.yml`` and the translated ``merge_recipe.yaml``.
    ``require_output=False`` (``validate``, ``plan``) checks a mergekit configuration, which
    has no output path (``run --out`` gives it), as if one had been given.
    """
    source = str(path)
    text = _read(path, "the recipe")
    raw = _parse(text, source)
    files = {RECIPE_FILE: text}
    warnings: list[str] = []
    key_map: dict[str, str] = {}
    if is_mergekit_config(raw):
        raw, warnings, key_map = translate_with_warnings(raw, source)
        if out is None and not require_output and "path" not in raw.get("save", {}):
            out = UNSET_OUTPUT
        files = {
            MERGEKIT_FILE: text,
            RECIPE_FILE: f"# translated by merge-cli from {MERGEKIT_FILE}\n"
            + yaml.safe_dump(raw, sort_keys=False),
        }
    if push_to_hub is not None:
        raw = _with_push_target(raw, push_to_hub)
    try:
        recipe = recipe_from_dict(raw, source, overrides=overrides, out=out)
    except RecipeError as error:
        if not key_map:
            raise
        raise RecipeError(source, user_keys(error.problems, key_map)) from None
    recipe.origin.files.update(files)
    recipe.origin.warnings.extend(f"{source}: {warning}" for warning in warnings)
    return recipe


#: save.path while checking a mergekit configuration without --out (never written to).
UNSET_OUTPUT = "<--out DIR>"


def _with_push_target(raw: Any, repo_id: str) -> Any:
    if not isinstance(raw, dict):
        return raw  # parse_recipe reports it
    raw = dict(raw)
    save = raw.get("save")
    save = dict(save) if isinstance(save, dict) else {}
    current = save.get("push_to_hub")
    save["push_to_hub"] = {**current, "repo_id": repo_id} if isinstance(current, dict) else repo_id
    raw["save"] = save
    return raw


def recipe_from_dict(
    raw: Any, source: str = "<recipe>", overrides: list[str] | None = None, out: str | None = None
) -> Recipe:
    """Validate a recipe given as a mapping (after applying ``--set`` and ``--out``): the
    schema, then every cross-field check."""
    recipe = parse_recipe(raw, source, overrides=overrides, out=out)
    problems = check_recipe(recipe)
    if problems:
        raise RecipeError(source, problems)
    return recipe


def convert_mergekit(path: str | Path, out: str | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a mergekit configuration file; return the validated recipe v1 mapping and the
    warnings for the user (see :func:`merge_cli.mergekit.translate_with_warnings`).

    ``save.path`` is ``out`` when given; without it the recipe is checked as if an output
    directory had been given, and printed without one (``merge-cli run --out`` sets it).
    """
    source = str(path)
    raw = _parse(_read(path, "the file"), source)
    if not is_mergekit_config(raw):
        raise RecipeError(source, ["merge_method: not a mergekit configuration (no merge_method)"])
    recipe, warnings, key_map = translate_with_warnings(raw, source)
    if out is not None:
        recipe.setdefault("save", {})["path"] = out
    try:
        recipe_from_dict(recipe, source, out=out or UNSET_OUTPUT)
    except RecipeError as error:
        raise RecipeError(source, user_keys(error.problems, key_map)) from None
    return recipe, [f"{source}: {warning}" for warning in warnings]


def _parse(text: str, source: str) -> Any:
    """The one YAML document of a recipe file; mergekit's other formats (several documents:
    mergekit-multi; ``experts``: mergekit-moe) get a message saying what they are."""
    try:
        raw = parse_yaml(text, source)
    except RecipeError as invalid:
        try:
            documents = [doc for doc in load_yaml_documents(text) if doc is not None]
        except yaml.YAMLError:
            raise invalid from None
        if len(documents) > 1:
            raise RecipeError(
                source,
                [
                    f"{len(documents)} YAML documents: a mergekit-multi configuration (named "
                    "stages referring to earlier ones) is not supported by merge-cli; run each "
                    "stage as its own file (`merge-cli run STAGE.yml --out DIR`), naming an "
                    "earlier stage's output directory as a model"
                ],
            ) from None
        raise
    if is_mergekit_moe_config(raw):
        raise RecipeError(
            source,
            [
                "experts: a mergekit-moe configuration is not read by merge-cli; write a "
                "recipe with `fuse: {method: moe}` (base, experts as fuse.models with their "
                "positive_prompts, params gate_mode and num_experts_per_tok; "
                "`merge-cli methods` lists them)"
            ],
        )
    return raw


#: The largest recipe read (a real one is a few kilobytes; a mergekit one with many slices,
#: tens).
MAX_RECIPE_BYTES = 1 << 20


def _read(path: str | Path, what: str) -> str:
    try:
        with open(path, "rb") as handle:
            data = handle.read(MAX_RECIPE_BYTES + 1)
    except OSError as error:
        raise RecipeError(str(path), [f"cannot read {what} ({error.strerror or error})"]) from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(str(path), [f"{what} is larger than {MAX_RECIPE_BYTES} bytes"])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise RecipeError(
            str(path), [f"{what} is not UTF-8 text (byte {error.start}: {data[error.start]:#04x})"]
        ) from None
