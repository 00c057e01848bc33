"""Quantized inputs and outputs in the plan: chunk alignment, requantization, config.json.

Inputs are dequantized on read by :class:`~merge_cli.io.quantized.DequantizedCheckpoint`;
the plan only makes each row chunk a whole number of the inputs' scale blocks, so no scale
block is read twice. ``save.quantize: fp8_block`` writes each merged weight that the config
source stores as block-scaled FP8 in that layout again (DeepSeek-V3: ``W`` float8 and
``W_scale_inv`` float32, one per ``weight_block_size`` block): the executor quantizes each
merged chunk (rows aligned to the blocks) and writes the scales, gathered chunk by chunk,
right after the weight. Otherwise the output is plain floating point and its config.json
loses ``quantization_config``.

Functions here take and return the plan's ``OutputTensor`` records (edited with
``dataclasses.replace``), so that this module and :mod:`merge_cli.engine.plan` do not import
each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from math import ceil, lcm
from typing import Any, TypeVar

import torch

from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.quantized import FP8_FORMATS, DequantizedCheckpoint

#: ``save.quantize`` values.
QUANTIZE_FORMATS = ("fp8_block",)
#: Scale tensor of an FP8 block-quantized weight (DeepSeek-V3's name).
SCALE_SUFFIX = "_scale_inv"

T = TypeVar("T")


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


def _row_block(checkpoints: Mapping[str, Checkpoint], tensor: Any) -> int:
    block = 1
    for model, name in tensor.sources:
        row_block = getattr(checkpoints[model], "row_block", None)
        if row_block is not None:
            block = lcm(block, row_block(name))
    return block


def quantized_outputs(
    tensors: list[T],
    checkpoints: Mapping[str, Checkpoint],
    config_source: Checkpoint,
    quantize: str | None,
) -> list[T]:
    """``tensors`` with chunk alignment, and with FP8 weights and their scales when
    ``quantize`` is ``fp8_block``: every tensor the config source stores as block-scaled FP8
    is written so again, followed by its ``_scale_inv``."""
    layout = None
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
    out: list[T] = []
    for tensor in tensors:
        block = _row_block(checkpoints, tensor)
        source = tensor.copy_from or (tensor.inputs[0] if tensor.inputs else None)  # type: ignore[attr-defined]
        stored = view.quantized(source[1]) if layout and source else None  # type: ignore[union-attr]
        if stored is None or stored.block is None:
            out.append(replace(tensor, row_block=block) if block > 1 else tensor)  # type: ignore[type-var]
            continue
        rows, cols = tensor.shape  # type: ignore[attr-defined]
        name = tensor.name  # type: ignore[attr-defined]
        weight = replace(
            tensor,  # type: ignore[type-var]
            dtype=FP8_FORMATS[fmt][0],
            row_block=lcm(block, stored.block[0]),
            quantize=stored.block,
            scale_name=name + SCALE_SUFFIX,
        )
        scale = replace(
            tensor,  # type: ignore[type-var]
            name=name + SCALE_SUFFIX,
            shape=(ceil(rows / stored.block[0]), ceil(cols / stored.block[1])),
            dtype=torch.float32,
            inputs=(),
            base=None,
            copy_from=None,
            scale_of=name,
        )
        out += [weight, scale]
    return out
