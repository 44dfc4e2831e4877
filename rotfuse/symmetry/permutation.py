"""FFN neuron permutation (docs/design/symmetries.md section 1), solved as a linear assignment.

All parameters indexed by the FFN neuron are concatenated into one row per neuron, so the score
matrix is a single GEMM: C[i, j] = <row i of source, row j of anchor>. The Hungarian solve on C
(scipy's `linear_sum_assignment`, O(dff^3)) is the expensive part of matching when it runs; when
every row's best column is distinct it does not, and the bests can be found exactly without the
float32 GEMM: for related models from bounds on a prefix of the columns (`bounded_row_bests`),
and, where those do not settle and the CPU multiplies bfloat16 several times faster than float32,
from a bfloat16 GEMM and its rigorous error bound (`filtered_row_bests`). The bounds come first:
they are cheaper when they settle, and the bfloat16 path is the fallback for rows they leave open.
"""

from __future__ import annotations

import numpy as np
import torch

from rotfuse.symmetry.weights import Ffn, Linear

PREFIXES = (8, 4, 2)  # bounded scores over the first 1/8, 1/4, then 1/2 of the columns
SLACK = 2.0**-12  # of |x| |y|: far above float32 GEMM rounding, far below a real margin
MIN_SETTLED = 1 / 8  # a prefix that settles fewer of the open rows gives up on the bounds
ROW_BLOCK = 512  # rows per block of bounds: temporaries of a few MiB, not of the whole score matrix
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_UNIT = 2.0**-24
MAX_CANDIDATES = 4  # per row on average; more means near-ties everywhere (unrelated models)
PAIR_CHUNK = 1024  # candidate pairs scored at once in float64: a few tens of MiB


def solve_permutation(src_rows: torch.Tensor, anchor_rows: torch.Tensor) -> torch.Tensor:
    """`perm[j]` = the source row to place at anchor slot j, maximising the total inner product."""
    src, anchor = src_rows.float(), anchor_rows.float()
    best = bounded_row_bests(src, anchor)
    if best is None and fast_bfloat16_gemm(src.device):
        best = filtered_row_bests(src, anchor)
    if best is not None:
        return _inverse(best)
    return best_assignment(src @ anchor.T)


def fast_bfloat16_gemm(device: torch.device) -> bool:
    """CPUs with AMX or AVX512-BF16 multiply bfloat16 matrices (accumulating in float32, via oneDNN)
    four to six times faster than float32 ones. GPUs are left to float32: cuBLAS may reduce bfloat16
    products in reduced precision, which the error bound of `filtered_row_bests` does not cover."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent means no
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def filtered_row_bests(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor | None:
    """Every source row's best anchor row (exactly, as the float64 scores would give it) when they
    are all distinct, from a bfloat16 GEMM.

    Rounding the rows to bfloat16 moves each product by at most 2u |x_k y_k| (u = 2^-8), summing in
    float32 adds at most w u32 sum|x_k y_k|, rounding the result to bfloat16 u |s|: so every
    approximate score is within (3u + w u32) |x| |y| of the true one; the bound used is twice that.
    The approximate best's score, less its own rounding bound, is a lower bound on the row's
    maximum; the only columns that can beat it are those whose approximate score plus the bound
    reaches it. One candidate settles the row; a few are scored in float64; more than
    MAX_CANDIDATES per row on average (unrelated models, near-ties everywhere) gives up (None), as
    do two rows with one best.
    """
    n, width = src.shape
    if n < 2 or anchor.shape[0] != n:
        return None
    approx = src.bfloat16() @ anchor.bfloat16().T
    error = 2 * (3 * BF16_UNIT + width * FP32_UNIT)
    src_norm, anchor_norm = src.norm(dim=1), anchor.norm(dim=1)
    best = torch.empty(n, dtype=torch.int64, device=src.device)
    open_rows, open_cols, open_pairs = [], [], 0
    for start in range(0, n, ROW_BLOCK):
        block = slice(start, start + ROW_BLOCK)
        scores = approx[block].float()
        pick = scores.argmax(dim=1)
        picked = anchor.index_select(0, pick)
        # the pick's score in float32, less its rounding bound (w u32 |x| |y|, doubled): a lower bound
        reached = (src[block] * picked).sum(dim=1) - 2 * width * FP32_UNIT * src_norm[block] * anchor_norm[pick]
        upper = scores.addr_(src_norm[block], anchor_norm, alpha=error)
        candidates = upper >= reached[:, None]
        candidates[torch.arange(len(pick), device=pick.device), pick] = True
        single = candidates.sum(dim=1) == 1
        best[start : start + len(pick)][single] = pick[single]
        rows, cols = candidates[~single].nonzero(as_tuple=True)
        open_rows.append(torch.arange(start, start + len(pick), device=src.device)[~single][rows])
        open_cols.append(cols)
        open_pairs += len(cols)
        if open_pairs > MAX_CANDIDATES * n:
            return None
    rows, cols = torch.cat(open_rows), torch.cat(open_cols)
    if len(rows):
        chunks = [slice(i, i + PAIR_CHUNK) for i in range(0, len(rows), PAIR_CHUNK)]
        exact = torch.cat([_dot64(src.index_select(0, rows[c]), anchor.index_select(0, cols[c])) for c in chunks])
        row_max = exact.new_full((n,), -torch.inf).scatter_reduce(0, rows, exact, "amax")
        reaching = exact == row_max[rows]
        best[rows[reaching]] = cols[reaching]
    if torch.unique(best).numel() != n:
        return None
    return best


def _dot64(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Row-wise inner products in float64: exact enough to compare with any float32 bound."""
    return torch.einsum("ij,ij->i", x.double(), y.double())


