"""Mapping between safetensors dtype codes, recipe dtype names and torch dtypes."""

from __future__ import annotations

import torch

SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _name):
        SAFETENSORS_TO_TORCH[_code] = getattr(torch, _name)

TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

RECIPE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def is_float(dtype: torch.dtype) -> bool:
    """True for dtypes that merging may average (floating point of 16 bits or more)."""
    return dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtype_name(dtype: torch.dtype) -> str:
    """Short readable name: ``torch.bfloat16`` -> ``bfloat16``."""
    return str(dtype).removeprefix("torch.")
