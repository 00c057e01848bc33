"""Counter-based random numbers: a uniform value per (seed, stream, element index).

DARE and DELLA drop entries at random. Drawing from torch's sequential generator would make
the mask depend on how the tensor is chunked and on the device; hashing the element's flat
index instead gives every element the same draw whether the tensor is processed whole or in
chunks, on CPU or GPU. The hash is an integer mixer of the xorshift-multiply kind (as in
murmur3's finalizer) on 32-bit values held in int64, with multipliers below 2**31 so no
product overflows; all arithmetic is exact and identical on every device. The index is
xored with a key mixed from the seed and stream, so different streams get unrelated draws.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x2C1B3C6D


def _mix_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MULTIPLIER_1) & _MASK32
    x ^= x >> 15
    x = (x * _MULTIPLIER_2) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> int:
    """A 32-bit key for one random stream (e.g. one model) of a tensor's seed."""
    return _mix_int(seed ^ _mix_int((seed >> 32) ^ _mix_int(stream + 0x9E3779B9)))


def uniform_range(seed: int, stream: int, start: int, count: int, device=None) -> torch.Tensor:
    """A float32 in [0, 1) for each flat index in ``[start, start + count)``.

    The value depends only on ``(seed, stream, index)``. It is a multiple of 2**-24, so
    ``uniform < p`` holds with probability ``p`` rounded to 24 bits.
    """
    return _hash24(stream_key(seed, stream), start, count, device).to(torch.float32).mul_(2**-24)


def uniform_below(
    seed: int, stream: int, start: int, count: int, probability: float, device=None
) -> torch.Tensor:
    """``uniform_range(...) < probability`` (bool), without forming the floats.

    A draw ``h * 2**-24`` is below ``probability`` (rounded to float32, as the comparison of a
    float32 tensor with a number rounds it) exactly when ``h < ceil(probability * 2**24)``.
    """
    threshold = _threshold24(probability)
    return torch.lt(_hash24(stream_key(seed, stream), start, count, device), threshold)


@lru_cache(maxsize=64)
def _threshold24(probability: float) -> int:
    """``ceil(probability * 2**24)``, the probability rounded to float32 first."""
    return math.ceil(torch.tensor(probability, dtype=torch.float32).item() * 2**24)


@lru_cache(maxsize=8)
def _offsets(count: int, device: str) -> torch.Tensor:
    """``arange(count)`` in int32, kept (read-only) for reuse: adding an offset to it is three
    times faster than a fresh ``arange``, and the executor asks for the same block sizes."""
    return torch.arange(count, dtype=torch.int32, device=device)


def _hash24(key: int, start: int, count: int, device) -> torch.Tensor:
    """The top 24 bits of the mixed 32-bit hash of each index, as an integer tensor.

    Indices below 2**31 are hashed in int32, whose products wrap modulo 2**32 exactly as the
    int64 products masked to 32 bits do; arithmetic right shifts are masked to act as
    logical ones. That is three times faster than int64. Larger indices take the int64 path,
    which also folds the index's high 32 bits in.
    """
    if start + count <= 1 << 31:
        signed_key = key - (1 << 32) if key >= 1 << 31 else key
        hashed = torch.add(_offsets(count, str(device or "cpu")), start)
        shifted = torch.empty_like(hashed)  # one scratch buffer for the three shifts
        hashed ^= signed_key
        hashed *= _MULTIPLIER_1
        torch.bitwise_right_shift(hashed, 15, out=shifted)
        hashed ^= shifted.bitwise_and_(0x1FFFF)
        hashed *= _MULTIPLIER_2
        torch.bitwise_right_shift(hashed, 16, out=shifted)
        hashed ^= shifted.bitwise_and_(0xFFFF)
        torch.bitwise_right_shift(hashed, 8, out=shifted)
        return shifted.bitwise_and_(0xFFFFFF)
    hashed = torch.arange(start, start + count, dtype=torch.int64, device=device)
    if start + count > 1 << 32:
        high = hashed >> 32
        hashed &= _MASK32
        hashed ^= (high * _MULTIPLIER_2) & _MASK32
    hashed ^= key
    hashed *= _MULTIPLIER_1
    hashed &= _MASK32
    hashed ^= hashed >> 15
    hashed *= _MULTIPLIER_2
    hashed &= _MASK32
    hashed ^= hashed >> 16
    return hashed >> 8
