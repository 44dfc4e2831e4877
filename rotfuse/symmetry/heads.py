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
from fractions import Fraction
from typing import cast

import torch

from rotfuse.symmetry.circuit import CircuitProducts, circuit_products
from rotfuse.symmetry.permutation import (
    BF16_UNIT,
    FP32_UNIT,
    accumulation_bound,
    best_assignment,
    certified_assignment,
    fast_bfloat16_gemm,
    norm_round_up,
    optimal_against,
    rest_norm,
    row_norms,
)
from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.weights import Circuit

PairProducts = dict[tuple[int, int], list[CircuitProducts]]  # (source group, anchor group) -> per circuit


@dataclass(frozen=True)
class ScoredCircuit:
    """One circuit's part of the group pair scores: source and anchor circuits, and the rotations
    allowed (none: the trace; all of O(dh): the nuclear norm; RoPE-compatible ones on `rotary_dim`)."""

    src: Circuit
    anchor: Circuit
    rotate: bool
    rotary_dim: int = 0


def group_permutation(circuits: Sequence[ScoredCircuit], exact: PairProducts | None = None) -> torch.Tensor:
    """`perm[j]` = the source group to place at anchor group j, maximising the pair scores summed
    over `circuits` (`pair_scores`). `exact`, where given, receives the `circuit_products` of the
    group pairs a proof computed exactly (`pair_products`: the rotations' solve reuses them).

    Where the CPU multiplies bfloat16 fast, the scores come first from bfloat16 GEMMs with a bound
    on their error (`rounded_pair_scores`), and their assignment is kept when the bound proves it
    optimal for the exact scores (`certified_assignment`): related models, whose matched groups
    score far above the rest. Elsewhere on the CPU, the assignment is first proven from float32
    GEMMs over a prefix of the columns (`prefix_group_permutation`). Otherwise -- unrelated models,
    near-ties -- from float32 GEMMs over every pair of groups."""
    device = circuits[0].src.left[0].device
    if all(fast_bfloat16_gemm(c.src.left[0].device) for c in circuits):
        rounded = [rounded_pair_scores(c.src, c.anchor, c.rotate, c.rotary_dim) for c in circuits]
        approx = cast(torch.Tensor, sum(scores for scores, _ in rounded))
        error = cast(torch.Tensor, sum(bound for _, bound in rounded))
        certified = certified_assignment(approx, error)
        if certified is not None:
            return certified
    elif device.type == "cpu":
        certified = prefix_group_permutation(circuits, exact)
        if certified is not None:
            return certified
    scores = sum(pair_scores(c.src, c.anchor, c.rotate, c.rotary_dim) for c in circuits)
    return best_assignment(cast(torch.Tensor, scores))


# the shares of every block's columns `prefix_group_permutation` tries, in turn
HEAD_PREFIXES = (Fraction(1, 8), Fraction(3, 16), Fraction(1, 4), Fraction(1, 2))


@dataclass
class _BlockPair:
    """One tensor of a circuit: source and anchor blocks `[G, H, dh, n]`, their rows' norms over
    every column (float32, as computed) and their groups' (float64, rounded up)."""

    x: torch.Tensor
    y: torch.Tensor
    x_norm: torch.Tensor
    y_norm: torch.Tensor
    x_groups: torch.Tensor
    y_groups: torch.Tensor
    done: int = 0  # columns already in the prefix scores

    @classmethod
    def of(cls, x: torch.Tensor, y: torch.Tensor) -> _BlockPair:
        x_norm, y_norm = _last_norms(x), _last_norms(y)
        width = x.shape[-1]
        return cls(x, y, x_norm, y_norm, _group_norms_of(x_norm, width), _group_norms_of(y_norm, width))

    @property
    def width(self) -> int:
        return self.x.shape[-1]


