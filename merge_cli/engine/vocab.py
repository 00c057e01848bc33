"""Models whose vocabularies differ (added tokens): the ``fuse.tokenizer_source`` policy.

Fine-tunes often add tokens, which grows the embedding and lm_head by rows. By default the
plan refuses such inputs with a :class:`~merge_cli.errors.PlanError` naming the tensor and
both shapes. ``fuse.tokenizer_source`` (the key mergekit users know) says what to do instead.
Either way the *reference* is ``fuse.base``, or the first fused model without one.

``base``: the output keeps the reference's vocabulary. Each other model's
vocabulary-indexed tensors are seen resized to the reference's rows:

* rows past the reference's vocabulary (the model's added tokens) are dropped;
* rows the model lacks (tokens only the reference has) are taken from the reference, so the
  model contributes nothing there (a zero task vector, or the reference's row in an average).

This assumes shared tokens have the same ids and added tokens come after them, which is how
tokenizers grow; it reads no tokenizer file.

``union``: the output vocabulary is the reference's tokenizer followed by every token of the
other fused models (and ``fuse.base``) that the reference lacks, compared by token string and
read from each model's ``tokenizer.json`` (:mod:`merge_cli.io.tokenizer`). As in mergekit,
the new tokens of the models' base vocabularies come first, then their new added tokens, each
model in recipe order and by id; they get the ids after the reference's largest one. Every
model's vocabulary tensors are seen *permuted* to that vocabulary (mergekit 0.1's
``PermutedEmbeddings``): output row ``i`` is the model's row for token ``i``, wherever its own
tokenizer put it. Where a model lacks the token, it sees a default row, chosen per token as
mergekit 0.1 does:

1. the token is in exactly one model: that model's row;
2. ``fuse.base`` has the token: the base's row;
3. otherwise: the unweighted mean of the rows of the models that have it (a token nobody
   has, only an unassigned id inside the reference's range, gets zeros).

The merge method then runs unchanged on the permuted tensors. Consequences: a token only one
model has comes out as that model's row (every model, the base included, sees the same
row: zero task vectors, and an average of equal rows); with a base, a model lacking a token
the base has contributes a zero task vector; a base lacking a token shared by several models
sees their mean. This is *not* mergekit 0.0.4's mask-and-renormalize (its old
``tokenizer_permute`` method, where a weighted average skipped the models lacking a token):
in a weighted average a model lacking a token that several others have contributes their
unweighted mean with its own weight, which equals the renormalized average only when those
models' weights are equal. Defaults are computed in float32 and cast to the model's dtype.

Where merge-cli differs from mergekit 0.1.5: the reference's tokenizer file is kept as it is
(mergekit drops tokens past the model's ``vocab_size``; here their rows come from the
defaults above), the reference's padding rows (embedding rows past its last token) are kept
when the union fits in them (mergekit drops them: its output has exactly one row per token),
and step 2 applies to ``fuse.base`` only, so a mergekit ``base_model`` of a method without a
base (``linear``) is not preferred. A model's tokens with ids past its embedding rows are
ignored, as mergekit ignores those past ``vocab_size``. The views read rows in contiguous
runs, so the executor still streams in row chunks and chunked results equal unchunked ones.

Only tensors named like embeddings or output heads whose other dimensions agree are resized
or permuted; any other shape mismatch is still an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.tokenizer import PLAIN_ADDED_TOKEN, Vocabulary, read_vocabulary

#: Names of vocabulary-indexed tensors (rows = tokens) in common architectures.
VOCAB_TENSOR = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|tok_embeddings|"
    r"output|shared)(\.weight)?$"
)


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


class RowMappedView:
    """A checkpoint whose tensors ``names`` are seen with other rows (a vocabulary policy).

    ``shape(name)`` is such a tensor's shape as seen, ``read_rows(name, start, stop)`` reads
    rows ``[start, stop)`` of it; every other tensor is the inner checkpoint's.
    """

    def __init__(
        self,
        inner: Checkpoint,
        names: set[str],
        shape: Callable[[str], tuple[int, ...]],
        read_rows: Callable[[str, int, int], torch.Tensor],
    ):
        self.inner = inner
        self.names = names
        self.shape = shape
        self.read_rows = read_rows
        self.source = inner.source
        self.directory: Path | None = inner.directory

    def tensor_names(self) -> list[str]:
        return self.inner.tensor_names()

    def info(self, name: str) -> TensorInfo:
        info = self.inner.info(name)
        if name not in self.names:
            return info
        return TensorInfo(name, self.shape(name), info.dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        if name not in self.names:
            return self.inner.read(name, rows)
        start, stop = rows if rows is not None else (0, self.shape(name)[0])
        return self.read_rows(name, start, stop)


def resized_view(inner: Checkpoint, reference: Checkpoint, names: set[str]) -> RowMappedView:
    """``inner`` with tensors ``names`` cut or padded (from ``reference``) to its row count."""

    def read_rows(name: str, start: int, stop: int) -> torch.Tensor:
        own_rows = inner.info(name).shape[0]
        parts = []
        if start < own_rows:
            parts.append(inner.read(name, (start, min(stop, own_rows))))
        if stop > own_rows:
            padding = reference.read(name, (max(start, own_rows), stop))
            parts.append(padding.to(inner.info(name).dtype))
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    return RowMappedView(inner, names, lambda name: reference.info(name).shape, read_rows)


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
        result[model] = resized_view(checkpoint, ref, resized) if resized else checkpoint
    return result


# ---------------------------------------------------------------------------------------
# tokenizer_source: union

#: Rows apart by at most this many are read in one positioned read (then indexed).
READ_GAP = 8


@dataclass(frozen=True)
class UnionVocabulary:
    """The output vocabulary of ``tokenizer_source: union`` and each model's own vocabulary."""

    reference: str
    #: Output id -> token string (None: an id the reference's tokenizer leaves unassigned).
    tokens: tuple[str | None, ...]
    #: ``added_tokens`` entries (with their output ids) appended to the reference's tokenizer.
    appended: tuple[dict[str, Any], ...]
    #: Every model's vocabulary, the models in the merge in recipe order (reference included).
    vocabularies: dict[str, Vocabulary]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def output_rows(self, reference_rows: int) -> int:
        """Rows of an output vocabulary tensor: the union, or the reference's if it has more."""
        return max(reference_rows, self.size)

    def row_sources(self, model: str, output_rows: int, model_rows: int) -> torch.Tensor:
        """For each output row, the row of ``model``'s tensor with the same token, or -1.

        ``model_rows`` is that tensor's row count: tokens with larger ids have no row. Rows
        without a token (padding, unassigned ids) come from the reference only.
        """
        ids = self.vocabularies[model].ids
        is_reference = model == self.reference
        sources = []
        for row in range(output_rows):
            token = self.tokens[row] if row < self.size else None
            untokened = row if is_reference else -1  # padding rows: only the reference's own
            own = untokened if token is None else ids.get(token, -1)
            sources.append(own if own < model_rows else -1)
        return torch.tensor(sources, dtype=torch.long)


