"""General invertible per-head maps of an attention circuit (GLMC's fourth symmetry class;
docs/design/symmetries.md section 2b).

In the canonical layout (weights.py) a circuit side is a stack of `[dh, n]` blocks. For any
invertible B `[dh, dh]`, `left <- B left` and `right <- B^-T right` keep every product
`left^T right` (Q^T K: the attention scores; V^T O^T: what a head writes), so the function. With
RoPE the QK map must commute with every position's rotary map: per rotate_half plane
(i, i + rotary_dim/2) a scaled 2-D rotation `r [[c, -s], [s, c]]` (one complex number z; B^-T is
then the same rotation divided by r), and a full invertible block past rotary_dim.

Weight matching, min over B of ||B L1 - L2||^2 + ||B^-T R1 - R2||^2, has no closed form. The
solver evaluates it exactly on `[G, dh, dh]` Gram matrices and
- starts, per group, from the best of: the identity, the given rotation + scale solution, the
  least-squares fit of the left side alone (B = L2 L1^T (L1 L1^T)^+) and of the right side alone
  (B^-T likewise). Where the source IS a transformed anchor and L1 has full row rank, the
  left-side fit is the exact B: recovery is exact, not approximate;
- refines all groups with L-BFGS (strong Wolfe) in the group's own parameters;
- keeps, per group, the refined map only if it lowers the objective and its condition number
  stays under `max_condition` (a badly conditioned map would amplify float32 rounding of the
  written weights); otherwise the best admissible start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rotfuse.symmetry.weights import Blocks, Circuit, batched

MAX_CONDITION = 1e3  # ||B|| ||B^-1||: float32 rounding of a written weight grows by at most this


@dataclass
class Grams:
    """Everything the objective needs, per group, float64: g = X1 X1^T, c = X2 X1^T, n = |X2|^2."""

    g_left: torch.Tensor
    c_left: torch.Tensor
    n_left: torch.Tensor
    g_right: torch.Tensor
    c_right: torch.Tensor
    n_right: torch.Tensor

    def summed(self) -> Grams:
        """One transform for all groups: the groups' terms add up."""
        return Grams(*(t.sum(0, keepdim=True) for t in vars(self).values()))


def _products(x: Blocks, y: Blocks) -> tuple[torch.Tensor, torch.Tensor]:
    """sum over heads and blocks of y_h x_h^T `[G, dh, dh]`, and |y|^2 `[G]`, in float64."""
    groups, dh = x[0].shape[0], x[0].shape[2]
    cross = torch.zeros(groups, dh, dh, dtype=torch.float64, device=x[0].device)
    norm = torch.zeros(groups, dtype=torch.float64, device=x[0].device)
    for xb, yb in zip(x, y, strict=True):
        heads = xb.shape[1]
        xs, ys = batched(xb).double(), batched(yb).double()
        cross += torch.bmm(ys, xs.transpose(1, 2)).view(groups, heads, dh, dh).sum(1)
        norm += ys.square().sum((1, 2)).view(groups, heads).sum(1)
    return cross, norm


def grams(src: Circuit, anchor: Circuit) -> Grams:
    g_left, _ = _products(src.left, src.left)
    c_left, n_left = _products(src.left, anchor.left)
    g_right, _ = _products(src.right, src.right)
    c_right, n_right = _products(src.right, anchor.right)
    return Grams(g_left, c_left, n_left, g_right, c_right, n_right)


