"""The tensors of one transformer layer, in one canonical layout, with no names attached.

Every weight is torch-Linear style `[out, in]` (callers transpose Conv1D weights on the way in
and out). The attention symmetries act on per-head row blocks, so a circuit (QK or VO) is packed
into two tensors of shape `[groups, head_dim, n]`:

- QK: left = [Q rows | q bias] of every query head in the group, right = [K rows | k bias];
- VO: left = [V rows | v bias], right = O's columns for every query head in the group, transposed.

A rotation R acts as `X <- R^T X` on both sides; a scale a as `left <- a*left, right <- right/a`.
With GQA a group is one KV head and the query heads that read it (queries are laid out
group-major, as in Hugging Face's `repeat_kv`), so one transform per group keeps the function.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from rotfuse.tensors import sq_distance


@dataclass
class Linear:
    """`y = x @ weight.T + bias`; weight `[out, in]`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def map(self, fn) -> Linear:  # noqa: ANN001 - fn: Tensor -> Tensor
        return Linear(fn(self.weight), None if self.bias is None else fn(self.bias))


@dataclass
class Attention:
    """One attention block. `o.bias` is never touched by any symmetry and is left out (None)."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_like: list[Linear] = field(default_factory=list)  # extra tensors transformed exactly like Q
    k_like: list[Linear] = field(default_factory=list)  # ... and like K (e.g. DeBERTa pos_key_proj)

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass
class Ffn:
    """Input projections share the neuron index as rows; the output projection as columns."""

    inputs: list[Linear]
    output: Linear  # bias untouched, left out

    @property
    def width(self) -> int:
        return self.output.weight.shape[1]


@dataclass
class Circuit:
    """A QK or VO circuit packed per group: left `[G, dh, nL]` (scaled by a), right `[G, dh, nR]` (by 1/a)."""

    left: torch.Tensor
    right: torch.Tensor


# ---------------------------------------------------------------------- packing


def _pack(linears: list[Linear], groups: int, head_dim: int) -> torch.Tensor:
    """Stack per-group row blocks of several linears side by side: `[G, dh, sum of columns]`."""
    parts = []
    for linear in linears:
        for tensor in (linear.weight, linear.bias):
            if tensor is None:
                continue
            matrix = tensor if tensor.dim() == 2 else tensor[:, None]
            heads_per_group = matrix.shape[0] // (groups * head_dim)
            blocks = matrix.reshape(groups, heads_per_group, head_dim, matrix.shape[1])
            parts.append(blocks.permute(0, 2, 1, 3).reshape(groups, head_dim, -1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _unpack(packed: torch.Tensor, templates: list[Linear], groups: int, head_dim: int) -> list[Linear]:
    """Inverse of `_pack`, using `templates` for the shapes."""
    out: list[Linear] = []
    start = 0

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        nonlocal start
        if tensor is None:
            return None
        matrix = tensor if tensor.dim() == 2 else tensor[:, None]
        heads_per_group = matrix.shape[0] // (groups * head_dim)
        width = heads_per_group * matrix.shape[1]
        block = packed[:, :, start:start + width]
        start += width
        block = block.reshape(groups, head_dim, heads_per_group, matrix.shape[1]).permute(0, 2, 1, 3)
        return block.reshape(tensor.shape)

    for linear in templates:
        out.append(Linear(take(linear.weight), take(linear.bias)))  # type: ignore[arg-type]
    return out


def qk_circuit(att: Attention) -> Circuit:
    g, dh = att.num_kv_heads, att.head_dim
    return Circuit(_pack([att.q, *att.q_like], g, dh), _pack([att.k, *att.k_like], g, dh))


def vo_circuit(att: Attention) -> Circuit:
    g, dh = att.num_kv_heads, att.head_dim
    # O's columns as rows, contiguous first: torch transposes a matrix in cache-sized tiles, while
    # packing the transposed view directly would gather every element from another cache line
    return Circuit(_pack([att.v], g, dh), _pack([Linear(att.o.weight.T.contiguous())], g, dh))


def with_qk(att: Attention, circuit: Circuit) -> Attention:
    g, dh = att.num_kv_heads, att.head_dim
    q, *q_like = _unpack(circuit.left, [att.q, *att.q_like], g, dh)
    k, *k_like = _unpack(circuit.right, [att.k, *att.k_like], g, dh)
    return replace(att, q=q, k=k, q_like=q_like, k_like=k_like)


def with_vo(att: Attention, circuit: Circuit) -> Attention:
    g, dh = att.num_kv_heads, att.head_dim
    (v,) = _unpack(circuit.left, [att.v], g, dh)
    (o_t,) = _unpack(circuit.right, [Linear(att.o.weight.T)], g, dh)
    return replace(att, v=v, o=Linear(o_t.weight.T))  # a view: the writer's cast makes it contiguous


def ffn_rows(ffn: Ffn, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Every parameter indexed by FFN neuron, one row per neuron: `[dff, n]`, in `dtype` (default:
    the weights'), cast while concatenating."""
    parts = []
    for linear in ffn.inputs:
        parts.append(linear.weight)
        if linear.bias is not None:
            parts.append(linear.bias[:, None])
    parts.append(ffn.output.weight.T.contiguous())  # transposed in tiles, not gathered by cat
    out = parts[0].new_empty((parts[0].shape[0], sum(p.shape[1] for p in parts)), dtype=dtype or parts[0].dtype)
    return torch.cat(parts, dim=1, out=out)


def circuit_sq_distance(a: Circuit, b: Circuit) -> float:
    """Squared Frobenius distance, accumulated in float64."""
    return sq_distance(a.left, b.left) + sq_distance(a.right, b.right)


@dataclass
class LayerWeights:
    """What the symmetries of one transformer layer act on."""

    attention: Attention
    ffn: Ffn
