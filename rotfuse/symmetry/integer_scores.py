"""Row scores from an int8 GEMM, with a rigorous bound on their distance to the exact ones.

On CPUs that multiply bfloat16 no faster than float32 (AVX2 without AVX512-BF16 or AMX), the
prefix passes of the FFN permutation solve (`rotfuse.symmetry.permutation`) need only an upper
bound on every row pair's score, and fbgemm's int8 GEMM gives one at twice float32's speed. Each
anchor row y is quantized symmetrically, y = y' + r_y with y' = s_y q_y (q_y in [-127, 127]);
each block of source rows asymmetrically, x = x' + r_x with x' = s_x (q_x - z) (q_x in
[0, 127]). Then exactly

    x . y = x' . y' + x' . r_y + r_x . y,   so   |x . y - x' . y'| <= |x'| |r_y| + |r_x| |y|.

x' . y' = s_x s_y sum (q_x - z) q_y: fbgemm sums the integer products exactly in int32 (its AVX2
kernel adds pairs of u8 * s8 products in int16 with saturation; pairs of 127 * 127 stay below
2^15, which is why q_x keeps to 7 bits) and returns the sums in float32, scaled by s_x s_y (the
op that takes x' in float32 with its scale and zero point, and quantizes it back to q_x exactly:
x' lies on the grid). Three float32 roundings -- the int32 sum to float (exact below 2^24), the
scales' product, the scaled result -- and x' held in float32 (within u32 of the grid's values, which
the norms |x'| and |r_x| are taken of) leave each score within SCORE_ROUNDING |x'| |y'| of x' . y'.

The ops come from torch's quantized CPU backend, which torch marks deprecated: where they are
missing (or fail the self-check), `int8_gemm_available` is False and the callers use float32.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from dataclasses import dataclass
from functools import cache
from typing import Any

import torch

SOURCE_LEVELS = 127  # q_x in [0, 127]: two u8 * s8 products of 127 * 127 add up below 2^15
ANCHOR_LEVELS = 127  # q_y in [-127, 127]: symmetric, zero point 0
BLOCK_ROWS = 512  # anchor rows quantized at a time
SCORE_ROUNDING = 2.0**-20  # of |x'| |y'|: three float32 roundings (3 u32) and x' off the grid (u32), with room

_engine_lock = threading.Lock()


@dataclass
class QuantizedRows:
    """Rows quantized for fbgemm -- the source side as the quantized rows x' in float32 (on the
    grid of `scale` and `zero_point`), the anchor side as fbgemm's packed int8 weight -- with the
    norms of the quantized rows, |x'|, and of what quantizing left, |r| (float32, as computed)."""

    tensor: Any
    quantized_norm: torch.Tensor
    residual_norm: torch.Tensor
    scale: float = 1.0
    zero_point: int = 0


@cache
def int8_gemm_available() -> bool:
    """Whether torch has fbgemm's quantized linear ops (x86 builds) and they sum exactly on rows
    at the largest values the bound allows (a self-check, once per process). torch's one warning
    that quantized tensors are deprecated is raised, and silenced, here."""
    with _engine_lock, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _self_check()