def prefix_group_permutation(
    circuits: Sequence[ScoredCircuit], exact: PairProducts | None = None
) -> torch.Tensor | None:
    """`group_permutation`'s assignment proven optimal from float32 GEMMs over a prefix of every
    block's columns (HEAD_PREFIXES: 1/8, else 3/16, 1/4, 1/2), or None.

    A pair's score, max <R, M_ij> over the allowed R, is at most the nuclear norm of M_ij: at most
    sqrt(dh) |M_ij|_F over the prefix plus |X_i|_F |Y_j|_F over the rest, per block (|A B^T|_* <=
    |A|_F |B|_F), each float32 GEMM's rounding added (gamma_w |X|_F |Y|_F per block, with the
    inputs' rounding to float32). The best assignment P on these upper bounds has its own pairs
    scored over every column, less their rounding bound; P is optimal when it still is with the
    upper bounds off P and the lower ones on it (`optimal_against`). Matched groups of related
    models score about cos |X| |Y| against at most about (1 - share) |X| |Y| elsewhere: settled
    on 1/8 to 1/4 of the GEMM plus P's G blocks; unrelated models give up after the first prefix.
    Each share's products extend the last one's: a share that fails costs its norms, not its GEMM;
    shares whose rest alone would still exceed P's scores are skipped, and none left gives up."""
    groups, dh = circuits[0].src.left[0].shape[0], circuits[0].src.left[0].shape[2]
    pairs = [[_BlockPair.of(x, y) for x, y in zip(c.src.tensors(), c.anchor.tensors(), strict=True)] for c in circuits]
    prefix = [torch.zeros(groups * dh, groups * dh, dtype=torch.float64) for _ in circuits]
    whole = torch.zeros(groups, groups, dtype=torch.float64)  # |X_i| |Y_j| over every column, summed over blocks
    for pair in (pair for circuit_pairs in pairs for pair in circuit_pairs):
        whole.add_(torch.outer(pair.x_groups, pair.y_groups))
    lower: dict[tuple[int, int], float] = {}  # P's pairs, scored over every column (a lower bound)
    cols = torch.arange(groups)
    share: Fraction | None = HEAD_PREFIXES[0]
    while share is not None:
        upper = torch.zeros(groups, groups, dtype=torch.float64)
        for circuit_pairs, scores in zip(pairs, prefix, strict=True):
            upper.add_(_prefix_upper(circuit_pairs, scores, share, groups, dh))
        upper.mul_(1 + 2.0**-30).add_(_FLOOR)  # the float64 sums and square roots
        perm = best_assignment(upper)
        missing = torch.tensor([j for j in range(groups) if (int(perm[j]), j) not in lower], dtype=torch.int64)
        if len(missing):
            found = _exact_lowers(circuits, pairs, perm[missing], missing, exact)
            lower.update(zip(zip(perm[missing].tolist(), missing.tolist()), found.tolist()))
        worst = upper.clone()
        worst[perm, cols] = torch.tensor([lower[int(perm[j]), j] for j in range(groups)], dtype=torch.float64)
        if optimal_against(perm, worst):
            return perm
        # the next wider share whose rest alone, (1 - share) |X_i| |Y_j|, could fall below P's scores
        rivals = whole.clone()
        rivals[perm, cols] = 0
        best_rival, own = rivals.max(dim=0).values, worst[perm, cols]
        wider = (s for s in HEAD_PREFIXES if s > share)
        share = next((s for s in wider if not bool((own <= float(1 - s) * best_rival).any())), None)
    return None


def _prefix_upper(pairs: list[_BlockPair], scores: torch.Tensor, share: Fraction, groups: int, dh: int) -> torch.Tensor:
    """Upper bounds `[G, G]` on one circuit's pair scores from the first `share` of every block's
    columns; `scores` (`[G*dh, G*dh]` float64) accumulates the prefix products across calls."""
    bound = torch.zeros(groups, groups, dtype=torch.float64)
    for pair in pairs:
        width, heads = pair.width, pair.x.shape[1]
        upto = max(1, int(width * share))
        if upto > pair.done:
            part = slice(pair.done, upto)
            product = _rows(pair.x[..., part], torch.float32) @ _rows(pair.y[..., part], torch.float32).T
            scores.add_(product.double())
            pair.done = upto
        x_pre, y_pre = _last_norms(pair.x[..., :upto]), _last_norms(pair.y[..., :upto])
        x_rest = rest_norm(pair.x_norm.flatten(), x_pre.flatten(), width)
        y_rest = rest_norm(pair.y_norm.flatten(), y_pre.flatten(), width)
        rounding = accumulation_bound(heads * upto + 1) + 2 * FP32_UNIT
        prefix_x, prefix_y = _group_norms_of(x_pre, upto), _group_norms_of(y_pre, upto)
        bound.add_(torch.outer(prefix_x, prefix_y), alpha=rounding * dh**0.5)
        bound.add_(torch.outer(_group_norms_of(x_rest, 0, groups), _group_norms_of(y_rest, 0, groups)))
    frobenius = scores.reshape(groups, dh, groups, dh).square().sum((1, 3)).sqrt()
    return bound.add_(frobenius.mul_(dh**0.5 * (1 + 2.0**-40)))


def _exact_lowers(
    circuits: Sequence[ScoredCircuit],
    pairs: list[list[_BlockPair]],
    sources: torch.Tensor,
    targets: torch.Tensor,
    exact: PairProducts | None = None,
) -> torch.Tensor:
    """Lower bounds (float64) on the summed scores of source groups `sources[k]` and anchor groups
    `targets[k]`: M over every column (`circuit_products`: float32 products of column chunks,
    summed over heads, the chunks in float64), less its rounding bound -- all pairs in one batch
    (the groups as they are when the pairs are (j, j): no copy). `exact` keeps the products."""
    products = [circuit_products(_groups(c.src, sources), _groups(c.anchor, targets)) for c in circuits]
    if exact is not None:
        for k, pair in enumerate(zip(sources.tolist(), targets.tolist(), strict=True)):
            exact[pair] = [product.group(k) for product in products]
    total = torch.zeros(len(sources), dtype=torch.float64)
    for circuit, circuit_pairs, product in zip(circuits, pairs, products, strict=True):
        dh = circuit_pairs[0].x.shape[2]
        error = torch.zeros(len(sources), dtype=torch.float64)
        for block in circuit_pairs:
            rounding = accumulation_bound(block.width + block.x.shape[1]) + 2 * FP32_UNIT  # columns, then heads
            error += rounding * block.x_groups[sources] * block.y_groups[targets]
        score = _block_scores(product.cross, circuit.rotate, circuit.rotary_dim)
        total += score - error * dh**0.5 * (1 + 2.0**-20) - score.abs() * 2.0**-30 - _FLOOR
    return total