def bounded_row_bests(src: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor | None:
    """Every source row's best anchor row when they are all distinct, with a fraction of the GEMM.

    The scores over a prefix of the columns, plus |x_rest| |y_rest| (Cauchy-Schwarz) for the rest
    and a rounding slack, bound every row's full scores from above; a row whose best-bounded
    candidate scores (over every column) at least every other bound is settled, and its best is
    the full GEMM's argmax. Related models -- fine-tunes of one base, scrambled copies -- settle
    every row on a short prefix; unrelated ones cannot (None as soon as a prefix settles few of
    the open rows: the first one, at 1/8 of the GEMM's cost), nor two rows with one best.
    """
    n, width = src.shape
    if n < 2 or anchor.shape[0] != n:
        return None  # nothing to gain
    src_norm, anchor_norm = src.norm(dim=1), anchor.norm(dim=1)
    best = torch.empty(n, dtype=torch.int64, device=src.device)
    open_rows = torch.arange(n, device=src.device)
    scores: torch.Tensor | None = None
    bound = src.new_empty(min(n, ROW_BLOCK), n)
    done = 0
    for divisor in PREFIXES:
        upto = max(1, width // divisor)
        if upto <= done:
            continue
        rows_src = src if len(open_rows) == n else src.index_select(0, open_rows)
        part = rows_src[:, done:upto] @ anchor[:, done:upto].T
        scores = part if scores is None else scores.add_(part)
        done = upto
        src_rest, anchor_rest = rows_src[:, upto:], anchor[:, upto:]
        src_rest_norm, anchor_rest_norm = src_rest.norm(dim=1), anchor_rest.norm(dim=1)
        settled, candidate = [], []
        for start in range(0, len(open_rows), ROW_BLOCK):
            block = slice(start, start + ROW_BLOCK)
            upper = torch.addr(scores[block], src_rest_norm[block], anchor_rest_norm, out=bound[: len(scores[block])])
            upper.addr_(src_norm[open_rows[block]], anchor_norm, alpha=SLACK)
            top, pick = upper.topk(2, dim=1)
            # over every column: this prefix's GEMM scores (their rounding is inside SLACK) plus the rest
            exact = scores[block].gather(1, pick[:, :1])[:, 0] + (src_rest[block] * anchor_rest[pick[:, 0]]).sum(dim=1)
            settled.append(exact >= top[:, 1])
            candidate.append(pick[:, 0])
        ok, pick = torch.cat(settled), torch.cat(candidate)
        if float(ok.float().mean()) < MIN_SETTLED:
            return None  # unrelated rows: the bounds will not settle them before the full GEMM
        best[open_rows[ok]] = pick[ok]
        open_rows, scores = open_rows[~ok], scores[~ok]
        if not len(open_rows):
            break
    if len(open_rows) or torch.unique(best).numel() != n:
        return None
    return best


def _inverse(best: torch.Tensor) -> torch.Tensor:
    """`perm[j]` = the row whose best column is j, from distinct `best[i]`."""
    perm = torch.empty(len(best), dtype=torch.int64)
    perm[best.cpu()] = torch.arange(len(best))
    return perm


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
            return _inverse(best_cols)
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
