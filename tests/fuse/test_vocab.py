"""Models with added tokens: a clear error by default, `fuse.tokenizer_source: base` or
`union` on request."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from merge_cli.errors import CheckpointError, PlanError, RecipeError
from tests.conftest import load_safetensors_dir as load_merged
from tests.fuse.fuse_harness import merge


def _models():
    base = {
        "model.embed_tokens.weight": torch.arange(8.0).reshape(4, 2),
        "lm_head.weight": torch.ones(4, 2),
        "norm.weight": torch.ones(2),
    }
    bigger = {  # two added tokens
        "model.embed_tokens.weight": torch.arange(12.0).reshape(6, 2) + 1,
        "lm_head.weight": torch.full((6, 2), 3.0),
        "norm.weight": torch.full((2,), 2.0),
    }
    smaller = {  # lacks the base's last token
        "model.embed_tokens.weight": torch.arange(6.0).reshape(3, 2) - 1,
        "lm_head.weight": torch.full((3, 2), 5.0),
        "norm.weight": torch.full((2,), 4.0),
    }
    return {"base": base, "big": bigger, "small": smaller}


def test_differing_vocabularies_are_refused_with_a_hint(tmp_path):
    with pytest.raises(PlanError) as error:
        merge(tmp_path, "task_arithmetic", _models())
    message = str(error.value)
    assert "tensor 'model.embed_tokens.weight': shape [6, 2] in model 'big'" in message
    assert "set fuse.tokenizer_source: base" in message


def test_tokenizer_source_base_keeps_the_base_vocabulary(tmp_path):
    out = merge(tmp_path, "task_arithmetic", _models(), extra={"tokenizer_source": "base"})
    embed = torch.arange(8.0).reshape(4, 2)
    # big: its first 4 rows (+1 each); small: 3 rows (-1 each), then the base's row (delta 0)
    expected = embed + 1 + torch.tensor([[-1.0, -1], [-1, -1], [-1, -1], [0, 0]])
    assert torch.equal(out["model.embed_tokens.weight"], expected)
    head = torch.ones(4, 2) + 2 + torch.tensor([[4.0, 4], [4, 4], [4, 4], [0, 0]])
    assert torch.equal(out["lm_head.weight"], head)
    assert out["model.embed_tokens.weight"].shape == (4, 2)
    # chunked the same (rows straddle the model's own and the padded rows)
    chunked = merge(
        tmp_path, "task_arithmetic", _models(), extra={"tokenizer_source": "base"}, chunk_bytes=8
    )
    assert all(torch.equal(out[k], chunked[k]) for k in out)


def test_tokenizer_source_does_not_hide_other_shape_mismatches(tmp_path):
    models = _models()
    models["big"]["norm.weight"] = torch.ones(3)
    with pytest.raises(PlanError, match="tensor 'norm.weight': shape \\[3\\] in model 'big'"):
        merge(tmp_path, "task_arithmetic", models, extra={"tokenizer_source": "base"})


# ---------------------------------------------------------------------------------------
# tokenizer_source: union, on tiny Llamas with real (WordLevel) tokenizers

SPECIALS = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
#: Token strings -> ids of each model's base vocabulary, and its added tokens (content,
#: special). "a" swaps "the"/"cat" and adds "dog"; "b" lacks "mat", has "dog" elsewhere.
VOCABS = {
    "base": (["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat"], []),
    "a": (
        ["<unk>", "<s>", "</s>", "cat", "the", "sat", "on", "mat", "dog"],
        [("<|im_start|>", True)],
    ),
    "b": (
        ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "dog"],
        [("<|im_start|>", True), ("<tool>", False)],
    ),
}  # fmt: skip
#: The union: base's 8 tokens, then the new base-vocabulary token, then the new added ones.
UNION = ["<unk>", "<s>", "</s>", "the", "cat", "sat", "on", "mat", "dog", "<|im_start|>", "<tool>"]
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")


def _save_tokenizer(words: list[str], added: list[tuple[str, bool]], directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIALS)
    for content, special in added:
        fast.add_tokens([content], special_tokens=special)
    fast.save_pretrained(directory)


def _llama_with_tokenizer(
    example_models, directory: Path, name: str, seed: int, rows: int | None = None
) -> None:
    """A float32 tiny Llama whose embeddings have a row per token (or ``rows``)."""
    words, added = VOCABS[name]
    config = {**example_models.CONFIG, "vocab_size": rows or len(words) + len(added)}
    config["torch_dtype"] = "float32"
    state = example_models.llama_state_dict(config, seed=seed)
    example_models.save_hf_directory(state, directory, config, shards=1, dtype=torch.float32)
    _save_tokenizer(words, added, directory)


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory, example_models) -> dict[str, Path]:
    """base, a, b (b with two padding rows past its tokens). Read-only."""
    root = tmp_path_factory.mktemp("vocab_models")
    rows = {"b": 12}
    for seed, name in enumerate(VOCABS):
        _llama_with_tokenizer(example_models, root / name, name, seed, rows.get(name))
    return {name: root / name for name in VOCABS}


def _run_union(tmp_path, paths, fuse, chunk_bytes=32 * 2**20, name="out", source="union"):
    """Run ``fuse`` on the model directories ``paths`` with ``tokenizer_source: source``."""
    from merge_cli.config import recipe_from_dict
    from merge_cli.options import RunOptions
    from merge_cli.pipeline import run

    recipe = recipe_from_dict(
        {
            "models": {model: str(path) for model, path in paths.items()},
            "fuse": {**fuse, "tokenizer_source": source},
            "save": {"path": str(tmp_path / name), "dtype": "float32", "model_card": False},
        }
    )
    output = run(recipe, RunOptions(chunk_bytes=chunk_bytes)).output
    assert output is not None
    return output


def _rows(path: Path, tensor: str) -> dict[str, torch.Tensor]:
    """token -> that model's row of ``tensor``."""
    weights = load_merged(path)[tensor]
    ids = json.loads((path / "tokenizer.json").read_text())["model"]["vocab"]
    added = json.loads((path / "tokenizer.json").read_text())["added_tokens"]
    ids = {**ids, **{entry["content"]: entry["id"] for entry in added}}
    return {token: weights[i] for token, i in ids.items()}


