"""Weight-space comparison of two checkpoints, tensor by tensor (streaming)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from merge_cli.engine.executor import row_chunks
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.dtypes import is_float
from merge_cli.options import DEFAULT_CHUNK_BYTES
from merge_cli.progress import NullProgress, Progress


@dataclass(frozen=True)
class TensorDiff:
    name: str
    shape: tuple[int, ...]
    cosine: float
    relative_l2: float
    max_abs: float

    def as_dict(self) -> dict:
        return asdict(self)


def diff_checkpoints(
    a: Checkpoint,
    b: Checkpoint,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[TensorDiff]:
    """Cosine similarity, relative L2 distance ``|a-b|/|a|`` and max |a-b| per float tensor."""
    progress = progress or NullProgress()
    names = [n for n in a.tensor_names() if is_float(a.info(n).dtype)]
    missing = [n for n in names if n not in set(b.tensor_names())]
    if missing:
        raise PlanError(
            f"{b.source}: lacks {len(missing)} tensor(s) of {a.source}, e.g. {missing[0]!r}"
        )
    progress.start("comparing", sum(a.info(n).nbytes for n in names))
    rows = []
    for name in names:
        info = a.info(name)
        if b.info(name).shape != info.shape:
            raise PlanError(
                f"tensor {name!r}: shape {list(b.info(name).shape)} in {b.source} "
                f"differs from {list(info.shape)} in {a.source}"
            )
        dot = norm_a = norm_b = dist = 0.0
        max_abs = 0.0
        for chunk in row_chunks(info.shape, chunk_bytes, True):
            rows_arg = None if len(info.shape) == 0 else chunk
            x = a.read(name, rows_arg).double()
            y = b.read(name, rows_arg).double()
            dot += float((x * y).sum())
            norm_a += float((x * x).sum())
            norm_b += float((y * y).sum())
            delta = x - y
            dist += float((delta * delta).sum())
            max_abs = max(max_abs, float(delta.abs().max())) if delta.numel() else max_abs
        denominator = (norm_a**0.5) * (norm_b**0.5)
        cosine = dot / denominator if denominator > 0 else float(norm_a == norm_b)
        relative = dist**0.5 / norm_a**0.5 if norm_a > 0 else float(dist > 0) * float("inf")
        rows.append(TensorDiff(name, info.shape, cosine, relative, max_abs))
        progress.advance(info.nbytes)
    progress.finish()
    return rows
