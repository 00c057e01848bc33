"""Passthrough: copy tensors from one model, or stack layer ranges of several models.

Layer stacking builds a deeper model from slices of others (the "frankenmerge" of
SOLAR 10.7B, Kim et al. 2023, "SOLAR 10.7B: Scaling LLMs with simple yet effective depth
up-scaling"; mergekit's ``passthrough`` with ``slices``). Layers are renumbered in output
order and ``num_hidden_layers`` in config.json is updated. Tensors outside the layers
(embeddings, final norm, lm_head) come from the base model, or the first slice's model;
``head_from`` takes those after the layers (final norm, lm_head) from another model, as
mergekit does with the last slice's model.

Which tensors come before the layers and which after is decided by their role, never by
their storage order: safetensors headers and index files list names sorted, so
``lm_head.weight`` is stored before ``model.layers.0``. Embeddings (the names the layer
gradients also place before the layers, :data:`~merge_cli.engine.params.PRE_LAYER_PATTERN`)
feed the layers; every other tensor outside the layers (final norm, lm_head, classifier
heads, pooler) reads their output, as mergekit's ``pre_weights``/``post_weights`` split
them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from merge_cli.engine.method import TensorMethod, copy_first
from merge_cli.engine.params import LAYER_PATTERN, PRE_LAYER_PATTERN, count_layers, layer_index
from merge_cli.engine.plan import OutputTensor, output_dtype
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint


class LayerSlice(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="model to take the layers from")
    layers: tuple[int, int] = Field(description="layer range [start, end), end exclusive")

    @model_validator(mode="after")
    def _ordered(self) -> LayerSlice:
        start, end = self.layers
        if not 0 <= start < end:
            raise ValueError(
                f"layers must be [start, end) with 0 <= start < end, got {list(self.layers)}"
            )
        return self


class PassthroughParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slices: list[LayerSlice] | None = Field(
        None, description="layer ranges to stack, in output order; absent: copy one model"
    )
    head_from: str | None = Field(
        None,
        description="model whose tensors after the layers (final norm, lm_head) are copied; "
        "absent: the same model as the embeddings",
    )


def stacked_layer_sources(
    slices: list[LayerSlice], names_by_model: dict[str, list[str]]
) -> list[tuple[str, str, str]]:
    """``(output name, model, source name)`` for every layer tensor of the stacked model."""
    result = []
    out_layer = 0
    for piece in slices:
        names = names_by_model[piece.model]
        for layer in range(*piece.layers):
            for name in names:
                if layer_index(name) == layer:
                    out_name = _renumber(name, out_layer)
                    result.append((out_name, piece.model, name))
            out_layer += 1
    return result


def _role(name: str) -> str:
    """``layer``, ``before`` (embeddings) or ``after`` (final norm, lm_head, heads)."""
    if layer_index(name) is not None:
        return "layer"
    return "before" if PRE_LAYER_PATTERN.search(name) else "after"


def _renumber(name: str, new_index: int) -> str:
    found = LAYER_PATTERN.search(name)
    assert found is not None
    start, end = found.span(1)
    return name[:start] + str(new_index) + name[end:]


def _plan_tensors(
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    params: PassthroughParams,
    save_dtype: str,
) -> tuple[list[OutputTensor], dict[str, Any], str]:
    def copied(out_name: str, model: str, name: str) -> OutputTensor:
        info = checkpoints[model].info(name)
        return OutputTensor(
            out_name, info.shape, output_dtype(info.dtype, save_dtype), copy_from=(model, name)
        )

    if not params.slices:
        source = base or model_names[0]
        names = checkpoints[source].tensor_names()
        return [copied(n, source, n) for n in names], {}, source

    names_by_model = {m: checkpoints[m].tensor_names() for m in checkpoints}
    problems = []
    for i, piece in enumerate(params.slices):
        if piece.model not in checkpoints:
            problems.append(f"fuse.params.slices[{i}].model: no model named {piece.model!r}")
            continue
        available = count_layers(names_by_model[piece.model])
        if piece.layers[1] > available:
            problems.append(
                f"fuse.params.slices[{i}].layers: {list(piece.layers)} is out of range; "
                f"model {piece.model!r} has {available} layers"
            )
    if params.head_from is not None and params.head_from not in checkpoints:
        problems.append(f"fuse.params.head_from: no model named {params.head_from!r}")
    if problems:
        raise PlanError("\n".join(problems))
    source = base or params.slices[0].model
    head = params.head_from or source
    before = [n for n in names_by_model[source] if _role(n) == "before"]
    after = [n for n in names_by_model[head] if _role(n) == "after"]
    layers = stacked_layer_sources(params.slices, names_by_model)
    tensors = [copied(n, source, n) for n in before]
    tensors += [copied(out, model, name) for out, model, name in layers]
    tensors += [copied(n, head, n) for n in after]
    num_layers = sum(end - start for start, end in (p.layers for p in params.slices))
    return tensors, {"num_hidden_layers": num_layers}, source


METHOD = TensorMethod(
    name="passthrough",
    url="https://arxiv.org/abs/2312.15166",
    family="weight_average",
    summary="Copy one model's tensors, or stack layer ranges of several models into a deeper one.",
    reference="Kim et al. 2023, SOLAR 10.7B (depth up-scaling); mergekit passthrough",
    params=PassthroughParams,
    min_models=1,
    merge=copy_first,
    plan_tensors=_plan_tensors,
)
