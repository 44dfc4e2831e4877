"""A map of the residual stream (symmetries.md section 5): pure tensor math, no names or files.

The stream is a row vector x of width d, and a map Q [d, d] moves it to x_new = x @ Q. One rule
then covers every tensor of a checkpoint: multiply each axis indexed by the stream by Q,

    X_new[.., j, ..] = sum_i X[.., i, ..] Q[i, j].

Why that is exact (torch layouts; a Linear computes y = x @ W.T + b):
- reader W [out, d] (stream on axis 1): W_new = W Q, so x_new @ W_new.T = x Q Q^T W^T = x W^T.
  Conv1D [d, out] (axis 0): W_new = Q^T W, so x_new @ W_new = x W.
- writer W [d, in] (axis 0) and its bias b [d]: W_new = Q^T W, b_new = b Q, so the written
  vector h W^T + b becomes (h W^T + b) Q, i.e. it lands in the new basis. Conv1D [in, d]: axis 1.
  A patch convolution [d, C, p, p] writes along axis 0 the same way.
- embedding tables [vocab, d], position tables [N, d] or [1, N, d], cls tokens [1, 1, d] hold
  stream vectors along their last axis: rows e become e Q.
- LayerNorm gain and bias: LN(x P) = LN(x) P for a permutation P (mean and variance ignore the
  order), and (LN(x) * g + b) P = LN(x) P * (g P) + b P. An orthogonal Q does not commute with
  the mean subtraction, so LayerNorm models admit permutations only.
- RMSNorm: rms(x Q) = rms(x) for orthogonal Q, so x / rms(x) commutes with Q; the gain does not,
  but (x / rms * g) W^T = (x / rms) (W diag(g))^T, so folding g into every reader (fold_gain)
  and setting it to 1 makes any orthogonal Q exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Matrix products run in float32 at least (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(eq=False)  # tensors do not compare to one bool
class StreamMap:
    """A map of the d-dim residual stream: x_new = x @ Q. A permutation (perm[j] = old index
    placed at j, i.e. Q[perm[j], j] = 1) or an orthogonal matrix (float64)."""

    perm: torch.Tensor | None = None  # [d] int64
    matrix: torch.Tensor | None = None  # [d, d] float64, orthogonal

    def __post_init__(self) -> None:
        if (self.perm is None) == (self.matrix is None):
            raise ValueError("a StreamMap needs exactly one of perm and matrix")
        if self.perm is not None:
            self.perm = torch.as_tensor(self.perm, dtype=torch.int64).cpu()
            d = self.perm.numel()
            if self.perm.dim() != 1 or not torch.equal(torch.sort(self.perm).values, torch.arange(d)):
                raise ValueError("perm must hold every index 0..d-1 exactly once")
        else:
            self.matrix = torch.as_tensor(self.matrix).to(dtype=torch.float64, device="cpu")
            q = self.matrix
            if q.dim() != 2 or q.shape[0] != q.shape[1]:
                raise ValueError(f"matrix must be square, got shape {list(q.shape)}")
            # Q^T Q = I probed on a few random vectors: O(d^2), where the full product is O(d^3)
            probe = torch.randn(q.shape[0], 4, dtype=q.dtype, generator=torch.Generator().manual_seed(0))
            error = (q.T @ (q @ probe) - probe).abs().max().item() if q.numel() else 0.0
            if error > 1e-5 * max(1.0, probe.abs().max().item()):
                raise ValueError(f"matrix is not orthogonal (|Q^T Q v - v| up to {error:.3g})")

    @property
    def d(self) -> int:
        return int(self.perm.numel() if self.perm is not None else self.matrix.shape[0])  # type: ignore[union-attr]

    @property
    def is_permutation(self) -> bool:
        return self.perm is not None

    @classmethod
    def identity(cls, d: int) -> StreamMap:
        return cls(perm=torch.arange(d))

    def as_matrix(self) -> torch.Tensor:
        """Q as a dense float64 matrix (a permutation matrix for the perm form)."""
        if self.matrix is not None:
            return self.matrix
        q = torch.zeros(self.d, self.d, dtype=torch.float64)
        q[self.perm, torch.arange(self.d)] = 1.0
        return q

    def inverse(self) -> StreamMap:
        """Q^-1 = Q^T: x_new @ Q^T = x."""
        if self.perm is not None:
            return StreamMap(perm=torch.argsort(self.perm))
        return StreamMap(matrix=self.matrix.T.contiguous())  # type: ignore[union-attr]

    def then(self, other: StreamMap) -> StreamMap:
        """The map x -> x @ Q_self @ Q_other (a permutation when both are)."""
        if self.perm is not None and other.perm is not None:
            return StreamMap(perm=self.perm[other.perm])
        return StreamMap(matrix=self.as_matrix() @ other.as_matrix())

    def apply(self, tensor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        """Multiply every listed axis of `tensor` by Q; same dtype and device as `tensor`."""
        result = tensor
        for axis in axes:
            if result.shape[axis] != self.d:
                raise ValueError(f"axis {axis} of a tensor of shape {list(tensor.shape)} is not the stream "
                                 f"(d={self.d})")
            if self.perm is not None:
                result = result.index_select(axis, self.perm.to(result.device))
            else:
                q = self.matrix.to(device=result.device, dtype=work_dtype(result.dtype))  # type: ignore[union-attr]
                moved = result.to(q.dtype).movedim(axis, -1) @ q
                result = moved.movedim(-1, axis)
        return result.to(tensor.dtype)


def random_stream_map(d: int, orthogonal: bool, generator: torch.Generator) -> StreamMap:
    """A uniformly random permutation, or a Haar-random orthogonal matrix (QR with sign fix)."""
    if not orthogonal:
        return StreamMap(perm=torch.randperm(d, generator=generator))
    gaussian = torch.randn(d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    return StreamMap(matrix=q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0))


def fold_gain(weight: torch.Tensor, gain: torch.Tensor, axis: int) -> torch.Tensor:
    """A reader's weight with a norm gain folded in: weight * gain along the stream `axis`, so
    that reading the un-scaled norm output gives the same result. Computed in float32 or wider;
    returned in the weight's dtype."""
    if gain.dim() != 1 or weight.shape[axis] != gain.numel():
        raise ValueError(f"gain of shape {list(gain.shape)} does not fit axis {axis} of {list(weight.shape)}")
    work = work_dtype(weight.dtype)
    shape = [1] * weight.dim()
    shape[axis] = -1
    return (weight.to(work) * gain.to(device=weight.device, dtype=work).reshape(shape)).to(weight.dtype)
