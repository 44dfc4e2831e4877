"""The tensors of one transformer layer, in one canonical layout, with no names attached.

Every weight is torch-Linear style `[out, in]` (callers transpose Conv1D weights on the way in
and out). The attention symmetries act on per-head row blocks, so each side of a circuit (QK or
VO) is a few blocks of shape `[groups, heads per group, head_dim, n]`, one per weight or bias:

- QK: left = Q, q bias (and q-like tensors) of every query head in the group, right = K, k bias;
- VO: left = V, v bias, right = O's columns for every query head in the group, transposed.

A rotation R acts as `X <- R^T X` on both sides; a scale a as `left <- a*left, right <- right/a`.
With GQA a group is one KV head and the query heads that read it (queries are laid out
group-major, as in Hugging Face's `repeat_kv`), so one transform per group keeps the function.
The blocks are views of the weights (O's transposed included): nothing is copied to pack a circuit
or to unpack it, and a transformed block keeps the layout of the weight it came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from rotfuse.core.buffers import thread_buffer
from rotfuse.core.tensors import sq_distance


@dataclass
class Linear:
    """`y = x @ weight.T + bias`; weight `[out, in]`."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def map(self, fn) -> Linear:
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
    # per-coordinate vectors over the Q (K, V) output width that move with whole heads and nothing else
    # (OLMo 2's full-width q_norm / k_norm gains); the spec keeps that circuit's rotations and scales off
    q_vectors: list[torch.Tensor] = field(default_factory=list)
    k_vectors: list[torch.Tensor] = field(default_factory=list)
    v_vectors: list[torch.Tensor] = field(default_factory=list)

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
class Experts:
    """The routed experts of a mixture-of-experts layer: expert e is `ffns[e]`, with a neuron index
    of its own, and the router's output row e (and bias entry e) scores it."""

    router: Linear
    ffns: list[Ffn]


Blocks = tuple[torch.Tensor, ...]


@dataclass
class Circuit:
    """A QK or VO circuit: per side, blocks `[G, H, dh, n]` whose H heads share their group's
    transform; left scaled by a, right by 1/a. A `[G, dh, n]` tensor is taken as one block, H = 1."""

    left: Blocks
    right: Blocks

    def __post_init__(self) -> None:
        self.left, self.right = as_blocks(self.left), as_blocks(self.right)

    def tensors(self) -> Blocks:
        return self.left + self.right


def as_blocks(side: torch.Tensor | tuple[torch.Tensor, ...] | list[torch.Tensor]) -> Blocks:
    items = (side,) if isinstance(side, torch.Tensor) else tuple(side)
    return tuple(t[:, None] if t.dim() == 3 else t for t in items)


def batched(block: torch.Tensor) -> torch.Tensor:
    """`[G, H, dh, n]` -> `[G*H, dh, n]`, a view for every layout packing makes."""
    return block.reshape(block.shape[0] * block.shape[1], *block.shape[2:])


# ---------------------------------------------------------------------- packing


def _pack(linears: list[Linear], groups: int, head_dim: int) -> Blocks:
    """Each weight and bias as a view `[G, heads per group, dh, columns]` of its per-head row blocks."""
    blocks = []
    for linear in linears:
        for tensor in (linear.weight, linear.bias):
            if tensor is None:
                continue
            matrix = tensor if tensor.dim() == 2 else tensor[:, None]
            heads_per_group = matrix.shape[0] // (groups * head_dim)
            blocks.append(matrix.reshape(groups, heads_per_group, head_dim, matrix.shape[1]))
    return tuple(blocks)


def _unpack(blocks: Blocks, templates: list[Linear]) -> list[Linear]:
    """Inverse of `_pack`, using `templates` for the shapes."""
    remaining = iter(blocks)

    def take(tensor: torch.Tensor | None) -> torch.Tensor | None:
        return None if tensor is None else next(remaining).reshape(tensor.shape)

    return [Linear(take(linear.weight), take(linear.bias)) for linear in templates]  # type: ignore[arg-type]