def inverse_transpose(b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.inv(b).transpose(-1, -2)


def objective(b: torch.Tensor, gr: Grams) -> torch.Tensor:
    """||B L1 - L2||^2 + ||B^-T R1 - R2||^2 per group `[G]` (differentiable in B)."""
    c = inverse_transpose(b)

    def side(m: torch.Tensor, g: torch.Tensor, cross: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        return ((m @ g) * m).sum((1, 2)) - 2 * (m * cross).sum((1, 2)) + n

    return side(b, gr.g_left, gr.c_left, gr.n_left) + side(c, gr.g_right, gr.c_right, gr.n_right)


def condition(b: torch.Tensor) -> torch.Tensor:
    """2-norm condition number per group (inf for a singular or non-finite map)."""
    if not bool(torch.isfinite(b).all()):
        out = torch.full(b.shape[:1], float("inf"), dtype=b.dtype, device=b.device)
        finite = torch.isfinite(b).flatten(1).all(1)
        out[finite] = condition(b[finite]) if bool(finite.any()) else out[finite]
        return out
    s = torch.linalg.svdvals(b)
    return s[:, 0] / s[:, -1].clamp_min(1e-300)


# ---------------------------------------------------------------------- the group, parametrised


def rotary_map(x: torch.Tensor, y: torch.Tensor, tail: torch.Tensor | None, head_dim: int) -> torch.Tensor:
    """`[G, dh, dh]`: `[[x, -y], [y, x]]` on each rotate_half plane (i, i + half) -- the scaled
    rotation z = x + iy, `procrustes`'s sign convention -- and `tail` past the rotary dims."""
    groups, half = x.shape
    b = x.new_zeros(groups, head_dim, head_dim)
    i = torch.arange(half, device=x.device)
    b[:, i, i], b[:, i, i + half], b[:, i + half, i], b[:, i + half, i + half] = x, -y, y, x
    if tail is not None:
        b[:, 2 * half :, 2 * half :] = tail
    return b


def project(m: torch.Tensor, rotary_dim: int) -> tuple[torch.Tensor, ...]:
    """The group's parameters of the member nearest (Frobenius) to `m`: (m,) or (x, y, tail)."""
    if rotary_dim == 0:
        return (m,)
    half = rotary_dim // 2
    i = torch.arange(half, device=m.device)
    j = i + half
    x = (m[:, i, i] + m[:, j, j]) / 2
    y = (m[:, j, i] - m[:, i, j]) / 2
    tail = m[:, rotary_dim:, rotary_dim:] if rotary_dim < m.shape[-1] else None
    return (x, y) + ((tail,) if tail is not None else ())


def member(params: tuple[torch.Tensor, ...], rotary_dim: int, head_dim: int) -> torch.Tensor:
    if rotary_dim == 0:
        return params[0]
    return rotary_map(params[0], params[1], params[2] if len(params) > 2 else None, head_dim)


def _fit(g: torch.Tensor, cross: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """argmin over the group of ||M X1 - X2||^2 from its Grams (g = X1 X1^T, cross = X2 X1^T):
    `cross g^+` on full blocks; per rotary plane the complex least squares
    z = <u1, u2> / |u1|^2 (u = row i + i row i+half)."""
    dh = g.shape[-1]
    if rotary_dim == 0:
        return cross @ torch.linalg.pinv(g, hermitian=True)
    half = rotary_dim // 2
    i = torch.arange(half, device=g.device)
    j = i + half
    power = (g[:, i, i] + g[:, j, j]).clamp_min(1e-300)
    x = (cross[:, i, i] + cross[:, j, j]) / power
    y = (cross[:, j, i] - cross[:, i, j]) / power
    tail = None
    if rotary_dim < dh:
        r = slice(rotary_dim, dh)
        tail = cross[:, r, r] @ torch.linalg.pinv(g[:, r, r], hermitian=True)
    return rotary_map(x, y, tail, dh)


# ---------------------------------------------------------------------- solving


@dataclass
class LinearSolution:
    linear: torch.Tensor  # [G, dh, dh] float64: left <- B left, right <- B^-T right
    objective: list[float]  # summed squared distance: [0] before, [1] after
    condition: float  # the largest condition number of the chosen maps
    iterations: int


def solve_linear(
    src: Circuit,
    anchor: Circuit,
    rotary_dim: int = 0,
    start: torch.Tensor | None = None,
    tie_groups: bool = False,
    max_condition: float = MAX_CONDITION,
    max_iter: int = 200,
) -> LinearSolution:
    """The invertible per-group map of `src` closest to `anchor` (see the module docstring);
    `start`: a map to try first (the rotation + scale solution, `[G, dh, dh]`)."""
    gr = grams(src, anchor)
    groups = gr.g_left.shape[0]
    if tie_groups:
        gr = gr.summed()
    dh = gr.g_left.shape[-1]
    eye = torch.eye(dh, dtype=torch.float64, device=gr.g_left.device).expand(gr.g_left.shape[0], dh, dh)
    candidates = [eye.contiguous(), _fit(gr.g_left, gr.c_left, rotary_dim)]
    right = _fit(gr.g_right, gr.c_right, rotary_dim)
    if bool(torch.isfinite(right).all()) and bool((torch.linalg.matrix_rank(right) == dh).all()):
        candidates.append(inverse_transpose(right))
    if start is not None:
        candidates.append(start.to(torch.float64)[:1] if tie_groups else start.to(torch.float64))
    before = objective(eye, gr)
    best, best_value = _choose(candidates, gr, max_condition)

    params = tuple(p.contiguous().clone().requires_grad_(True) for p in project(best, rotary_dim))
    optimiser = torch.optim.LBFGS(
        params, lr=1, max_iter=max_iter, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe"
    )
    scale = float(before.sum().clamp_min(1e-300))  # the objective in units of its start: sane gradient sizes

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        try:
            value = objective(member(params, rotary_dim, dh), gr).sum() / scale
        except RuntimeError:  # torch.linalg.inv of a singular map
            value = torch.tensor(float("inf"), dtype=torch.float64)
        if not bool(torch.isfinite(value)):  # a step through a singular map: tell the line search
            return torch.tensor(float("inf"), dtype=torch.float64)
        value.backward()
        return value

    try:
        optimiser.step(closure)
    except RuntimeError:  # a singular map on the way: keep the starts
        pass
    iterations = int(optimiser.state[optimiser._params[0]].get("n_iter", 0))
    with torch.no_grad():
        refined = member(tuple(p.detach() for p in params), rotary_dim, dh)
        chosen, chosen_value = _choose([best, refined], gr, max_condition)
    if tie_groups:
        chosen = chosen.expand(groups, dh, dh).clone()
    return LinearSolution(
        chosen,
        [float(before.sum()), float(chosen_value.sum())],
        float(condition(chosen).max()),
        iterations,
    )


def _choose(candidates: list[torch.Tensor], gr: Grams, max_condition: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the admissible candidate (finite, condition <= max_condition) with the smallest
    objective; the first candidate is always admissible (the identity, or the current best)."""
    best = candidates[0].clone()
    best_value = objective(best, gr)
    for candidate in candidates[1:]:
        ok = torch.isfinite(candidate).flatten(1).all(1)
        if not bool(ok.any()):
            continue
        ok &= condition(candidate) <= max_condition
        safe = torch.where(ok[:, None, None], candidate, best)
        value = objective(safe, gr)
        better = ok & torch.isfinite(value) & (value < best_value)
        best = torch.where(better[:, None, None], safe, best)
        best_value = torch.where(better, value, best_value)
    return best, best_value


def random_linear(
    groups: int, dh: int, rotary_dim: int, generator: torch.Generator, spread: float = 2.0
) -> torch.Tensor:
    """A random member of the group `solve_linear` searches, float64, with singular values in
    [1/spread, spread] (condition <= spread^2): U diag(s) V^T on full blocks, r e^{i angle} per plane."""

    def full(count: int, n: int) -> torch.Tensor:
        u = torch.linalg.qr(torch.randn(count, n, n, generator=generator, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(count, n, n, generator=generator, dtype=torch.float64))[0]
        s = spread ** (torch.rand(count, n, generator=generator, dtype=torch.float64) * 2 - 1)
        return u @ torch.diag_embed(s) @ v.transpose(1, 2)

    if rotary_dim == 0:
        return full(groups, dh)
    half = rotary_dim // 2
    r = spread ** (torch.rand(groups, half, generator=generator, dtype=torch.float64) * 2 - 1)
    angle = (torch.rand(groups, half, generator=generator, dtype=torch.float64) * 2 - 1) * torch.pi
    tail = full(groups, dh - rotary_dim) if rotary_dim < dh else None
    return rotary_map(r * torch.cos(angle), r * torch.sin(angle), tail, dh)
