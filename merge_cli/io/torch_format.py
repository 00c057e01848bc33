"""PyTorch ``.bin`` / ``.pt`` state dicts, loaded safely.

Files are loaded with ``torch.load(weights_only=True)``, which refuses arbitrary pickled
objects, and memory-mapped where the file format allows it, so nothing beyond tensors,
containers and primitive values is ever unpickled.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import InMemoryCheckpoint, index_shard_files, require_regular_file

#: The first torch whose ``weights_only=True`` loader has no known way to run code
#: (CVE-2025-32434 before 2.6, CVE-2026-24747 before 2.10).
SAFE_TORCH = (2, 10)

#: Keys under which training frameworks nest the state dict (Lightning, many repos).
NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def load_torch_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.bin``/``.pt`` file without unpickling arbitrary objects."""
    require_regular_file(path)
    refuse_unsafe_torch(path)
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


def torch_version(version: str = torch.__version__) -> tuple[int, int]:
    """``"2.13.0+cpu"`` -> ``(2, 13)``."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def refuse_unsafe_torch(path: Path, version: str = torch.__version__) -> None:
    """Refuse to unpickle with a torch whose ``weights_only`` loader can be exploited."""
    if torch_version(version) < SAFE_TORCH:
        raise CheckpointError(
            f"{path}: refusing to unpickle with torch {version}: its weights_only loader can "
            f"run code from a crafted file; install torch>={SAFE_TORCH[0]}.{SAFE_TORCH[1]} "
            "or convert the checkpoint to safetensors"
        )


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
    return index_shard_files(index_path)
