"""FFN neuron permutation (symmetries.md section 1), solved as a linear assignment.

All parameters indexed by the FFN neuron are concatenated into one row per neuron, so the score
matrix is a single GEMM: C[i, j] = <row i of source, row j of anchor>. The Hungarian solve on C
(scipy's `linear_sum_assignment`, O(dff^3)) is the expensive part of matching.
"""

from __future__ import annotations

import numpy as np
import torch

from rotfuse.symmetry.weights import Ffn, Linear


def solve_permutation(src_rows: torch.Tensor, anchor_rows: torch.Tensor) -> torch.Tensor:
    """`perm[j]` = the source row to place at anchor slot j, maximising the total inner product."""
    return best_assignment(src_rows.float() @ anchor_rows.float().T)


def best_assignment(scores: torch.Tensor) -> torch.Tensor:
    """`perm[j]` = the row assigned to column j, maximising the summed scores.

    Fast path with a certificate: when every row's best column is a different column (or every
    column's best row a different row), taking them is optimal -- each row (column) attains its
    own maximum, the largest any assignment can give it. Models fine-tuned from one base and
    scrambled copies are usually this case; otherwise the Hungarian solve (scipy, O(n^3)).
    """
    n = scores.shape[0]
    if scores.shape[0] == scores.shape[1] and n:
        best_cols = scores.argmax(dim=1)
        if torch.unique(best_cols).numel() == n:
            perm = torch.empty(n, dtype=torch.int64)
            perm[best_cols.cpu()] = torch.arange(n)
            return perm
        best_rows = scores.argmax(dim=0)
        if torch.unique(best_rows).numel() == n:
            return best_rows.cpu().to(torch.int64)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.cpu().numpy(), maximize=True)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm)


def permute_ffn(ffn: Ffn, perm: torch.Tensor) -> Ffn:
    perm = perm.to(ffn.output.weight.device)
    inputs = [linear.map(lambda t: t.index_select(0, perm)) for linear in ffn.inputs]
    return Ffn(inputs, Linear(ffn.output.weight.index_select(1, perm)))


def random_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)
