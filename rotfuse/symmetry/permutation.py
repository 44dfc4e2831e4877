"""FFN neuron permutation (docs/design/symmetries.md section 1), solved as a linear assignment.

All parameters indexed by the FFN neuron are concatenated into one row per neuron, so the score
matrix is a single GEMM: C[i, j] = <row i of source, row j of anchor>. The Hungarian solve on C
(scipy's `linear_sum_assignment`, O(dff^3)) is the expensive part of matching when it runs; when
every row's best column is distinct it does not, and the bests can be found exactly without the
float32 GEMM: for related models from bounds on a prefix of the columns (`bounded_row_bests`;
a probe picks the prefix to start from), and, where those do not settle, from the whole GEMM's
scores with a rigorous error bound (`filtered_row_bests`). Where the CPU multiplies bfloat16
several times faster than float32, both take their scores from a bfloat16 GEMM and bound its
rounding (`RoundedScores`); where it does not but torch has fbgemm (x86), the first prefix pass
bounds its scores with an int8 GEMM (`integer_scores`), twice float32's speed. The bounds come
first: they are cheaper when they settle. They settle rows against column potentials (LP duality:
any v will do, see `distance_potentials`): with v_j = a |y_j|^2 / 2, each row's best is its nearest
anchor row, so rows of unequal norms -- every trained model's -- settle as early as equal ones. Rows
whose bests collide (unrelated models) are solved on a sparse candidate graph, proven optimal on
every entry by LP duality (`certified_sparse_assignment`); from the bfloat16 GEMM, the graph holds
its estimates, and only the entries that can decide the matching are read exactly (`_RowScores`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from rotfuse.core.buffers import thread_buffer
from rotfuse.symmetry.integer_scores import (
    SCORE_ROUNDING,
    QuantizedRows,
    int8_gemm_available,
    quantize_anchor,
    quantize_source,
    quantized_scores,
)
from rotfuse.symmetry.part_norms import PairedRows, PartSquares, paired_rows, part_squares
from rotfuse.symmetry.top_two import top_two
from rotfuse.symmetry.weights import Ffn, Linear, ffn_row_parts, ffn_rows, ffn_rows_shape

PREFIXES = (2, 4, 6, 8, 10, 12, 16, 24, 32)  # bounded scores over the first 2/64, 4/64, ... 32/64 of the columns
PREFIX_UNIT = 64  # ... in these parts: fine steps from 1/8 on, where rows a step short pay for the next pass
SLACK = 2.0**-12  # of |x| |y|, at least (`slack`): above float32 rounding, far below a real margin
POTENTIAL_ROUNDING = 2.0**-20  # of |v_j| and |score|: the float32 rounding of taking potentials off (16 u32)
MIN_SETTLED = 1 / 8  # a prefix that settles fewer of the open rows gives up on the bounds ...
GIVE_UP_FROM = 8  # ... from 8/64 of the columns on (narrower ones cost little next to the next one)
FINISH_SHARE = 1 / 16  # rows the widest prefix leaves, at most this share, are scored over every column
START_SETTLED = 1 / 2  # the passes start at the first prefix that settles this much of a sample
ROW_BLOCK = 512  # rows per block of bounds: temporaries of a few MiB, not of the whole score matrix
SCAN_BLOCK = 128  # rows per block of the bfloat16 scores' scans: a few passes over it stay in L2
NORM_ELEMENTS = 2**18  # float32 entries per temporary of the norms of bfloat16 rows (1 MiB: in L2)
DOT_ROWS = 64  # rows per block of row-wise inner products (their float32 copies: a few MiB)
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
FP32_UNIT = 2.0**-24
MAX_CANDIDATES = 4  # per row on average; more means near-ties everywhere (unrelated models)
PAIR_CHUNK = 1024  # candidate pairs scored at once in float64: a few tens of MiB
SPARSE_CANDIDATES = 32  # per row: the candidate graph the sparse solve starts from (1B unrelated: 1-2 rounds)
SPARSE_ROUNDS = 8  # certificate checks (each adding the edges it found violated) before the dense solve
SPARSE_SOLVES = 4 * SPARSE_ROUNDS  # sparse solves, counting those after estimates were read exactly
SPARSE_MIN_SIZE = 1024  # below it the dense Hungarian takes well under a second: not worth a risk of rounds
INT8_MIN_PRODUCTS = 2**31  # multiply-adds of a first pass below which float32 is as fast as int8 (AVX2)
PROBE_ROWS = 256  # rows whose first prefix pass decides whether the passes are worth running
PROBE_COLUMNS = 256  # a 1/8 prefix this wide finds the partners of rows that any prefix can settle
EXACT_BYTES = 2**28  # float64 rows the exact re-scoring holds at once, whatever the size (both sides)
EXACT_SRC_SHARE = 8  # 1/8 of them source rows, the rest anchor rows (each converted once per call)
SMALL_ASSIGNMENT = 10  # square problems up to this size are solved by `small_assignment`, without scipy
INT_LIMIT = 2**62  # integer potentials, path sums and dual sums stay below it (int64)


def solve_permutation(
    src_rows: torch.Tensor, anchor_rows: torch.Tensor, paired: PairedRows | None = None
) -> torch.Tensor:
    """`perm[j]` = the source row to place at anchor slot j, maximising the total inner product
    (of the rows in float32: bfloat16 rows are read as they are, see `working_rows`). `paired`:
    the rows' `paired_rows`, where the caller has them (`neuron_pairs`)."""
    src, anchor = working_rows(src_rows, anchor_rows)
    bounds = _PrefixBounds.of(src, anchor, None if paired is None else paired.anchor)
    first = first_prefix(src, anchor, bounds, paired)
    best = None if first is None else bounded_row_bests(src, anchor, first, bounds, paired)
    rounded = None
    if best is None and fast_bfloat16_gemm(src.device) and len(src) == len(anchor) > 1:
        rounded = RoundedScores.of(src, anchor)
        best = filtered_row_bests(src, anchor, rounded)
    if best is not None:
        return _inverse(best)
    if rounded is not None and len(src) >= SPARSE_MIN_SIZE:
        certified = _certified_sparse(_RowScores(src, anchor, rounded), len(src), SPARSE_CANDIDATES)
        if certified is not None:
            return certified
    return best_assignment(src.float() @ anchor.float().T, bounds.potential)


