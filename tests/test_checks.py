"""Cross-field checks: a recipe key that would do nothing is an error."""

from __future__ import annotations

import pytest

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError


def test_push_to_hub_says_it_is_not_available():
    raw = {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "fuse": {"method": "linear"},
        "save": {"path": "out", "push_to_hub": "org/merged"},
    }
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert len(error.value.problems) == 1
    assert error.value.problems[0].startswith(
        "save.push_to_hub: uploading to the Hub is not available in this version of merge-cli"
    )
