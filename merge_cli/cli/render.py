"""How the command line shows things: rich progress bars, tables, sizes, JSON, errors.

Library code reports progress through :class:`merge_cli.progress.Progress`; this module
renders it. Errors are printed here too, so the commands share one format and exit codes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from merge_cli.errors import MergeCliError

console = Console()
errors = Console(stderr=True)


class RichProgress:
    """Renders library progress events as rich progress bars (on stderr)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar: Progress | None = None
        self._task: Any = None

    def start(self, description: str, total: int | None, unit: str = "bytes") -> None:
        if not self.enabled:
            return
        self.finish()
        columns: list[Any] = [TextColumn("[bold]{task.description}"), BarColumn()]
        if unit == "bytes":
            columns += [DownloadColumn(), TransferSpeedColumn()]
        else:
            columns += [TextColumn("{task.completed}/{task.total} " + unit)]
        columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = Progress(*columns, console=errors, transient=False)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def advance(self, amount: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, amount)

    def finish(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def note(self, text: str) -> None:
        if self.enabled:
            errors.print(f"[dim]{text}[/dim]")


def fail(error: MergeCliError, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"ok": False, "error": str(error), "kind": type(error).__name__}))
    else:
        errors.print(f"[bold red]error:[/bold red] {error}", highlight=False, markup=True)
    raise typer.Exit(error.exit_code)


def guarded(as_json: bool, action: Callable[[], Any]) -> Any:
    try:
        return action()
    except MergeCliError as error:
        fail(error, as_json)
    except KeyboardInterrupt:
        errors.print("[bold red]interrupted[/bold red]: nothing was written at the output path")
        raise typer.Exit(130) from None


def print_warnings(warnings: list[str]) -> None:
    """Warnings go to stderr, one line each (``--json`` payloads carry them too)."""
    for warning in warnings:
        errors.print(f"[yellow]warning[/yellow]: {warning}", highlight=False, soft_wrap=True)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def print_evaluation(rows: list[dict[str, Any]]) -> None:
    table = Table(title="evaluation")
    keys = list(dict.fromkeys(k for row in rows for k in row))
    for key in keys:
        table.add_column(key)
    for row in rows:
        table.add_row(*[_cell(row.get(k)) for k in keys])
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "" if value is None else str(value)
