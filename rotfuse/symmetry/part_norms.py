"""Row norms over any prefix of the columns, and over the rest, from one pass over the rows.

The FFN solve's prefix bounds need, per row, the norm of the whole row, of a prefix of its
columns and of the columns after it -- for several prefixes (the probe tries a few, the passes
widen them). Each is a pass over rows of 5632 x 6144 entries at 1B. Instead, one pass sums each
row's squares over each of `parts` equal runs of its columns (float32 within a run, as torch's
norm sums them; the runs' totals in float64), and every norm whose boundary falls between two
runs is the square root of a few of those totals. `paired_rows` makes those passes over two row
sets as one, with each row pair's inner product and the sets' distance: what a solve and its
report would read both sides again for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

CHUNK_ELEMENTS = 2**18  # float32 entries squared at a time (1 MiB: stays in cache)


@dataclass(frozen=True)
class PartSquares:
    """`sums[i, k]`: row i's sum of squares over its k-th run of `part` columns (float64)."""

    sums: torch.Tensor
    part: int

    def norms(self, start: int = 0, stop: int | None = None) -> torch.Tensor | None:
        """The norms of the columns [start, stop) (float32; stop None: to the end), or None where
        either end falls inside a run."""
        stop = self.sums.shape[1] * self.part if stop is None else stop
        if start % self.part or stop % self.part:
            return None
        return self.sums[:, start // self.part : stop // self.part].sum(1).sqrt_().float()

    def rows(self, index: torch.Tensor | slice) -> PartSquares:
        """The same for the rows `index` (indices, or a slice) only."""
        return PartSquares(self.sums[index], self.part)


def part_squares(rows: torch.Tensor, parts: int) -> PartSquares | None:
    """`PartSquares` of 2-D `rows` (any float dtype) in `parts` runs of columns, or None when their
    width is not a multiple of `parts`."""
    if not _divides(rows, parts):
        return None
    sums = torch.empty(len(rows), parts, dtype=torch.float32, device=rows.device)
    for block in _chunks(rows):
        _sum_parts(rows[block].to(torch.float32, copy=True), parts, sums[block])
    return PartSquares(sums.double(), rows.shape[1] // parts)


@dataclass(frozen=True)
class PairedRows:
    """What one pass over two row sets of one shape gives (`paired_rows`): each side's
    `PartSquares`, every pair's inner product x_i . y_i (float32, as `vecdot` sums it) and the
    squared distance sum_i |x_i - y_i|^2 (float32 sums of chunks of rows, added in float64)."""

    src: PartSquares
    anchor: PartSquares
    diagonal: torch.Tensor
    sq_distance: float


def paired_rows(
    src: torch.Tensor, anchor: torch.Tensor, parts: int, fill: Callable[[slice], None] | None = None
) -> PairedRows | None:
    """`PairedRows` of two 2-D row sets of one shape (any float dtypes), or None when their width
    is not a multiple of `parts`: the passes `part_squares` makes over each, a row-wise inner
    product and a distance, made as one (each chunk of rows converted to float32 once). `fill`,
    where given, writes each chunk of rows of both sets just before it is read: rows built as they
    are measured are read from cache, not from memory (None returned: it was called for none)."""
    if src.shape != anchor.shape or not _divides(src, parts):
        return None
    sums = [torch.empty(len(src), parts, dtype=torch.float32, device=src.device) for _ in range(2)]
    diagonal = torch.empty(len(src), dtype=torch.float32, device=src.device)
    chunk_distances = []
    for block in _chunks(src):
        if fill is not None:
            fill(block)
        x, y = src[block].to(torch.float32, copy=True), anchor[block].to(torch.float32, copy=True)
        torch.linalg.vecdot(x, y, out=diagonal[block])
        chunk_distances.append(torch.sub(x, y).square_().sum())
        _sum_parts(x, parts, sums[0][block])
        _sum_parts(y, parts, sums[1][block])
    width = src.shape[1] // parts
    distance = float(torch.stack(chunk_distances).double().sum()) if chunk_distances else 0.0
    return PairedRows(PartSquares(sums[0].double(), width), PartSquares(sums[1].double(), width), diagonal, distance)


def _divides(rows: torch.Tensor, parts: int) -> bool:
    width = rows.shape[1]
    return width >= parts and not width % parts


def _chunks(rows: torch.Tensor) -> Iterator[slice]:
    """The rows of `rows` CHUNK_ELEMENTS at a time."""
    step = max(1, CHUNK_ELEMENTS // rows.shape[1])
    return (slice(start, start + step) for start in range(0, len(rows), step))


def _sum_parts(chunk: torch.Tensor, parts: int, out: torch.Tensor) -> None:
    """Each row's sums of squares over `parts` runs of columns, into `out` (squares `chunk` in place)."""
    torch.sum(chunk.square_().view(len(chunk), parts, -1), dim=2, out=out)
