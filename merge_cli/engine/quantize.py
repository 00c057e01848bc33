"""Quantized inputs and outputs in the plan: chunk alignment, requantization, config.json.

Inputs are dequantized on read by :class:`~merge_cli.io.quantized.DequantizedCheckpoint`;
the plan only makes each row chunk a whole number of the inputs' scale blocks, so no scale
block is read twice. ``save.quantize: fp8_block`` writes each merged weight that the config
source stores as block-scaled FP8 in that layout again (DeepSeek-V3: ``W`` float8 and
``W_scale_inv`` float32, one per ``weight_block_size`` block): the executor quantizes each
merged chunk (rows aligned to the blocks) and writes the scales, gathered chunk by chunk,
right after the weight. Otherwise the output is plain floating point and its config.json
loses ``quantization_config``.

The fuse stage applies :func:`quantized_plan` to the plan :func:`~merge_cli.engine.plan.
build_plan` makes from the headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from math import ceil, lcm
from typing import Any

import torch

from merge_cli.engine.plan import MergePlan, OutputTensor, split_into_shards
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.quantized import FP8_FORMATS, DequantizedCheckpoint, Quantized

#: Scale tensor of an FP8 block-quantized weight (DeepSeek-V3's name).
SCALE_SUFFIX = "_scale_inv"


def dequantizing_view(checkpoint: Checkpoint) -> DequantizedCheckpoint | None:
    """The dequantizing view ``checkpoint`` is or wraps (views keep theirs as ``checkpoint``)."""
    for _ in range(8):
        if isinstance(checkpoint, DequantizedCheckpoint):
            return checkpoint
        inner = getattr(checkpoint, "checkpoint", None)
        if inner is None:
            return None
        checkpoint = inner
    return None


def quantization_updates(config_source: Checkpoint, quantize: str | None) -> dict[str, Any]:
    """config.json changes: a dequantized output drops ``quantization_config`` (None removes
    a key; :func:`merge_cli.save.write_extras`); a requantized one keeps the input's."""
    if quantize is None and dequantizing_view(config_source) is not None:
        return {"quantization_config": None}
    return {}


def _row_block(checkpoints: Mapping[str, Checkpoint], tensor: OutputTensor) -> int:
    block = 1
    for model, name in tensor.sources:
        row_block = getattr(checkpoints[model], "row_block", None)
        if row_block is not None:
            block = lcm(block, row_block(name))
    return block


def quantized_plan(
    plan: MergePlan, checkpoints: Mapping[str, Checkpoint], quantize: str | None, shard_size: int
) -> MergePlan:
    """``plan`` with its tensors' chunks aligned to their inputs' scale blocks and, when
    ``quantize`` is ``fp8_block``, every tensor the config source stores as block-scaled FP8
    written so again, followed by its ``_scale_inv``; with the config.json changes."""
    sources = plan.sources(dict(checkpoints))
    config_source = sources[plan.config_source]
    layout, fmt = None, "e4m3"
    if quantize is not None:
        view = dequantizing_view(config_source)
        layout = view.block_size if view is not None and view.method == "fp8" else None
        if view is None or layout is None:
            raise PlanError(
                f"save.quantize: {quantize} writes the FP8 block layout of the model whose "
                f"config.json the output gets ({config_source.source}), which is not an FP8 "
                "block-quantized checkpoint (quantization_config with quant_method: fp8 and "
                "weight_block_size)"
            )
        fmt = view.quantization.get("fmt", "e4m3")
    tensors: list[OutputTensor] = []
    for tensor in plan.tensors:
        block = _row_block(sources, tensor)
        stored = _stored_fp8(sources, tensor) if layout is not None else None
        if stored is None or stored.block is None:
            tensors.append(replace(tensor, row_block=block) if block > 1 else tensor)
            continue
        tensors += _fp8_pair(tensor, stored, block, fmt)
    updates = quantization_updates(config_source, quantize)
    return replace(
        plan,
        tensors=tensors,
        shards=split_into_shards(tensors, shard_size),
        config_updates={**updates, **plan.config_updates},
    )


def _stored_fp8(sources: Mapping[str, Checkpoint], tensor: OutputTensor) -> Quantized | None:
    """How the tensor's first source stores it, when that is FP8 (a view's weight)."""
    source = tensor.copy_from or (tensor.inputs[0] if tensor.inputs else None)
    if source is None:
        return None
    view = dequantizing_view(sources[source[0]])
    stored = view.quantized(source[1]) if view is not None else None
    return stored if stored is not None and stored.kind == "fp8" else None


def _fp8_pair(
    tensor: OutputTensor, stored: Quantized, row_block: int, fmt: str
) -> list[OutputTensor]:
    """The FP8 weight (computed in float32, quantized chunk by chunk) and its scales."""
    assert stored.block is not None
    rows, cols = tensor.shape
    weight = replace(
        tensor,
        dtype=FP8_FORMATS[fmt][0],
        row_block=lcm(row_block, stored.block[0]),
        quantize=stored.block,
        scale_name=tensor.name + SCALE_SUFFIX,
    )
    scale = OutputTensor(
        tensor.name + SCALE_SUFFIX,
        (ceil(rows / stored.block[0]), ceil(cols / stored.block[1])),
        torch.float32,
        scale_of=tensor.name,
    )
    return [weight, scale]
