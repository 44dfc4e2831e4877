"""Orthogonal Procrustes per head: the rotation symmetry of attention (docs/design/symmetries.md section 2).

`procrustes(M)` returns the orthogonal R maximising <R, M> = trace(R^T M), batched over heads.
With rotary embeddings the QK rotation must commute with every position's rotary map: in Hugging
Face's `rotate_half` layout, coordinates i and i + rotary_dim/2 form a plane with its own
frequency, and the maps that commute are one 2-D rotation per plane (no reflection, no mixing);
coordinates past rotary_dim (partial rotary) keep a full orthogonal block.
"""

from __future__ import annotations

import torch


def procrustes(m: torch.Tensor, rotary_dim: int = 0) -> torch.Tensor:
    """argmax over orthogonal R (in the rotary-compatible group) of <R, M>, for M `[G, dh, dh]`."""
    dh = m.shape[-1]
    if rotary_dim == 0:
        return _full(m)
    half = rotary_dim // 2
    r = torch.zeros_like(m)
    i = torch.arange(half, device=m.device)
    j = i + half
    m00, m01, m10, m11 = m[:, i, i], m[:, i, j], m[:, j, i], m[:, j, j]
    angle = torch.atan2(m10 - m01, m00 + m11)
    c, s = torch.cos(angle), torch.sin(angle)
    r[:, i, i], r[:, i, j], r[:, j, i], r[:, j, j] = c, -s, s, c
    if rotary_dim < dh:
        r[:, rotary_dim:, rotary_dim:] = _full(m[:, rotary_dim:, rotary_dim:])
    return r


def _full(m: torch.Tensor) -> torch.Tensor:
    u, _, vt = torch.linalg.svd(m)
    return u @ vt


def random_rotation(groups: int, dh: int, rotary_dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random member of the same group `procrustes` searches (Haar on full blocks), float64."""
    m = torch.randn(groups, dh, dh, generator=generator, dtype=torch.float64)
    if rotary_dim == 0:
        return _haar(m)
    half = rotary_dim // 2
    r = torch.zeros(groups, dh, dh, dtype=torch.float64)
    i = torch.arange(half)
    angle = (torch.rand(groups, half, generator=generator, dtype=torch.float64) * 2 - 1) * torch.pi
    c, s = torch.cos(angle), torch.sin(angle)
    r[:, i, i], r[:, i, i + half], r[:, i + half, i], r[:, i + half, i + half] = c, -s, s, c
    if rotary_dim < dh:
        r[:, rotary_dim:, rotary_dim:] = _haar(m[:, rotary_dim:, rotary_dim:])
    return r


def _haar(m: torch.Tensor) -> torch.Tensor:
    q, rr = torch.linalg.qr(m)
    return q * torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1)).unsqueeze(-2)