def _groups(circuit: Circuit, index: torch.Tensor) -> Circuit:
    """The groups `index` of `circuit`, in that order, in float32 or wider (the rounding bound's
    precision): no copy when that is all of its groups in order, in such a dtype."""
    if not torch.equal(index, torch.arange(circuit.left[0].shape[0])):
        circuit = permute_groups(circuit, index)
    if all(b.dtype in (torch.float32, torch.float64) for b in circuit.tensors()):
        return circuit
    return Circuit(tuple(b.float() for b in circuit.left), tuple(b.float() for b in circuit.right))


def pair_products(exact: PairProducts, perm: torch.Tensor | None, circuit: int, groups: int) -> CircuitProducts | None:
    """Circuit `circuit`'s products for the source groups `perm` (None: as they are) against the
    anchor's `groups` groups, from those `group_permutation` computed -- None unless it computed
    every pair."""
    wanted = [(j if perm is None else int(perm[j]), j) for j in range(groups)]
    if not exact or not all(pair in exact for pair in wanted):
        return None
    return CircuitProducts.stack([exact[pair][circuit] for pair in wanted])


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
        x_norm, y_norm = (_group_norms(rows, groups) for rows in (x, y))
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


STRIDED_CHUNK = 256  # columns of a transposed block squared at once: a temporary of a few hundred KiB


def _last_norms(block: torch.Tensor) -> torch.Tensor:
    """Norms along the last dimension, summed in float32 or wider; a transposed block (o's
    columns) squared first, STRIDED_CHUNK columns at a time: torch's norm along a strided
    dimension is ten times slower, and squaring it whole is a fresh temporary as large as the block."""
    if block.dtype not in (torch.float32, torch.float64):
        block = block.float()
    if block.stride(-1) == 1:
        return torch.linalg.vector_norm(block, dim=-1)
    total = block.new_zeros(block.shape[:-1])
    for start in range(0, block.shape[-1], STRIDED_CHUNK):
        part = block[..., start : start + STRIDED_CHUNK]
        total.add_(torch.mul(part, part).sum(-1))
    return total.sqrt_()


def _group_norms_of(row_norm: torch.Tensor, width: int, groups: int | None = None) -> torch.Tensor:
    """Each group's Frobenius norm (float64) from its rows' norms summed in float32 over `width`
    columns (`[G, H, dh]`, or flat, group-major, with `groups`), rounded up past their error
    (width 0: the norms are bounds already)."""
    up = norm_round_up(width) if width else 1.0
    norms = row_norm.double().reshape(groups if groups is not None else row_norm.shape[0], -1) * up
    return norms.square().sum(1).sqrt().mul_(1 + 2.0**-40)


def _group_norms(rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Each group's Frobenius norm (float64) of bfloat16 `rows` (`[G*dh, n]`), bounding from above
    both theirs and that of the rows they were rounded from: `_group_norms_of`, over 1 - u."""
    return _group_norms_of(row_norms(rows), rows.shape[1], groups).div_(1 - BF16_UNIT).mul_(1 + 2.0**-40)


def _best_rotation_scores(m: torch.Tensor, groups: int, dh: int, rotate: bool, rotary_dim: int) -> torch.Tensor:
    """max over the allowed R of <R, M_ij> for every block pair of `m` (`[G*dh, G*dh]` float64)."""
    blocks = m.reshape(groups, dh, groups, dh).permute(0, 2, 1, 3).reshape(groups * groups, dh, dh)
    return _block_scores(blocks, rotate, rotary_dim).reshape(groups, groups)


def _block_scores(blocks: torch.Tensor, rotate: bool, rotary_dim: int) -> torch.Tensor:
    """max over the allowed R of <R, M> for every block M of `blocks` (`[k, dh, dh]` float64)."""
    if not rotate:
        return torch.diagonal(blocks, dim1=-2, dim2=-1).sum(-1)
    if rotary_dim == 0:
        return torch.linalg.svdvals(blocks).sum(-1)  # the maximum of <R, M> over O(dh) is the nuclear norm
    return (procrustes(blocks, rotary_dim) * blocks).sum((1, 2))


def permute_groups(circuit: Circuit, perm: torch.Tensor) -> Circuit:
    index = perm.to(circuit.left[0].device)
    return Circuit(
        tuple(b.index_select(0, index) for b in circuit.left), tuple(b.index_select(0, index) for b in circuit.right)
    )
