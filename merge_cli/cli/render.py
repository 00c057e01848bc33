"""How the command line shows things: rich progress bars, tables, sizes, JSON, errors.

Library code reports progress through :class:`merge_cli.progress.Progress`; this module
renders it. Errors are printed here too, so the commands share one format and exit codes.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
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
#: Signals that end a run the way Ctrl-C does: timeout, docker stop, SLURM and Kubernetes
#: preemption (SIGTERM), a closed terminal (SIGHUP).
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


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


def fail(error: MergeCliError, as_json: bool, command: str | None = None) -> None:
    if as_json:
        print(
            json.dumps(
                {
                    "ok": False,
                    "command": command,
                    "error": str(error),
                    "kind": type(error).__name__,
                }
            )
        )
    else:
        # soft_wrap: one long line, as logs and CI want; lone surrogates (from undecodable
        # file names) are shown escaped instead of failing to encode
        text = str(error).encode("utf-8", "backslashreplace").decode("utf-8")
        errors.print(f"[bold red]error:[/bold red] {escape(text)}", highlight=False, soft_wrap=True)
    raise typer.Exit(error.exit_code)


@contextmanager
def stop_signals_interrupt(received: list[int]) -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise KeyboardInterrupt (as Ctrl-C does), so a
    stopped run cleans up its staging directory and lock; the signal is appended to
    ``received``. The previous handlers come back when the block ends. Outside the main
    thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number: int, _frame: object) -> None:
        received.append(number)
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in STOP_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def guarded(as_json: bool, action: Callable[[], Any], command: str | None = None) -> Any:
    """``action()``; a merge-cli error is printed (in the JSON envelope of ``command`` with
    ``as_json``) and ends the command with the error's exit code. Ctrl-C, SIGTERM and SIGHUP
    end it with 128 + the signal's number, after the action has cleaned up."""
    received: list[int] = []
    try:
        with stop_signals_interrupt(received):
            return action()
    except MergeCliError as error:
        fail(error, as_json, command)
    except KeyboardInterrupt:
        name = signal.Signals(received[0]).name if received else "interrupted"
        errors.print(f"[bold red]{name}[/bold red]: nothing was written at the output path")
        raise typer.Exit(128 + (received[0] if received else signal.SIGINT)) from None


def print_warnings(warnings: list[str]) -> None:
    """Warnings go to stderr, one line each (``--json`` payloads carry them too)."""
    for warning in warnings:
        errors.print(
            f"[yellow]warning[/yellow]: {escape(warning)}", highlight=False, soft_wrap=True
        )


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


def print_envelope(command: str, payload: dict[str, Any]) -> None:
    """A command's ``--json`` output: one object, ``{"ok": true, "command": NAME, ...}``
    with the command's fields (errors: ``{"ok": false, "command", "error", "kind"}``)."""
    print_json({"ok": True, "command": command, **payload})


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
