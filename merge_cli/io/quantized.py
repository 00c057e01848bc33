"""Quantized checkpoints, dequantized on read: a lazy view whose tensors are float32.

The largest open models ship quantized, and a quantized weight cannot be averaged as
stored: its values only mean something together with their scales. :func:`dequantizing`
wraps a checkpoint whose ``config.json`` has a ``quantization_config`` in a
:class:`DequantizedCheckpoint`, which presents every quantized weight under its plain name as
a float32 tensor of its true shape and hides the scale tensors (consumed, never merged).
Like alignment's permuted view it transforms on read, row chunk by row chunk: a chunk's
rows are widened to whole scale blocks, read with the matching scale rows, dequantized and
cut back, so memory stays bounded by the chunk budget whatever the model size.

Formats (detected from ``quantization_config.quant_method`` and the tensor names):

- ``fp8``: the DeepSeek-V3 layout (``deepseek-ai/DeepSeek-V3``, ``inference/kernel.py``
  ``weight_dequant``; transformers' ``FineGrainedFP8Config``): ``W`` stored as
  ``float8_e4m3fn`` (``fmt: e4m3``) or ``float8_e5m2``, and ``W_scale_inv`` float32 with one
  value per ``weight_block_size`` block (``ceil(rows/128) x ceil(cols/128)``); the weight is
  ``W * scale_inv`` blockwise. Without ``weight_block_size`` the scale is per tensor
  (one value) or per output channel (``rows`` or ``rows x 1``).
- ``mxfp4``: the gpt-oss layout, OCP Microscaling Formats (MX) v1.0: ``W_blocks`` uint8
  ``(..., G, 16)`` holds 32 FP4 E2M1 values per group, two per byte (low nibble first), and
  ``W_scales`` uint8 ``(..., G)`` one E8M0 exponent per group (value ``2**(s - 127)``).
  Stacked expert tensors ``(experts, out, G, 16)`` are stored out-features-major; their
  dequantized tensor is transposed to ``(experts, in, out)``, the layout transformers'
  ``GptOssExperts`` holds (as its ``convert_moe_packed_tensors`` does).
- ``compressed-tensors``: the ``float-quantized`` format (vLLM / llm-compressor FP8):
  ``W`` float8 with ``W_scale`` per tensor, channel, group or block, as the config group's
  ``weights`` arguments say; dequantized with the ``compressed-tensors`` package's own
  ``dequantize`` (``docs.vllm.ai/projects/llm-compressor``, ``compressed_tensors``
  ``QuantizationArgs``). Static activation scales (``input_scale``) are dropped: a
  dequantized model computes in floating point.

Everything is checked when the view is made, from the headers and config.json alone, so
``validate`` and ``plan`` refuse what ``run`` would: a quantized tensor without its scale, a
scale of the wrong shape, a scale without its tensor, an unknown ``quant_method``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from math import ceil
from typing import Any

import torch

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import Checkpoint, TensorInfo, info_of
from merge_cli.io.dtypes import dtype_name

#: Formats this module dequantizes (``quantization_config.quant_method``).
QUANT_METHODS = ("fp8", "mxfp4", "compressed-tensors")
FLOAT8 = tuple(
    getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, name)
)
#: FP8 formats by their ``fmt`` name and their largest finite value.
FP8_FORMATS = {"e4m3": (torch.float8_e4m3fn, 448.0), "e5m2": (torch.float8_e5m2, 57344.0)}
#: FP4 E2M1 code -> value (OCP MX v1.0, section 5.3.3); bit 3 is the sign.
FP4_VALUES = (
    0.0,
    0.5,
    1.0,
    1.5,
    2.0,
    3.0,
    4.0,
    6.0,
    -0.0,
    -0.5,
    -1.0,
    -1.5,
    -2.0,
    -3.0,
    -4.0,
    -6.0,
)
MX_GROUP = 32
MX_EXPONENT_BIAS = 127


@dataclass(frozen=True)
class Quantized:
    """How one logical tensor is stored: its data, its scale and how they combine."""

    name: str
    kind: str  # "fp8" | "mxfp4" | "compressed-tensors"
    data: str
    scale: str
    shape: tuple[int, ...]
    #: rows of the weight one scale row covers (1: per-channel or per-tensor scales)
    row_block: int = 1
    #: (rows, cols) of a scale block, for block scales
    block: tuple[int, int] | None = None
    #: compressed-tensors' QuantizationArgs for this weight
    args: Any = None


def dequantizing(checkpoint: Checkpoint) -> Checkpoint:
    """``checkpoint`` itself, or a dequantizing view when its config.json says it is
    quantized (raises :class:`CheckpointError` for what cannot be dequantized)."""
    config = _quantization_config(checkpoint)
    if config is None:
        return checkpoint
    return DequantizedCheckpoint(checkpoint, config)


def _quantization_config(checkpoint: Checkpoint) -> dict[str, Any] | None:
    directory = checkpoint.directory
    path = directory / "config.json" if directory is not None else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{path}: not valid JSON ({error})") from None
    quantization = config.get("quantization_config") if isinstance(config, dict) else None
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        raise CheckpointError(f"{path}: quantization_config must be a mapping")
    return quantization


class DequantizedCheckpoint:
    """``checkpoint`` with its quantized weights dequantized (float32) and scales hidden."""

    def __init__(self, checkpoint: Checkpoint, quantization: dict[str, Any]):
        self.checkpoint = checkpoint
        self.quantization = quantization
        self.source = checkpoint.source
        self.directory = checkpoint.directory
        method = quantization.get("quant_method")
        where = f"{checkpoint.source}: config.json quantization_config"
        if method not in QUANT_METHODS:
            raise CheckpointError(
                f"{where}: unknown quant_method {method!r}; merge-cli dequantizes "
                + ", ".join(QUANT_METHODS)
            )
        self.method: str = method
        finder = {"fp8": _fp8_tensors, "mxfp4": _mxfp4_tensors}.get(method, _compressed_tensors)
        quantized, hidden = finder(checkpoint, quantization, where)
        self._quantized = {q.name: q for q in quantized}
        stored = {q.data: q for q in quantized}
        self._names: list[str] = []
        for name in checkpoint.tensor_names():
            if name in stored:
                self._names.append(stored[name].name)
            elif name not in hidden:
                self._names.append(name)

    @property
    def block_size(self) -> tuple[int, int] | None:
        """The FP8 block layout (``weight_block_size``) when the format is DeepSeek's."""
        blocks = [q.block for q in self._quantized.values() if q.kind == "fp8" and q.block]
        return blocks[0] if blocks else None

    def quantized(self, name: str) -> Quantized | None:
        """How ``name`` is stored, when it is quantized."""
        return self._quantized.get(name)

    def tensor_names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        found = self._quantized.get(name)
        if found is not None:
            return TensorInfo(name, found.shape, torch.float32)
        if name not in self._names:
            return info_of({}, self.source, name)
        return self.checkpoint.info(name)

    def stored_bytes(self, name: str) -> int:
        """Bytes read for ``name``: a quantized weight's data and scale as stored."""
        found = self._quantized.get(name)
        if found is None:
            return self.info(name).nbytes
        return self.checkpoint.info(found.data).nbytes + self.checkpoint.info(found.scale).nbytes

    def row_block(self, name: str) -> int:
        """Rows that share a scale row: chunks aligned to them read no row twice."""
        found = self._quantized.get(name)
        return found.row_block if found is not None else 1

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        found = self._quantized.get(name)
        if found is None:
            self.info(name)
            return self.checkpoint.read(name, rows)
        total = found.shape[0] if found.shape else 1
        start, stop = (0, total) if rows is None else (max(0, rows[0]), min(total, rows[1]))
        block = found.row_block
        first, last = start // block, ceil(stop / block)
        data_rows = (first * block, min(total, last * block))
        scale_rows = (first, last) if block > 1 or found.kind == "mxfp4" else data_rows
        data = self.checkpoint.read(found.data, data_rows)
        if found.kind == "mxfp4":
            scale = self.checkpoint.read(found.scale, scale_rows)
            values = dequantize_mxfp4(data, scale)
            values = values.transpose(1, 2) if values.dim() == 3 else values
        else:
            scale = self._scale(found, scale_rows)
            values = (
                dequantize_fp8(data, scale, found.block)
                if found.kind == "fp8"
                else _dequantize_compressed(data, scale, found.args)
            )
        offset = start - data_rows[0]
        values = values[offset : offset + stop - start]
        return values.contiguous()

    def _scale(self, found: Quantized, rows: tuple[int, int]) -> torch.Tensor:
        info = self.checkpoint.info(found.scale)
        if info.numel <= 1 or not info.shape:  # per tensor: the one value
            whole = self.checkpoint.read(found.scale).float()
            return whole.reshape(()) if found.kind == "fp8" else whole
        return self.checkpoint.read(found.scale, rows).float()


