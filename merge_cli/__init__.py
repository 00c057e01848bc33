"""merge-cli: deep model fusion from the command line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from merge_cli.version import __version__

if TYPE_CHECKING:
    from torch import nn


__all__ = ["__version__", "load"]


def load(path: Any, task: Any = None, device: str = "cpu") -> nn.Module:
    """A merge-cli output as one ``nn.Module`` (see :func:`merge_cli.loading.load`)."""
    from merge_cli.loading import load as load_module

    return load_module(path, task, device)
