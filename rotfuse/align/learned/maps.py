"""The learnable parameters of every enabled symmetry, and the exact maps they stand for.

Every map starts at the identity: learning refines the matched copy, whose maps are already applied.
- orthogonal maps: R = exp(S - S^T); the pre-LN stream keeps the all-ones direction as
  H diag(1, R) H (`ones_frame`); RoPE QK maps are one angle per frequency pair (plus a full block on
  non-rotary coordinates);
- per-head scales: a = exp(log a);
- general invertible per-head maps (qk.linear, vo.linear): B = exp(X), X any matrix, so B^-1 =
  exp(-X) exactly and B is always invertible; RoPE QK maps are r e^{i angle} per frequency pair
  (log r and the angle learned) plus exp(X) on non-rotary coordinates. After every step a map whose
  condition number passes MAX_CONDITION is pulled back toward the identity until it does not: the
  float32 rounding of the written weights grows with it (unbounded, a GPT-2 pair's maps reached
  190 and `rotfuse verify` rejected the copy);
- permutations (FFN neurons, heads, the post-LN stream): straight-through estimator -- the forward
  uses the hard permutation maximising <P, M> for a relaxed real matrix M, the gradient goes to M.

A map Q acts on an axis as x_new = x @ Q (new index j = sum_i old i Q[i, j]); for a permutation
Q[perm[j], j] = 1, so new slot j holds old index perm[j].
"""

from __future__ import annotations

import math

import torch

from rotfuse.symmetry.linear import condition, rotary_map
from rotfuse.symmetry.permutation import best_assignment
from rotfuse.symmetry.residual import ones_frame

MAX_CONDITION = 30.0  # ||B|| ||B^-1|| of a learned per-head linear map
AIM_INSIDE = 2.0**-6  # relative: where the power-law steps aim below the limit
GUESSES = 3  # `LayerMaps.limit_condition`'s power-law steps toward the limit ...
SHRINK_STEPS = 12  # ... and bisection steps, where those do not reach it


def orthogonal(param: torch.Tensor) -> torch.Tensor:
    """exp of the skew part: an exact rotation (batched over leading axes)."""
    return torch.matrix_exp(param - param.transpose(-1, -2))


