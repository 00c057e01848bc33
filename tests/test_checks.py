"""Cross-field checks: a recipe key that would do nothing is an error."""

from __future__ import annotations

import pytest

from merge_cli.config import recipe_from_dict
from merge_cli.errors import RecipeError


def test_push_to_hub_is_checked_with_the_recipe():
    """save.push_to_hub uploads now (tests/io/test_hub.py): the recipe check accepts a
    repository id, as a string or a mapping, and names a malformed one."""
    raw = {
        "models": {"a": "a.safetensors", "b": "b.safetensors"},
        "fuse": {"method": "linear"},
        "save": {"path": "out", "push_to_hub": "org/merged"},
    }
    assert recipe_from_dict(raw).save.push_to_hub.repo_id == "org/merged"
    raw["save"]["push_to_hub"] = {"repo_id": "org/merged", "private": True, "revision": "v1"}
    push = recipe_from_dict(raw).save.push_to_hub
    assert (push.repo_id, push.private, push.revision) == ("org/merged", True, "v1")
    raw["save"]["push_to_hub"] = "merged"
    with pytest.raises(RecipeError) as error:
        recipe_from_dict(raw)
    assert error.value.problems == [
        "save.push_to_hub.repo_id: expected org/name (a user or organization, a slash, a "
        "name), got 'merged'"
    ]
