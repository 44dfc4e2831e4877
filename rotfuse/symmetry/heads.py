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

from typing import cast

import torch

from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.weights import Circuit


def pair_scores(src: Circuit, anchor: Circuit, rotate: bool, rotary_dim: int = 0) -> torch.Tensor:
    """`[G, G]` float64: the best <R, M_ij> for every source group i and anchor group j."""
    groups, dh = src.left[0].shape[0], src.left[0].shape[2]

    def rows(block: torch.Tensor) -> torch.Tensor:  # [G*dh, H*n]: a group's heads side by side
        if block.stride(-1) != 1:  # a transposed weight (o's columns): as a matrix first, torch's fast transpose
            block = block.reshape(-1, block.shape[-1]).contiguous().view(block.shape)
        moved = block.new_empty((groups, dh, block.shape[1], block.shape[3]), dtype=torch.float32)
        return moved.copy_(block.permute(0, 2, 1, 3)).view(groups * dh, -1)  # converted and moved in one copy

    # all pairs in one GEMM per block
    m = cast(torch.Tensor, sum(rows(a) @ rows(b).T for a, b in zip(src.tensors(), anchor.tensors(), strict=True)))
    m = m.double()
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