def test_union_vocabulary_order_and_size(vocab_models):
    from merge_cli.engine.vocab import read_union_vocabulary
    from merge_cli.io import open_checkpoint

    checkpoints = {name: open_checkpoint(str(path)) for name, path in vocab_models.items()}
    union = read_union_vocabulary(checkpoints, ["a", "b", "base"], "base")
    assert list(union.tokens) == UNION and union.size == 11
    assert [(e["id"], e["content"], e["special"]) for e in union.appended] == [
        (8, "dog", False),
        (9, "<|im_start|>", True),
        (10, "<tool>", False),
    ]
    assert union.appended[0]["normalized"] is True  # a plain added token, as mergekit adds it


def test_union_task_arithmetic_rows(tmp_path, vocab_models):
    weights = {"a": 0.6, "b": 0.3}
    fuse = {
        "method": "task_arithmetic",
        "base": "base",
        "models": {name: {"weight": w} for name, w in weights.items()},
        "params": {"lambda": 1.0, "normalize": False},
    }
    out = _run_union(tmp_path, vocab_models, fuse)
    for tensor in VOCAB_TENSORS:
        base, a, b = (_rows(vocab_models[m], tensor) for m in ("base", "a", "b"))
        merged = load_merged(out)[tensor]
        assert merged.shape == (11, 64)

        def task_arithmetic(base_row, a_row, b_row):
            return base_row + 0.6 * (a_row - base_row) + 0.3 * (b_row - base_row)

        for i, token in enumerate(UNION[:7]):  # everyone has it: permuted rows merged
            torch.testing.assert_close(merged[i], task_arithmetic(base[token], a[token], b[token]))
        # "mat": b lacks it and the base has it: b sees the base's row (a zero task vector)
        torch.testing.assert_close(merged[7], task_arithmetic(base["mat"], a["mat"], base["mat"]))
        # "dog", "<|im_start|>": the base lacks them, a and b have them: the base sees their mean
        for i, token in ((8, "dog"), (9, "<|im_start|>")):
            mean = (a[token] + b[token]) / 2
            torch.testing.assert_close(merged[i], task_arithmetic(mean, a[token], b[token]))
        # "<tool>": only b has it: every model sees b's row, exactly
        assert torch.equal(merged[10], b["<tool>"])
    # the other tensors merge as usual
    norm = "model.norm.weight"
    inputs = {m: load_merged(vocab_models[m])[norm] for m in ("base", "a", "b")}
    expected = inputs["base"] + 0.6 * (inputs["a"] - inputs["base"])
    expected += 0.3 * (inputs["b"] - inputs["base"])
    torch.testing.assert_close(load_merged(out)[norm], expected)


def test_union_linear_rows(tmp_path, vocab_models):
    fuse = {"method": "linear", "models": {"base": {"weight": 1.0}, "a": {"weight": 2.0}, "b": {}}}
    out = _run_union(tmp_path, vocab_models, fuse)
    for tensor in VOCAB_TENSORS:
        base, a, b = (_rows(vocab_models[m], tensor) for m in ("base", "a", "b"))
        merged = load_merged(out)[tensor]

        def linear(base_row, a_row, b_row):
            return (base_row + 2 * a_row + b_row) / 4

        torch.testing.assert_close(merged[3], linear(base["the"], a["the"], b["the"]))
        # no fuse.base: b, lacking "mat", sees the mean of the two models that have it
        mat = (base["mat"] + a["mat"]) / 2
        torch.testing.assert_close(merged[7], linear(base["mat"], a["mat"], mat))
        dog = (a["dog"] + b["dog"]) / 2
        torch.testing.assert_close(merged[8], linear(dog, a["dog"], b["dog"]))
        torch.testing.assert_close(merged[10], b["<tool>"], rtol=0, atol=1e-7)