def rotary_rotation(angles: torch.Tensor, tail: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """`[G, dh, dh]`: a 2-D rotation per rotate_half plane (i, i + half), `procrustes`'s convention
    (R[i, i] = c, R[i, j] = -s, R[j, i] = s, R[j, j] = c), and a full block past the rotary dims."""
    groups, half = angles.shape
    r = angles.new_zeros(groups, head_dim, head_dim)
    i = torch.arange(half, device=angles.device)
    c, s = torch.cos(angles), torch.sin(angles)
    r[:, i, i] = c
    r[:, i, i + half] = -s
    r[:, i + half, i] = s
    r[:, i + half, i + half] = c
    if tail is not None:
        r[:, 2 * half :, 2 * half :] = orthogonal(tail)
    return r


def hard_permutation(relaxed: torch.Tensor) -> torch.Tensor:
    """Q with Q[perm[j], j] = 1 maximising <Q, relaxed>, as a float matrix like `relaxed`."""
    perm = best_assignment(relaxed.detach().double().cpu()).to(relaxed.device)
    q = torch.zeros_like(relaxed)
    q[perm, torch.arange(len(perm), device=relaxed.device)] = 1.0
    return q


def straight_through(relaxed: torch.Tensor) -> torch.Tensor:
    """Forward: the hard permutation; backward: as if it were `relaxed` itself."""
    return hard_permutation(relaxed) + relaxed - relaxed.detach()


def along(tensor: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply one axis of `tensor` by Q (x_new = x @ Q on that axis)."""
    return (tensor.movedim(axis, -1) @ q.to(tensor.dtype)).movedim(-1, axis)


def limit_conditions(maps: torch.nn.ModuleDict, most: float | None = None) -> None:
    """`LayerMaps.limit_condition` on every layer (`most`: MAX_CONDITION)."""
    for layer in maps.values():
        if isinstance(layer, LayerMaps):
            layer.limit_condition(MAX_CONDITION if most is None else most)


def largest_condition(maps: torch.nn.ModuleDict) -> float | None:
    """The largest condition number of the learned linear maps (None when none is learned)."""
    found = [
        float(c.max())
        for layer in maps.values()
        if isinstance(layer, LayerMaps)
        for c in (layer.condition("qk"), layer.condition("vo"))
        if c is not None and c.numel()
    ]
    return max(found) if found else None


class StreamMaps(torch.nn.Module):
    """One residual map: 'orthogonal', 'keeps_ones' or 'permutation' (STE)."""

    def __init__(self, d: int, kind: str):
        super().__init__()
        self.kind, self.d = kind, d
        size = d - 1 if kind == "keeps_ones" else d
        init = torch.eye(d) if kind == "permutation" else torch.zeros(size, size)
        self.param = torch.nn.Parameter(init.double())
        self.register_buffer("frame", ones_frame(d), persistent=False)

    def matrix(self, exact: bool = False) -> torch.Tensor:
        if self.kind == "permutation":
            return hard_permutation(self.param) if exact else straight_through(self.param)
        r = orthogonal(self.param)
        if self.kind == "orthogonal":
            return r
        block = torch.block_diag(torch.ones(1, 1, dtype=r.dtype, device=r.device), r)
        return self.frame @ block @ self.frame


class LayerMaps(torch.nn.Module):
    """The per-layer maps of one layer, for the symmetries `enabled` (names as in symmetry/names.py)."""

    def __init__(self, enabled: frozenset[str], groups: int, head_dim: int, ffn_width: int, rotary_dim: int):
        super().__init__()
        self.enabled, self.head_dim, self.rotary_dim = enabled, head_dim, rotary_dim
        double = torch.float64
        self.qk_angles = torch.nn.Parameter(torch.zeros(groups, rotary_dim // 2, dtype=double)) if rotary_dim else None
        tail = head_dim - (rotary_dim // 2) * 2 if rotary_dim else head_dim
        self.qk_rot = torch.nn.Parameter(torch.zeros(groups, tail, tail, dtype=double)) if tail else None
        self.vo_rot = torch.nn.Parameter(torch.zeros(groups, head_dim, head_dim, dtype=double))
        self.qk_log_scale = torch.nn.Parameter(torch.zeros(groups, dtype=double))
        self.vo_log_scale = torch.nn.Parameter(torch.zeros(groups, dtype=double))
        self.qk_linear_log_r = torch.nn.Parameter(torch.zeros(groups, rotary_dim // 2, dtype=double))
        self.qk_linear_angles = torch.nn.Parameter(torch.zeros(groups, rotary_dim // 2, dtype=double))
        self.qk_linear = torch.nn.Parameter(torch.zeros(groups, tail, tail, dtype=double)) if tail else None
        self.vo_linear = torch.nn.Parameter(torch.zeros(groups, head_dim, head_dim, dtype=double))
        self.heads = torch.nn.Parameter(torch.eye(groups, dtype=double)) if groups > 1 else None
        self.ffn = torch.nn.Parameter(torch.eye(ffn_width, dtype=double))

    def on(self, name: str) -> bool:
        return name in self.enabled

    def rotation(self, circuit: str) -> torch.Tensor | None:
        if not self.on(f"{circuit}.rot"):
            return None
        if circuit == "vo":
            return orthogonal(self.vo_rot)
        if self.qk_angles is not None:
            return rotary_rotation(self.qk_angles, self.qk_rot, self.head_dim)
        assert self.qk_rot is not None
        return orthogonal(self.qk_rot)

    def scale(self, circuit: str) -> torch.Tensor | None:
        if not self.on(f"{circuit}.scale"):
            return None
        return torch.exp(self.qk_log_scale if circuit == "qk" else self.vo_log_scale)

    def linear(self, circuit: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, B^-T) for `left <- B left`, `right <- B^-T right`, or None when off."""
        if not self.on(f"{circuit}.linear"):
            return None
        x = self._full_exponent(circuit)
        if x is not None:
            return torch.matrix_exp(x), torch.matrix_exp(-x.transpose(-1, -2))
        r, c, s = torch.exp(self.qk_linear_log_r), torch.cos(self.qk_linear_angles), torch.sin(self.qk_linear_angles)
        x = self.qk_linear
        tails = (None, None) if x is None else (torch.matrix_exp(x), torch.matrix_exp(-x.transpose(-1, -2)))
        # B^-T of r e^{i angle} on a plane is e^{i angle} / r
        return (
            rotary_map(r * c, r * s, tails[0], self.head_dim),
            rotary_map(c / r, s / r, tails[1], self.head_dim),
        )

    def _full_exponent(self, circuit: str) -> torch.Tensor | None:
        """X of a circuit whose map is exp(X) on every coordinate (VO; QK without RoPE), else None."""
        if circuit == "vo" or not self.rotary_dim:
            x = self.vo_linear if circuit == "vo" else self.qk_linear
            assert x is not None
            return x
        return None

    def condition(self, circuit: str) -> torch.Tensor | None:
        """Per group, the condition number of the circuit's linear map B (None when off)."""
        if not self.on(f"{circuit}.linear"):
            return None
        x = self._full_exponent(circuit)
        if x is not None:
            return condition(torch.matrix_exp(x.detach()))  # B alone: B^-T has the same
        found = self.linear(circuit)
        assert found is not None
        return condition(found[0].detach())

    @torch.no_grad()
    def limit_condition(self, most: float) -> None:
        """Scale the parameters of every group's linear map whose condition number passes `most` by
        a factor in [0, 1] that brings it within (factor 0 is the identity): cond(exp(t X)) =
        cond(exp(X))^t for a normal X gives the factor, bisection below it where X is not normal.
        The angles of RoPE's scaled rotations stay: rotations do not change the condition number."""
        for circuit in ("qk", "vo"):
            found = self.condition(circuit)
            if found is not None and bool((found > most).any()):
                self._shrink(circuit, found, most)

    def _shrink(self, circuit: str, found: torch.Tensor, most: float) -> None:
        over = found > most
        params = [self.vo_linear] if circuit == "vo" else [self.qk_linear_log_r, self.qk_linear]
        params = [p for p in params if p is not None and p.numel()]
        start = [p.detach().clone() for p in params]

        def scaled_by(factor: torch.Tensor) -> torch.Tensor:
            """The groups' condition numbers with the over-limit ones scaled by `factor`."""
            for param, first in zip(params, start):
                param.copy_(first * torch.where(over, factor, 1.0).view(-1, *[1] * (first.dim() - 1)))
            now = self.condition(circuit)
            assert now is not None
            return now

        # cond(exp(t X)) = cond(exp(X))^t for a normal X: that factor (aimed a little inside the
        # limit, so that a map not quite normal lands within too), refined the same way from where
        # it lands; then bisection below the last one if need be
        factor, now, aim = torch.ones_like(found), found, math.log(most * (1 - AIM_INSIDE))
        for _ in range(GUESSES):
            factor = factor * (aim / now.clamp_min(1 + 1e-12).log()).clamp(0.0, 1.0)
            now = scaled_by(factor)
            if bool((now <= most).all()):
                return
        within = now <= most
        low, high = torch.where(within, factor, 0.0), factor.clone()
        for _ in range(SHRINK_STEPS):
            middle = torch.where(within, factor, (low + high) / 2)
            ok = scaled_by(middle) <= most
            low, high = torch.where(ok, middle, low), torch.where(ok, high, middle)
        scaled_by(low)  # low only ever moves to a factor that was within

    def head_permutation(self, exact: bool) -> torch.Tensor | None:
        if self.heads is None or not self.on("heads.perm"):
            return None
        return hard_permutation(self.heads) if exact else straight_through(self.heads)

    def ffn_permutation(self, exact: bool) -> torch.Tensor | None:
        if not self.on("ffn.perm"):
            return None
        return hard_permutation(self.ffn) if exact else straight_through(self.ffn)
