"""The options of one run, shared by every stage (what the command line sets besides the
recipe)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from merge_cli.progress import NullProgress, Progress

#: Row-chunk budget per input tensor (float32 bytes); ``--chunk-mb`` overrides it.
DEFAULT_CHUNK_BYTES = 8 * 2**20


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    overwrite: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: Progress = field(default_factory=NullProgress)
    #: CPU threads for compute (None: all cores but one, at most 4; executor.compute_threads).
    threads: int | None = None
    #: Files the output may not be or contain besides the inputs (the recipe file).
    protected: tuple[Path, ...] = ()
    #: Write outputs with NaN or infinite values instead of failing.
    allow_nonfinite: bool = False
