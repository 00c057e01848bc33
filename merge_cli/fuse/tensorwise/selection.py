"""Exact top-k selection over a tensor streamed in chunks, in O(1) memory in its size.

TIES, breadcrumbs and SCE keep the k largest magnitudes of a whole tensor. Sorting the
tensor (what mergekit does) costs O(n log n) time and a full copy; here the k-th largest value
is found by *radix selection* on the float32 bit patterns instead. For non-negative floats the
bit pattern, read as an integer, orders like the value, so:

1. one pass histograms the high 16 bits (the sign bit is 0: 2**15 bins) and finds the bin
   that holds the k-th largest value;
2. a second pass histograms the low 16 bits of the values in that bin: that gives the exact
   k-th largest value (the *threshold*) and how many values equal it;
3. when the values equal to the threshold are more than the top k still has room for, ties
   are broken by flat index (earlier first), the same way however the tensor is chunked:
   each chunk's low histogram from pass 2 says how many ties lie before it.

The memory held is two histograms per query plus, per chunk, the values of its own that fall
in the threshold's high bin (a thin slice: at most 65,536 counts); the time is two linear
passes (no sort).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

HIGH_BINS = 1 << 15
LOW_BINS = 1 << 16

#: Fresh iterators over ``(first row of the chunk, [bit keys of each series])``.
KeyPasses = Callable[[], Iterator[tuple[int, list[torch.Tensor]]]]


def magnitude_keys(values: torch.Tensor) -> torch.Tensor:
    """Flat int32 keys that order like ``|values|`` (the float32 bit patterns of the magnitudes)."""
    return values.float().abs().reshape(-1).view(torch.int32)


@dataclass(frozen=True)
class TopK:
    """The ``k`` largest of ``numel`` keys, ranked by value, then by flat index (earlier first)."""

    k: int
    numel: int
    threshold: int = 0
    ties_kept: int = 0
    ties_total: int = 0
    #: First row of each chunk -> threshold ties in the chunks before it (only when needed).
    ties_before: dict[int, int] = field(default_factory=dict)

    def mask(self, keys: torch.Tensor, first_row: int) -> torch.Tensor:
        """Boolean mask of the chunk's keys (flat) that are in the top k."""
        if self.k <= 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        if self.k >= self.numel:
            return torch.ones_like(keys, dtype=torch.bool)
        if self.ties_kept == self.ties_total:
            return keys >= self.threshold
        keep = keys > self.threshold
        room = self.ties_kept - self.ties_before[first_row]
        if room > 0:
            positions = (keys == self.threshold).nonzero().squeeze(1)[:room]
            keep[positions] = True
        return keep


def _first_from_top(histogram: torch.Tensor, count: int) -> tuple[int, int]:
    """Bin holding the ``count``-th largest entry, and how many entries lie in higher bins."""
    from_top = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(from_top, torch.tensor([count]))[0])
    bin_index = len(histogram) - 1 - position
    above = int(from_top[position]) - int(histogram[bin_index])
    return bin_index, above


def select_top_k(passes: KeyPasses, queries: list[tuple[int, Callable[[int], int]]]) -> list[TopK]:
    """Exact top-k of every query ``(series, k_of_size)`` over keys streamed in chunks.

    Each pass yields, per chunk, its first row and one flat int32 key tensor per series
    (see :func:`magnitude_keys`); ``k_of_size(n)`` says how many of the series' n keys to
    keep. Returns one :class:`TopK` per query.
    """
    high: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    for _, keys in passes():
        for series, key in enumerate(keys):
            histogram = torch.bincount(key >> 16, minlength=HIGH_BINS).cpu()
            high[series] = high[series] + histogram if series in high else histogram
            counts[series] = counts.get(series, 0) + key.numel()

    results: dict[int, TopK] = {}
    open_queries: dict[int, tuple[int, int, int, int]] = {}  # query -> series, k, bin, above
    for i, (series, k_of_size) in enumerate(queries):
        total = counts.get(series, 0)
        k = k_of_size(total)
        if k <= 0 or k >= total:
            results[i] = TopK(k, total)
        else:
            bin_index, above = _first_from_top(high[series], k)
            open_queries[i] = (series, k, bin_index, above)
    if not open_queries:
        return [results[i] for i in range(len(queries))]

    low = {i: torch.zeros(LOW_BINS, dtype=torch.int64) for i in open_queries}
    # Each chunk's low histogram too (its non-zero bins): once the threshold is known, they
    # say how many of its ties lie in the chunks before each chunk, without another pass.
    per_chunk: dict[int, list[tuple[int, torch.Tensor, torch.Tensor]]] = {
        i: [] for i in open_queries
    }
    for first_row, keys in passes():
        for i, (series, _, bin_index, _) in open_queries.items():
            key = keys[series]
            in_bin = key[(key >> 16) == bin_index] & 0xFFFF
            histogram = torch.bincount(in_bin, minlength=LOW_BINS).cpu()
            low[i] += histogram
            present = histogram.nonzero().squeeze(1)
            per_chunk[i].append((first_row, present.to(torch.int32), histogram[present]))

    for i, (series, k, bin_index, above) in open_queries.items():
        low_index, above_low = _first_from_top(low[i], k - above)
        ties_total = int(low[i][low_index])
        ties_kept = k - above - above_low
        ties_before: dict[int, int] = {}
        if ties_kept < ties_total:
            seen = 0
            for first_row, present, counts_present in per_chunk[i]:
                ties_before[first_row] = seen
                seen += int(counts_present[present == low_index].sum())
        threshold = (bin_index << 16) | low_index
        results[i] = TopK(k, counts[series], threshold, ties_kept, ties_total, ties_before)
    return [results[i] for i in range(len(queries))]
