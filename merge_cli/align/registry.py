"""The alignment registry's entry type.

An aligner is a plain function ``(checkpoints, reference, spec, params, context) ->
{model name: {group name: UnitMap}}`` plus one :class:`Aligner` entry saying what it needs
and which parameters it takes (a pydantic model, validated when the recipe is loaded).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel


@dataclass(frozen=True)
class Aligner:
    name: str
    summary: str
    reference: str
    align: Callable[..., dict[str, dict[str, Any]]]
    params: type[BaseModel]
    #: (validated params) -> whether the method needs task.model and task.data
    needs_data: Callable[[Any], bool]
    #: True when the reference is mapped too and only a uniform linear fuse is meaningful.
    zips: bool = False