def build_union(vocabularies: dict[str, Vocabulary], reference: str) -> UnionVocabulary:
    """The reference's vocabulary followed by the tokens the other models add (see module doc).

    ``vocabularies`` are the merged models' (in recipe order); the others' may be cut to
    their embedding rows (:meth:`Vocabulary.below`), the reference's is used whole.
    """
    ref = vocabularies[reference]
    tokens: list[str | None] = [None] * ref.size
    for token, token_id in ref.ids.items():
        tokens[token_id] = token
    others = [vocab for name, vocab in vocabularies.items() if name != reference]
    added_anywhere = {token for vocab in others for token in vocab.added}
    known = set(ref.ids)
    appended: list[dict[str, Any]] = []

    def append(token: str, entry: dict[str, Any]) -> None:
        known.add(token)
        appended.append({**entry, "id": len(tokens), "content": token})
        tokens.append(token)

    for vocab in others:  # the models' base vocabularies first, as mergekit does
        for token in vocab.in_id_order():
            if token not in known and token not in added_anywhere:
                append(token, PLAIN_ADDED_TOKEN)
    for vocab in others:  # then their added tokens, with their flags (special, ...)
        for token in vocab.in_id_order():
            if token not in known and token in vocab.added:
                append(token, vocab.added[token])
    return UnionVocabulary(reference, tuple(tokens), tuple(appended), dict(vocabularies))


def gather_rows(checkpoint: Checkpoint, name: str, ids: torch.Tensor) -> torch.Tensor:
    """Rows ``ids`` (any order, repeats allowed) of tensor ``name``, read in contiguous runs."""
    unique = torch.unique(ids, sorted=True)
    breaks = (torch.nonzero(unique.diff() > READ_GAP).flatten() + 1).tolist()
    parts = []
    for span in torch.tensor_split(unique, breaks):
        start, stop = int(span[0]), int(span[-1]) + 1
        parts.append(checkpoint.read(name, (start, stop))[span - start])
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)
    return rows[torch.searchsorted(unique, ids)]


