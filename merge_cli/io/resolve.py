"""Turn a model reference from a recipe into a lazy :class:`Checkpoint`.

A reference is a directory (safetensors shards with or without an index, or a PyTorch
state dict), a single ``.safetensors`` / ``.bin`` / ``.pt`` file, or a Hugging Face Hub repo
written ``hf://org/name@revision``.
"""

from __future__ import annotations

import os
from pathlib import Path

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint, SafetensorsCheckpoint, index_shard_files
from merge_cli.io.torch_format import open_torch_checkpoint, torch_index_files

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
HUB_PREFIX = "hf://"
#: Files fetched from the Hub: weights, configs, tokenizers, the card (its license goes into
#: the merged model's card). Never code.
HUB_PATTERNS = [
    "README.md",
    "*.safetensors",
    "*.json",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
]


def open_checkpoint(reference: str, base_dir: Path | None = None) -> Checkpoint:
    """Resolve ``reference`` (relative paths against ``base_dir``) to a checkpoint.

    Only headers are read: names, shapes and dtypes are known, no tensor data is touched.
    """
    if reference.startswith(HUB_PREFIX):
        return _open_path(download_hub_repo(reference), reference)
    path = Path(reference).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.exists():
        raise CheckpointError(f"{reference}: no such file or directory ({path})")
    return _open_path(path, reference)


def _open_path(path: Path, source: str) -> Checkpoint:
    if path.is_file():
        if path.suffix == ".safetensors":
            return SafetensorsCheckpoint([path], source, path.parent)
        if path.suffix in (".bin", ".pt", ".pth"):
            return open_torch_checkpoint([path], source, path.parent)
        raise CheckpointError(
            f"{source}: unsupported file type {path.suffix!r} "
            "(expected .safetensors, .bin, .pt or a directory)"
        )
    if (path / SAFETENSORS_INDEX).exists():
        return SafetensorsCheckpoint(index_shard_files(path / SAFETENSORS_INDEX), source, path)
    shards = sorted(path.glob("*.safetensors"))
    if shards:
        return SafetensorsCheckpoint(shards, source, path)
    if (path / TORCH_INDEX).exists():
        return open_torch_checkpoint(torch_index_files(path / TORCH_INDEX), source, path)
    torch_files = sorted([*path.glob("*.bin"), *path.glob("*.pt"), *path.glob("*.pth")])
    if torch_files:
        return open_torch_checkpoint(torch_files, source, path)
    raise CheckpointError(f"{source}: directory {path} holds no .safetensors, .bin or .pt weights")


def parse_hub_reference(reference: str) -> tuple[str, str | None]:
    """``hf://org/name@rev`` -> ``("org/name", "rev")``; the revision is optional."""
    body = reference.removeprefix(HUB_PREFIX)
    repo_id, _, revision = body.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise CheckpointError(f"{reference}: expected hf://org/name or hf://org/name@revision")
    return repo_id, revision or None


def download_hub_repo(reference: str) -> Path:
    """Fetch a Hub repo's weights, configs and tokenizer files (never code); return its path.

    Honours the local cache and ``HF_HUB_OFFLINE``: offline, only cached snapshots are used.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo_id, revision = parse_hub_reference(reference)
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        path = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_PATTERNS,
                local_files_only=offline,
            )
        )
        if not any(path.glob("*.safetensors")):
            path = Path(
                snapshot_download(
                    repo_id,
                    revision=revision,
                    allow_patterns=[*HUB_PATTERNS, "*.bin", "*.pt"],
                    local_files_only=offline,
                )
            )
    except LocalEntryNotFoundError as error:
        hint = " (HF_HUB_OFFLINE is set: download it once online first)" if offline else ""
        raise CheckpointError(f"{reference}: not in the local Hub cache{hint}") from error
    except HfHubHTTPError as error:
        raise CheckpointError(f"{reference}: Hub download failed: {error}") from error
    except Exception as error:  # huggingface_hub raises many kinds (repo not found, revision...)
        raise CheckpointError(f"{reference}: cannot fetch from the Hub: {error}") from error
    return path
