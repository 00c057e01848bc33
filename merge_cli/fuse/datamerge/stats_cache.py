"""On-disk caches of per-model data statistics (Fisher diagonals, Gram matrices).

A statistic depends on the model's weights, the examples it is computed on and the
method's parameters; the cache key hashes all three (the weights' and examples' bytes, not
file names or paths), so a changed checkpoint, data set or parameter recomputes and an
unchanged one is read back instead of running the model again.

The cache lives beside the input, ``<model dir>/.merge-cli-cache/<kind>-<key>.safetensors``,
so it travels with the checkpoint. Where that directory cannot be written (a read-only
mount, an in-memory checkpoint) it goes to ``$MERGE_CLI_CACHE`` or ``~/.cache/merge-cli``.
Files are written under a temporary name and renamed, so an interrupted run never leaves a
partial cache. Statistics are read back one tensor at a time (:func:`read_statistic`), so
merging holds one layer's statistics per model in memory, not the whole model's. A method's
``cache: false`` neither reads nor writes a cache: the statistics are computed and held in
memory for the merge, and nothing is left on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_cli.errors import OutputError
from merge_cli.io.checkpoint import Checkpoint

CACHE_DIR_NAME = ".merge-cli-cache"
#: Bump when the meaning of a cached statistic changes.
FORMAT_VERSION = 1


def fingerprint(*parts: Any) -> str:
    """SHA-256 of nested tensors, mappings, sequences and scalars (order-sensitive)."""
    digest = hashlib.sha256()

    def feed(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(memoryview(tensor.view(torch.uint8).numpy()))
        elif isinstance(value, Mapping):
            digest.update(b"{")
            for key in value:
                feed(str(key))
                feed(value[key])
            digest.update(b"}")
        elif isinstance(value, list | tuple):
            digest.update(b"[")
            for item in value:
                feed(item)
            digest.update(b"]")
        else:
            digest.update(repr(value).encode())

    feed([FORMAT_VERSION, *parts])
    return digest.hexdigest()[:24]


def checkpoint_fingerprint(checkpoint: Checkpoint) -> str:
    """Fingerprint of a checkpoint's tensors (names, dtypes, shapes and bytes), streamed."""
    digest = hashlib.sha256()
    for name in checkpoint.tensor_names():
        digest.update(fingerprint(name, checkpoint.read(name)).encode())
    return digest.hexdigest()[:24]


def fallback_dir() -> Path:
    """The cache directory used when the inputs' directory is not writable."""
    configured = os.environ.get("MERGE_CLI_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "merge-cli"


def cache_dirs(checkpoint: Checkpoint) -> list[Path]:
    """Where ``checkpoint``'s statistics may be cached, in order of preference."""
    places = []
    if checkpoint.directory is not None:
        places.append(Path(checkpoint.directory) / CACHE_DIR_NAME)
    places.append(fallback_dir())
    return places


@dataclass(frozen=True)
class CachedStatistics:
    """A statistics file and whether it was read from the cache (``hit``) or computed; or,
    without a cache, the statistics themselves (``path`` None)."""

    path: Path | None
    hit: bool
    tensors: Mapping[str, torch.Tensor] | None = None

    def names(self) -> list[str]:
        if self.tensors is not None:
            return list(self.tensors)
        with safe_open(str(self.path), framework="pt") as handle:
            return list(handle.keys())  # noqa: SIM118 - safe_open is not a dict

    def read(self, name: str) -> torch.Tensor:
        if self.tensors is not None:
            return self.tensors[name]
        assert self.path is not None
        return read_statistic(self.path, name)


def read_statistic(path: Path, name: str) -> torch.Tensor:
    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name)


def cached_statistics(
    checkpoint: Checkpoint,
    kind: str,
    key: str,
    compute: Callable[[], dict[str, torch.Tensor]],
    metadata: dict[str, Any] | None = None,
    use_cache: bool = True,
) -> CachedStatistics:
    """Read ``<kind>-<key>.safetensors`` from a cache directory, or compute and store it.

    With ``use_cache`` false the statistics are computed and kept in memory: no cache is
    read or written.
    """
    file_name = f"{kind}-{key}.safetensors"
    if not use_cache:
        tensors = {name: t.detach().cpu().contiguous() for name, t in compute().items()}
        return CachedStatistics(None, hit=False, tensors=tensors)
    for directory in cache_dirs(checkpoint):
        if (directory / file_name).is_file():
            return CachedStatistics(directory / file_name, hit=True)
    tensors = {name: t.detach().cpu().contiguous() for name, t in compute().items()}
    info = {"merge_cli": json.dumps(metadata or {}, sort_keys=True, default=str)}
    last_error: OSError | None = None
    for directory in cache_dirs(checkpoint):
        target = directory / file_name
        temp = directory / f".{file_name}.{os.getpid()}.tmp"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            save_file(tensors, str(temp), metadata=info)
            os.replace(temp, target)
            return CachedStatistics(target, hit=False)
        except OSError as error:
            last_error = error
            with contextlib.suppress(OSError):
                temp.unlink(missing_ok=True)
    raise OutputError(
        f"cannot write the {kind} statistics of {checkpoint.source} to any cache directory "
        f"({', '.join(map(str, cache_dirs(checkpoint)))}): {last_error}; set MERGE_CLI_CACHE "
        "to a writable directory"
    )
