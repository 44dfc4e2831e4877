"""Which entries torch's CPU `argsort(descending=True)` puts first, found without the sort.

TIES trims each task vector to its k largest magnitudes, and where entries tied in magnitude
straddle the k-th place (most tensors of a 16-bit checkpoint) mergekit keeps those its full
`torch.argsort` puts first. On the CPU that sort is libstdc++'s `std::sort` -- an introsort:
median-of-three pivots, Hoare partitions, insertion sort below 17 entries -- whose choice among
ties is arbitrary but fixed. Which entries end in the first k places depends only on the
partitions of the segments that straddle place k (a partition moves entries within its segment;
insertion sort, which is stable, never moves an entry past an equal one). `leading_mask` follows
exactly those: a quickselect with the sort's own pivots and swaps, O(n) instead of O(n log n),
holding chunks of positions rather than the sort's n values and n indices.

It is exact only where torch's sort is that introsort (Linux builds; not macOS's libc++, nor a
future vectorised sort): `follows_torch_sort` compares the two on arrays full of ties once per
process, and where they differ -- or past the sort's depth limit, where it turns to heapsort --
callers sort as before.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from functools import cache

import numpy as np
import torch

INSERTION_THRESHOLD = 16  # libstdc++'s _S_threshold: segments this short are left to insertion sort
CHUNK = 1 << 18  # entries classified at a time: masks and positions of at most 2 MiB, reused
SELF_CHECKS = (  # size, distinct values (0: continuous), places of k (fractions of the size)
    (17, (3, 0), (0.0, 0.5, 0.95)),  # one partition, then insertion sort
    (1000, (3, 50, 0), (0.0, 0.2, 0.5, 0.99)),
    (200_000, (50, 0), (0.2,)),  # many partitions, as TIES's trimming meets them
)

_position_buffers = threading.local()


def leading_mask(keys: torch.Tensor, k: int) -> torch.Tensor | None:
    """True at the k entries that `torch.argsort(keys, descending=True)[:k]` names, for 1-D
    float32 CPU `keys` without NaN, which this overwrites (they end partly sorted); None where
    the sort's path cannot be followed (its depth limit reached: heapsort would take over)."""
    n = keys.numel()
    values = keys.numpy()
    keep = np.zeros(n, dtype=bool)
    if k >= n:
        keep[:] = True
        return torch.from_numpy(keep)
    index = _index_buffer(n)
    first, last = 0, n
    depth = 2 * (n.bit_length() - 1)  # std::__lg(n) * 2
    while last - first > INSERTION_THRESHOLD and first < k < last:
        if depth == 0:
            return None
        depth -= 1
        _median_to_first(values, index, first, last)
        cut = _partition(values, index, first + 1, last, values[first])
        if cut <= first:  # no stop for the left scan: not the sort's median of three
            return None
        if k <= cut:
            last = cut
        else:  # everything before the cut comes first, in whatever order
            keep[index[first:cut]] = True
            first = cut
    if k >= last:
        keep[index[first:last]] = True
    elif first < k:  # a short segment across place k: insertion sort, which keeps ties in order
        order = np.argsort(-values[first:last], kind="stable")[: k - first]
        keep[index[first:last][order]] = True
    return torch.from_numpy(keep)


@cache
def follows_torch_sort() -> bool:
    """Whether `leading_mask` agrees with this torch's CPU argsort on arrays with many ties, few
    and none, short and long enough for many partitions: once per process, a few tens of ms."""
    generator = np.random.default_rng(20261202)
    for size, levels, places in SELF_CHECKS:
        for level in levels:
            if level:
                keys = generator.integers(0, level, size).astype(np.float32)
            else:
                keys = np.abs(generator.standard_normal(size)).astype(np.float32)
            for k in {max(1, int(size * place)) for place in places}:
                reference = torch.zeros(size, dtype=torch.bool)
                reference[torch.argsort(torch.from_numpy(keys), descending=True)[:k]] = True
                mask = leading_mask(torch.from_numpy(keys.copy()), k)
                if mask is None or not torch.equal(mask, reference):
                    return False
    return True


def _index_buffer(n: int) -> np.ndarray:
    """Positions 0..n-1 (each entry's original index, moved with it), in a buffer this thread
    keeps for the next tensor: a fresh one would be faulted in page by page every time."""
    dtype = np.int32 if n < 2**31 else np.int64
    held: np.ndarray | None = getattr(_position_buffers, "index", None)
    if held is None or len(held) < n or held.dtype != dtype:
        _position_buffers.index = None
        held = _position_buffers.index = np.empty(n, dtype=dtype)
    index = held[:n]
    torch.arange(n, out=torch.from_numpy(index))  # written in place: no temporary of n entries
    return index


def _median_to_first(values: np.ndarray, index: np.ndarray, first: int, last: int) -> None:
    """std::__move_median_to_first(first, first + 1, mid, last - 1) with a descending comparator."""
    a, b, c = first + 1, first + (last - first) // 2, last - 1
    va, vb, vc = values[a], values[b], values[c]
    if va > vb:
        median = b if vb > vc else (c if va > vc else a)
    elif va > vc:
        median = a
    else:
        median = c if vb > vc else b
    values[first], values[median] = values[median], values[first]
    index[first], index[median] = index[median], index[first]


def _partition(values: np.ndarray, index: np.ndarray, first: int, last: int, pivot: np.float32) -> int:
    """std::__unguarded_partition over [first, last) with a descending comparator, in place: the
    left scan stops at entries <= pivot, the right scan at entries >= pivot, and the i-th stop
    from the left swaps with the i-th from the right while they have not crossed. Returns the cut
    (-1 where the left scan finds no stop, which the sort's median of three rules out).
    The stops are found a chunk at a time from both ends; a chunk is classified before any swap
    reaches it, except past the crossing, where what it reads cannot change the cut."""
    lows = _stops(values, first, last, pivot, low=True)
    highs = _stops(values, first, last, pivot, low=False)
    left: np.ndarray = np.empty(0, dtype=np.int64)
    right: np.ndarray = left
    last_high = -1  # the right stop of the last swap
    while True:
        if not len(left):
            more = next(lows, None)
            if more is None:  # no left stop past the swaps: the scan stops at the last right one
                return last_high
            left = more
        if not len(right):
            more = next(highs, None)
            if more is None:  # no right stop left: the scans have crossed at the next left stop
                return int(left[0]) if last_high < 0 or left[0] < last_high else last_high
            right = more
        count = min(len(left), len(right))
        crossed = int(np.searchsorted(left[:count] >= right[:count], True))  # monotone: False..True
        if crossed:
            lo, hi = left[:crossed], right[:crossed]
            values[lo], values[hi] = values[hi], values[lo].copy()
            index[lo], index[hi] = index[hi], index[lo].copy()
            last_high = int(hi[-1])
        if crossed < count:
            stop = int(left[crossed])
            return stop if last_high < 0 or stop < last_high else last_high
        left, right = left[count:], right[count:]


def _stops(values: np.ndarray, first: int, last: int, pivot: np.float32, low: bool) -> Iterator[np.ndarray]:
    """Positions in [first, last) where the left scan (`low`: values <= pivot, from the left) or
    the right scan (values >= pivot, from the right) stops, in scan order, a chunk at a time."""
    starts = range(first, last, CHUNK)
    for start in starts if low else reversed(starts):
        chunk = values[start : min(last, start + CHUNK)]
        found = np.flatnonzero(chunk <= pivot if low else chunk >= pivot)
        if len(found):
            found += start
            yield found if low else found[::-1]
