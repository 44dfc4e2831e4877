"""`top_two`: each row's second-largest value and a column of its largest entry, as `topk(2)` gives
them -- on rows wide enough for the blocked path, narrow ones, ties within a block and across
blocks, and a short last block."""

from __future__ import annotations

import pytest
import torch

from rotfuse.symmetry.top_two import MIN_BLOCKS, TOP_BLOCK, top_two


def _check(rows: torch.Tensor) -> None:
    second, pick = top_two(rows)
    top = rows.topk(2, dim=1).values
    assert torch.equal(second, top[:, 1])
    assert torch.equal(rows.gather(1, pick[:, None])[:, 0], top[:, 0]), "the pick holds the largest entry"


@pytest.mark.parametrize("width", [2, 40, MIN_BLOCKS * TOP_BLOCK, MIN_BLOCKS * TOP_BLOCK + 7, 5632, 5000])
def test_top_two_agrees_with_topk(width):
    g = torch.Generator().manual_seed(width)
    _check(torch.randn(300, width, generator=g))


def test_top_two_sees_a_tie_in_another_block_and_in_the_same_block():
    """Two equal maxima make the second value the largest, wherever the second one sits -- in a
    block of its own (the blocks' runner-up) or beside the first (the best block's runner-up)."""
    width = 4096
    rows = torch.randn(4, width, generator=torch.Generator().manual_seed(1))
    rows[0, [5, 3000]] = 100.0  # different blocks
    rows[1, [5, 6]] = 100.0  # the same block
    rows[2, [width - 1]] = 100.0  # the last column
    rows[3, [width - 2, width - 1]] = 100.0
    _check(rows)
    second, _ = top_two(rows)
    assert second.tolist() == [100.0, 100.0, float(rows[2].topk(2).values[1]), 100.0]


def test_top_two_keeps_the_short_last_block_apart():
    """A width that is no multiple of TOP_BLOCK: the last block is shorter, and the columns past
    the end that its gather would read twice must not count as a runner-up."""
    width = MIN_BLOCKS * TOP_BLOCK + 3
    rows = torch.full((2, width), -5.0)
    rows[0, width - 1] = 1.0  # the largest in the short last block, nothing else near it
    rows[1, width - 2] = 1.0
    rows[1, 0] = 0.5
    second, pick = top_two(rows)
    assert pick.tolist() == [width - 1, width - 2]
    assert second.tolist() == [-5.0, 0.5]
