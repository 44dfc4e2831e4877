"""A map of the residual stream (docs/design/symmetries.md section 5): pure tensor math, no names or files.

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
  order), and (LN(x) * g + b) P = LN(x) P * (g P) + b P.
- RMSNorm: rms(x Q) = rms(x) for orthogonal Q, so x / rms(x) commutes with Q; the gain does not,
  but (x / rms * g) W^T = (x / rms) (W diag(g))^T, so folding g into every reader (`scale_axis`)
  and setting it to 1 makes any orthogonal Q exact.
- LayerNorm, when its output only feeds weights (pre-LN models): x - mean(x) commutes with an
  orthogonal Q exactly when Q keeps the all-ones direction (Q 1 = 1; `keeps_ones`), and then so
  does the variance. The gain folds into the readers as for RMSNorm, and the bias rides along as
  b / g: LN(x) * g + b = (LN(x) + b / g) * g, with b / g a stream vector that moves like a table.
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

    @property
    def keeps_ones(self) -> bool:
        """Q 1 = 1: the map keeps the all-ones direction, so it commutes with LayerNorm's centering."""
        if self.perm is not None:
            return True
        return bool((self.matrix.sum(dim=1) - 1).abs().max() <= 1e-6) if self.d else True  # type: ignore[union-attr]

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
                raise ValueError(
                    f"axis {axis} of a tensor of shape {list(tensor.shape)} is not the stream (d={self.d})"
                )
            if self.perm is not None:
                result = result.index_select(axis, self.perm.to(result.device))
            else:
                q = self.matrix.to(device=result.device, dtype=work_dtype(result.dtype))  # type: ignore[union-attr]
                moved = result.to(q.dtype).movedim(axis, -1) @ q
                result = moved.movedim(-1, axis)
        return result.to(tensor.dtype)


def ones_frame(d: int) -> torch.Tensor:
    """A symmetric orthogonal H [d, d] (a Householder reflection) whose first column is 1/sqrt(d):
    its other columns are an orthonormal basis of the directions orthogonal to all-ones, so
    H diag(1, R) H keeps the ones for every orthogonal R [d-1, d-1]."""
    unit = torch.full((d,), d**-0.5, dtype=torch.float64)
    v = -unit
    v[0] += 1.0
    if float(v.norm()) < 1e-12:  # d == 1: the ones are the first axis already
        return torch.eye(d, dtype=torch.float64)
    return torch.eye(d, dtype=torch.float64) - 2.0 * torch.outer(v, v) / (v @ v)


def keeping_ones(rotation: torch.Tensor) -> StreamMap:
    """The map H diag(1, R) H that acts as `rotation` [d-1, d-1] on the directions orthogonal to all-ones."""
    d = rotation.shape[0] + 1
    frame = ones_frame(d)
    block = torch.eye(d, dtype=torch.float64)
    block[1:, 1:] = rotation.double()
    return StreamMap(matrix=frame @ block @ frame)


def random_stream_map(d: int, orthogonal: bool, generator: torch.Generator, keep_ones: bool = False) -> StreamMap:
    """A uniformly random permutation, or a Haar-random orthogonal matrix (QR with sign fix) --
    `keep_ones`: Haar-random among those with Q 1 = 1."""
    if not orthogonal:
        return StreamMap(perm=torch.randperm(d, generator=generator))
    size = d - 1 if keep_ones else d
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)
    return keeping_ones(q) if keep_ones else StreamMap(matrix=q)


def scale_axis(tensor: torch.Tensor, factors: torch.Tensor, axis: int) -> torch.Tensor:
    """tensor * factors along `axis` (folding a norm gain into a reader, or back out of it).
    Computed in float32 or wider; returned in the tensor's dtype."""
    if factors.dim() != 1 or tensor.shape[axis] != factors.numel():
        raise ValueError(f"factors of shape {list(factors.shape)} do not fit axis {axis} of {list(tensor.shape)}")
    work = work_dtype(tensor.dtype)
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return (tensor.to(work) * factors.to(device=tensor.device, dtype=work).reshape(shape)).to(tensor.dtype)
