"""Vocabularies read from tokenizer.json (BPE/WordLevel and Unigram) and union tokenizer files."""

from __future__ import annotations

import json

import pytest

from merge_cli.engine.vocab import build_union
from merge_cli.errors import CheckpointError
from merge_cli.io.tokenizer import (
    PLAIN_ADDED_TOKEN,
    Vocabulary,
    read_vocabulary,
    union_tokenizer_files,
    vocabulary_from_json,
)


def _added(token_id: int, content: str, special: bool = True) -> dict:
    return {**PLAIN_ADDED_TOKEN, "id": token_id, "content": content, "special": special}


def test_mapping_and_unigram_vocabularies():
    bpe = {
        "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]},
        "added_tokens": [_added(3, "<eos>")],
    }
    vocab = vocabulary_from_json(bpe)
    assert vocab.ids == {"a": 0, "b": 1, "ab": 2, "<eos>": 3} and vocab.size == 4
    assert set(vocab.added) == {"<eos>"} and vocab.added["<eos>"]["special"] is True
    unigram = {
        "model": {"type": "Unigram", "vocab": [["<unk>", 0.0], ["▁x", -1.5], ["y", -2.0]]},
        "added_tokens": [_added(0, "<unk>")],
    }
    vocab = vocabulary_from_json(unigram)
    assert vocab.in_id_order() == ["<unk>", "▁x", "y"] and set(vocab.added) == {"<unk>"}
    assert vocab.below(2).ids == {"<unk>": 0, "▁x": 1}


def test_missing_or_broken_tokenizer_json(tmp_path):
    with pytest.raises(CheckpointError, match="model 'm' .*no tokenizer.json in"):
        read_vocabulary(tmp_path, "m", "src")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model 'm': .*not valid JSON"):
        read_vocabulary(tmp_path, "m", "src")
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordPiece"}}))
    with pytest.raises(CheckpointError, match="cannot read the vocabulary"):
        read_vocabulary(tmp_path, "m", "src")


def test_union_order_base_vocabulary_tokens_first_then_added_tokens():
    ref = Vocabulary({"a": 0, "b": 1, "<s>": 20}, {"<s>": _added(20, "<s>")})  # ids 2..19 unused
    one = Vocabulary({"a": 0, "x": 1, "<t1>": 2, "y": 3}, {"<t1>": _added(2, "<t1>")})
    two = Vocabulary({"z": 0, "y": 1, "<t2>": 2, "x": 3}, {"<t2>": _added(2, "<t2>", False)})
    union = build_union({"one": one, "ref": ref, "two": two}, "ref")
    assert union.tokens[:3] == ("a", "b", None) and union.tokens[20] == "<s>"
    assert list(union.tokens[21:]) == ["x", "y", "z", "<t1>", "<t2>"]
    assert [e["id"] for e in union.appended] == [21, 22, 23, 24, 25]
    assert [e["special"] for e in union.appended] == [False, False, False, True, False]
    # a token that another model has as an added token takes that model's entry
    three = Vocabulary({"<t1>": 0}, {})
    union = build_union({"ref": ref, "three": three, "one": one}, "ref")
    assert [e["content"] for e in union.appended] == ["x", "y", "<t1>"]
    assert union.appended[-1]["special"] is True


def test_union_tokenizer_files_append_added_tokens(tmp_path):
    tokenizer = {"version": "1.0", "model": {"vocab": {"a": 0}}, "added_tokens": [_added(1, "<s>")]}
    decoder = {"1": {k: v for k, v in _added(1, "<s>").items() if k != "id"}}
    config = {"added_tokens_decoder": decoder, "bos_token": "<s>"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    appended = [_added(2, "<tool>", special=False)]
    files = union_tokenizer_files(tmp_path, appended)
    written = json.loads(files["tokenizer.json"])
    assert written["added_tokens"] == [_added(1, "<s>"), _added(2, "<tool>", False)]
    assert written["model"] == tokenizer["model"]
    written_config = json.loads(files["tokenizer_config.json"])
    assert written_config["added_tokens_decoder"]["2"]["content"] == "<tool>"
    assert written_config["added_tokens_decoder"]["2"]["special"] is False
    assert written_config["bos_token"] == "<s>"
    # a tokenizer_config.json without added_tokens_decoder (transformers 5) is left as it is
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>"}))
    assert set(union_tokenizer_files(tmp_path, appended)) == {"tokenizer.json"}


@pytest.mark.parametrize("token_id", [-1, 2**22, 10**12, "1e400", 1e400])
def test_token_ids_out_of_range_are_one_message(tmp_path, token_id):
    vocab = {"a": 0, "b": token_id}
    text = json.dumps({"model": {"vocab": vocab}, "added_tokens": []}).replace("Infinity", "1e400")
    (tmp_path / "tokenizer.json").write_text(text)
    with pytest.raises(CheckpointError, match="cannot read the vocabulary"):
        read_vocabulary(tmp_path, "math", str(tmp_path))
