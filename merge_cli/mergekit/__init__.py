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

A per-model ``weight`` that mergekit accepts and ignores (slerp, karcher, model_stock, sce,
nearswap, ram, ramplus_tl) is dropped with a warning (:func:`translate_with_warnings`).
Anything else (``modules``, ``tokenizer``, ``chat_template``, ``tokenizer_source: MODEL``,
LoRA references, partial-range
merges, ``residual_weight``, unknown methods or keys) fails with a :class:`RecipeError` that
names the key as the user wrote it (:func:`user_keys` maps the translated recipe's keys
back). Model references: a path that exists stays local, ``org/name[@rev]`` becomes
``hf://org/name[@rev]``.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

from merge_cli.mergekit.methods import MERGEKIT_METHODS, MergekitMethod
from merge_cli.mergekit.translate import Translator

__all__ = [
    "MERGEKIT_METHODS",
    "MergekitMethod",
    "is_mergekit_config",
    "is_mergekit_moe_config",
    "translate_mergekit",
    "translate_with_warnings",
    "user_keys",
]


def is_mergekit_config(raw: Any) -> bool:
    """Whether a parsed YAML document is a mergekit configuration (it has ``merge_method``)."""
    return isinstance(raw, dict) and "merge_method" in raw


def is_mergekit_moe_config(raw: Any) -> bool:
    """Whether a parsed YAML document is a mergekit-moe configuration (``experts``, no
    ``merge_method`` or ``models``)."""
    return (
        isinstance(raw, dict)
        and "experts" in raw
        and "merge_method" not in raw
        and "models" not in raw
    )


def translate_mergekit(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The recipe v1 mapping equivalent to mergekit configuration ``raw``.

    Raises :class:`~merge_cli.errors.RecipeError` naming every key merge-cli cannot honour.
    """
    return translate_with_warnings(raw, source).recipe


class Translation(NamedTuple):
    """A translated configuration: the recipe mapping, warnings for the user (each naming
    the key as written: a value mergekit accepts and ignores, which merge-cli ignores too),
    and where each translated key came from (see :func:`user_keys`)."""

    recipe: dict[str, Any]
    warnings: list[str]
    key_map: dict[str, str]


def translate_with_warnings(raw: dict[str, Any], source: str) -> Translation:
    """:func:`translate_mergekit`, with the warnings and the key map."""
    translator = Translator(raw, source)
    recipe = translator.translate()
    return Translation(recipe, translator.warnings, translator.key_map)


#: A key path of a recipe in a message (``fuse.models.a.scale``, ``fuse.rules[0].params``).
_KEY = re.compile(r"(?<![\w.])(?:fuse|models|save)(?:\.[\w-]+|\[\d+\])+")


def user_keys(problems: list[str], key_map: dict[str, str]) -> list[str]:
    """Problems found in a translated recipe, with every key path in them rewritten to where
    the user wrote it (the longest translated prefix wins; unmapped paths stay)."""
    prefixes = sorted(key_map, key=len, reverse=True)

    def rewrite(found: re.Match[str]) -> str:
        path = found.group(0)
        for prefix in prefixes:
            if path == prefix or path.startswith((prefix + ".", prefix + "[")):
                return key_map[prefix] + path[len(prefix) :]
        return path

    return [_KEY.sub(rewrite, problem) for problem in problems]
