"""``perplexity``: a causal language model's perplexity on a text file, in strided windows.

The text is tokenized once and scored in windows of ``max_length`` tokens that start every
``stride`` tokens; each window predicts only the tokens not predicted by the previous one,
with the rest of the window as context (the sliding-window evaluation of the Hugging Face
"Perplexity of fixed-length models" guide). Token log-likelihoods are summed exactly, so the
result is ``exp(total NLL / predicted tokens)`` for whatever ``stride`` is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, PositiveInt

from merge_cli.errors import TaskError
from merge_cli.evaluate.registry import EvalContext, Metric, MetricParams, MetricResult
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.dtypes import RECIPE_DTYPES
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import EvalSpec, Recipe, TaskSpec
from merge_cli.task import Task


class PerplexityParams(MetricParams):
    text: str = Field(description="path to a UTF-8 text file")
    max_length: PositiveInt | None = Field(
        None, description="window length in tokens (default: the model's context length)"
    )
    stride: PositiveInt | None = Field(
        None, description="tokens between window starts (default: max_length / 2)"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="compute dtype of the model"
    )
    tokenizer: str = Field(
        "auto",
        description="'auto' (the model directory's tokenizer), a tokenizer directory, or "
        "'bytes' (UTF-8 bytes as token ids, for byte-level vocabularies)",
    )


def tokenize(text: str, tokenizer: str, checkpoint: Checkpoint) -> torch.Tensor:
    """Token ids of ``text`` as a [1, n] tensor."""
    if tokenizer == "bytes":
        return torch.tensor([list(text.encode("utf-8"))], dtype=torch.long)
    source = checkpoint.directory if tokenizer == "auto" else Path(tokenizer)
    try:
        from transformers import AutoTokenizer

        loaded = AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise TaskError(
            f"perplexity: no usable tokenizer in {source} ({str(error).splitlines()[0]}); set "
            "params.tokenizer to a tokenizer directory, or to 'bytes' for a byte-level vocabulary"
        ) from error
    return loaded(text, return_tensors="pt").input_ids


def window_starts(length: int, max_length: int, stride: int) -> list[int]:
    """Start of every window until one reaches the end of the text."""
    starts = []
    for begin in range(0, length, stride):
        starts.append(begin)
        if begin + max_length >= length:
            break
    return starts


@torch.no_grad()
def strided_nll(
    model: torch.nn.Module,
    ids: torch.Tensor,
    max_length: int,
    stride: int,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[float, int]:
    """Total negative log-likelihood (nats) and number of predicted tokens of ``ids``."""
    progress = progress or NullProgress()
    length = ids.shape[1]
    starts = window_starts(length, max_length, stride)
    progress.start("perplexity", len(starts), unit="windows")
    total, count, previous_end = 0.0, 0, 0
    for begin in starts:
        end = min(begin + max_length, length)
        window = ids[:, begin:end].to(device)
        logits = model(input_ids=window).logits.float()
        log_probs = torch.log_softmax(logits[:, :-1], dim=-1)
        token_nll = -log_probs.gather(-1, window[:, 1:, None]).squeeze(-1)
        # Score the tokens the previous window did not (at least one token of context).
        first = max(window.shape[1] - (end - previous_end), 1)
        total += float(token_nll[:, first - 1 :].double().sum())
        count += token_nll.shape[1] - (first - 1)
        previous_end = end
        progress.advance(1)
    progress.finish()
    return total, count


def run_perplexity(context: EvalContext, spec: EvalSpec, params: PerplexityParams) -> MetricResult:
    text = Path(params.text).read_text(encoding="utf-8")
    rows, details = [], {}
    for name in spec.models or context.default_models():
        checkpoint = context.checkpoint(name)
        ids = tokenize(text, params.tokenizer, checkpoint)
        if ids.shape[1] < 2:
            raise TaskError(f"perplexity: {params.text} holds fewer than two tokens")
        model = context.load(
            name, Task(TaskSpec(model="transformers")), RECIPE_DTYPES[params.dtype]
        )
        config: Any = getattr(model, "config", None)
        max_length = params.max_length or getattr(config, "max_position_embeddings", None) or 1024
        stride = min(params.stride or max(1, max_length // 2), max_length)
        nll, tokens = strided_nll(model, ids, max_length, stride, context.device, context.progress)
        value = math.exp(nll / tokens)
        rows.append(
            {"metric": "perplexity", "model": name, "split": Path(params.text).name, "value": value}
        )
        details[name] = {
            "nll": nll,
            "tokens": tokens,
            "max_length": max_length,
            "stride": stride,
            "perplexity": value,
        }
    return MetricResult(rows, details)


def _check(recipe: Recipe, spec: EvalSpec, params: PerplexityParams, where: str) -> list[str]:
    problems = []
    if not Path(params.text).is_file():
        problems.append(f"{where}.params.text: no such file {params.text}")
    if params.stride and params.max_length and params.stride > params.max_length:
        problems.append(f"{where}.params.stride: must not exceed max_length ({params.max_length})")
    return problems


PERPLEXITY = Metric(
    name="perplexity",
    summary="Perplexity of a causal LM (transformers) on a text file, in strided windows.",
    reference="Hugging Face Transformers guide, Perplexity of fixed-length models",
    run=run_perplexity,
    params=PerplexityParams,
    check=_check,
)
