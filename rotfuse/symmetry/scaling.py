"""Per-head rescaling (docs/design/symmetries.md section 3): left side times a, right side divided by a.

With c4 = |L1|^2, c3 = <R^T L1, L2>, c1 = <R^T R1, R2>, c0 = |R1|^2 the objective is
f(a) = c4 a^2 - 2 c3 a + c0 / a^2 - 2 c1 / a (+ constants), and f'(a) = 0 times a^3/2 is the
quartic c4 a^4 - c3 a^3 + c1 a - c0 = 0 (paper eq. 12). Every root's real part and a = 1 are
candidates; the one with the smallest f wins. Roots are never filtered with an exact "is real"
test: a real root computed in floating point usually carries a tiny imaginary part.
"""

from __future__ import annotations

import numpy as np
import torch


def scale_objective(a, c4, c3, c1, c0):
    """f(a) up to a constant; works on Python floats and on tensors."""
    return c4 * a * a - 2 * c3 * a + c0 / (a * a) - 2 * c1 / a


def best_scale(c4: torch.Tensor, c3: torch.Tensor, c1: torch.Tensor, c0: torch.Tensor) -> torch.Tensor:
    """Optimal a per group (all arguments `[G]`, float64); 1 where nothing beats it."""
    table = torch.stack([c4, c3, c1, c0], dim=1).cpu().tolist()
    best = np.ones(len(table))
    for g, (k4, k3, k1, k0) in enumerate(table):
        if not np.all(np.isfinite([k4, k3, k1, k0])) or not any((k4, k3, k1, k0)):
            continue
        roots = np.roots([k4, -k3, 0.0, k1, -k0])
        candidates = [1.0] + [float(r.real) for r in roots if np.isfinite(r) and abs(r.real) > 1e-12]
        values = [scale_objective(a, k4, k3, k1, k0) for a in candidates]
        best[g] = candidates[int(np.argmin(values))]  # argmin keeps the first (a = 1) on ties
    return torch.from_numpy(best).to(device=c4.device)


def random_scale(groups: int, generator: torch.Generator) -> torch.Tensor:
    """Scales in +-[0.5, 2] (log-uniform magnitude, random sign), float64."""
    magnitude = torch.exp((torch.rand(groups, generator=generator, dtype=torch.float64) * 2 - 1) * np.log(2.0))
    sign = torch.where(torch.rand(groups, generator=generator) < 0.5, -1.0, 1.0).to(torch.float64)
    return magnitude * sign