def test_union_chunked_equals_whole(tmp_path, vocab_models):
    fuse = {"method": "ties", "base": "base", "models": ["a", "b"], "params": {"density": 0.5}}
    whole = load_merged(_run_union(tmp_path, vocab_models, fuse, name="whole"))
    chunked = load_merged(_run_union(tmp_path, vocab_models, fuse, chunk_bytes=16, name="rows"))
    assert whole.keys() == chunked.keys()
    assert all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_union_output_loads_with_transformers(tmp_path, vocab_models):
    from transformers import AutoTokenizer, LlamaForCausalLM

    fuse = {"method": "task_arithmetic", "base": "base", "models": ["a", "b"]}
    out = _run_union(tmp_path, vocab_models, fuse)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 11
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert len(tokenizer) == 11
    ids = tokenizer("the dog <|im_start|> <tool> mat", add_special_tokens=False)["input_ids"]
    assert ids == [3, 8, 9, 10, 7]
    assert tokenizer.convert_ids_to_tokens([8, 9, 10]) == ["dog", "<|im_start|>", "<tool>"]
    added = json.loads((out / "tokenizer.json").read_text())["added_tokens"]
    assert {e["content"]: e["special"] for e in added}["<|im_start|>"] is True
    model = LlamaForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (11, 64)
    logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, 5, 11) and torch.isfinite(logits).all()


def test_union_keeps_the_reference_padding_rows(tmp_path, vocab_models, example_models):
    # a base with 13 embedding rows for its 8 tokens: the 11 union tokens fit in them
    padded = tmp_path / "padded"
    _llama_with_tokenizer(example_models, padded, "base", seed=5, rows=13)
    paths = {**vocab_models, "base": padded}
    fuse = {"method": "task_arithmetic", "base": "base", "models": ["a", "b"]}
    out = _run_union(tmp_path, paths, fuse)
    merged = load_merged(out)["model.embed_tokens.weight"]
    base = load_merged(padded)["model.embed_tokens.weight"]
    assert merged.shape == (13, 64)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 13
    assert torch.equal(merged[11:], base[11:])  # padding: only the base has rows there
    b = _rows(vocab_models["b"], "model.embed_tokens.weight")
    assert torch.equal(merged[10], b["<tool>"])  # a token lands on a padding row


def test_union_of_one_vocabulary_is_the_plain_merge(tmp_path, example_models):
    paths = {name: tmp_path / name for name in ("base", "x", "y")}
    for seed, path in enumerate(paths.values()):
        _llama_with_tokenizer(example_models, path, "base", seed)
    fuse = {"method": "ties", "base": "base", "models": ["x", "y"], "params": {"density": 0.5}}
    union = _run_union(tmp_path, paths, fuse)
    plain = _run_union(tmp_path, paths, fuse, name="plain", source=None)
    assert all(torch.equal(t, load_merged(plain)[k]) for k, t in load_merged(union).items())
    for name in ("tokenizer.json", "config.json"):
        assert (union / name).read_text() == (paths["base"] / name).read_text(), name


def test_union_needs_every_tokenizer_json(tmp_path, vocab_models):
    bare = tmp_path / "b"
    shutil.copytree(vocab_models["b"], bare)
    (bare / "tokenizer.json").unlink()
    paths = {**vocab_models, "b": bare}
    with pytest.raises(CheckpointError) as error:
        _run_union(tmp_path, paths, {"method": "linear", "models": ["base", "a", "b"]})
    message = str(error.value)
    assert "model 'b'" in message and "no tokenizer.json" in message
    assert "fuse.tokenizer_source: union" in message


def test_union_needs_a_per_tensor_method(vocab_models):
    from merge_cli.config import recipe_from_dict

    raw = {
        "models": {name: str(path) for name, path in vocab_models.items()},
        "fuse": {"method": "fisher", "models": ["a", "b"], "tokenizer_source": "union"},
        "save": {"path": "out"},
    }
    with pytest.raises(RecipeError, match="fuse.tokenizer_source: union needs a per-tensor"):
        recipe_from_dict(raw)


def test_union_plan_and_mergekit_config(tmp_path, vocab_models, cli):
    config = {
        "merge_method": "task_arithmetic",
        "base_model": str(vocab_models["base"]),
        "models": [{"model": str(vocab_models[m]), "parameters": {"weight": 0.5}} for m in "ab"],
        "tokenizer_source": "union",
        "dtype": "float32",
    }
    path = tmp_path / "mk.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = cli("plan", path, "--out", tmp_path / "unused", "--json")
    assert code == 0, err
    assert json.loads(out)["config_updates"] == {"vocab_size": 11}
    code, _, err = cli("run", path, "--out", tmp_path / "mk")
    assert code == 0, err
    fuse = {"method": "task_arithmetic", "base": "base", "models": {"a": {"weight": 0.5}}}
    fuse["models"]["b"] = {"weight": 0.5}
    ours = load_merged(_run_union(tmp_path, vocab_models, fuse))
    theirs = load_merged(tmp_path / "mk")
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