def _columns(vectors: list[torch.Tensor]) -> list[Linear]:
    """Head-indexed vectors as one-column weights (they pack like a bias, after the weights)."""
    return [Linear(vector[:, None]) for vector in vectors]


def qk_circuit(att: Attention) -> Circuit:
    g, dh = att.num_kv_heads, att.head_dim
    return Circuit(
        _pack([att.q, *att.q_like, *_columns(att.q_vectors)], g, dh),
        _pack([att.k, *att.k_like, *_columns(att.k_vectors)], g, dh),
    )


def vo_circuit(att: Attention) -> Circuit:
    g, dh = att.num_kv_heads, att.head_dim
    return Circuit(_pack([att.v, *_columns(att.v_vectors)], g, dh), _pack([Linear(att.o.weight.T)], g, dh))


def with_qk(att: Attention, circuit: Circuit) -> Attention:
    nq, nk = 1 + len(att.q_like), 1 + len(att.k_like)
    left = _unpack(circuit.left, [att.q, *att.q_like, *_columns(att.q_vectors)])
    right = _unpack(circuit.right, [att.k, *att.k_like, *_columns(att.k_vectors)])
    return replace(
        att,
        q=left[0],
        k=right[0],
        q_like=left[1:nq],
        k_like=right[1:nk],
        q_vectors=[c.weight[:, 0] for c in left[nq:]],
        k_vectors=[c.weight[:, 0] for c in right[nk:]],
    )


def with_vo(att: Attention, circuit: Circuit) -> Attention:
    v, *vectors = _unpack(circuit.left, [att.v, *_columns(att.v_vectors)])
    (o_t,) = _unpack(circuit.right, [Linear(att.o.weight.T)])
    # O's own layout again when the blocks kept it
    return replace(att, v=v, o=Linear(o_t.weight.T), v_vectors=[c.weight[:, 0] for c in vectors])


def ffn_row_parts(ffn: Ffn, buffer: str = "ffn_rows.output") -> list[torch.Tensor]:
    """The column blocks of `ffn_rows(ffn)`, each one row per neuron: the input weights, their
    biases as columns, the output weight transposed -- in tiles (not gathered by cat), into this
    thread's buffer `buffer`: no fresh pages per layer."""
    parts = []
    for linear in ffn.inputs:
        parts.append(linear.weight)
        if linear.bias is not None:
            parts.append(linear.bias[:, None])
    output = ffn.output.weight
    parts.append(thread_buffer(buffer, output.T.shape, output.dtype, output.device).copy_(output.T))
    return parts


def ffn_rows(ffn: Ffn, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Every parameter indexed by FFN neuron, one row per neuron: `[dff, n]`, in `dtype` (default:
    the weights'), cast while concatenating -- into `out` if given (of `ffn_rows_shape` and `dtype`)."""
    parts = ffn_row_parts(ffn)
    if out is None:
        out = parts[0].new_empty(ffn_rows_shape(ffn), dtype=dtype or parts[0].dtype)
    return torch.cat(parts, dim=1, out=out)


def ffn_rows_shape(ffn: Ffn) -> tuple[int, int]:
    """The shape of `ffn_rows(ffn)`: one row per neuron, every parameter of it side by side."""
    columns = sum(linear.weight.shape[1] + (linear.bias is not None) for linear in ffn.inputs)
    return ffn.width, columns + ffn.output.weight.shape[0]


def circuit_sq_distance(a: Circuit, b: Circuit) -> float:
    """Squared Frobenius distance, accumulated in float64."""
    return sum((sq_distance(x, y) for x, y in zip(a.tensors(), b.tensors(), strict=True)), 0.0)


@dataclass
class LayerWeights:
    """What the symmetries of one transformer layer act on."""

    attention: Attention
    ffn: Ffn | None  # None in an attention-only stack (cross-attention blocks) and MoE layers without a shared expert
    experts: Experts | None = None  # routed experts (mixture-of-experts layers)
