"""Exact chunked top-k selection (radix select on float32 bit patterns) and counter hashing."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merge_cli.fuse.tensorwise.hashing import stream_key, uniform_range
from merge_cli.fuse.tensorwise.selection import HIGH_BINS, LOW_BINS, magnitude_keys, select_top_k


def _reference_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by (|value| descending, index ascending), by a plain stable sort."""
    order = sorted(range(len(values)), key=lambda i: (-abs(float(values[i])), i))
    mask = torch.zeros(len(values), dtype=torch.bool)
    mask[order[: max(0, min(k, len(values)))]] = True
    return mask


def _chunked_mask(values: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    def passes():
        for start in range(0, len(values), chunk):
            yield start, [magnitude_keys(values[start : start + chunk])]

    (top,) = select_top_k(passes, [(0, lambda _size: k)])
    pieces = [
        top.mask(magnitude_keys(values[s : s + chunk]), s) for s in range(0, len(values), chunk)
    ]
    return torch.cat(pieces)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, -2.0, 3.25, 1e-30, -7e10]),
        min_size=1,
        max_size=60,
    ),
    k_fraction=st.floats(0, 1.2),
    chunk=st.integers(1, 64),
)
def test_top_k_with_many_ties_matches_a_stable_sort_for_any_chunking(values, k_fraction, chunk):
    tensor = torch.tensor(values, dtype=torch.float32)
    k = int(k_fraction * len(values))
    assert torch.equal(_chunked_mask(tensor, k, chunk), _reference_top_k(tensor, k))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 500), chunk=st.integers(1, 500))
def test_top_k_of_continuous_values_keeps_exactly_k(seed, n, chunk):
    tensor = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    k = n // 3
    mask = _chunked_mask(tensor, k, chunk)
    assert int(mask.sum()) == k
    if 0 < k < n:
        assert tensor[mask].abs().min() >= tensor[~mask].abs().max()


def test_selection_agrees_with_kthvalue_on_a_large_tensor():
    values = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    k = len(values) // 5
    (top,) = select_top_k(lambda: iter([(0, [magnitude_keys(values)])]), [(0, lambda _n: k)])
    mask = top.mask(magnitude_keys(values), 0)
    assert int(mask.sum()) == k
    assert float(values.abs().kthvalue(len(values) - k + 1).values) == float(
        values[mask].abs().min()
    )
    assert (HIGH_BINS, LOW_BINS) == (2**15, 2**16)  # the only state kept between passes


def test_uniform_hash_is_fixed_by_seed_stream_and_index_only():
    draws = uniform_range(7, 0, 0, 100_000)
    assert torch.equal(draws[1000:2000], uniform_range(7, 0, 1000, 1000))
    assert not torch.equal(draws, uniform_range(8, 0, 0, 100_000))
    assert not torch.equal(draws, uniform_range(7, 1, 0, 100_000))
    assert draws.min() >= 0 and draws.max() < 1
    assert abs(float(draws.mean()) - 0.5) < 0.005
    assert abs(float((draws < 0.3).float().mean()) - 0.3) < 0.005
    # neighbouring elements and different streams are uncorrelated
    assert abs(float(torch.corrcoef(torch.stack([draws[:-1], draws[1:]]))[0, 1])) < 0.01
    for other in (uniform_range(7, 1, 0, 100_000), uniform_range(8, 0, 0, 100_000)):
        assert abs(float(torch.corrcoef(torch.stack([draws, other]))[0, 1])) < 0.01
        # joint keep rate of two streams is the product (independent masks)
        assert abs(float(((draws < 0.5) & (other < 0.5)).float().mean()) - 0.25) < 0.006
    high = uniform_range(7, 0, 2**33, 100_000)
    assert not torch.equal(draws, high)
    assert abs(float(high.mean()) - 0.5) < 0.005


def _reference_uniform(seed: int, stream: int, index: int) -> float:
    """The documented hash, in Python integers (indices below 2**32)."""
    from merge_cli.fuse.tensorwise.hashing import _MASK32, _MULTIPLIER_1, _MULTIPLIER_2, stream_key

    hashed = index ^ stream_key(seed, stream)
    hashed = (hashed * _MULTIPLIER_1) & _MASK32
    hashed ^= hashed >> 15
    hashed = (hashed * _MULTIPLIER_2) & _MASK32
    hashed ^= hashed >> 16
    return (hashed >> 8) / 2**24


@pytest.mark.parametrize("start", [0, 1000, 2**31 - 3, 2**32 - 10])
def test_uniform_hash_equals_the_reference_on_both_integer_paths(start):
    seed, stream = 3, 3  # a key with the top bit set exercises the signed int32 path
    assert stream_key(seed, stream) >= 2**31
    draws = uniform_range(seed, stream, start, 6).tolist()
    assert draws == [_reference_uniform(seed, stream, start + i) for i in range(6)]


@pytest.mark.parametrize("start", [1000, 2**31 - 3, 2**32 - 10])
def test_uniform_below_is_the_float_comparison_even_next_to_a_draw(start):
    """The integer comparison behind DARE's masks gives ``uniform_range(...) < p`` exactly,
    including for p a fraction of 2**-24 above or below a draw (where float32 rounds p)."""
    from merge_cli.fuse.tensorwise.hashing import uniform_below

    seed, stream, count = 3, 3, 4096
    draws = uniform_range(seed, stream, start, count)
    for p in (0.1, 0.5, 1 / 3, 0.9999999):
        assert torch.equal(uniform_below(seed, stream, start, count, p), draws < p)
    upper = draws[draws >= 0.5]  # where float32 has a 2**-24 spacing
    for value in upper[:5].tolist():
        for offset in (-0.6, -0.4, 0.4, 0.6):  # of 2**-24: p rounds to a draw or its neighbour
            p = value + offset * 2**-24
            expected = draws < p
            assert torch.equal(uniform_below(seed, stream, start, count, p), expected)
            assert bool(expected[draws == value].all()) == (offset > 0.5)
