"""The learnable parameters of every enabled symmetry, and the exact maps they stand for.

Every map starts at the identity: learning refines the matched copy, whose maps are already applied.
- orthogonal maps: R = exp(S - S^T); the pre-LN stream keeps the all-ones direction as
  H diag(1, R) H (`ones_frame`); RoPE QK maps are one angle per frequency pair (plus a full block on
  non-rotary coordinates);
- per-head scales: a = exp(log a);
- general invertible per-head maps (qk.linear, vo.linear), in polar form B = Q exp(S): S symmetric,
  Q = exp(K - K^T) a rotation of its own only where the circuit's rotation is off (otherwise that
  rotation is Q), so B^-T = Q exp(-S) exactly and B is always invertible; RoPE QK maps are
  r e^{i angle} per frequency pair (log r and the angle learned) plus Q exp(S) on non-rotary
  coordinates. B's singular values are exp of S's eigenvalues and the r, so its condition number
  is exp(largest - smallest) of those logs. After every step the logs of a map past
  MAX_CONDITION are clamped into a band of that width about their middle (only the extreme ones
  move): the float32 rounding of the written weights grows with the condition number (unbounded, a
  GPT-2 pair's maps reached 190 and `rotfuse verify` rejected the copy);
- permutations (FFN neurons, heads, the post-LN stream): straight-through estimator -- the forward
  uses the hard permutation maximising <P, M> for a relaxed real matrix M, the gradient goes to M.

A map Q acts on an axis as x_new = x @ Q (new index j = sum_i old i Q[i, j]); for a permutation
Q[perm[j], j] = 1, so new slot j holds old index perm[j].
"""

from __future__ import annotations

import math

import torch

from rotfuse.symmetry.linear import rotary_map
from rotfuse.symmetry.permutation import best_assignment
from rotfuse.symmetry.residual import ones_frame

MAX_CONDITION = 30.0  # ||B|| ||B^-1|| of a learned per-head linear map
BAND_INSIDE = 1e-9  # relative: the clamped band's width stays this far inside log(MAX_CONDITION)


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
    """Forward: the hard permutation, exactly (relaxed - relaxed.detach() is 0; (hard + relaxed) -
    relaxed would round); backward: as if it were `relaxed` itself."""
    return hard_permutation(relaxed) + (relaxed - relaxed.detach())


def symmetric(param: torch.Tensor) -> torch.Tensor:
    """The symmetric part of square matrices (batched)."""
    return (param + param.transpose(-1, -2)) / 2


