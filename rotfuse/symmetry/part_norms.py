"""Row norms over any prefix of the columns, and over the rest, from one pass over the rows.

The FFN solve's prefix bounds need, per row, the norm of the whole row, of a prefix of its
columns and of the columns after it -- for several prefixes (the probe tries a few, the passes
widen them). Each is a pass over rows of 5632 x 6144 entries at 1B. Instead, one pass sums each
row's squares over each of `parts` equal runs of its columns (float32 within a run, as torch's
norm sums them; the runs' totals in float64), and every norm whose boundary falls between two
runs is the square root of a few of those totals.
"""

from __future__ import annotations

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

    def rows(self, index: torch.Tensor) -> PartSquares:
        """The same for the rows `index` only."""
        return PartSquares(self.sums.index_select(0, index), self.part)


def part_squares(rows: torch.Tensor, parts: int) -> PartSquares | None:
    """`PartSquares` of 2-D `rows` (any float dtype) in `parts` runs of columns, or None when their
    width is not a multiple of `parts`."""
    n, width = rows.shape
    if width < parts or width % parts:
        return None
    sums = torch.empty(n, parts, dtype=torch.float32, device=rows.device)
    step = max(1, CHUNK_ELEMENTS // width)
    for start in range(0, n, step):
        block = rows[start : start + step].to(torch.float32, copy=True)
        torch.sum(block.square_().view(len(block), parts, -1), dim=2, out=sums[start : start + step])
    return PartSquares(sums.double(), width // parts)