def dequantize_fp8(
    data: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None
) -> torch.Tensor:
    """FP8 values times their scale: per block (DeepSeek-V3 ``weight_dequant``: each
    ``block`` of the weight times its ``scale_inv``), per output row, or per tensor."""
    values = data.to(torch.float32)  # a new tensor: scaled in place
    if block is None or scale.dim() == 0:
        return values * (scale.reshape(-1, 1) if scale.dim() >= 1 else scale)
    rows, cols = values.shape
    if rows % block[0] == 0 and cols % block[1] == 0:  # whole blocks: scale tile by tile
        tiles = values.view(rows // block[0], block[0], cols // block[1], block[1])
        return tiles.mul_(scale[:, None, :, None]).view(rows, cols)
    expanded = scale.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)
    return values.mul_(expanded[:, :cols])


def quantize_fp8_block(
    values: torch.Tensor, block: tuple[int, int], fmt: str = "e4m3"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` (rows aligned to ``block``) as FP8 with one float32 ``scale_inv`` per block,
    DeepSeek-V3's layout: ``scale_inv = amax / max_finite``, ``q = values / scale_inv``.

    An all-zero block gets ``scale_inv = 1``. Dequantizing gives ``values`` within one FP8
    rounding step (a relative 2**-4 for E4M3) of each entry's block maximum.
    """
    dtype, largest = FP8_FORMATS[fmt]
    rows, cols = values.shape
    row_blocks, col_blocks = ceil(rows / block[0]), ceil(cols / block[1])
    padded = torch.zeros(row_blocks * block[0], col_blocks * block[1], dtype=torch.float32)
    padded[:rows, :cols] = values
    tiles = padded.reshape(row_blocks, block[0], col_blocks, block[1])
    amax = tiles.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / largest, torch.ones_like(amax))
    scaled = tiles / scale_inv[:, None, :, None]
    quantized = scaled.clamp(-largest, largest).to(dtype)
    data = quantized.reshape(padded.shape)[:rows, :cols].contiguous()
    return data, scale_inv.contiguous()


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 (OCP MX v1.0): ``blocks`` ``(..., G, 16)`` uint8, two FP4 E2M1 codes per byte
    (low nibble first), ``scales`` ``(..., G)`` E8M0 exponents; returns ``(..., G * 32)``."""
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = blocks.to(torch.int64)
    low, high = table[codes & 0x0F], table[codes >> 4]
    values = torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], MX_GROUP)
    exponent = scales.to(torch.int32) - MX_EXPONENT_BIAS
    values = torch.ldexp(values, exponent.unsqueeze(-1).to(torch.float32))
    return values.reshape(*blocks.shape[:-2], blocks.shape[-2] * MX_GROUP)


def _dequantize_compressed(data: torch.Tensor, scale: torch.Tensor, args: Any) -> torch.Tensor:
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    return dequantize(data, scale, args=args, dtype=torch.float32)


# -- format detection: which stored tensors make up which weight -----------------------------


def _problem(where: str, problems: list[str]) -> CheckpointError:
    shown = problems[:10]
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    return CheckpointError(f"{where}:\n  " + "\n  ".join(shown) + more)


def _fp8_tensors(
    checkpoint: Checkpoint, config: dict[str, Any], where: str
) -> tuple[list[Quantized], set[str]]:
    """DeepSeek-V3 / transformers FineGrainedFP8: ``W`` float8 and ``W_scale_inv``."""
    fmt = config.get("fmt", "e4m3")
    if fmt not in FP8_FORMATS:
        raise CheckpointError(f"{where}: unknown fmt {fmt!r} (expected e4m3 or e5m2)")
    block = config.get("weight_block_size")
    if block is not None and (
        not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) for b in block)
    ):
        raise CheckpointError(f"{where}: weight_block_size must be two integers, got {block!r}")
    return _scaled_fp8(
        checkpoint, "_scale_inv", "fp8", tuple(block) if block else None, None, where
    )


def _scaled_fp8(
    checkpoint: Checkpoint,
    suffix: str,
    kind: str,
    block: tuple[int, int] | None,
    args_of: Any,
    where: str,
) -> tuple[list[Quantized], set[str]]:
    """Pair every float8 tensor with its scale (``name + suffix``) and check the shapes."""
    names = checkpoint.tensor_names()
    present = set(names)
    problems: list[str] = []
    found: list[Quantized] = []
    hidden: set[str] = set()
    for name in names:
        info = checkpoint.info(name)
        if name.endswith(suffix):
            if name.removesuffix(suffix) not in present:
                problems.append(f"scale {name!r} has no quantized tensor {name[: -len(suffix)]!r}")
            hidden.add(name)
            continue
        if name.endswith("input_scale"):
            hidden.add(name)
            continue
        if info.dtype not in FLOAT8:
            continue
        scale = name + suffix
        if scale not in present:
            problems.append(
                f"tensor {name!r} is {dtype_name(info.dtype)} ({kind}) but has no scale {scale!r}"
            )
            continue
        args = args_of(name) if args_of is not None else None
        tensor_block = _block_of(args) if args is not None else block
        expected = _expected_scale_shapes(info.shape, tensor_block, args)
        scale_shape = checkpoint.info(scale).shape
        if scale_shape not in expected:
            problems.append(
                f"scale {scale!r} of tensor {name!r} {list(info.shape)} has shape "
                f"{list(scale_shape)}; expected " + " or ".join(str(list(s)) for s in expected)
            )
            continue
        row_block = tensor_block[0] if tensor_block else 1
        found.append(Quantized(name, kind, name, scale, info.shape, row_block, tensor_block, args))
    if problems:
        raise _problem(where, problems)
    return found, hidden


def _expected_scale_shapes(
    shape: tuple[int, ...], block: tuple[int, int] | None, args: Any
) -> list[tuple[int, ...]]:
    """Scale shapes the format allows for a weight of ``shape``."""
    if len(shape) != 2:
        return [(), (1,)]
    rows, cols = shape
    if block is not None:
        return [(ceil(rows / block[0]), ceil(cols / block[1]))]
    strategy = getattr(getattr(args, "strategy", None), "value", None)
    if strategy == "group":
        return [(rows, ceil(cols / args.group_size))]
    if strategy == "channel":
        return [(rows, 1)]
    if strategy == "tensor":
        return [(), (1,)]
    return [(), (1,), (rows,), (rows, 1)]


def _block_of(args: Any) -> tuple[int, int] | None:
    structure = getattr(args, "block_structure", None)
    strategy = getattr(getattr(args, "strategy", None), "value", None)
    return tuple(structure) if strategy == "block" and structure else None


def _mxfp4_tensors(
    checkpoint: Checkpoint, config: dict[str, Any], where: str
) -> tuple[list[Quantized], set[str]]:
    """gpt-oss MXFP4: ``W_blocks`` uint8 ``(..., G, 16)`` with ``W_scales`` uint8 ``(..., G)``."""
    del config
    names = checkpoint.tensor_names()
    present = set(names)
    problems: list[str] = []
    found: list[Quantized] = []
    hidden: set[str] = set()
    for name in names:
        info = checkpoint.info(name)
        if name.endswith("_scales"):
            if name.removesuffix("_scales") + "_blocks" not in present:
                problems.append(f"scale {name!r} has no packed tensor {name[:-7] + '_blocks'!r}")
            hidden.add(name)
            continue
        if not name.endswith("_blocks"):
            continue
        base = name.removesuffix("_blocks")
        scale = base + "_scales"
        if info.dtype != torch.uint8 or len(info.shape) < 2 or info.shape[-1] != MX_GROUP // 2:
            problems.append(
                f"tensor {name!r} ({dtype_name(info.dtype)} {list(info.shape)}) is not MXFP4 "
                f"packed blocks (uint8 with a last axis of {MX_GROUP // 2})"
            )
            continue
        if scale not in present:
            problems.append(f"tensor {name!r} is MXFP4 packed blocks but has no scale {scale!r}")
            continue
        scale_info = checkpoint.info(scale)
        if scale_info.shape != info.shape[:-1] or scale_info.dtype != torch.uint8:
            problems.append(
                f"scale {scale!r} of tensor {name!r} {list(info.shape)} is "
                f"{dtype_name(scale_info.dtype)} {list(scale_info.shape)}; expected uint8 "
                f"{list(info.shape[:-1])}"
            )
            continue
        flat = (*info.shape[:-2], info.shape[-2] * MX_GROUP)
        shape = (flat[0], flat[2], flat[1]) if len(flat) == 3 else flat
        found.append(Quantized(base, "mxfp4", name, scale, shape))
    if problems:
        raise _problem(where, problems)
    return found, hidden


def _compressed_tensors(
    checkpoint: Checkpoint, config: dict[str, Any], where: str
) -> tuple[list[Quantized], set[str]]:
    """compressed-tensors ``float-quantized``: ``W`` float8 with ``W_scale``."""
    try:
        from compressed_tensors.quantization import QuantizationConfig
    except ImportError:
        raise CheckpointError(
            f"{where}: a compressed-tensors checkpoint needs the compressed-tensors package "
            "(pip install compressed-tensors, or merge-cli's quantized extra)"
        ) from None
    try:
        parsed = QuantizationConfig.model_validate(config)
    except ValueError as error:
        raise CheckpointError(f"{where}: not a valid compressed-tensors config ({error})") from None
    fmt = getattr(parsed.format, "value", parsed.format)
    if fmt != "float-quantized":
        raise CheckpointError(
            f"{where}: compressed-tensors format {fmt!r} is not supported; merge-cli "
            "dequantizes float-quantized (FP8)"
        )
    groups = [g for g in parsed.config_groups.values() if g.weights is not None]

    def args_of(name: str) -> Any:
        module = name.rsplit(".", 1)[0]
        for group in groups:
            for target in group.targets:
                if not target.startswith("re:") or re.fullmatch(target[3:], module):
                    return group.weights
        return None

    names = checkpoint.tensor_names()
    unmatched = [
        f"tensor {n!r} is float8 but no config group of quantization_config targets it"
        for n in names
        if checkpoint.info(n).dtype in FLOAT8 and args_of(n) is None
    ]
    zero_points = [
        f"tensor {n!r}: asymmetric zero points are not supported"
        for n in names
        if n.endswith("_zero_point")
    ]
    if unmatched or zero_points:
        raise _problem(where, unmatched + zero_points)
    return _scaled_fp8(checkpoint, "_scale", "compressed-tensors FP8", None, args_of, where)


# -- what a merge must not copy -----------------------------------------------------------------


def unmergeable(checkpoint: Checkpoint, name: str) -> str | None:
    """Why the stored tensor ``name`` must be neither merged nor copied from one model, or
    None: a quantized weight or a quantization scale left in a checkpoint that no dequantizing
    view explains (its config.json has no quantization_config)."""
    info = checkpoint.info(name)
    names = checkpoint.tensor_names()
    hint = "config.json has no quantization_config saying how to dequantize it"
    if info.dtype in FLOAT8:
        return (
            f"tensor {name!r} is {dtype_name(info.dtype)} (FP8) in {checkpoint.source} and "
            f"{hint}; merging would copy it unmerged from one model"
        )
    if (
        name.endswith("_blocks")
        and info.dtype == torch.uint8
        and name.removesuffix("_blocks") + "_scales" in names
    ):
        return (
            f"tensor {name!r} holds MXFP4 packed blocks in {checkpoint.source} and {hint}; "
            "merging would copy it unmerged from one model"
        )
    for suffix, partner in (("_scale_inv", ""), ("_scale", ""), ("_scales", "_blocks")):
        if name.endswith(suffix):
            weight = name.removesuffix(suffix) + partner
            if weight in names and (
                checkpoint.info(weight).dtype in FLOAT8 or weight.endswith("_blocks")
            ):
                return (
                    f"tensor {name!r} is the quantization scale of {weight!r} in "
                    f"{checkpoint.source} and {hint}; scales are consumed, never merged"
                )
    return None