def working_rows(src: torch.Tensor, anchor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows a solve reads: bfloat16 rows as they are on the CPU (their float32 copies hold the
    same values at twice the bytes; every GEMM, norm and dot product of the solve still
    accumulates in float32 or wider, and where the CPU does not multiply bfloat16 fast, each float32
    GEMM takes float32 copies of the columns it reads), anything else in float32."""
    if src.dtype == anchor.dtype == torch.bfloat16 and src.device.type == "cpu":
        return src, anchor
    return src.float(), anchor.float()


def neuron_rows(src: Ffn, anchor: Ffn) -> tuple[torch.Tensor, torch.Tensor]:
    """Both FFNs' neuron rows (`ffn_rows`) for `solve_permutation`: in bfloat16 when every tensor is
    bfloat16 and on the CPU (no rounding: the rows hold the stored values), else in float32 --
    built in the dtype the solve reads (`working_rows`), never converted twice.

    The rows are written into two buffers of the calling thread, which its next call overwrites:
    use them before calling again. (Fresh, such tensors are mapped anew by the allocator and every
    page is zeroed by the kernel before the rows are written: a tenth of a 1B match's CPU time.)"""
    dtype = _rows_dtype(src, anchor)
    src_rows = ffn_rows(src, dtype, out=_row_buffer(0, src, dtype))
    return src_rows, ffn_rows(anchor, dtype, out=_row_buffer(1, anchor, dtype))


def neuron_pairs(src: Ffn, anchor: Ffn) -> tuple[torch.Tensor, torch.Tensor, PairedRows | None]:
    """`neuron_rows` of both FFNs, and their `paired_rows` (in PREFIX_UNIT runs) for
    `solve_permutation`: the rows' norms, each neuron's score against the anchor's neuron of its
    index and the FFNs' squared distance -- every parameter the permutation moves is in the rows
    once -- from the rows as they are built, a chunk at a time. None for the latter where the
    rows round the weights (float64 ones), whose distance would then not be the tensors'."""
    dtype = _rows_dtype(src, anchor)
    rows = [_row_buffer(side, ffn, dtype) for side, ffn in enumerate((src, anchor))]
    parts = [ffn_row_parts(ffn, f"neuron_rows.output.{side}") for side, ffn in enumerate((src, anchor))]

    def fill(block: slice) -> None:
        for side_rows, side_parts in zip(rows, parts, strict=True):
            torch.cat([part[block] for part in side_parts], dim=1, out=side_rows[block])

    exact = all(t.dtype in (torch.bfloat16, torch.float16, torch.float32) for t in _row_tensors(src, anchor))
    paired = paired_rows(rows[0], rows[1], PREFIX_UNIT, fill) if exact else None
    if paired is None:
        fill(slice(None))
    return rows[0], rows[1], paired


def _rows_dtype(src: Ffn, anchor: Ffn) -> torch.dtype:
    """bfloat16 where every tensor of both FFNs' rows is and they are on the CPU, else float32."""
    tensors = _row_tensors(src, anchor)
    keep = all(t.dtype == torch.bfloat16 for t in tensors) and tensors[0].device.type == "cpu"
    return torch.bfloat16 if keep else torch.float32


def _row_tensors(src: Ffn, anchor: Ffn) -> list[torch.Tensor]:
    """The tensors both FFNs' neuron rows hold (`ffn_rows`): the output's weight, the inputs'
    weights and biases."""
    inputs = [t for ffn in (src, anchor) for lin in ffn.inputs for t in (lin.weight, lin.bias) if t is not None]
    return [src.output.weight, anchor.output.weight, *inputs]


def _row_buffer(side: int, ffn: Ffn, dtype: torch.dtype) -> torch.Tensor:
    """This thread's buffer for one side's rows (0: source, 1: anchor)."""
    return thread_buffer(f"neuron_rows.{side}", ffn_rows_shape(ffn), dtype, ffn.output.weight.device)


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """Row norms, summed in float32 whatever the rows' dtype (through float32 temporaries of
    NORM_ELEMENTS: torch would convert the whole first; small ones stay in cache)."""
    if rows.dtype == torch.float32:
        return torch.linalg.vector_norm(rows, dim=1)
    norms = rows.new_empty(len(rows), dtype=torch.float32)
    step = max(1, NORM_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, len(rows), step):
        block = slice(start, start + step)
        torch.linalg.vector_norm(rows[block].float(), dim=1, out=norms[block])
    return norms


def distance_potentials(src: torch.Tensor, anchor: torch.Tensor, anchor_norm: torch.Tensor) -> torch.Tensor:
    """Column potentials v_j = a |y_j|^2 / 2 (float32) for the row-bests certificates, with a the
    ratio of the rows' norms (|x| / |y| over a sample of PROBE_ROWS rows of each side).

    By LP duality, rows whose bests against ANY potentials -- argmax_j x_i . y_j - v_j -- are all
    distinct are the optimal assignment (sum_i x_i . y_pi(i) = sum_i max_j (x_i . y_j - v_j) +
    sum_j v_j, and no assignment beats the row maxima). v = 0 asks each row for its largest inner
    product, which an anchor row of large norm wins for many rows; these v ask for the nearest
    anchor row (x . y - a |y|^2 / 2 = (|x|^2 - |x - a y|^2) / (2 a)), which is what a related
    model's row is. With rows of unequal norms -- trained models' neurons range over a factor of
    2 to 6 -- the bounds then settle rows on the same short prefix as rows of equal norms, where
    v = 0 settles almost none before half the columns."""
    sample = torch.linspace(0, len(src) - 1, min(len(src), PROBE_ROWS), device=src.device).long()
    src_sample = row_norms(src.index_select(0, sample)).square().sum()
    anchor_sample = anchor_norm.index_select(0, sample.clamp_max(len(anchor_norm) - 1)).square().sum()
    scale = float((src_sample / anchor_sample).sqrt()) if float(anchor_sample) > 0 else 0.0
    if not math.isfinite(scale):
        scale = 0.0
    return anchor_norm.square() * (scale / 2)


def _dots32(x: torch.Tensor, y: torch.Tensor, pick: torch.Tensor | None = None) -> torch.Tensor:
    """Row-wise inner products x_i . y_i -- or x_i . y_pick[i] -- accumulated in float32 (each
    within w u32 |x| |y| of the exact one), DOT_ROWS at a time: their float32 copies, and the rows
    of y picked, stay in cache (a batched matmul is twice as slow; picking every row first is a
    fresh copy of them)."""
    out = x.new_empty(len(x), dtype=torch.float32)
    for start in range(0, len(x), DOT_ROWS):
        block = slice(start, start + DOT_ROWS)
        rows = y[block] if pick is None else y.index_select(0, pick[block])
        torch.linalg.vecdot(x[block].float(), rows.float(), out=out[block])
    return out


def first_prefix(
    src: torch.Tensor, anchor: torch.Tensor, bounds: _PrefixBounds | None = None, paired: PairedRows | None = None
) -> int | None:
    """Which of PREFIXES `bounded_row_bests` should start from -- the narrowest that settles at
    least half of a sample of PROBE_ROWS rows -- or None when none will (unrelated rows: the passes
    would give up, and the full GEMM is cheaper than trying them).

    The probe starts at 1/8 of the columns; the sample's candidates there tell how far the models
    are apart: a row whose best scores cos |x| |y| settles once the prefix holds about 1 - cos of
    the squared norms (the rest's bound is then below it). Where 1/8 settles the sample, narrower
    prefixes that wide are tried, the narrowest first (close fine-tunes settle on 1/32); where it
    does not, the probe goes on at the first wider prefix that wide -- far relatives from 10/64 up
    to 1/2, unrelated rows (cos ~ 0) nowhere (narrow rows, whose 1/8 may be too short to find the
    partners, at the widest, to be sure). `bounds` (the solve's, else new ones) keeps what the
    probe computes of the anchor's prefixes for the passes, and the int8 probes' results for the
    sample rows (the first PROBE_ROWS), which the first pass then does not compute again. `paired`
    (`paired_rows` of `src` and `anchor`) gives the candidates' scores where a row's is its own
    anchor row (`_diagonal`)."""
    n, width = src.shape
    if n <= 4 * PROBE_ROWS or anchor.shape[0] != n:
        return 0  # the passes themselves are cheap enough to be the probe
    src, anchor = working_rows(src, anchor)
    rows_src = src[:PROBE_ROWS]  # neurons come in no particular order: the first ones are a sample
    sample_norm = row_norms(rows_src)
    known = _diagonal(paired, torch.arange(PROBE_ROWS, device=src.device))
    if bounds is None:
        bounds = _PrefixBounds.of(src, anchor)
    anchor_norm = bounds.anchor_norm
    steps: dict[int, torch.Tensor] = {}  # float32: the sample's scores over each step between prefixes

    def probe(index: int) -> tuple[bool, torch.Tensor]:
        upto = _prefix_width(width, PREFIXES[index])
        if bounds.mode == "bfloat16":
            settled, pick = bounds.settle(rows_src, sample_norm, upto)
        elif bounds.integer(n, upto):  # the anchor's quantized prefix serves the first pass too
            settled, pick = bounds.probe_pass(src, sample_norm, upto, known)
        else:  # each step's GEMM once, whichever prefixes the probe tries
            for step in range(index + 1):
                if step not in steps:
                    start = _prefix_width(width, PREFIXES[step - 1]) if step else 0
                    columns = slice(start, _prefix_width(width, PREFIXES[step]))
                    steps[step] = rows_src[:, columns].float() @ anchor[:, columns].float().T
            scores = torch.stack([steps[step] for step in range(index + 1)]).sum(0)
            settled, pick = _prefix_pass(rows_src, anchor, upto, scores, sample_norm, bounds)
        return float(settled.float().mean()) >= START_SETTLED, pick

    index = PREFIXES.index(GIVE_UP_FROM)
    settles, pick = probe(index)
    cosine = _candidate_dots(rows_src, anchor, pick, known) / (sample_norm * anchor_norm[pick]).clamp_min(1e-30)
    needed = 1 - float(cosine.median())
    if settles:  # the narrowest prefix that wide first: a close fine-tune's probe is two GEMMs, not four
        narrower = [step for step in range(index) if PREFIXES[step] / PREFIX_UNIT >= needed]
        return next((step for step in narrower if probe(step)[0]), index)
    wide_enough = [wider for wider in range(index + 1, len(PREFIXES)) if PREFIXES[wider] / PREFIX_UNIT >= needed]
    if not wide_enough and _prefix_width(width, GIVE_UP_FROM) < PROBE_COLUMNS:
        wide_enough = [len(PREFIXES) - 1]  # the widest: a short prefix may not find the partners
    for wider in wide_enough:
        if probe(wider)[0]:
            while wider > index + 1 and probe(wider - 1)[0]:
                wider -= 1
            return wider
    return None


# `RoundedScores`' bound, in `upper` (blocks) and `error_at` (entries) alike:
_TERMS_UP = 1 + 2.0**-10  # the rank-r error terms, rounded up past their float32 sum
_OUTPUT_ROUNDING = BF16_UNIT * 1.01  # of |approx|: the GEMM's result rounded to bfloat16
_SUBNORMAL = 2.0**-100  # whatever underflowed


@dataclass
class RoundedScores:
    """bfloat16 GEMM scores with a rigorous per-entry bound on their distance to the exact ones.

    With x = x_hi + x_lo (x_hi = x rounded to bfloat16, x_lo exact in float32), x.y = x_hi.y_hi +
    x_hi.y_lo + x_lo.y: the GEMM's products x_hi_k y_hi_k are exact in float32, its float32 sum is
    within gamma_w |x_hi| |y_hi| of x_hi.y_hi (gamma_w = w u32 / (1 - w u32)), the rest within
    |x_hi| |y_lo| + |x_lo| |y| (Cauchy-Schwarz), and rounding the result to bfloat16 moves it by at
    most u |A| / (1 - u). The residual norms |x_lo| ~ u |x| / sqrt(3) make this bound about five
    times tighter than one from |x| |y| alone, which is what lets unrelated rows use it.
    """

    approx: torch.Tensor  # (n, n) bfloat16
    left: torch.Tensor  # (n, r) float32: |x_hi|, |x_lo|, |x_hi|, each rounded up (and more terms, rank r)
    right: torch.Tensor  # (r, n) float32: |y_lo|, |y|, gamma_w |y_hi|: error <= sum_k left_ik right_kj

    @classmethod
    def of(cls, src: torch.Tensor, anchor: torch.Tensor) -> RoundedScores:
        width = src.shape[1]
        gamma = accumulation_bound(width)
        assert gamma < 0.01, "rows too wide for the float32 accumulation bound"
        up = norm_round_up(width)  # norms summed in float32: rounded up past their error
        anchor_hi = anchor.bfloat16()  # whole: every block of the GEMM reads it
        approx = src.new_empty(len(src), len(anchor), dtype=torch.bfloat16)
        if src.dtype == anchor.dtype == torch.bfloat16:  # nothing to round: no residual
            x_hi, y_hi = row_norms(src), row_norms(anchor)
            x_lo, y_lo, y = torch.zeros_like(x_hi), torch.zeros_like(y_hi), y_hi.clone()
            for start in range(0, len(src), ROW_BLOCK):
                block = slice(start, start + ROW_BLOCK)
                torch.mm(src[block], anchor_hi.T, out=approx[block])
        else:
            x_hi, x_lo, y_hi, y_lo, y = (
                src.new_empty(len(rows), dtype=torch.float32) for rows in (src, src, anchor, anchor, anchor)
            )
            for start in range(0, max(len(src), len(anchor)), ROW_BLOCK):  # float32 temporaries of a block
                block = slice(start, start + ROW_BLOCK)
                if start < len(src):
                    src_hi = _residual_norms(src[block], x_hi[block], x_lo[block])
                    torch.mm(src_hi, anchor_hi.T, out=approx[block])
                if start < len(anchor):
                    _residual_norms(anchor[block], y_hi[block], y_lo[block], anchor_hi[block])
                    torch.linalg.vector_norm(anchor[block].float(), dim=1, out=y[block])
        x_hi, x_lo, y_hi, y_lo, y = (norm.mul_(up) for norm in (x_hi, x_lo, y_hi, y_lo, y))
        return cls(approx, torch.stack([x_hi, x_lo, x_hi], 1), torch.stack([y_lo, y, gamma * y_hi]))

    def upper(self, block: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 scores of rows `block` and their error bound (rounded up, float32)."""
        scores = self.approx[block].float()
        error = torch.addmm(scores.abs(), self.left[block], self.right, alpha=_TERMS_UP, beta=_OUTPUT_ROUNDING)
        return scores, error.add_(_SUBNORMAL)

    def error_at(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """`upper`'s error bound at the entries (rows, cols) alone (float32)."""
        terms = (self.left[rows] * self.right[:, cols].T).sum(dim=1).mul_(_TERMS_UP)
        return terms.add_(self.approx[rows, cols].float().abs(), alpha=_OUTPUT_ROUNDING).add_(_SUBNORMAL)


def _residual_norms(
    full: torch.Tensor, hi_norm: torch.Tensor, lo_norm: torch.Tensor, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows `full` rounded to bfloat16 (`hi`, if not given), the norms of those and of the residual
    full - hi (float32, written to `hi_norm` and `lo_norm`, not yet rounded up)."""
    hi = full.bfloat16() if hi is None else hi
    wide = hi.float()
    torch.linalg.vector_norm(wide, dim=1, out=hi_norm)
    torch.linalg.vector_norm(wide.sub_(full), dim=1, out=lo_norm)  # |hi - full|: the same norm
    return hi


def prefix_gemm(device: torch.device) -> str:
    """The GEMM the prefix passes bound their scores with: "bfloat16" where the CPU multiplies it
    fast (`RoundedScores`' bound), else "int8" where torch has fbgemm (`integer_scores`: twice
    float32's speed on AVX2), else "float32" (GPUs, other CPUs: exact enough within `slack`)."""
    if fast_bfloat16_gemm(device):
        return "bfloat16"
    return "int8" if device.type == "cpu" and int8_gemm_available() else "float32"


def fast_bfloat16_gemm(device: torch.device) -> bool:
    """CPUs with AMX or AVX512-BF16 multiply bfloat16 matrices (accumulating in float32, via oneDNN)
    four to six times faster than float32 ones. GPUs are left to float32: cuBLAS may reduce bfloat16
    products in reduced precision, which the error bound of `filtered_row_bests` does not cover."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private: absent means no
    return any(bool(getattr(torch.cpu, probe, lambda: False)()) for probe in probes)


def filtered_row_bests(
    src: torch.Tensor, anchor: torch.Tensor, rounded: RoundedScores | None = None
) -> torch.Tensor | None:
    """Every source row's best anchor row (exactly, as the float64 scores would give it) when they
    are all distinct, from a bfloat16 GEMM.

    Every approximate score is within `RoundedScores`' bound of the true one. The approximate
    best's score, less its own rounding bound, is a lower bound on the row's maximum; the only
    columns that can beat it are those whose approximate score plus the bound reaches it. One
    candidate settles the row; a few are scored in float64; more than MAX_CANDIDATES per row on
    average (unrelated models, near-ties everywhere) gives up (None), as do two rows with one best.
    """
    n = len(src)
    if n < 2 or anchor.shape[0] != n:
        return None
    src, anchor = working_rows(src, anchor)
    rounded = rounded or RoundedScores.of(src, anchor)
    src_norm, anchor_norm = row_norms(src), row_norms(anchor)
    best = torch.empty(n, dtype=torch.int64, device=src.device)
    taken = torch.zeros(n, dtype=torch.bool, device=src.device)  # the settled rows' bests
    open_rows, open_cols, open_pairs = [], [], 0
    for start in range(0, n, SCAN_BLOCK):
        block = slice(start, start + SCAN_BLOCK)
        scores, error = rounded.upper(block)
        pick = scores.argmax(dim=1)
        reached = _score_from_below(src[block], src_norm[block], anchor, anchor_norm, pick)
        upper = scores.add_(error)
        candidates = upper >= reached[:, None]
        candidates[torch.arange(len(pick), device=pick.device), pick] = True
        single = candidates.sum(dim=1) == 1
        chosen = pick[single]
        if bool(taken[chosen].any()) or torch.unique(chosen).numel() != len(chosen):
            return None  # two settled rows with one best (unrelated rows): no need to look further
        taken[chosen] = True
        best[start : start + len(pick)][single] = chosen
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


def bounded_row_bests(
    src: torch.Tensor,
    anchor: torch.Tensor,
    first: int = 0,
    bounds: _PrefixBounds | None = None,
    paired: PairedRows | None = None,
) -> torch.Tensor | None:
    """Every source row's best anchor row against the column potentials of `bounds` (row i's
    argmax of x_i . y_j - v_j; `distance_potentials` unless given) when they are all distinct --
    then the optimal assignment -- with a fraction of the GEMM.

    The scores over a prefix of the columns, plus |x_rest| |y_rest| (Cauchy-Schwarz) for the rest and a
    rounding slack, less the potentials, bound every row's full scores from above; a row whose
    best-bounded candidate scores (over every column, less its potential) at least every other bound is
    settled, and its best is the full GEMM's argmax of x_i . y_j - v_j. Related models -- fine-tunes of
    one base, scrambled copies -- settle every row on a short prefix; unrelated ones cannot (None as
    soon as a prefix from 1/8 on settles few of the open rows), nor two rows with one best. The few rows
    the widest prefix may leave (near-ties: at most FINISH_SHARE of them) are scored over every column,
    where only a tie within the rounding allowance stays open. `first`: the index in PREFIXES to start
    at. Where the CPU multiplies bfloat16 fast, each prefix's scores come from a bfloat16 GEMM with
    `RoundedScores`' error bound (`_PrefixBounds`), else from a float32 GEMM with SLACK -- the first
    pass's, where torch has fbgemm, from an int8 GEMM's bound (`_PrefixBounds.integer_pass`; the later
    passes add float32 columns to the open rows' bounds, and score candidates over every column).
    """
    n, width = src.shape
    if n < 2 or anchor.shape[0] != n:
        return None  # nothing to gain
    src, anchor = working_rows(src, anchor)
    # every pass's rest norms from one pass over the rows (the caller's, where it has them)
    src_parts = paired.src if paired is not None else part_squares(src, PREFIX_UNIT)
    src_norm = _norms_between(src, src_parts)
    if bounds is None:  # else the solve's, with what its probe computed
        bounds = _PrefixBounds.of(src, anchor)
    best = torch.empty(n, dtype=torch.int64, device=src.device)
    open_rows = torch.arange(n, device=src.device)
    scores: torch.Tensor | None = None  # float32: the open rows' scores over the first `done` columns
    exact_prefix = True  # False: `scores` bound them from above (int8 GEMM)
    done = 0
    give_up_from = _prefix_width(width, GIVE_UP_FROM)
    for upto in [*(_prefix_width(width, share) for share in PREFIXES[first:]), width]:
        if upto <= done:
            continue
        if upto == width and len(open_rows) > n * FINISH_SHARE:
            return None  # the full GEMM is cheaper than scoring that many rows over every column
        rows_src = src if len(open_rows) == n else src.index_select(0, open_rows)
        parts = src_parts if src_parts is None or len(open_rows) == n else src_parts.rows(open_rows)
        if bounds.mode == "bfloat16":  # each pass from the first column: the open rows are few after the first
            ok, pick = bounds.settle(rows_src, src_norm[open_rows], upto)
        else:
            if scores is None and bounds.integer(len(rows_src), upto):  # open rows keep bounds on their prefix scores
                ok, pick, scores = bounds.integer_pass(
                    rows_src, src_norm[open_rows], upto, parts, _diagonal(paired, open_rows)
                )
                exact_prefix = False
            else:
                if scores is None:  # into this thread's buffer: a fresh one is new pages every time
                    out = thread_buffer("prefix_scores", (len(rows_src), len(anchor)), torch.float32, src.device)
                    scores = torch.mm(rows_src[:, :upto].float(), anchor[:, :upto].float().T, out=out)
                else:
                    scores.addmm_(rows_src[:, done:upto].float(), anchor[:, done:upto].float().T)  # no temporary
                ok, pick = _prefix_pass(
                    rows_src,
                    anchor,
                    upto,
                    scores,
                    src_norm[open_rows],
                    bounds,
                    exact_prefix,
                    parts,
                    _diagonal(paired, open_rows),
                )
                scores = scores[~ok]
        done = upto
        if float(ok.float().mean()) < MIN_SETTLED and give_up_from <= upto < width:
            return None  # unrelated rows: the bounds will not settle them before the full GEMM
        best[open_rows[ok]] = pick[ok]
        open_rows = open_rows[~ok]
        if not len(open_rows):
            break
    if len(open_rows) or torch.unique(best).numel() != n:
        return None
    return best


Known = tuple[torch.Tensor, torch.Tensor]  # (anchor row, x_i . y_that) per source row: scores read already


def _diagonal(paired: PairedRows | None, rows: torch.Tensor) -> Known | None:
    """What `paired` knows of the source rows `rows` (indices): each one's score against its own
    anchor row (same index), the candidate of every row of a related model that stayed in place."""
    return None if paired is None else (rows, paired.diagonal[rows])


def _known_rows(known: Known | None, rows: slice) -> Known | None:
    """`known` for the rows `rows` of the rows it is of."""
    return None if known is None else (known[0][rows], known[1][rows])


def _candidate_dots(x: torch.Tensor, y: torch.Tensor, pick: torch.Tensor, known: Known | None = None) -> torch.Tensor:
    """`_dots32(x, y, pick)`, taking the rows whose candidate `known` has scored from it."""
    if known is None:
        return _dots32(x, y, pick)
    columns, dots = known
    other = (pick != columns).nonzero()[:, 0]
    if 2 * len(other) > len(pick):  # most moved: one pass over them all
        return _dots32(x, y, pick)
    out = dots.clone()
    if len(other):
        out[other] = _dots32(x.index_select(0, other), y, pick[other])
    return out


def _score_from_below(
    src: torch.Tensor,
    src_norm: torch.Tensor,
    anchor: torch.Tensor,
    anchor_norm: torch.Tensor,
    pick: torch.Tensor,
    known: Known | None = None,
) -> torch.Tensor:
    """A lower bound on each row's full score against anchor row `pick`: the float32 inner product
    over every column (any order of summation: `known`'s too), less its rounding bound (w u32 |x|
    |y|, doubled)."""
    full = _candidate_dots(src, anchor, pick, known)
    return full - 2 * src.shape[1] * FP32_UNIT * src_norm * anchor_norm[pick]


def _reached(
    src: torch.Tensor, src_norm: torch.Tensor, bounds: _PrefixBounds, pick: torch.Tensor, known: Known | None = None
) -> torch.Tensor:
    """`_score_from_below` against the candidate `pick`, less its potential."""
    below = _score_from_below(src, src_norm, bounds.anchor, bounds.anchor_norm, pick, known)
    return bounds.less_potential(below, pick)


def _prefix_pass(
    rows_src: torch.Tensor,
    anchor: torch.Tensor,
    upto: int,
    scores: torch.Tensor,
    src_norm: torch.Tensor,
    bounds: _PrefixBounds,
    exact_prefix: bool = True,
    parts: PartSquares | None = None,
    known: Known | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which source rows `rows_src` (norms `src_norm`, `parts` if known, float32 GEMM `scores`
    over the first `upto` columns) the bounds settle, and each one's candidate best: see
    `bounded_row_bests`. Each block's bound is one rank-3 update of its scores (the rest's norms,
    `slack` and the potentials), and the candidate's score over the rest is read from its rest
    columns alone -- or, where `scores` only bound the prefix's (`exact_prefix` False: the int8
    first pass's), its whole score (`_reached`, reading `known`'s scores of the rows)."""
    left, right = bounds.rest_factors(rows_src, src_norm, upto, parts)
    anchor_rest = anchor[:, upto:]
    bound = _bound_buffer(len(rows_src), anchor)
    settled, candidate = [], []
    for start in range(0, len(rows_src), ROW_BLOCK):
        block = slice(start, start + ROW_BLOCK)
        upper = torch.addmm(scores[block], left[block], right, out=bound[: len(scores[block])])
        second, pick = top_two(upper)
        if exact_prefix:  # over every column: this prefix's GEMM scores (rounding inside `slack`) plus the rest
            rest = _dots32(rows_src[block, upto:], anchor_rest, pick)
            exact = bounds.less_potential(scores[block].gather(1, pick[:, None])[:, 0] + rest, pick)
        else:
            exact = _reached(rows_src[block], src_norm[block], bounds, pick, _known_rows(known, block))
        settled.append(exact >= second)
        candidate.append(pick)
    return torch.cat(settled), torch.cat(candidate)


def _bound_buffer(rows: int, anchor: torch.Tensor) -> torch.Tensor:
    """This thread's float32 block of bounds, min(rows, ROW_BLOCK) x len(anchor)."""
    return thread_buffer("prefix_bound", (ROW_BLOCK, len(anchor)), torch.float32, anchor.device)[: min(rows, ROW_BLOCK)]


class _PrefixBounds:
    """The anchor's side of `bounded_row_bests`' passes (and its probe): per prefix, the anchor's
    rounded columns and norms (bfloat16 passes), its int8 columns packed for fbgemm (the int8 first
    pass and probe, `integer_pass`) or its rest norms (float32 passes, `rest`) are computed once
    and serve every pass over it -- and the column potentials v every pass settles rows against.

    A row's bound on its full score against anchor row j is the rounded prefix score plus its
    error bound (`RoundedScores`', the result's rounding bounded by the prefix norms: see `_side`)
    plus |x_rest| |y_rest| (Cauchy-Schwarz), less v_j, all added in one rank-6 update; the rest
    norms come from the full and prefix norms (rounded up past their float32 error), so the rest of
    the columns is never read. A row is settled when its candidate's full score, in float32 less its
    rounding bound and its potential, reaches every other bound: the candidate is then the argmax of
    the float64 scores less the potentials."""

    def __init__(
        self,
        anchor: torch.Tensor,
        anchor_norm: torch.Tensor,
        potential: torch.Tensor | None = None,
        anchor_parts: PartSquares | None = None,
    ) -> None:
        self.anchor, self.anchor_norm, self.anchor_parts = anchor, anchor_norm, anchor_parts
        self.potential = torch.zeros_like(anchor_norm) if potential is None else potential
        self.mode = prefix_gemm(anchor.device)  # float32: the passes of `_prefix_pass`, else `settle`
        self._sides: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._integer_sides: dict[int, tuple[QuantizedRows, torch.Tensor]] = {}
        self._rests: dict[int, torch.Tensor] = {}
        # per prefix, the probe's int8 pass over the first rows of a source: (source, its results)
        self._probed: dict[int, tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def of(cls, src: torch.Tensor, anchor: torch.Tensor, parts: PartSquares | None = None) -> _PrefixBounds:
        """The bounds of a solve of `src` against `anchor`, with `distance_potentials`. `parts`:
        the anchor's `PartSquares` in PREFIX_UNIT runs, where the caller has them."""
        if parts is None:  # every prefix's and rest's norms from one pass
            parts = part_squares(anchor, PREFIX_UNIT)
        anchor_norm = _norms_between(anchor, parts)
        return cls(anchor, anchor_norm, distance_potentials(src, anchor, anchor_norm), parts)

    def less_potential(self, score: torch.Tensor, pick: torch.Tensor) -> torch.Tensor:
        """A lower bound on score - v[pick] (float32: less its rounding, POTENTIAL_ROUNDING)."""
        potential = self.potential[pick]
        return score - potential - POTENTIAL_ROUNDING * (score.abs() + potential.abs())

    def rest_factors(
        self, src: torch.Tensor, src_norm: torch.Tensor, upto: int, parts: PartSquares | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 passes' rank-3 terms past the prefix [0, upto): left (rows of `src`)
        |x_rest|, `slack` |x| and 1, right |y_rest|, |y| and -v -- Cauchy-Schwarz on the rest, the
        rounding allowance, and the potentials (shrunk by POTENTIAL_ROUNDING, which bounds the
        rounding of taking them off). `parts`: `src`'s, where known."""
        src_rest = _norms_between(src, parts, upto)
        left = torch.stack([src_rest, src_norm * slack(src.shape[1]), torch.ones_like(src_norm)], 1)
        return left, torch.stack([self.rest(upto), self.anchor_norm, self.taken_off])

    @property
    def taken_off(self) -> torch.Tensor:
        """-v, less POTENTIAL_ROUNDING of |v|: what the bounds add for the potentials."""
        return -self.potential + POTENTIAL_ROUNDING * self.potential.abs()

    def rest(self, upto: int) -> torch.Tensor:
        """The norms of the anchor's rows past the prefix [0, upto) (float32, as computed)."""
        if upto not in self._rests:
            self._rests[upto] = _norms_between(self.anchor, self.anchor_parts, upto)
        return self._rests[upto]

    def settle(self, src: torch.Tensor, src_norm: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows of `src` the prefix [0, upto) settles, and each row's candidate best."""
        settled, candidate = [], []
        for block, upper in self.upper(src, src_norm, upto):
            second, pick = top_two(upper)
            settled.append(_reached(src[block], src_norm[block], self, pick) >= second)
            candidate.append(pick)
        return torch.cat(settled), torch.cat(candidate)

    def upper(self, src: torch.Tensor, src_norm: torch.Tensor, upto: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """Per block of SCAN_BLOCK rows of `src`, an upper bound (float32) on every row's full score
        against every anchor row, from the prefix [0, upto) of the columns. Each block is written
        into the same buffer: use it before taking the next."""
        anchor_hi, right = self._side(upto)
        src_hi, src_hi_norm, src_lo_norm, src_pre_norm = _rounded_rows(src[:, :upto])
        src_rest = rest_norm(src_norm, src_pre_norm, src.shape[1])
        ones = torch.ones_like(src_rest)
        left = torch.stack([src_hi_norm, src_lo_norm, src_hi_norm, src_rest, ones, ones], 1)
        # one GEMM block and one scan block, refilled: fresh ones would be new pages every time
        approx_buffer = anchor_hi.new_empty(min(len(src), ROW_BLOCK), len(anchor_hi))
        scan_buffer = anchor_hi.new_empty(min(len(src), SCAN_BLOCK), len(anchor_hi), dtype=torch.float32)
        for start in range(0, len(src), ROW_BLOCK):
            rows = src_hi[start : start + ROW_BLOCK]
            approx = torch.mm(rows, anchor_hi.T, out=approx_buffer[: len(rows)])
            for scan in range(0, len(approx), SCAN_BLOCK):
                block = slice(start + scan, start + scan + SCAN_BLOCK)
                part = approx[scan : scan + SCAN_BLOCK]
                upper = scan_buffer[: len(part)].copy_(part)
                yield block, upper.addmm_(left[block], right, alpha=_TERMS_UP)

    def integer(self, rows: int, upto: int) -> bool:
        """Whether a first pass of `rows` source rows over the prefix [0, upto) takes the int8 GEMM:
        where torch has it, and the GEMM is large enough for its speed to outweigh quantizing."""
        return self.mode == "int8" and rows * len(self.anchor) * upto >= INT8_MIN_PRODUCTS

    def integer_pass(
        self,
        src: torch.Tensor,
        src_norm: torch.Tensor,
        upto: int,
        parts: PartSquares | None = None,
        known: Known | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_prefix_pass` from fbgemm's int8 GEMM (`rotfuse.symmetry.integer_scores`), for the first
        pass and the probe: which rows of `src` the prefix [0, upto) settles, each row's candidate,
        and for the rows left open an upper bound on their scores over the prefix, which the later
        float32 passes add columns to. Per block of ROW_BLOCK source rows (quantized on their own)
        the prefix bound is x' . y' + |x'| (|r_y| + SCORE_ROUNDING |y'|) + |r_x| |y_pre| from the
        GEMM's float32 scores, and the row's bound adds |x_rest| |y_rest| and `slack` |x| |y|, less
        v_j: one rank-5 update of the scores. A candidate is settled on its whole score less its
        potential (`_reached`; `known`: the scores of `src`'s rows read already). The rows a probe
        of this same `src` passed over (`probe_pass`) are taken from its results."""
        probed, found = self._probed.get(upto, (None, None))
        if probed is src and found is not None:
            done = len(found[0])
            rest_parts = None if parts is None else parts.rows(slice(done, None))
            rest_known = _known_rows(known, slice(done, None))
            rest = self.integer_pass(src[done:], src_norm[done:], upto, rest_parts, rest_known)
            return tuple(torch.cat([a, b]) for a, b in zip(found, rest, strict=True))  # type: ignore[return-value]
        quantized_anchor, prefix_right = self._integer_side(upto)
        rest_left, rest_right = self.rest_factors(src, src_norm, upto, parts)
        right = torch.cat([prefix_right, rest_right])
        bound = _bound_buffer(len(src), self.anchor)
        settled, candidate, kept = [], [], []
        for start in range(0, len(src), ROW_BLOCK):
            rows = slice(start, start + ROW_BLOCK)
            quantized = quantize_source(src[rows, :upto])
            scores = quantized_scores(quantized, quantized_anchor)
            prefix_left = torch.stack([quantized.quantized_norm, quantized.residual_norm], 1)
            left = torch.cat([prefix_left, rest_left[rows]], 1)
            upper = torch.addmm(scores, left, right, out=bound[: len(scores)])
            second, pick = top_two(upper)
            ok = _reached(src[rows], src_norm[rows], self, pick, _known_rows(known, rows)) >= second
            settled.append(ok)
            candidate.append(pick)
            kept.append(scores[~ok].addmm_(prefix_left[~ok], prefix_right))
        return torch.cat(settled), torch.cat(candidate), torch.cat(kept)

    def probe_pass(
        self, src: torch.Tensor, sample_norm: torch.Tensor, upto: int, known: Known | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`integer_pass` over the first len(sample_norm) rows of `src` (the probe's sample), kept
        for the first pass over `src`: which rows it settles and their candidates."""
        found = self.integer_pass(src[: len(sample_norm)], sample_norm, upto, None, known)
        self._probed[upto] = src, found
        return found[0], found[1]

    def _integer_side(self, upto: int) -> tuple[QuantizedRows, torch.Tensor]:
        """The anchor's prefix [0, upto) quantized and packed, and the right factors of
        `integer_pass`: |r_y| + SCORE_ROUNDING |y'| and |y_pre| (rounded up)."""
        if upto not in self._integer_sides:
            prefix = self.anchor[:, :upto]
            quantized = quantize_anchor(prefix)
            pre_norm = _norms_between(self.anchor, self.anchor_parts, 0, upto) * norm_round_up(upto)
            residual = quantized.residual_norm + SCORE_ROUNDING * quantized.quantized_norm
            self._integer_sides[upto] = quantized, torch.stack([residual, pre_norm])
        return self._integer_sides[upto]

    def _side(self, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The anchor's prefix in bfloat16 and its right factors: |y_lo|, |y|, (gamma + u') |y_hi|,
        |y_rest|, a floor for what underflowed and -v (against the left's |x_hi|, |x_lo|, |x_hi|,
        |x_rest|, 1 and 1). The result's rounding to bfloat16 is bounded by u' |x_hi| |y_hi| rather
        than u' |approx| (`RoundedScores`): looser by a fraction of a percent of a prefix score's
        range, and the whole bound is then one rank-6 update of the scores."""
        if upto not in self._sides:
            hi, hi_norm, lo_norm, pre_norm = _rounded_rows(self.anchor[:, :upto])
            gamma = accumulation_bound(upto)
            rounding = gamma + _OUTPUT_ROUNDING * (1 + gamma)  # |approx| <= (1 + gamma) |x_hi| |y_hi|
            rest = rest_norm(self.anchor_norm, pre_norm, self.anchor.shape[1])
            pre = pre_norm * norm_round_up(upto)
            floor = torch.full_like(rest, _SUBNORMAL)
            potential = self.taken_off / _TERMS_UP  # the update's factor would take off more than v
            self._sides[upto] = hi, torch.stack([lo_norm, pre, rounding * hi_norm, rest, floor, potential])
        return self._sides[upto]


def _norms_between(
    rows: torch.Tensor, parts: PartSquares | None, start: int = 0, stop: int | None = None
) -> torch.Tensor:
    """The norms of `rows`' columns [start, stop) (float32; stop None: to the end): from `parts`
    where they hold them (ends between PREFIX_UNIT parts), else computed."""
    known = None if parts is None else parts.norms(start, stop)
    return row_norms(rows[:, start:stop]) if known is None else known


def _prefix_width(width: int, share: int) -> int:
    """The columns of the prefix `share` (in PREFIX_UNIT parts) of rows `width` wide."""
    return max(1, width * share // PREFIX_UNIT)


def slack(width: int) -> float:
    """The float32 passes' allowance for rounding, of |x| |y|, for rows `width` wide: SLACK, or
    twice gamma_w where that is more -- the worst case of the prefix GEMM's sums and the
    candidate's (each within gamma_w |x| |y|), the rest norms' (within gamma_w of their product)."""
    return max(SLACK, 2 * accumulation_bound(width))


def accumulation_bound(width: int) -> float:
    """gamma_w, rounded up: a float32 sum of `width` terms is within gamma_w of the sum of their
    magnitudes (w u32 / (1 - w u32) for any order of summation)."""
    return 1.01 * width * FP32_UNIT


def norm_round_up(width: int) -> float:
    """The factor that rounds a float32 norm of `width` entries up past its error."""
    return 1 + 4 * width * FP32_UNIT + 2.0**-20


def _rounded_rows(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`rows` in bfloat16 and the norms `RoundedScores` bounds with: of the bfloat16 rows and of
    their residual, each rounded up past its float32 error, and of the rows, as computed (for
    `rest_norm`, which needs it from below). In blocks: no float32 copy of the whole."""
    up = norm_round_up(rows.shape[1])
    if rows.dtype == torch.bfloat16:  # nothing to round: no residual
        norm = row_norms(rows)
        return rows.contiguous(), norm * up, torch.zeros_like(norm), norm
    hi = torch.empty(rows.shape, dtype=torch.bfloat16, device=rows.device)
    hi_norm, lo_norm = (rows.new_empty(len(rows), dtype=torch.float32) for _ in range(2))
    for start in range(0, len(rows), ROW_BLOCK):
        block = slice(start, start + ROW_BLOCK)
        hi[block] = rows[block]
        _residual_norms(rows[block], hi_norm[block], lo_norm[block], hi[block])
    return hi, hi_norm.mul_(up), lo_norm.mul_(up), row_norms(rows)


def rest_norm(norm: torch.Tensor, prefix_norm: torch.Tensor, width: int) -> torch.Tensor:
    """An upper bound on the norm of the rows' columns after a prefix, from the float32 norms of
    the whole rows and of the prefix as computed (each within w u32 / 2 + u32 of the exact norm,
    whatever the order of its sum; 2 w u32 is allowed): sqrt(|x|^2 - |x_pre|^2) with |x| rounded
    up and |x_pre| down, in float64."""
    margin = 2 * width * FP32_UNIT + 2.0**-22
    whole, prefix = norm.double() / (1 - margin), prefix_norm.double() / (1 + margin)
    return (whole.square() - prefix.square()).clamp_(min=0).sqrt_().float().mul_(1 + 2.0**-20)


def _inverse(best: torch.Tensor) -> torch.Tensor:
    """`perm[j]` = the row whose best column is j, from distinct `best[i]`."""
    perm = torch.empty(len(best), dtype=torch.int64)
    perm[best.cpu()] = torch.arange(len(best))
    return perm


def best_assignment(scores: torch.Tensor, potential: torch.Tensor | None = None) -> torch.Tensor:
    """`perm[j]` = the row assigned to column j, maximising the summed scores.

    Fast path with a certificate: when every row's best column is a different column (or every
    column's best row a different row), taking them is optimal -- each row (column) attains its
    own maximum, the largest any assignment can give it; with column potentials `potential`
    (`distance_potentials`), first each row's best of scores - v, in float64 (LP duality: optimal
    too when distinct; a fine-tune's rows of uneven norms are this case where their largest scores
    collide). Models fine-tuned from one base and scrambled copies are usually this case.
    Otherwise, for float32 scores, the sparse solve with its LP-duality certificate
    (`certified_sparse_assignment`: unrelated models), and where that steps aside the dense
    Hungarian solve (scipy, O(n^3); a few rows: `small_assignment`).
    """
    n = scores.shape[0]
    if scores.shape[0] == scores.shape[1] and n:
        if potential is not None:
            nearest = _bests_against(scores, potential)
            if torch.unique(nearest).numel() == n:
                return _inverse(nearest)
        best_cols = scores.argmax(dim=1)
        if torch.unique(best_cols).numel() == n:
            return _inverse(best_cols)
        best_rows = scores.argmax(dim=0)
        if torch.unique(best_rows).numel() == n:
            return best_rows.cpu().to(torch.int64)
        if scores.dtype == torch.float32 and n >= SPARSE_MIN_SIZE:
            certified = certified_sparse_assignment(scores)
            if certified is not None:
                return certified
    if scores.shape[0] == scores.shape[1] <= SMALL_ASSIGNMENT and bool(torch.isfinite(scores).all()):
        return torch.from_numpy(small_assignment(scores.cpu().double().numpy()))
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(scores.cpu().numpy(), maximize=True)
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return torch.from_numpy(perm)


def small_assignment(scores: np.ndarray) -> np.ndarray:
    """`perm[j]` = the row assigned to column j, maximising the summed `scores` (square, a few
    rows: head groups), by dynamic programming over the sets of rows given to the first columns --
    n 2^n steps, exact, and no scipy to import (a third of a second) for an 8 x 8 problem."""
    n = len(scores)
    values = scores.tolist()
    best = [-math.inf] * (1 << n)  # best[rows]: the best total of those rows on the first |rows| columns
    came_from = [0] * (1 << n)
    best[0] = 0.0
    for taken in range(1 << n):
        total = best[taken]
        if total == -math.inf:
            continue
        column = taken.bit_count()
        if column == n:
            continue
        for row in range(n):
            if not taken >> row & 1 and total + values[row][column] > best[taken | 1 << row]:
                best[taken | 1 << row] = total + values[row][column]
                came_from[taken | 1 << row] = row
    perm = np.empty(n, dtype=np.int64)
    taken = (1 << n) - 1
    for column in range(n - 1, -1, -1):
        perm[column] = came_from[taken]
        taken &= ~(1 << perm[column])
    return perm


def _bests_against(scores: torch.Tensor, potential: torch.Tensor) -> torch.Tensor:
    """Each row's argmax of scores - potential, in float64 (exact for float32 operands of like
    magnitude), ROW_BLOCK rows at a time: no float64 copy of the whole."""
    wide = potential.to(scores.device, torch.float64)
    blocks = [(scores[i : i + ROW_BLOCK].double() - wide).argmax(dim=1) for i in range(0, len(scores), ROW_BLOCK)]
    return torch.cat(blocks)


def certified_assignment(approx: torch.Tensor, error: torch.Tensor) -> torch.Tensor | None:
    """`best_assignment` of scores known only within `error` of `approx` (float64, square): the
    assignment P of `approx` when no exact scores within the bounds can prefer another; else None.

    For any assignment A, exact(P) - exact(A) = exact(P minus A) - exact(A minus P) >= W(P) - W(A),
    W the scores moved against P (approx - error on P's entries, approx + error elsewhere) -- the
    entries both share cancel. So P is optimal when it is W's optimum, which one more solve on W
    checks (with a relative margin for the float64 sums)."""
    perm = best_assignment(approx)
    cols = torch.arange(len(perm))
    worst = approx + error
    worst[perm, cols] = approx[perm, cols] - error[perm, cols]
    return perm if optimal_against(perm, worst) else None


def optimal_against(perm: torch.Tensor, worst: torch.Tensor) -> bool:
    """Whether the assignment `perm` is an optimum of `worst` (float64, square): scores bounded
    from below on perm's entries and from above elsewhere, so that it is then the optimum of every
    exact score within those bounds (`certified_assignment`)."""
    cols = torch.arange(len(perm))
    rival = best_assignment(worst)
    if torch.equal(rival, perm):
        return True
    gap = float(worst[perm, cols].sum() - worst[rival, cols].sum())
    return gap > 2.0**-40 * float(worst.abs().sum())


def certified_sparse_assignment(scores: torch.Tensor, candidates: int = SPARSE_CANDIDATES) -> torch.Tensor | None:
    """`perm[j]` = the row assigned to column j, maximising the summed float32 `scores` -- exactly,
    proven by LP duality -- or None (the caller solves densely).

    The assignment is solved (scipy's sparse LAPJV) on a candidate graph: every row's top
    `candidates` columns, and the diagonal (so that a perfect matching exists). Its scores, scaled
    by 2^K, are integers q (K from the smallest unit in the last place among them; None when int64
    could not hold their sums), so the sparse solve runs on integers (in float64: exactly while its
    sums stay below 2^53; a matching it got wrong shows up below as a positive cycle, and None).
    Dual potentials follow from the matching M by Bellman-Ford in int64: u_i = longest path in the
    graph with an edge k -> i of weight q_ij - q_kj per candidate (i, j) with (k, j) in M, and
    v_j = q_ij - u_i for (i, j) in M; so u_i + v_j >= q_ij on every candidate, with equality on M.
    The certificate then checks u_i + v_j >= 2^K scores_ij on EVERY entry of the dense matrix,
    exactly (in int64, against the ceiling of the score scaled by a power of two): by weak duality
    no assignment sums to more than sum(u) + sum(v), which M attains, so M is optimal on the dense
    float32 scores (as real numbers), not just on the graph. A float32 pass with a rigorous rounding
    margin clears most rows first. The worst violating entries of each row join the graph and the
    solve repeats (SPARSE_ROUNDS times at most).
    """
    n = scores.shape[0]
    if scores.dtype != torch.float32 or scores.shape != (n, n) or n < 2:
        return None
    scores = scores.cpu().contiguous()
    if not bool(torch.isfinite(scores).all()):
        return None
    return _certified_sparse(_DenseScores(scores), n, candidates)


class _ScoreSource(Protocol):
    """The float32 score matrix the sparse solve certifies its optimum on, as it reads it: exact
    values where they are known, estimates with an error bound elsewhere (read exactly on demand)."""

    def top(self, k: int) -> np.ndarray:
        """Flat indices i * n + j of (at least) each row's k best columns."""
        ...

    def values(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The float32 scores at (rows, cols), `rows` sorted -- exact where the second array (bool)
        says so, estimates elsewhere."""
        ...

    def error(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """A bound (float64) on how far the estimates at (rows, cols) are from the exact scores."""
        ...

    def exact(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The exact float32 scores at (rows, cols), `rows` sorted; `values` gives them from now on."""
        ...

    def violations(self, u: np.ndarray, v: np.ndarray, scale: int, most: int) -> np.ndarray:
        """Flat indices of the `most` worst entries of each row with 2^scale score > u_i + v_j."""
        ...


@dataclass
class _DenseScores:
    """A dense float32 score matrix: every value exact."""

    scores: torch.Tensor

    def top(self, k: int) -> np.ndarray:
        n = len(self.scores)
        return (torch.arange(n).repeat_interleave(k) * n + self.scores.topk(k, dim=1).indices.flatten()).numpy()

    def values(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.exact(rows, cols), np.ones(len(rows), dtype=bool)

    def error(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return np.zeros(len(rows))

    def exact(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.scores.numpy()[rows, cols]

    def violations(self, u: np.ndarray, v: np.ndarray, scale: int, most: int) -> np.ndarray:
        return _dual_violations(self.scores, u, v, scale, most)


@dataclass
class _RowScores:
    """The scores of source rows against anchor rows, never formed densely: entry (i, j) is the
    float64 inner product of the float32 rows rounded to float32 (the exact score, correctly
    rounded but for a float64 rounding far below float32's). `RoundedScores` picks candidates,
    stands in for the exact scores where its bound shows they cannot matter, and clears every
    entry whose bound keeps it below the duals; the few it cannot are computed, once each."""

    src: torch.Tensor
    anchor: torch.Tensor
    rounded: RoundedScores
    _exact: _ExactScores | None = None
    _known: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))  # flat indices, sorted
    _known_values: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.float32))

    def top(self, k: int) -> np.ndarray:
        n = len(self.src)
        approx = self.rounded.approx
        picks = [approx[start : start + SCAN_BLOCK].topk(k, dim=1).indices for start in range(0, n, SCAN_BLOCK)]
        return (torch.arange(n).repeat_interleave(k) * n + torch.cat(picks).flatten()).numpy()

    def values(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        at, known = self._lookup(rows, cols)
        values = self.rounded.approx[torch.from_numpy(rows), torch.from_numpy(cols)].float().numpy()
        values[known] = self._known_values[at[known]]
        return values, known

    def error(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        return self.rounded.error_at(torch.from_numpy(rows), torch.from_numpy(cols)).double().numpy()

    def exact(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        at, known = self._lookup(rows, cols)
        values = np.empty(len(rows), dtype=np.float32)
        values[known] = self._known_values[at[known]]
        new = np.flatnonzero(~known)
        if len(new):
            if self._exact is None:  # once per solve: its float64 buffers serve every call
                self._exact = _ExactScores(self.src, self.anchor)
            values[new] = self._exact(rows[new], cols[new])
            keys = np.concatenate([self._known, rows[new] * len(self.src) + cols[new]])
            order = np.argsort(keys, kind="stable")
            self._known = keys[order]
            self._known_values = np.concatenate([self._known_values, values[new]])[order]
        return values

    def _lookup(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where (rows, cols) sit in the known values, and which of them are there."""
        keys = rows * len(self.src) + cols
        at = np.searchsorted(self._known, keys).clip(max=max(0, len(self._known) - 1))
        known = self._known[at] == keys if len(self._known) else np.zeros(len(keys), dtype=bool)
        return at, known

    def violations(self, u: np.ndarray, v: np.ndarray, scale: int, most: int) -> np.ndarray:
        n = len(self.src)
        u_real = np.ldexp(u.astype(np.float64), -scale)
        v_real = np.ldexp(v.astype(np.float64), -scale)
        u32, v32 = torch.from_numpy(u_real).float(), torch.from_numpy(v_real).float()
        v_max = float(np.abs(v_real).max())
        rows_found, cols_found = [], []
        for start in range(0, n, SCAN_BLOCK):
            block = slice(start, start + SCAN_BLOCK)
            scores, error = self.rounded.upper(block)
            # float32 rounding of the few operations below: far inside 2^-20 of their magnitudes
            slack = 2.0**-20 * (float(scores.abs().max()) + float(error.max()) + v_max + float(u32[block].abs().max()))
            reach = scores.add_(error).sub_(v32).sub_(u32[block, None]) > -slack
            at_row, at_col = torch.nonzero(reach, as_tuple=True)
            rows_found.append((at_row + start).numpy())
            cols_found.append(at_col.numpy())
        rows, cols = np.concatenate(rows_found), np.concatenate(cols_found)
        if not len(rows):
            return rows
        # x > m for an integer m iff ceil(x) > m: the exactly scaled float32 score, ceiled, in int64
        scaled = np.ceil(np.ldexp(self.exact(rows, cols).astype(np.float64), scale))
        excess = np.clip(scaled, -(2.0**62), 2.0**62).astype(np.int64) - (u[rows] + v[cols])
        bad = np.flatnonzero(excess > 0)
        order = bad[np.lexsort((-excess[bad], rows[bad]))]  # by row, worst first
        rank = np.arange(len(order)) - np.searchsorted(rows[order], rows[order])
        keep = order[rank < most]
        return rows[keep] * n + cols[keep]


class _ExactScores:
    """Float64 inner products of float32 source and anchor rows at sampled entries, rounded to
    float32, holding at most EXACT_BYTES of float64 rows: a tile of anchor rows (converted once per
    call) and a block of source rows (converted per tile that needs them), never whole copies --
    or, when the entries asked for touch few enough rows, just those rows, in the tile's buffer.

    Each entry is `sampled_addmm`'s float64 dot product of the two rows, whatever block they are
    read from: the values are bit-identical to one call on whole float64 copies."""

    def __init__(self, src: torch.Tensor, anchor: torch.Tensor) -> None:
        self.src, self.anchor = src, anchor
        held = max(2, EXACT_BYTES // (8 * max(1, src.shape[1])))  # float64 rows, both sides together
        self.block = max(1, min(len(src), held // EXACT_SRC_SHARE))
        self.tile = max(1, min(len(anchor), held - self.block))
        self._src64 = torch.empty(self.block, src.shape[1], dtype=torch.float64)
        self._anchor64 = torch.empty(self.tile, anchor.shape[1], dtype=torch.float64)
        self._held_tile = -1  # the anchor tile `_anchor64` holds

    def __call__(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """The scores at (rows, cols), `rows` sorted."""
        src_rows, local_rows = np.unique(rows, return_inverse=True)
        anchor_rows, local_cols = np.unique(cols, return_inverse=True)
        if len(src_rows) + len(anchor_rows) <= self.tile:  # few rows: just those, both in the tile's buffer
            self._held_tile = -1
            both = self._anchor64[: len(src_rows) + len(anchor_rows)]
            _gather_into(both[: len(src_rows)], self.src, src_rows)
            _gather_into(both[len(src_rows) :], self.anchor, anchor_rows)
            return _sampled_dots(both[: len(src_rows)], both[len(src_rows) :], local_rows, local_cols)
        out = np.empty(len(rows), dtype=np.float32)
        tile_of = cols // self.tile
        order = np.argsort(tile_of, kind="stable")  # by tile, rows still sorted within each
        tiles = np.searchsorted(tile_of[order], np.arange(-(-len(self.anchor) // self.tile) + 1))
        for tile in sorted(range(len(tiles) - 1), key=lambda t: t != self._held_tile):  # the held one first
            at = order[tiles[tile] : tiles[tile + 1]]
            if not len(at):
                continue
            first = tile * self.tile
            if tile != self._held_tile:
                part = self.anchor[first : first + self.tile]
                self._anchor64[: len(part)].copy_(part)
                self._held_tile = tile
            anchor64 = self._anchor64[: min(self.tile, len(self.anchor) - first)]
            tile_rows, tile_cols = rows[at], cols[at] - first
            blocks, starts = np.unique(tile_rows // self.block, return_index=True)
            ends = np.r_[starts[1:], len(at)]
            for block, start, end in zip(blocks.tolist(), starts.tolist(), ends.tolist()):
                top = block * self.block
                part = self.src[top : top + self.block]
                src64 = self._src64[: len(part)].copy_(part)
                out[at[start:end]] = _sampled_dots(src64, anchor64, tile_rows[start:end] - top, tile_cols[start:end])
        return out


def _gather_into(out: torch.Tensor, rows: torch.Tensor, index: np.ndarray) -> None:
    """out[k] = rows[index[k]], converted, through float32 temporaries of ROW_BLOCK rows at most."""
    for start in range(0, len(index), ROW_BLOCK):
        part = torch.from_numpy(index[start : start + ROW_BLOCK])
        out[start : start + len(part)].copy_(rows.index_select(0, part))


def _sampled_dots(src: torch.Tensor, anchor: torch.Tensor, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`src[rows[e]] . anchor[cols[e]]` (float64 rows, `rows` sorted), rounded to float32."""
    crow = torch.from_numpy(np.searchsorted(rows, np.arange(len(src) + 1)))
    zeros = torch.zeros(len(cols), dtype=torch.float64)
    shape = (len(src), len(anchor))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": sampled_addmm is all it uses
        warnings.simplefilter("ignore", UserWarning)
        mask = torch.sparse_csr_tensor(crow, torch.from_numpy(cols), zeros, shape, check_invariants=False)
    return torch.sparse.sampled_addmm(mask, src, anchor.T, beta=0.0).values().float().numpy()


def _certified_sparse(source: _ScoreSource, n: int, candidates: int) -> torch.Tensor | None:
    """`certified_sparse_assignment` on the scores `source` reads (see there). The graph's scores
    may be estimates: an edge whose estimate's error bound reaches its reduced cost u_i + v_j - q_ij
    (every edge of the matching among them) is read exactly and the graph solved again, so that
    the matching and the duals stand on exact scores where it matters; the dual check over every
    entry is on exact scores whatever the graph held."""
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    k = min(candidates, n)
    key = _union(source.top(k), np.arange(n) * (n + 1))  # the diagonal too: a perfect matching exists
    checks = 0
    for _ in range(SPARSE_SOLVES):
        rows, cols = key // n, key % n  # sorted by row: every row holds at least k candidates
        value, known = source.values(rows, cols)
        value = value.astype(np.float64)
        if not np.isfinite(value).all():
            return None
        _, exponent = np.frexp(value[value != 0])
        scale = int((24 - exponent).max()) if len(exponent) else 0  # float32: 24 significant bits
        q = np.ldexp(value, scale)
        if not len(q) or 4 * n * (float(np.abs(q).max()) + 1) >= INT_LIMIT:
            return None  # a tiny candidate score: its unit would need more bits than int64 sums keep
        q = q.astype(np.int64)
        top = int(q.max())
        graph = csr_matrix(((top + 1 - q).astype(np.float64), (rows, cols)), shape=(n, n))  # positive
        matched_rows, matched_cols = min_weight_full_bipartite_matching(graph)
        row_of = np.empty(n, dtype=np.int64)
        row_of[matched_cols] = matched_rows
        col_of = np.empty(n, dtype=np.int64)
        col_of[matched_rows] = matched_cols
        on_matching = np.flatnonzero(cols == col_of[rows])
        q_matched = np.empty(n, dtype=np.int64)  # per column: the matched edge's integer score
        q_matched[cols[on_matching]] = q[on_matching]
        u = _longest_paths(rows, row_of[cols], q - q_matched[cols], n)
        if u is None:
            return None  # a positive cycle: the sparse solve was not optimal (cannot happen in integers)
        v = q_matched - u[row_of]
        if float(np.abs(u).max()) + float(np.abs(v).max()) >= INT_LIMIT:
            return None
        unsure = np.flatnonzero(~known)  # estimates that could decide the matching: read them exactly
        if len(unsure):
            reduced = np.ldexp((u[rows[unsure]] + v[cols[unsure]] - q[unsure]).astype(np.float64), -scale)
            unsure = unsure[reduced <= source.error(rows[unsure], cols[unsure])]  # the matching's: 0 < error
        if len(unsure):
            source.exact(rows[unsure], cols[unsure])
            continue
        if checks == SPARSE_ROUNDS:
            return None
        checks += 1
        violated = source.violations(u, v, scale, k)
        if not len(violated):
            return torch.from_numpy(row_of)
        key = _union(key, violated)
    return None


def _union(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """The sorted distinct values of both (np.union1d, by a sort: numpy 2's hashing unique is ~10x slower here)."""
    both = np.sort(np.concatenate([first, second]))
    return both[np.r_[True, both[1:] != both[:-1]]] if len(both) else both


def _longest_paths(heads: np.ndarray, tails: np.ndarray, weight: np.ndarray, n: int) -> np.ndarray | None:
    """Least u >= 0 with u[head] >= u[tail] + weight on every edge (Bellman-Ford rounds, int64);
    None when a positive cycle keeps it growing. `heads` sorted, every node one at least."""
    starts = np.flatnonzero(np.r_[True, heads[1:] != heads[:-1]])
    if len(starts) != n:
        return None
    u = np.zeros(n, dtype=np.int64)
    for _ in range(n + 1):
        grown = np.maximum(u, np.maximum.reduceat(u[tails] + weight, starts))
        if np.array_equal(grown, u):
            return u
        u = grown
    return None


def _dual_violations(scores: torch.Tensor, u: np.ndarray, v: np.ndarray, scale: int, most: int) -> np.ndarray:
    """Flat indices i * n + j of entries with 2^scale scores_ij > u_i + v_j, compared exactly: the
    `most` worst of each row (none means the duals are feasible on every entry).

    A float32 pass first: d_ij = fl(s_ij - v32_j) (v32 = v 2^-scale rounded to float32) is within
    2^-24 |s_ij - v32_j| of s_ij - v32_j and v32_j within 2^-24 |v_j 2^-scale| of v_j 2^-scale, so
    max_j (s_ij - v_j 2^-scale) <= max_j d_ij + 2^-23 max_j |d_ij| + 2^-24 max |v 2^-scale|; rows
    whose bound, with both terms doubled (for its own float64 rounding) and 2^-100 added (for
    subnormals), stays at or below u_i 2^-scale are clear."""
    n = scores.shape[0]
    u_real = torch.from_numpy(np.ldexp(u.astype(np.float64), -scale))
    u_real -= 2.0**-50 * u_real.abs()  # rounded down past its float64 rounding (u may exceed 2^53)
    v_real = np.ldexp(v.astype(np.float64), -scale)
    v32 = torch.from_numpy(v_real).float()
    v_slack = 2.0**-23 * float(np.abs(v_real).max()) + 2.0**-100
    uv = torch.from_numpy(v)
    found = []
    for start in range(0, n, ROW_BLOCK):
        block = scores[start : start + ROW_BLOCK]
        low, high = torch.aminmax(block - v32, dim=1)
        bound = high.double() + 2.0**-22 * torch.maximum(high.abs(), low.abs()).double() + v_slack
        open_rows = torch.nonzero(bound > u_real[start : start + len(block)]).flatten()
        if len(open_rows):
            rows = start + open_rows
            # x > m for an integer m iff ceil(x) > m: ceil of the exactly scaled score, clamped into int64
            scaled = torch.ldexp(scores[rows].double(), torch.tensor(float(scale), dtype=torch.float64))
            exact = scaled.ceil_().clamp_(-(2.0**62), 2.0**62).long()
            rhs = torch.from_numpy(u)[rows, None] + uv  # |u| + |v| < 2^62: no overflow
            excess = torch.where(exact > rhs, exact - rhs, 0)
            top, col = excess.topk(min(most, n), dim=1)
            bad_row, bad_rank = torch.nonzero(top > 0, as_tuple=True)
            found.append((rows[bad_row] * n + col[bad_row, bad_rank]).numpy())
    return np.concatenate(found) if found else np.empty(0, dtype=np.int64)


def permute_ffn(ffn: Ffn, perm: torch.Tensor, rows: torch.Tensor | None = None) -> Ffn:
    """`ffn` with neuron `perm[j]` moved to place j. `rows`, if given, are `ffn_rows(ffn)` in the
    output weight's dtype: its columns are then gathered from their transposed copy there, as rows,
    and transposed back (twice as fast as gathering columns)."""
    perm = perm.to(ffn.output.weight.device)
    inputs = [linear.map(lambda t: t.index_select(0, perm)) for linear in ffn.inputs]
    down = ffn.output.weight
    if rows is not None and rows.dtype == down.dtype and rows.shape == ffn_rows_shape(ffn):
        return Ffn(inputs, Linear(rows[:, -down.shape[0] :].index_select(0, perm).T.contiguous()))
    return Ffn(inputs, Linear(down.index_select(1, perm)))


def random_permutation(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=generator)
