"""Reading and writing checkpoints: lazy inputs, streaming sharded output."""

from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint, TensorInfo
from merge_cli.io.resolve import open_checkpoint

__all__ = ["Checkpoint", "InMemoryCheckpoint", "TensorInfo", "open_checkpoint"]