def polar_pair(param: torch.Tensor | None, turn: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, B^-T) of B = Q exp(S), S the symmetric part of `param`, Q = exp(turn - turn^T) (the
    identity without `turn`): B^-T = Q exp(-S), exact whatever S is."""
    if param is None:
        return None
    s = symmetric(param)
    b, inverse_t = torch.matrix_exp(s), torch.matrix_exp(-s)
    if turn is None:
        return b, inverse_t
    q = orthogonal(turn)
    return q @ b, q @ inverse_t


def along(tensor: torch.Tensor, q: torch.Tensor, axis: int) -> torch.Tensor:
    """Multiply one axis of `tensor` by Q (x_new = x @ Q on that axis)."""
    return (tensor.movedim(axis, -1) @ q.to(tensor.dtype)).movedim(-1, axis)


def limit_conditions(maps: torch.nn.ModuleDict, most: float | None = None) -> None:
    """`LayerMaps.limit_condition` on every layer (`most`: MAX_CONDITION)."""
    for layer in maps.values():
        if isinstance(layer, LayerMaps):
            layer.limit_condition(MAX_CONDITION if most is None else most)


def relaxed_permutations(maps: torch.nn.ModuleDict) -> list[torch.nn.Parameter]:
    """The relaxed matrices behind the per-layer straight-through permutations (FFN neurons, heads):
    `--learn-perm-rate` sets their own rate. A permutation stream map is not among them: it reorders
    every layer's input at once (on GPT-2 it did better at the main rate)."""
    found: list[torch.nn.Parameter] = []
    for module in maps.values():
        if isinstance(module, LayerMaps):
            pairs = ((module.heads, "heads.perm"), (module.ffn, "ffn.perm"))
            found += [p for p, name in pairs if p is not None and module.on(name)]
    return found


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
        # the linear maps' S (as the symmetric part of these), and their own rotation's exponent
        # where the circuit's rotation is off
        self.qk_linear = torch.nn.Parameter(torch.zeros(groups, tail, tail, dtype=double)) if tail else None
        self.vo_linear = torch.nn.Parameter(torch.zeros(groups, head_dim, head_dim, dtype=double))
        self.qk_linear_turn = self._turn("qk", groups, tail)
        self.vo_linear_turn = self._turn("vo", groups, head_dim)
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

    def _turn(self, circuit: str, groups: int, size: int) -> torch.nn.Parameter | None:
        if not size or not self.on(f"{circuit}.linear") or self.on(f"{circuit}.rot"):
            return None
        return torch.nn.Parameter(torch.zeros(groups, size, size, dtype=torch.float64))

    def _polar(self, circuit: str) -> tuple[torch.nn.Parameter | None, torch.nn.Parameter | None]:
        """The parameters of the circuit's Q exp(S) block (on every coordinate, or RoPE's tail)."""
        return (self.vo_linear, self.vo_linear_turn) if circuit == "vo" else (self.qk_linear, self.qk_linear_turn)

    def linear(self, circuit: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, B^-T) for `left <- B left`, `right <- B^-T right`, or None when off."""
        if not self.on(f"{circuit}.linear"):
            return None
        block = polar_pair(*self._polar(circuit))
        if circuit == "vo" or not self.rotary_dim:
            assert block is not None
            return block
        r, c, s = torch.exp(self.qk_linear_log_r), torch.cos(self.qk_linear_angles), torch.sin(self.qk_linear_angles)
        tails = (None, None) if block is None else block
        # B^-T of r e^{i angle} on a plane is e^{i angle} / r
        return (
            rotary_map(r * c, r * s, tails[0], self.head_dim),
            rotary_map(c / r, s / r, tails[1], self.head_dim),
        )

    def _log_singular_values(self, circuit: str) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """`[G, n]`: the logs of B's singular values (S's eigenvalues, then RoPE's log r), with S's
        eigenvalues and eigenvectors (None without a Q exp(S) block)."""
        param, _ = self._polar(circuit)
        found = tuple(torch.linalg.eigh(symmetric(param.detach()))) if param is not None else None
        logs = [found[0]] if found is not None else []
        if circuit == "qk" and self.rotary_dim:
            logs.append(self.qk_linear_log_r.detach())
        return torch.cat(logs, dim=1), found

    def condition(self, circuit: str) -> torch.Tensor | None:
        """Per group, the condition number of the circuit's linear map B (None when off)."""
        if not self.on(f"{circuit}.linear"):
            return None
        logs, _ = self._log_singular_values(circuit)
        return torch.exp(logs.max(1).values - logs.min(1).values)

    @torch.no_grad()
    def limit_condition(self, most: float) -> None:
        """Clamp the log singular values of every group's map whose condition number passes `most`
        into a band of width log(most) about their middle: S's eigenvalues and RoPE's log r past the
        band move to its edge, the rest and every rotation stay."""
        width = math.log(most) * (1 - BAND_INSIDE)
        for circuit in ("qk", "vo"):
            if not self.on(f"{circuit}.linear"):
                continue
            logs, found = self._log_singular_values(circuit)
            low, high = logs.min(1, keepdim=True).values, logs.max(1, keepdim=True).values
            over = (high - low > width).squeeze(1)
            if not bool(over.any()):
                continue
            middle = (low + high) / 2
            clamped = logs.clamp(middle - width / 2, middle + width / 2)
            param, _ = self._polar(circuit)
            if found is not None and param is not None:
                values, vectors = clamped[:, : found[0].shape[1]], found[1]
                param[over] = (vectors @ torch.diag_embed(values) @ vectors.transpose(-1, -2))[over]
            if circuit == "qk" and self.rotary_dim:
                self.qk_linear_log_r[over] = clamped[over][:, -self.qk_linear_log_r.shape[1] :]

    def head_permutation(self, exact: bool) -> torch.Tensor | None:
        if self.heads is None or not self.on("heads.perm"):
            return None
        return hard_permutation(self.heads) if exact else straight_through(self.heads)

    def ffn_permutation(self, exact: bool) -> torch.Tensor | None:
        if not self.on("ffn.perm"):
            return None
        return hard_permutation(self.ffn) if exact else straight_through(self.ffn)
