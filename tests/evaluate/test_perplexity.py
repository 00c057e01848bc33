"""Perplexity against a direct transformers computation (the Hugging Face guide's loop)."""

import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from merge_cli.config import recipe_from_dict
from merge_cli.errors import TaskError
from merge_cli.evaluate.perplexity import window_starts
from merge_cli.pipeline import run_evaluation
from tests.evaluate.helpers import options

TEXT = (
    "Model soups average the weights of fine-tuned models. Task vectors add and subtract "
    "what fine-tuning changed. Mode connectivity finds paths of low loss between solutions. "
) * 3


def direct_perplexity(path, ids, max_length, stride):
    """The guide's strided loop with labels, weighted by the tokens each window predicts."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    nll, count, previous_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        target_length = end - previous_end
        input_ids = ids[:, begin:end]
        labels = input_ids.clone()
        labels[:, :-target_length] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=labels).loss
        predicted = int((labels[:, 1:] != -100).sum())
        nll += float(loss) * predicted
        count += predicted
        previous_end = end
        if end == ids.shape[1]:
            break
    return math.exp(nll / count)


@pytest.mark.parametrize(("max_length", "stride"), [(64, 32), (48, 48), (128, 100)])
def test_perplexity_equals_a_direct_transformers_computation(
    tiny_llamas, tmp_path, max_length, stride
):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    recipe = recipe_from_dict(
        {
            "models": {"base": str(tiny_llamas["base"]), "math": str(tiny_llamas["math"])},
            "evaluate": [
                {
                    "metric": "perplexity",
                    "params": {"text": str(text), "tokenizer": "bytes",
                               "max_length": max_length, "stride": stride},
                }
            ],
        }
    )  # fmt: skip
    rows, _ = run_evaluation(recipe, options(), report=tmp_path / "eval.json")
    ids = torch.tensor([list(TEXT.encode())])
    assert ids.shape[1] > 2 * max_length  # several windows
    for row in rows:
        expected = direct_perplexity(tiny_llamas[row["model"]], ids, max_length, stride)
        assert row["value"] == pytest.approx(expected, rel=1e-5)
    assert rows[0]["value"] != rows[1]["value"]


def test_window_starts_cover_the_text():
    assert window_starts(10, 4, 4) == [0, 4, 8]
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(3, 8, 4) == [0]


def test_missing_tokenizer_is_a_clear_error(tiny_llamas, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    recipe = recipe_from_dict(
        {
            "models": {"base": str(tiny_llamas["base"])},
            "evaluate": [{"metric": "perplexity", "params": {"text": str(text)}}],
        }
    )
    with pytest.raises(TaskError, match="no usable tokenizer .* 'bytes'"):
        run_evaluation(recipe, options(), report=tmp_path / "eval.json")