def _self_check() -> bool:
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        source = torch.randint(0, SOURCE_LEVELS + 1, (16, 96), generator=generator, dtype=torch.int64)
        weight = torch.randint(-ANCHOR_LEVELS, ANCHOR_LEVELS + 1, (24, 96), generator=generator, dtype=torch.int8)
        source[0], weight[0], weight[1] = SOURCE_LEVELS, ANCHOR_LEVELS, -ANCHOR_LEVELS
        zero, scale = 5, float(torch.tensor(0.37))  # float32-exact, as fbgemm holds it
        rows = QuantizedRows((source - zero).float().mul_(scale), torch.zeros(16), torch.zeros(16), scale, zero)
        packed = _prepack(weight, torch.ones(len(weight)), locked=True)
        exact = (source.double() - zero) @ weight.double().T * scale
        allowed = SCORE_ROUNDING * rows.tensor.double().norm(dim=1)[:, None] * weight.double().norm(dim=1)[None]
        return bool(((_scores(rows, packed).double() - exact).abs() <= allowed).all())
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def quantize_anchor(rows: torch.Tensor) -> QuantizedRows:
    """Anchor rows (any float dtype) as symmetric int8 rows, one scale per row, packed. In blocks
    of BLOCK_ROWS: the float32 temporaries are a few MiB, not copies of the whole."""
    n = len(rows)
    q = torch.empty(rows.shape, dtype=torch.int8, device=rows.device)
    scale, quantized_norm, residual_norm = (torch.empty(n, device=rows.device) for _ in range(3))
    for start in range(0, n, BLOCK_ROWS):
        block = slice(start, start + BLOCK_ROWS)
        wide = rows[block].float()
        step = wide.abs().amax(dim=1).div_(ANCHOR_LEVELS)
        step = torch.where(step > 0, step, torch.ones_like(step))  # zero rows: any scale, q = 0
        levels = wide.div(step[:, None]).round_().clamp_(-ANCHOR_LEVELS, ANCHOR_LEVELS)
        q[block], scale[block] = levels, step
        quantized = levels.mul_(step[:, None])
        torch.linalg.vector_norm(quantized, dim=1, out=quantized_norm[block])
        torch.linalg.vector_norm(quantized.sub_(wide), dim=1, out=residual_norm[block])
    return QuantizedRows(_prepack(q, scale), quantized_norm, residual_norm)


def quantize_source(rows: torch.Tensor) -> QuantizedRows:
    """Source rows (any float dtype) as 7-bit levels in [0, SOURCE_LEVELS] (one scale, one zero
    point), held as the float32 rows x' = scale (q - zero) that fbgemm quantizes back exactly."""
    rows = rows.float()
    low, high = min(float(rows.min()), 0.0), max(float(rows.max()), 0.0)
    scale = float(torch.tensor((high - low) / SOURCE_LEVELS, dtype=torch.float32))  # as fbgemm holds it
    scale = scale if scale > 0 else 1.0
    zero = min(max(round(-low / scale), 0), SOURCE_LEVELS)
    quantized = rows.div(scale).round_().add_(zero).clamp_(0, SOURCE_LEVELS).sub_(zero).mul_(scale)
    residual_norm = torch.linalg.vector_norm(quantized - rows, dim=1)  # rows may be the caller's
    return QuantizedRows(quantized, torch.linalg.vector_norm(quantized, dim=1), residual_norm, scale, zero)


def quantized_scores(src: QuantizedRows, anchor: QuantizedRows) -> torch.Tensor:
    """x' . y' for every pair (rows: `src`'s, columns: `anchor`'s) in float32, each within
    SCORE_ROUNDING |x'| |y'|."""
    return _scores(src, anchor.tensor)


def _prepack(q: torch.Tensor, scale: torch.Tensor, locked: bool = False) -> Any:
    """fbgemm's packed weight (per-row scales, zero points 0) whatever the default engine: the x86
    engine may hand it to oneDNN, whose int8 kernels on CPUs without VNNI halve the weights.
    `locked`: the caller holds the engine lock."""
    weight = torch._make_per_channel_quantized_tensor(q, scale.double(), torch.zeros(len(q), dtype=torch.long), 0)
    with contextlib.nullcontext() if locked else _engine_lock:
        before = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"
        try:
            return torch.ops.quantized.linear_prepack(weight, None)
        finally:
            torch.backends.quantized.engine = before


def _scores(src: QuantizedRows, packed: Any) -> torch.Tensor:
    """fbgemm's int8 GEMM of the source rows (quantized back from x') and the packed weight, its
    exact int32 sums scaled to float32."""
    op = torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32
    return op(src.tensor, src.scale, src.zero_point, packed)
