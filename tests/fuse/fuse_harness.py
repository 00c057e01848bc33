"""Run a fuse method through the real pipeline (plan, executor, writer) on small tensors.

Used by the method tests: ``merge(tmp_path, "ties", {"base": {...}, "a": {...}}, ...)``
writes each model as a safetensors file, runs the recipe with the given chunk budget and
returns the merged tensors.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from merge_cli.config import recipe_from_dict
from merge_cli.io import open_checkpoint
from merge_cli.io.checkpoint import read_state_dict
from merge_cli.options import RunOptions
from merge_cli.pipeline import run

_counter = itertools.count()


def merge(
    tmp_path: Path,
    method: str,
    models: dict[str, dict[str, torch.Tensor]],
    *,
    base: str | None = "base",
    fused: dict[str, dict[str, Any]] | None = None,
    params: dict[str, Any] | None = None,
    chunk_bytes: int = 32 * 2**20,
    seed: int = 0,
    extra: dict[str, Any] | None = None,
) -> dict[str, torch.Tensor]:
    """Merge ``models`` (name -> state dict, float32 kept) with ``method``; return the result."""
    run_dir = tmp_path / f"run{next(_counter)}"
    run_dir.mkdir()
    paths = {}
    for name, state in models.items():
        paths[name] = run_dir / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[name]))
    fuse: dict[str, Any] = {"method": method, "params": params or {}, "seed": seed}
    if base is not None:
        fuse["base"] = base
    if fused is not None:
        fuse["models"] = fused
    fuse.update(extra or {})
    raw = {
        "models": {name: str(path) for name, path in paths.items()},
        "fuse": fuse,
        "save": {"path": str(run_dir / "out"), "dtype": "float32", "model_card": False},
    }
    recipe = recipe_from_dict(raw)
    result = run(recipe, RunOptions(chunk_bytes=chunk_bytes))
    assert result.output is not None
    return read_state_dict(open_checkpoint(str(result.output)))


def chunked_equals_whole(
    tmp_path: Path, method: str, models: dict[str, dict[str, torch.Tensor]], **kwargs: Any
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The merge computed whole and with a chunk budget of a few rows (16 bytes)."""
    whole = merge(tmp_path, method, models, **kwargs)
    chunked = merge(tmp_path, method, models, chunk_bytes=16, **kwargs)
    return whole, chunked


def random_models(
    names: list[str], shapes: dict[str, tuple[int, ...]], seed: int = 0, scale: float = 0.1
) -> dict[str, dict[str, torch.Tensor]]:
    """A base (first name) and fine-tune-like variants: base + scale * noise."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(shape, generator=generator) for k, shape in shapes.items()}
    models = {names[0]: base}
    for name in names[1:]:
        models[name] = {
            k: v + scale * torch.randn(v.shape, generator=generator) for k, v in base.items()
        }
    return models