@dataclass
class UnionRows:
    """Reads the vocabulary tensors of every model permuted to a union vocabulary.

    ``checkpoints`` are the models' own (unpermuted) checkpoints; ``tensors`` maps each model
    to the vocabulary tensors it has with the reference's trailing dimensions.
    """

    union: UnionVocabulary
    checkpoints: dict[str, Checkpoint]
    tensors: dict[str, set[str]]
    base: str | None
    _sources: dict[tuple[str, str], torch.Tensor] = field(
        default_factory=dict, init=False, repr=False
    )

    def shape(self, name: str) -> tuple[int, ...]:
        ref_shape = self.checkpoints[self.union.reference].info(name).shape
        return (self.union.output_rows(ref_shape[0]), *ref_shape[1:])

    def sources(self, model: str, name: str) -> torch.Tensor:
        """Output row -> ``model``'s row of ``name`` (-1: the model lacks that token)."""
        key = (model, name)
        if key not in self._sources:
            rows = self.shape(name)[0]
            if name in self.tensors[model]:
                model_rows = self.checkpoints[model].info(name).shape[0]
                self._sources[key] = self.union.row_sources(model, rows, model_rows)
            else:
                self._sources[key] = torch.full((rows,), -1, dtype=torch.long)
        return self._sources[key]

    def read(self, model: str, name: str, start: int, stop: int) -> torch.Tensor:
        """Output rows ``[start, stop)`` of ``model``'s permuted ``name``."""
        inner = self.checkpoints[model]
        sources = self.sources(model, name)[start:stop]
        if torch.equal(sources, torch.arange(start, stop)):
            return inner.read(name, (start, stop))
        dtype = inner.info(name).dtype
        out = torch.empty((stop - start, *self.shape(name)[1:]), dtype=dtype)
        have = sources >= 0
        if have.any():
            out[have] = gather_rows(inner, name, sources[have])
        if not have.all():
            missing = torch.nonzero(~have).flatten() + start
            out[~have] = self.defaults(name, missing).to(dtype)
        return out

    def defaults(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        """Float32 default rows for output ``rows``: the only holder's, the base's, or the
        holders' mean (zeros where no model has the token); see the module doc."""
        total = torch.zeros((len(rows), *self.shape(name)[1:]), dtype=torch.float32)
        count = torch.zeros(len(rows), dtype=torch.float32)
        from_base: tuple[torch.Tensor, torch.Tensor] | None = None
        for model, checkpoint in self.checkpoints.items():
            own = self.sources(model, name)[rows]
            have = own >= 0
            if not have.any():
                continue
            values = gather_rows(checkpoint, name, own[have]).float()
            total[have] += values
            count[have] += 1
            if model == self.base:
                from_base = (have, values)
        result = total / count.clamp(min=1).view(-1, *[1] * (total.dim() - 1))
        if from_base is not None:
            result[from_base[0]] = from_base[1]
        return result


def vocab_tensors(checkpoint: Checkpoint, reference: Checkpoint) -> set[str]:
    """``checkpoint``'s vocabulary tensors that the reference has with the same trailing dims."""
    ref_names = set(reference.tensor_names())
    names = set()
    for name in checkpoint.tensor_names():
        if name in ref_names and is_vocab_tensor(name):
            own, ref = checkpoint.info(name).shape, reference.info(name).shape
            if len(own) >= 1 and len(ref) >= 1 and own[1:] == ref[1:]:
                names.add(name)
    return names


def read_union_vocabulary(
    checkpoints: dict[str, Checkpoint], models: Sequence[str], reference: str
) -> UnionVocabulary:
    """The union of ``models``' vocabularies (read from their tokenizer.json files)."""
    vocabularies = {}
    for model in dict.fromkeys(models):
        checkpoint = checkpoints[model]
        vocab = read_vocabulary(checkpoint.directory, model, checkpoint.source)
        rows = [
            checkpoint.info(name).shape[0]
            for name in checkpoint.tensor_names()
            if is_vocab_tensor(name) and checkpoint.info(name).shape
        ]
        if model != reference and rows:  # ids past the embedding rows are unused
            vocab = vocab.below(max(rows))
        vocabularies[model] = vocab
    return build_union(vocabularies, reference)


def union_vocabulary(
    checkpoints: dict[str, Checkpoint],
    union: UnionVocabulary,
    base: str | None,
) -> dict[str, Checkpoint]:
    """Views of ``checkpoints`` with the union's models' vocabulary tensors permuted to it."""
    members = {model: checkpoints[model] for model in union.vocabularies}
    reference = checkpoints[union.reference]
    tensors = {model: vocab_tensors(ckpt, reference) for model, ckpt in members.items()}
    rows = UnionRows(union, members, tensors, base)
    return {
        model: RowMappedView(
            checkpoint,
            tensors[model],
            rows.shape,
            lambda name, start, stop, model=model: rows.read(model, name, start, stop),
        )
        if model in members
        else checkpoint
        for model, checkpoint in checkpoints.items()
    }
