"""The ``merge-cli`` command line: commands (:mod:`.app`), how they show results
(:mod:`.render`) and the process's allocator settings (:mod:`.allocator`)."""

from __future__ import annotations

from merge_cli.cli.app import app, main

__all__ = ["app", "main"]
