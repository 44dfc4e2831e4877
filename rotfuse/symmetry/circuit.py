"""Joint rotation + rescaling of one attention circuit (QK or VO), solved by alternation.

The best rotation depends on the scale and the best scale on the rotation. Starting from the
paper's order (rotate with a = 1, then rescale), each half-step is optimal given the other, so the
objective never increases and the first round is exactly the paper's single pass. Rounds stop when
the objective improves by less than `rtol` of its starting value.

Everything runs on a handful of `[G, dh, dh]` matrices computed once (M_L = L1 L2^T, M_R = R1 R2^T
and the norms): a rotation leaves norms unchanged, so no round touches the big tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.scaling import best_scale, scale_objective
from rotfuse.symmetry.weights import Blocks, Circuit, batched


@dataclass
class CircuitTransform:
    """`left <- B scale R^T left`, `right <- B^-T R^T right / scale`, per group. None means
    identity; B is a general invertible map (symmetry/linear.py), applied after the rotation."""

    rotation: torch.Tensor | None = None  # [G, dh, dh] float64
    scale: torch.Tensor | None = None  # [G] float64
    linear: torch.Tensor | None = None  # [G, dh, dh] float64
    # the maps commute with RoPE on the first rotary_dim coordinates (rotation.py, linear.py): one
    # 2-D map per plane (i, i + rotary_dim/2), a full block past them -- applied plane by plane
    rotary_dim: int = 0

    def maps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The `[G, dh, dh]` left and right maps of the whole transform, float64."""
        assert self.rotation is not None or self.linear is not None
        ref = self.rotation if self.rotation is not None else self.linear
        assert ref is not None
        eye = torch.eye(ref.shape[-1], dtype=torch.float64, device=ref.device).expand_as(ref)
        rt = self.rotation.transpose(1, 2) if self.rotation is not None else eye
        a = self.scale[:, None, None] if self.scale is not None else torch.ones_like(rt[:, :1, :1])
        left, right = rt * a, rt / a
        if self.linear is not None:
            left, right = self.linear @ left, torch.linalg.inv(self.linear).transpose(1, 2) @ right
        return left, right

    def apply(self, circuit: Circuit) -> Circuit:
        if self.rotation is None and self.scale is None and self.linear is None:
            return circuit
        if self.rotation is None and self.linear is None:  # a scale alone: [G, 1, 1] maps
            assert self.scale is not None
            as_left = self.scale[:, None, None]
            as_right = 1.0 / as_left
        else:  # the scale folded into the small [G, dh, dh] maps: one pass over each big tensor
            as_left, as_right = self.maps()
        rotary = self.rotary_dim
        return Circuit(
            tuple(_mapped(as_left, b, rotary) for b in circuit.left),
            tuple(_mapped(as_right, b, rotary) for b in circuit.right),
        )


def _mapped(maps: torch.Tensor, block: torch.Tensor, rotary_dim: int = 0) -> torch.Tensor:
    """`maps[g] @ block[g, h]` for every head h of group g (`maps` `[G, dh, dh]`, or `[G, 1, 1]`
    for a scale), written in `block`'s own layout: a transposed weight's result is that weight
    transposed again, with no copy on the way in or out. Maps that commute with RoPE on
    `rotary_dim` coordinates touch each of those rows with its plane's partner only: two
    multiply-adds per element there instead of a dh-long dot product (maps of any other form, e.g.
    a rotation the spec forbids, go through the GEMM)."""
    maps = maps.to(device=block.device, dtype=block.dtype)
    out = torch.empty_like(block)  # same strides as `block` (packing only makes dense layouts)
    if maps.shape[1] == 1:
        return torch.mul(block, maps[:, None], out=out)
    if rotary_dim and not bool(maps.masked_select(~_rotary_pattern(maps.shape[-1], rotary_dim, maps.device)).any()):
        _planes(maps, block, out, rotary_dim)
        if rotary_dim == block.shape[2]:
            return out
        out[:, :, rotary_dim:] = _dense(maps[:, rotary_dim:, rotary_dim:], block[:, :, rotary_dim:])
        return out
    return _dense(maps, block, out)


