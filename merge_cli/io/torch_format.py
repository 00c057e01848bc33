"""PyTorch ``.bin`` / ``.pt`` state dicts, loaded safely.

Files are loaded with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects, and memory-mapped where the file format allows it, so nothing beyond tensors,
containers and primitive values is ever unpickled.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import InMemoryCheckpoint

#: Keys under which training frameworks nest the state dict (Lightning, many repos).
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.bin``/``.pt`` file without unpickling arbitrary objects."""
    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path}: refusing to load — the file holds Python objects other than tensors, and "
            "merge-cli never unpickles arbitrary objects. Convert it to safetensors with the "
            f"code that wrote it. ({str(error).splitlines()[0]})"
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch state dict ({error})") from error
    return _find_state_dict(path, loaded)


def _find_state_dict(path: Path, loaded: object) -> dict[str, torch.Tensor]:
    if isinstance(loaded, dict):
        if loaded and all(isinstance(v, torch.Tensor) for v in loaded.values()):
            return dict(loaded)
        for key in NESTED_STATE_DICT_KEYS:
            nested = loaded.get(key)
            if isinstance(nested, dict) and all(
                isinstance(v, torch.Tensor) for v in nested.values()
            ):
                return dict(nested)
    raise CheckpointError(
        f"{path}: expected a state dict (a mapping of names to tensors, possibly under "
        f"{', '.join(repr(k) for k in NESTED_STATE_DICT_KEYS)}), found {type(loaded).__name__}"
    )


def open_torch_checkpoint(files: list[Path], source: str, directory: Path | None):
    """One or more ``.bin``/``.pt`` shards as a checkpoint (tensors memory-mapped)."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        for name, tensor in load_torch_file(file).items():
            if name in tensors:
                raise CheckpointError(f"{source}: tensor {name!r} appears in two shards")
            tensors[name] = tensor
    return InMemoryCheckpoint(tensors, source=source, directory=directory)


def torch_index_files(index_path: Path) -> list[Path]:
    """Shard files named by a ``pytorch_model.bin.index.json``."""
    return _index_files(index_path)


def _index_files(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a valid shard index ({error})") from error
    names = list(dict.fromkeys(weight_map.values()))
    files = [index_path.parent / name for name in names]
    for file in files:
        if not file.exists():
            raise CheckpointError(f"{index_path}: names shard {file.name}, which does not exist")
    return files
