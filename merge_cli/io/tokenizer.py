"""Vocabularies read from ``tokenizer.json``, and the union tokenizer's files.

``fuse.tokenizer_source: union`` (see :mod:`merge_cli.engine.vocab`) needs every model's
vocabulary: which token string has which id. It is read from the model directory's
``tokenizer.json`` (the Hugging Face ``tokenizers`` format) as plain JSON, so the core needs
neither ``transformers`` nor ``tokenizers``:

* ``model.vocab``: a mapping token -> id (BPE, WordPiece, WordLevel) or a list of
  ``[token, score]`` pairs whose position is the id (Unigram);
* ``added_tokens``: entries ``{"id", "content", "special", ...}`` (special and user-added
  tokens; some also appear in ``model.vocab`` with the same id).

The output tokenizer is the reference's ``tokenizer.json`` with the appended tokens added to
its ``added_tokens`` (and to ``tokenizer_config.json``'s ``added_tokens_decoder`` when the file
has one, as transformers 4 writes it).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from merge_cli.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

#: The ``added_tokens`` entry of a token that was part of a model's base vocabulary (not an
#: added token there): a plain, normalized, non-special added token, as mergekit adds it.
PLAIN_ADDED_TOKEN = {
    "single_word": False,
    "lstrip": False,
    "rstrip": False,
    "normalized": True,
    "special": False,
}


#: Token ids must be below this (real vocabularies have at most a few hundred thousand): an
#: id of 10**12 in a tokenizer.json would otherwise size the output vocabulary.
MAX_TOKEN_IDS = 2**22


@dataclass(frozen=True)
class Vocabulary:
    """One tokenizer's tokens: every token string with its id, and which are added tokens."""

    #: token -> id, for the model vocabulary and the added tokens.
    ids: dict[str, int]
    #: added token content -> its ``tokenizer.json`` ``added_tokens`` entry.
    added: dict[str, dict[str, Any]]

    @property
    def size(self) -> int:
        """One past the largest id (the number of ids the tokenizer can produce)."""
        return max(self.ids.values(), default=-1) + 1

    def in_id_order(self) -> list[str]:
        """Every token, by increasing id."""
        return sorted(self.ids, key=self.ids.__getitem__)

    def below(self, limit: int) -> Vocabulary:
        """The tokens whose id is under ``limit`` (rows the model's embeddings actually have)."""
        ids = {token: i for token, i in self.ids.items() if i < limit}
        return Vocabulary(ids, {t: e for t, e in self.added.items() if t in ids})


def read_vocabulary(directory: Path | None, model: str, source: str) -> Vocabulary:
    """The vocabulary in ``directory/tokenizer.json`` of ``model`` (``source``: its path).

    Raises :class:`CheckpointError` when the file is missing or has no vocabulary.
    """
    path = directory / TOKENIZER_FILE if directory is not None else None
    if path is None or not path.is_file():
        where = f"in {directory}" if directory is not None else "beside its weights"
        raise CheckpointError(
            f"model {model!r} ({source}): no {TOKENIZER_FILE} {where}; "
            f"fuse.tokenizer_source: union reads every model's vocabulary from its "
            f"{TOKENIZER_FILE} (save the model's fast tokenizer there with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(DIR))"
        )
    data = _read_json(path, f"model {model!r}")
    try:
        return vocabulary_from_json(data)
    except (KeyError, TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(
            f"model {model!r}: {path}: cannot read the vocabulary ({str(error)[:200]}); "
            "expected model.vocab (a token -> id mapping or a list of [token, score]) "
            "and an added_tokens list"
        ) from None


def vocabulary_from_json(data: dict[str, Any]) -> Vocabulary:
    """The vocabulary of a parsed ``tokenizer.json``; raises KeyError/TypeError/ValueError."""
    vocab = data["model"]["vocab"]
    if isinstance(vocab, dict):
        ids = {str(token): int(i) for token, i in vocab.items()}
    elif isinstance(vocab, list):  # Unigram: [[token, score], ...], the position is the id
        ids = {str(entry[0]): i for i, entry in enumerate(vocab)}
    else:
        raise TypeError(f"model.vocab is a {type(vocab).__name__}")
    added: dict[str, dict[str, Any]] = {}
    for entry in data.get("added_tokens") or []:
        content, token_id = str(entry["content"]), int(entry["id"])
        ids[content] = token_id
        added[content] = dict(entry)
    if any(not 0 <= i < MAX_TOKEN_IDS for i in ids.values()):
        raise ValueError(f"a token id is out of range (0 to {MAX_TOKEN_IDS - 1})")
    return Vocabulary(ids, added)


def union_tokenizer_files(directory: Path, appended: Sequence[dict[str, Any]]) -> dict[str, bytes]:
    """The reference's tokenizer files with the ``appended`` ``added_tokens`` entries.

    Returns file name -> contents: ``tokenizer.json`` always, ``tokenizer_config.json`` when
    it exists and lists ``added_tokens_decoder`` (transformers 4 reads added tokens there).
    """
    tokenizer = _read_json(directory / TOKENIZER_FILE, "the reference model")
    tokenizer["added_tokens"] = [*(tokenizer.get("added_tokens") or []), *appended]
    files = {TOKENIZER_FILE: _dump(tokenizer)}
    config_path = directory / TOKENIZER_CONFIG_FILE
    if config_path.is_file():
        config = _read_json(config_path, "the reference model")
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for entry in appended:
                decoder[str(entry["id"])] = {k: v for k, v in entry.items() if k != "id"}
            files[TOKENIZER_CONFIG_FILE] = _dump(config)
    return files


def _read_json(path: Path, owner: str) -> dict[str, Any]:
    """A JSON object from ``path``; errors name ``owner`` (e.g. "model 'math'")."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise CheckpointError(f"{owner}: {path}: cannot read ({error.strerror or error})") from None
    except ValueError as error:
        raise CheckpointError(f"{owner}: {path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{owner}: {path}: expected a JSON object")
    return data


def _dump(data: dict[str, Any]) -> bytes:
    return (json.dumps(data, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