def _rotary_pattern(dh: int, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """`[dh, dh]` True where a map that commutes with RoPE on `rotary_dim` coordinates may be
    nonzero: each plane's four entries, and the block past rotary_dim."""
    pattern = torch.zeros(dh, dh, dtype=torch.bool, device=device)
    half = rotary_dim // 2
    planes = torch.arange(half, device=device)
    for rows in (planes, planes + half):
        pattern[rows, planes] = pattern[rows, planes + half] = True
    pattern[rotary_dim:, rotary_dim:] = True
    return pattern


def _planes(maps: torch.Tensor, block: torch.Tensor, out: torch.Tensor, rotary_dim: int) -> None:
    """`out`'s first rotary_dim rows of every head: per plane (i, j = i + rotary_dim/2),
    out_i = m_ii x_i + m_ij x_j and out_j = m_ji x_i + m_jj x_j."""
    half = rotary_dim // 2
    low, high = torch.arange(half, device=maps.device), torch.arange(half, rotary_dim, device=maps.device)

    def entries(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        return maps[:, rows, cols][:, None, :, None]  # [G, 1, half, 1]: broadcast over heads and columns

    x_low, x_high = block[:, :, :half], block[:, :, half:rotary_dim]
    torch.mul(x_low, entries(low, low), out=out[:, :, :half]).addcmul_(x_high, entries(low, high))
    torch.mul(x_low, entries(high, low), out=out[:, :, half:rotary_dim]).addcmul_(x_high, entries(high, high))


def _dense(maps: torch.Tensor, block: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`maps[g] @ block[g, h]` as one batched GEMM, into `out` where a `[G*H, dh, n]` view of it exists."""
    groups, heads, dh = block.shape[0], block.shape[1], block.shape[2]
    per_head = maps[:, None].expand(groups, heads, dh, dh).reshape(groups * heads, dh, dh)
    if out is None:
        out = torch.empty_like(block)
    try:
        torch.bmm(per_head, batched(block), out=out.view(groups * heads, dh, -1))
    except RuntimeError:  # a layout no [G*H, dh, n] view exists for: a contiguous result
        out = torch.matmul(maps[:, None], block)
    return out


@dataclass
class CircuitProducts:
    """What `solve_circuit` reads of a circuit pair: per group, M_L = sum_h L1_h L2_h^T and M_R
    (`[G, dh, dh]`) and the sides' squared norms (`[G]`), float64 (`circuit_products`)."""

    cross_left: torch.Tensor
    src_left: torch.Tensor
    anchor_left: torch.Tensor
    cross_right: torch.Tensor
    src_right: torch.Tensor
    anchor_right: torch.Tensor

    @property
    def cross(self) -> torch.Tensor:
        """M_L + M_R: the matrix whose best rotation scores the pair (`heads`)."""
        return self.cross_left + self.cross_right

    def group(self, index: int) -> CircuitProducts:
        """Group `index`'s products alone (views)."""
        return CircuitProducts(*(part[index : index + 1] for part in vars(self).values()))

    @staticmethod
    def stack(per_group: list[CircuitProducts]) -> CircuitProducts:
        """One-group products of several group pairs, as those of one circuit pair, in order."""
        return CircuitProducts(
            *(torch.cat(parts) for parts in zip(*(vars(g).values() for g in per_group), strict=True))
        )


def circuit_products(src: Circuit, anchor: Circuit) -> CircuitProducts:
    """`CircuitProducts` of `src` against `anchor` (`_products` on each side)."""
    return CircuitProducts(*_products(src.left, anchor.left), *_products(src.right, anchor.right))


@dataclass
class CircuitSolution:
    transform: CircuitTransform
    rounds: int
    objective: list[float]  # squared distance (up to float error) after each round; [0] = before


def solve_circuit(
    src: Circuit,
    anchor: Circuit,
    rotate: bool,
    scale: bool,
    rotary_dim: int = 0,
    tie_groups: bool = False,
    max_rounds: int = 20,
    rtol: float = 1e-10,
    products: CircuitProducts | None = None,
) -> CircuitSolution:
    """The transform of `src` closest to `anchor` within the chosen group. `products`: the pair's
    `circuit_products`, where the caller has them (the head permutation computes them)."""
    if not (rotate or scale):
        return CircuitSolution(CircuitTransform(), 0, [])
    if products is None:
        products = circuit_products(src, anchor)
    m_left, c4, anchor_left = products.cross_left, products.src_left, products.anchor_left
    m_right, c0, anchor_right = products.cross_right, products.src_right, products.anchor_right
    constant = anchor_left + anchor_right
    if tie_groups:  # one transform shared by all groups (positions shared across heads)
        m_left, m_right = m_left.sum(0, keepdim=True), m_right.sum(0, keepdim=True)
        c4, c0, constant = c4.sum(0, keepdim=True), c0.sum(0, keepdim=True), constant.sum(0, keepdim=True)

    groups, dh = m_left.shape[0], m_left.shape[1]
    eye = torch.eye(dh, dtype=torch.float64, device=m_left.device).expand(groups, dh, dh)
    rotation, a = eye.clone(), torch.ones(groups, dtype=torch.float64, device=m_left.device)

    def objective() -> float:
        c3 = (rotation * m_left).sum((1, 2))
        c1 = (rotation * m_right).sum((1, 2))
        return float((scale_objective(a, c4, c3, c1, c0) + constant).sum())

    history = [objective()]
    rounds = 0
    while rounds < max_rounds:
        rounds += 1
        if rotate:
            inv = 1.0 / a
            rotation = procrustes(m_left * a[:, None, None] + m_right * inv[:, None, None], rotary_dim)
        if scale:
            a = best_scale(c4, (rotation * m_left).sum((1, 2)), (rotation * m_right).sum((1, 2)), c0)
        history.append(objective())
        if not (rotate and scale):
            break  # one closed-form step is already optimal
        if history[-2] - history[-1] <= rtol * max(history[0], 1e-300):
            break

    if tie_groups:
        full = src.left[0].shape[0]
        rotation, a = rotation.expand(full, dh, dh).clone(), a.expand(full).clone()
    transform = CircuitTransform(rotation if rotate else None, a if scale else None, rotary_dim=rotary_dim)
    return CircuitSolution(transform, rounds, history)


def _products(x: Blocks, y: Blocks, columns: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """sum_h x_h y_h^T, |x|^2 and |y|^2 per group, over the blocks of one side (each `[G, H, dh,
    n]`), a block of columns at a time: each in the inputs' precision (a float32 GEMM is twice as
    fast as a float64 one and needs no float64 copy), the blocks summed in float64. A 256-term
    float32 sum is good to ~1e-6 of its terms: the optimum it finds moves far less than float32
    rounds the transformed weights. The objective's terms nearly cancel, so its values carry that
    error (float64 inputs: none). Strided blocks (O transposed) go to the GEMM as they are."""
    groups, dh = x[0].shape[0], x[0].shape[2]
    cross = torch.zeros(groups, dh, dh, dtype=torch.float64, device=x[0].device)
    x_norm = torch.zeros(groups, dtype=torch.float64, device=x[0].device)
    y_norm = torch.zeros_like(x_norm)
    for x_block, y_block in zip(x, y, strict=True):
        heads, n = x_block.shape[1], x_block.shape[3]
        xs, ys = batched(x_block), batched(y_block)
        for start in range(0, n, columns):
            xb, yb = xs[:, :, start : start + columns], ys[:, :, start : start + columns]
            cross += torch.bmm(xb, yb.transpose(1, 2)).view(groups, heads, dh, dh).sum(1).double()
            x_norm += xb.square().sum((1, 2)).view(groups, heads).sum(1).double()
            y_norm += yb.square().sum((1, 2)).view(groups, heads).sum(1).double()
    return cross, x_norm, y_norm
