"""Models whose vocabularies differ (added tokens): the ``fuse.tokenizer_source`` policy.

Fine-tunes often add tokens, which grows the embedding and lm_head by rows. By default the
plan refuses such inputs with a :class:`~merge_cli.errors.PlanError` naming the tensor and
both shapes. With ``fuse.tokenizer_source: base`` (the name mergekit users know) the output
keeps the *reference* model's vocabulary: ``fuse.base``, or the first fused model without
one. Each other model's vocabulary-indexed tensors are seen resized to the reference's rows:

* rows past the reference's vocabulary (the model's added tokens) are dropped;
* rows the model lacks (tokens only the reference has) are taken from the reference, so the
  model contributes nothing there (a zero task vector, or the reference's row in an average).

This assumes shared tokens have the same ids and added tokens come after them, which is how
tokenizers grow; mergekit instead maps rows through the tokenizers' vocabularies, which
merge-cli does not read. Only tensors named like embeddings or output heads whose other
dimensions agree are resized; any other shape mismatch is still an error.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from merge_cli.io.checkpoint import Checkpoint, TensorInfo

#: Names of vocabulary-indexed tensors (rows = tokens) in common architectures.
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|"
    r"output|shared)(\.weight)?$"
)


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


class VocabResized:
    """A checkpoint whose vocabulary-indexed tensors have the reference's row count."""

    def __init__(self, inner: Checkpoint, reference: Checkpoint, names: set[str]):
        self.inner = inner
        self.reference = reference
        self.resized = names
        self.source = inner.source
        self.directory: Path | None = inner.directory

    def tensor_names(self) -> list[str]:
        return self.inner.tensor_names()

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if name not in self.resized:
            return info
        return TensorInfo(name, self.reference.info(name).shape, info.dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.resized:
            return self.inner.read(name, rows)
        start, stop = rows if rows is not None else (0, self.reference.info(name).shape[0])
        own_rows = self.inner.info(name).shape[0]
        parts = []
        if start < own_rows:
            parts.append(self.inner.read(name, (start, min(stop, own_rows))))
        if stop > own_rows:
            padding = self.reference.read(name, (max(start, own_rows), stop))
            parts.append(padding.to(self.inner.info(name).dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


def match_vocabulary(checkpoints: dict[str, Checkpoint], reference: str) -> dict[str, Checkpoint]:
    """Views of ``checkpoints`` whose vocabulary tensors match ``reference``'s rows."""
    ref = checkpoints[reference]
    ref_names = set(ref.tensor_names())
    result: dict[str, Checkpoint] = {}
    for model, checkpoint in checkpoints.items():
        resized = set()
        if model != reference:
            for name in checkpoint.tensor_names():
                if name not in ref_names or not is_vocab_tensor(name):
                    continue
                own, wanted = checkpoint.info(name).shape, ref.info(name).shape
                if len(own) >= 1 and own[1:] == wanted[1:] and own[0] != wanted[0]:
                    resized.add(name)
        result[model] = VocabResized(checkpoint, ref, resized) if resized else checkpoint
    return result
