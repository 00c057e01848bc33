"""Reading a recipe: the file, mergekit detection and translation, the schema, and the
cross-field checks, in that order; the result is a :class:`~merge_cli.recipe.Recipe` that
every stage can trust.

``merge-cli run``, ``validate``, ``plan`` and ``eval`` all read their recipe here, so they
refuse the same recipes with the same report (one message per problem, naming the key).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from merge_cli.checks import check_recipe
from merge_cli.errors import RecipeError
from merge_cli.mergekit import is_mergekit_config, translate_mergekit
from merge_cli.recipe import Recipe, parse_recipe, parse_yaml


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, out: str | None = None
) -> Recipe:
    """Read, translate (a mergekit configuration), override and validate a recipe file;
    raise :class:`RecipeError` listing every problem."""
    source = str(path)
    raw = parse_yaml(_read(path, "the recipe"), source)
    if is_mergekit_config(raw):
        raw = translate_mergekit(raw, source)
    return recipe_from_dict(raw, source, overrides=overrides, out=out)


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


def convert_mergekit(path: str | Path, out: str | None = None) -> dict[str, Any]:
    """Read a mergekit configuration file and return the validated recipe v1 mapping.

    ``save.path`` is ``out`` when given; without it the recipe is checked as if an output
    directory had been given, and printed without one (``merge-cli run --out`` sets it).
    """
    source = str(path)
    raw = parse_yaml(_read(path, "the file"), source)
    if not is_mergekit_config(raw):
        raise RecipeError(source, ["merge_method: not a mergekit configuration (no merge_method)"])
    recipe = translate_mergekit(raw, source)
    if out is not None:
        recipe.setdefault("save", {})["path"] = out
    recipe_from_dict(recipe, source, out=out or "OUT")
    return recipe


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
