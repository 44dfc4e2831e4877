"""`part_squares`: every prefix's and rest's norms from one pass, equal to the norms computed
directly, for the boundaries it holds and for none other; the rows it reads are left as they were."""

from __future__ import annotations

import pytest
import torch

from rotfuse.symmetry.part_norms import paired_rows, part_squares


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_part_norms_equal_the_direct_norms(dtype):
    g = torch.Generator().manual_seed(0)
    rows = (torch.randn(700, 640, generator=g) * torch.logspace(-2, 2, 700)[:, None]).to(dtype)
    before = rows.clone()
    parts = part_squares(rows, 64)
    assert parts is not None and parts.part == 10
    assert torch.equal(rows, before), "the rows are squared in a copy"
    wide = rows.double()
    assert torch.allclose(parts.norms().double(), wide.norm(dim=1), rtol=1e-6)
    for upto in (10, 80, 320, 630):
        assert torch.allclose(parts.norms(0, upto).double(), wide[:, :upto].norm(dim=1), rtol=1e-6)
        assert torch.allclose(parts.norms(upto).double(), wide[:, upto:].norm(dim=1), rtol=1e-6)
    assert parts.norms(640).abs().max() == 0 and parts.norms(0, 0).abs().max() == 0
    picked = torch.tensor([5, 0, 699])
    assert torch.equal(parts.rows(picked).norms(), parts.norms()[picked])


def test_part_norms_hold_only_their_boundaries():
    rows = torch.randn(10, 640)
    parts = part_squares(rows, 64)
    assert parts is not None
    assert parts.norms(15) is None and parts.norms(0, 15) is None and parts.norms(10, 15) is None
    assert part_squares(torch.randn(10, 641), 64) is None, "a width no multiple of the parts"
    assert part_squares(torch.randn(10, 32), 64) is None, "narrower than the parts"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paired_rows_are_each_sides_parts_their_diagonal_and_distance(dtype):
    """`paired_rows`: one pass gives both sides' `part_squares` (the same sums), each row pair's
    float32 inner product (`vecdot`'s) and the sets' squared distance; the rows stay as they were."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(700, 640, generator=g) * torch.logspace(-2, 2, 700)[:, None]).to(dtype)
    y = (x.float() + 0.3 * torch.randn(700, 640, generator=g)).to(dtype)
    before = x.clone(), y.clone()
    paired = paired_rows(x, y, 64)
    assert paired is not None
    assert torch.equal(x, before[0]) and torch.equal(y, before[1])
    for side, rows in ((paired.src, x), (paired.anchor, y)):
        alone = part_squares(rows, 64)
        assert alone is not None and side.part == alone.part and torch.equal(side.sums, alone.sums)
    assert torch.equal(paired.diagonal, torch.linalg.vecdot(x.float(), y.float()))
    exact = (x.double() - y.double()).square().sum()
    assert abs(paired.sq_distance - float(exact)) <= 1e-6 * float(exact)
    assert paired_rows(x, y[:-1], 64) is None and paired_rows(x[:, :-1], y[:, :-1], 64) is None
