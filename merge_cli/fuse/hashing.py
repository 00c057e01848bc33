"""Counter-based random numbers: a uniform value per (seed, stream, element index).

DARE and DELLA drop entries at random. Drawing from torch's sequential generator would make
the mask depend on how the tensor is chunked and on the device; hashing the element's flat
index instead gives every element the same draw whether the tensor is processed whole or in
chunks, on CPU or GPU. The hash is an integer mixer of the xorshift-multiply kind (as in
murmur3's finalizer) on 32-bit values held in int64, with multipliers below 2**31 so no
product overflows; all arithmetic is exact and identical on every device.
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
_MULTIPLIER_1 = 0x7FEB352D
_MULTIPLIER_2 = 0x2C1B3C6D


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Bijective avalanche mix of 32-bit values (in an int64 tensor)."""
    x = x ^ (x >> 16)
    x = (x * _MULTIPLIER_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MULTIPLIER_2) & _MASK32
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    x &= _MASK32
    x ^= x >> 16
    x = (x * _MULTIPLIER_1) & _MASK32
    x ^= x >> 15
    x = (x * _MULTIPLIER_2) & _MASK32
    return x ^ (x >> 16)


def stream_key(seed: int, stream: int) -> tuple[int, int]:
    """Two 32-bit keys for one random stream (e.g. one model) of a tensor's seed."""
    key = _mix_int(seed ^ _mix_int((seed >> 32) ^ _mix_int(stream + 0x9E3779B9)))
    return key, _mix_int(key + 0x632BE5AB)


def uniform(seed: int, stream: int, indices: torch.Tensor) -> torch.Tensor:
    """A float32 in [0, 1) for every int64 element index, fixed by ``(seed, stream, index)``.

    Values are multiples of 2**-24, so ``uniform(...) < p`` holds with probability ``p``
    rounded to 24 bits.
    """
    key_low, key_high = stream_key(seed, stream)
    hashed = _mix((indices & _MASK32) ^ key_low)
    hashed = _mix(hashed ^ (((indices >> 32) ^ key_high) & _MASK32))
    return (hashed >> 8).to(torch.float32) * (1.0 / (1 << 24))
