"""Progress reporting interface.

Library code reports progress through a :class:`Progress` object it is given; only the CLI
renders it (as rich progress bars). The default does nothing.
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def start(self, description: str, total: int | None, unit: str = "bytes") -> None:
        """Begin a task of ``total`` units (None when unknown)."""

    def advance(self, amount: int) -> None:
        """``amount`` more units of the current task are done."""

    def finish(self) -> None:
        """The current task is complete."""

    def note(self, text: str) -> None:
        """A one-line message for the user (a stage starting, a cache hit, ...)."""


class NullProgress:
    """Reports nothing."""

    def start(self, description: str, total: int | None, unit: str = "bytes") -> None:
        pass

    def advance(self, amount: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def note(self, text: str) -> None:
        pass
