"""Helpers shared by the evaluate tests."""

from __future__ import annotations

from pathlib import Path

from merge_cli.config import recipe_from_dict
from merge_cli.options import RunOptions

REPO = Path(__file__).resolve().parents[2]

DIGITS = f"{REPO}/recipes/tasks/digits.py"


def digits_recipe(models: dict, evaluate: list, **extra) -> object:
    """A recipe over digits MLPs (hidden 128, depth 2) with absolute paths."""
    return recipe_from_dict(
        {
            "models": {name: str(path) for name, path in models.items()},
            "task": {
                "model": f"{DIGITS}:build_mlp",
                "data": f"{DIGITS}:data",
                "params": {"hidden": 128, "depth": 2},
            },
            "evaluate": evaluate,
            **extra,
        }
    )


class RecordingProgress:
    """Records progress events: (kind, description or amount, total, unit)."""

    def __init__(self):
        self.events = []

    def start(self, description, total, unit="bytes"):
        self.events.append(("start", description, total, unit))

    def advance(self, amount):
        self.events.append(("advance", amount))

    def finish(self):
        self.events.append(("finish",))

    def note(self, text):
        self.events.append(("note", text))


def options(progress=None) -> RunOptions:
    return RunOptions(progress=progress or RecordingProgress())
