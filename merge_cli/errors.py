"""Typed errors raised by library code.

Only ``merge_cli.cli`` prints errors and picks exit codes; everything else raises one of
these, with a message that says what went wrong, where, and (when it can) what to do.
"""

from __future__ import annotations


class MergeCliError(Exception):
    """Base class of every error merge-cli reports to the user."""

    exit_code = 1


class RecipeError(MergeCliError):
    """The recipe (or a `--set` override) is invalid. Lists every problem at once (the
    first MAX_PROBLEMS of them: a hostile recipe may hold thousands)."""

    exit_code = 2
    MAX_PROBLEMS = 50

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = [f"{source}: {p}" for p in problems[: self.MAX_PROBLEMS]]
        if len(problems) > self.MAX_PROBLEMS:
            lines.append(f"{source}: ... and {len(problems) - self.MAX_PROBLEMS} more problems")
        super().__init__("\n".join(lines))


class CheckpointError(MergeCliError):
    """A checkpoint is missing, unreadable, corrupt, or lacks a tensor."""


class PlanError(MergeCliError):
    """The inputs cannot be merged as asked (missing tensor, shape mismatch, ...)."""


class OutputError(MergeCliError):
    """The output cannot be written (exists already, disk full, ...)."""


class TaskError(MergeCliError):
    """A `task` entry (model builder, data, loss) cannot be loaded or used."""


class PublishError(MergeCliError):
    """The output cannot be uploaded (offline, no token, the Hub refused it)."""
