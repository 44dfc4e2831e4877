"""Head permutation (docs/design/symmetries.md section 4): whole heads -- with GQA whole KV groups and their
query heads -- can swap places, Q/K/V rows and O columns moving together.

For models trained from different initialisations head h of one model has no reason to be head h
of the other. Pairing source group i with anchor group j is worth the best the per-head rotation
can then do for that pair: score(i, j) = max over the allowed rotations R of <R, M_ij>, summed over
the QK and VO circuits (the trace, i.e. R = I, when rotation is off). The rotations of different
pairs are independent, so one assignment on the G x G scores finds the joint optimum of
permutation and rotation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from rotfuse.symmetry.permutation import (
    BF16_UNIT,
    accumulation_bound,
    best_assignment,
    certified_assignment,
    fast_bfloat16_gemm,
    norm_round_up,
    row_norms,
)
from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.weights import Circuit


@dataclass(frozen=True)
class ScoredCircuit:
    """One circuit's part of the group pair scores: source and anchor circuits, and the rotations
    allowed (none: the trace; all of O(dh): the nuclear norm; RoPE-compatible ones on `rotary_dim`)."""

    src: Circuit
    anchor: Circuit
    rotate: bool
    rotary_dim: int = 0


def group_permutation(circuits: Sequence[ScoredCircuit]) -> torch.Tensor:
    """`perm[j]` = the source group to place at anchor group j, maximising the pair scores summed
    over `circuits` (`pair_scores`).

    Where the CPU multiplies bfloat16 fast, the scores come first from bfloat16 GEMMs with a bound
    on their error (`rounded_pair_scores`), and their assignment is kept when the bound proves it
    optimal for the exact scores (`certified_assignment`): related models, whose matched groups
    score far above the rest. Otherwise -- unrelated models, near-ties -- from float32 GEMMs."""
    if all(fast_bfloat16_gemm(c.src.left[0].device) for c in circuits):
        rounded = [rounded_pair_scores(c.src, c.anchor, c.rotate, c.rotary_dim) for c in circuits]
        approx = cast(torch.Tensor, sum(scores for scores, _ in rounded))
        error = cast(torch.Tensor, sum(bound for _, bound in rounded))
        certified = certified_assignment(approx, error)
        if certified is not None:
            return certified
    scores = sum(pair_scores(c.src, c.anchor, c.rotate, c.rotary_dim) for c in circuits)
    return best_assignment(cast(torch.Tensor, scores))


def pair_scores(src: Circuit, anchor: Circuit, rotate: bool, rotary_dim: int = 0) -> torch.Tensor:
    """`[G, G]` float64: the best <R, M_ij> for every source group i and anchor group j."""
    groups, dh = src.left[0].shape[0], src.left[0].shape[2]
    # all pairs in one GEMM per block
    pairs = zip(src.tensors(), anchor.tensors(), strict=True)
    m = cast(torch.Tensor, sum(_rows(a, torch.float32) @ _rows(b, torch.float32).T for a, b in pairs))
    return _best_rotation_scores(m.double(), groups, dh, rotate, rotary_dim)


def rounded_pair_scores(
    src: Circuit, anchor: Circuit, rotate: bool, rotary_dim: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """`pair_scores` from bfloat16 GEMMs (the blocks rounded to bfloat16), and a bound on each
    score's distance to the exact one (both `[G, G]` float64).

    Per entry of a block product, with rows x, y rounded to x_hi, y_hi (|x - x_hi| <= u |x|) and
    X >= |x|, |x_hi| (the float32 norm of x_hi rounded up, over 1 - u): the rounding moves x.y by
    at most 2u X Y, the float32 accumulation of the exact products by gamma_w X Y, and rounding
    the result c to bfloat16 by u |c| / (1 - u). Summed over a block pair's entries, that bounds
    the Frobenius norm of M_ij's error E; every score is a maximum of <R, M_ij> over orthogonal R
    (the trace: R = I), which moves by at most |<R, E>| <= sqrt(dh) |E|_F."""
    groups, dh = src.left[0].shape[0], src.left[0].shape[2]
    m = torch.zeros(groups * dh, groups * dh, dtype=torch.float64, device=src.left[0].device)
    block_error = m.new_zeros(groups, groups)
    for a, b in zip(src.tensors(), anchor.tensors(), strict=True):
        x, y = _rows(a, torch.bfloat16), _rows(b, torch.bfloat16)
        product = (x @ y.T).double()
        m.add_(product)
        width = x.shape[1]
        gamma = accumulation_bound(width)
        x_norm, y_norm = (_group_norms(rows, groups, dh) for rows in (x, y))
        product_norm = product.reshape(groups, dh, groups, dh).square().sum((1, 3)).sqrt()
        block_error.add_((2 * BF16_UNIT + gamma) * x_norm[:, None] * y_norm[None, :])
        block_error.add_(product_norm, alpha=BF16_UNIT / (1 - BF16_UNIT))
    scores = _best_rotation_scores(m, groups, dh, rotate, rotary_dim)
    # float64 sums, SVDs and square roots: far inside a relative 2^-30 and an absolute floor
    error = block_error.mul_(dh**0.5 * (1 + 2.0**-20)).add_(scores.abs() * 2.0**-30 + _FLOOR)
    return scores, error


_FLOOR = 2.0**-100  # whatever underflowed


def _rows(block: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[G*dh, H*n]`: each group's rows with its heads side by side, in `dtype` (converted and moved
    in one copy)."""
    if block.stride(-1) != 1:  # a transposed weight (o's columns): converted, then as a matrix, torch's fast transpose
        block = block.to(dtype).reshape(-1, block.shape[-1]).contiguous().view(block.shape)
    groups, dh = block.shape[0], block.shape[2]
    moved = block.new_empty((groups, dh, block.shape[1], block.shape[3]), dtype=dtype)
    return moved.copy_(block.permute(0, 2, 1, 3)).view(groups * dh, -1)


def _group_norms(rows: torch.Tensor, groups: int, dh: int) -> torch.Tensor:
    """Each group's Frobenius norm (float64) of bfloat16 `rows`, bounding from above both theirs
    and that of the rows they were rounded from: row norms summed in float32 rounded up past their
    error, over 1 - u."""
    up = norm_round_up(rows.shape[1]) / (1 - BF16_UNIT)
    norms = row_norms(rows).double() * up
    return norms.reshape(groups, dh).square().sum(1).sqrt().mul_(1 + 2.0**-40)


def _best_rotation_scores(m: torch.Tensor, groups: int, dh: int, rotate: bool, rotary_dim: int) -> torch.Tensor:
    """max over the allowed R of <R, M_ij> for every block pair of `m` (`[G*dh, G*dh]` float64)."""
    m = m.reshape(groups, dh, groups, dh).permute(0, 2, 1, 3)  # [i, j, dh, dh]
    if not rotate:
        return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)
    if rotary_dim == 0:
        return torch.linalg.svdvals(m).sum(-1)  # the maximum of <R, M> over O(dh) is the nuclear norm
    flat = m.reshape(groups * groups, dh, dh)
    return (procrustes(flat, rotary_dim) * flat).sum((1, 2)).reshape(groups, groups)


def permute_groups(circuit: Circuit, perm: torch.Tensor) -> Circuit:
    index = perm.to(circuit.left[0].device)
    return Circuit(
        tuple(b.index_select(0, index) for b in circuit.left), tuple(b.index_select(0, index) for b in circuit.right)
    )
