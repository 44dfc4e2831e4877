"""Read one layer's tensors out of a checkpoint into canonical `LayerWeights`, and write them back.

This is the only place that turns spec names into tensors: it applies the prefix and layer
pattern, transposes Conv1D-style `[in, out]` weights, splits fused QKV tensors by head counts, and
checks every shape against the config so that a wrong config fails loudly instead of reshaping
garbage. Math is done in float32 (or wider); `CheckpointWriter.write` casts back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from rotfuse.archs.bind import BoundArch, Dims, LayerId
from rotfuse.archs.spec import AttentionSpec, FfnSpec, LinearRef
from rotfuse.core.errors import InputError
from rotfuse.symmetry.weights import Attention, Experts, Ffn, LayerWeights, Linear

if TYPE_CHECKING:
    from rotfuse.io.checkpoint import Checkpoint
    from rotfuse.io.writer import CheckpointWriter


def _rows(role: str, dims: Dims) -> int:
    return (dims.num_heads if role == "q" else dims.num_kv_heads) * dims.head_dim


def layer_tensor_names(bound: BoundArch, layer: LayerId, checkpoint: Checkpoint) -> list[str]:
    """Full names of every tensor the layer's symmetries read and write (biases, extras when present)."""
    names = [bound.full_name(layer, relative) for relative in bound.touched(layer)]
    return [name for name in names if name in checkpoint]


def check_layer_pair(
    model: Checkpoint, model_bound: BoundArch, anchor: Checkpoint, anchor_bound: BoundArch, layer: LayerId
) -> None:
    """Both checkpoints must hold the same optional tensors (biases, extras) in a layer, or the
    packed circuits would not line up; name the first one that only one of them has."""
    for relative in model_bound.touched(layer):
        mine, theirs = model_bound.full_name(layer, relative), anchor_bound.full_name(layer, relative)
        if (mine in model) != (theirs in anchor):
            holder, name, other = (model, mine, anchor) if mine in model else (anchor, theirs, model)
            raise InputError(f"{holder.folder}: tensor {name!r} has no counterpart in {other.folder}")


TensorView = Callable[[str, torch.Tensor], torch.Tensor]  # (full name, stored-layout value) -> new value


class _LayerReader:
    def __init__(
        self,
        checkpoint: Checkpoint,
        bound: BoundArch,
        layer: LayerId,
        device: str,
        view: TensorView | None = None,
        stored: bool = False,
    ):
        self.checkpoint, self.bound, self.layer, self.device = checkpoint, bound, layer, device
        self.view, self.stored = view, stored  # stored: values kept in their stored dtype

    def tensor(self, relative: str, layout: str, shape: tuple[int, ...]) -> torch.Tensor:
        name = self.bound.full_name(self.layer, relative)
        stored = tuple(self.checkpoint.entry(name).shape)
        expected = shape if layout == "out_in" or len(shape) == 1 else shape[::-1]
        if stored != expected:
            raise InputError(
                f"{self.checkpoint.shard_of(name).path}: tensor {name!r} has shape {list(stored)}, "
                f"but the config implies {list(expected)}"
            )
        value = self.checkpoint.get(name, self.device)
        if not value.is_floating_point():
            raise InputError(f"{self.checkpoint.folder}: tensor {name!r} is not floating point ({value.dtype})")
        if not self.stored or value.element_size() == 1:  # float8 has no arithmetic: through float32
            value = value.float() if value.dtype != torch.float64 else value
        if self.view is not None:
            value = self.view(name, value)
        return value.T if layout == "in_out" and value.dim() == 2 else value

    def optional(self, relative: str | None, layout: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        if relative is None or self.bound.full_name(self.layer, relative) not in self.checkpoint:
            return None
        return self.tensor(relative, layout, shape)

    def linear(self, ref: LinearRef, out_dim: int, in_dim: int) -> Linear:
        return Linear(
            self.tensor(ref.weight, ref.layout, (out_dim, in_dim)),
            self.optional(ref.bias, ref.layout, (out_dim,)),
        )

    def extras(self, refs: tuple[LinearRef, ...], out_dim: int, in_dim: int) -> list[Linear]:
        """The extra Q-like or K-like projections this checkpoint has (see AttentionSpec); layer 0
        decides which, and a layer holding one that layer 0 lacks is refused rather than left
        untransformed."""
        present = self.bound.present(self.layer.stack, refs)
        for ref in refs:
            name = self.bound.full_name(self.layer, ref.weight)
            if ref not in present and name in self.checkpoint:
                raise InputError(f"{self.checkpoint.folder}: tensor {name!r} has no counterpart in layer 0")
        return [self.linear(ref, out_dim, in_dim) for ref in present]


def read_layer(
    checkpoint: Checkpoint,
    bound: BoundArch,
    layer: LayerId,
    device: str = "cpu",
    view: TensorView | None = None,
    stored_ffn: bool = False,
) -> LayerWeights:
    """One layer's tensors as canonical float32 `LayerWeights`. `view`, when given, sees every
    tensor right after it is read (in float32, in its stored layout) and may replace it: the
    residual-stream map and RMSNorm folding come in this way. `stored_ffn` (without a view) keeps
    the FFN's tensors in their stored dtype: measuring and permuting them is exact in it, and a
    float32 copy of two thirds of the layer's bytes would cost more than the rest of its work."""
    if stored_ffn and view is not None:
        raise ValueError("stored_ffn: the view needs float tensors")
    stack = bound.layer_spec(layer)
    dims = bound.dims[layer.stack]
    reader = _LayerReader(checkpoint, bound, layer, device, view)
    att, d = stack.attention, dims.hidden_size

    if att.qkv is not None:
        sizes = [_rows(role, dims) for role in att.qkv.order]
        if att.qkv.per_head and dims.num_kv_heads != dims.num_heads:
            raise InputError(
                f"{checkpoint.folder}: a per-head fused qkv needs as many key/value heads as "
                f"query heads ({dims.num_kv_heads} != {dims.num_heads})"
            )
        weight = reader.tensor(att.qkv.weight, att.qkv.layout, (sum(sizes), d))
        bias = reader.optional(att.qkv.bias, att.qkv.layout, (sum(sizes),))
        weights = dict(zip(att.qkv.order, _split_qkv(weight, sizes, att.qkv.per_head, dims)))
        biases = dict(
            zip(att.qkv.order, _split_qkv(bias, sizes, att.qkv.per_head, dims) if bias is not None else [None] * 3)
        )
        q, k, v = (Linear(weights[r], biases[r]) for r in ("q", "k", "v"))
    else:
        q, k, v = (
            reader.linear(ref, _rows(role, dims), d)  # type: ignore[arg-type]
            for role, ref in (("q", att.q), ("k", att.k), ("v", att.v))
        )
    o = Linear(reader.tensor(att.o.weight, att.o.layout, (d, dims.num_heads * dims.head_dim)))
    attention = Attention(
        q,
        k,
        v,
        o,
        dims.num_heads,
        dims.num_kv_heads,
        dims.head_dim,
        q_like=reader.extras(att.q_like, _rows("q", dims), d),
        k_like=reader.extras(att.k_like, _rows("k", dims), d),
        **{
            f"{side}_vectors": [reader.tensor(name, "out_in", (_rows(side, dims),)) for name in names]
            for side, names in stack.moves_with_heads.items()
        },
    )

    ffn_reader = _LayerReader(checkpoint, bound, layer, device, view, stored_ffn)
    ffn = _read_ffn(ffn_reader, stack.ffn, ffn_inputs(bound, layer.stack, stack.ffn), d) if stack.ffn else None
    if stack.ffn is not None:
        for ref in set(stack.ffn.inputs) - set(ffn_inputs(bound, layer.stack, stack.ffn)):
            if bound.full_name(layer, ref.weight) in checkpoint:  # layer 0 decides; a stray is refused
                raise InputError(
                    f"{checkpoint.folder}: tensor {bound.full_name(layer, ref.weight)!r} has no counterpart in layer 0"
                )
    experts = None
    if stack.experts is not None:
        count = dims.num_experts
        router = ffn_reader.linear(stack.experts.router, count, d)
        ffns = [
            _read_ffn(ffn_reader, spec, list(spec.inputs), d)
            for spec in (stack.experts.expert(e) for e in range(count))
        ]
        experts = Experts(router, ffns)
    return LayerWeights(attention, ffn, experts)


def _read_ffn(reader: _LayerReader, spec: FfnSpec, inputs: list[LinearRef], d: int) -> Ffn:
    """An FFN whose width is read off its output weight (checked against every input)."""
    out_name = reader.bound.full_name(reader.layer, spec.output.weight)
    stored = reader.checkpoint.entry(out_name).shape
    if len(stored) != 2:
        raise InputError(f"{reader.checkpoint.folder}: tensor {out_name!r} is not a matrix (shape {list(stored)})")
    width = stored[1] if spec.output.layout == "out_in" else stored[0]
    output = Linear(reader.tensor(spec.output.weight, spec.output.layout, (d, width)))
    linears = []
    for ref in inputs:  # a fused input (parts > 1) splits into its projections
        fused = reader.linear(ref, ref.parts * width, d)
        biases: list[torch.Tensor | None] = (
            list(fused.bias.chunk(ref.parts)) if fused.bias is not None else [None] * ref.parts
        )
        linears += [Linear(w, b) for w, b in zip(fused.weight.chunk(ref.parts), biases, strict=True)]
    return Ffn(linears, output)


def ffn_inputs(bound: BoundArch, stack: str, spec: FfnSpec) -> list[LinearRef]:
    """The FFN input projections this checkpoint has: every required one, and the optional ones
    that layer 0 has (e.g. T5's `wi`, or `wi_0` and `wi_1` when the FFN is gated)."""
    present = set(bound.present(stack, spec.inputs))
    return [ref for ref in spec.inputs if not ref.optional or ref in present]


def _split_qkv(tensor: torch.Tensor, sizes: list[int], per_head: bool, dims: Dims) -> list[torch.Tensor]:
    """A fused QKV weight (or bias) split into its parts, in `order`: stacked as a whole
    ([len(order), heads, head_dim] rows) or within each head ([heads, len(order), head_dim])."""
    if not per_head:
        return list(tensor.split(sizes, dim=0))
    rows = tensor.reshape(dims.num_heads, len(sizes), dims.head_dim, *tensor.shape[1:])
    return [rows[:, part].reshape(dims.num_heads * dims.head_dim, *tensor.shape[1:]) for part in range(len(sizes))]


def _fuse_qkv(parts: list[torch.Tensor], per_head: bool, dims: Dims) -> torch.Tensor:
    """The inverse of `_split_qkv`."""
    if not per_head:
        return torch.cat(parts)
    rows = [p.reshape(dims.num_heads, dims.head_dim, *p.shape[1:]) for p in parts]
    return torch.stack(rows, dim=1).reshape(-1, *parts[0].shape[1:])


class _LayerWriter:
    """Puts canonical tensors back under their names, in their stored layout."""

    def __init__(self, writer: CheckpointWriter, bound: BoundArch, layer: LayerId):
        self.writer, self.bound, self.layer = writer, bound, layer

    def put(self, relative: str, tensor: torch.Tensor, layout: str) -> None:
        stored = tensor.T if layout == "in_out" and tensor.dim() == 2 else tensor
        self.writer.write(self.bound.full_name(self.layer, relative), stored)

    def linear(self, ref: LinearRef, linear: Linear) -> None:
        self.put(ref.weight, linear.weight, ref.layout)
        if ref.bias and linear.bias is not None:
            self.put(ref.bias, linear.bias, ref.layout)

    def attention(self, spec: AttentionSpec, attention: Attention) -> None:
        if spec.qkv is not None:
            parts = {"q": attention.q, "k": attention.k, "v": attention.v}
            dims = self.bound.dims[self.layer.stack]
            fused = _fuse_qkv([parts[r].weight for r in spec.qkv.order], spec.qkv.per_head, dims)
            self.put(spec.qkv.weight, fused, spec.qkv.layout)
            if spec.qkv.bias and attention.q.bias is not None:
                biases = [parts[r].bias for r in spec.qkv.order]
                self.put(
                    spec.qkv.bias,
                    _fuse_qkv(biases, spec.qkv.per_head, dims),  # type: ignore[arg-type]
                    spec.qkv.layout,
                )
        else:
            for ref, linear in ((spec.q, attention.q), (spec.k, attention.k), (spec.v, attention.v)):
                self.linear(ref, linear)  # type: ignore[arg-type]
        self.put(spec.o.weight, attention.o.weight, spec.o.layout)
        for refs, linears in ((spec.q_like, attention.q_like), (spec.k_like, attention.k_like)):
            for ref, linear in zip(self.bound.present(self.layer.stack, refs), linears, strict=True):
                self.linear(ref, linear)
        vectors = {"q": attention.q_vectors, "k": attention.k_vectors, "v": attention.v_vectors}
        for side, names in self.bound.stack(self.layer.stack).moves_with_heads.items():
            for name, vector in zip(names, vectors[side], strict=True):
                self.put(name, vector, "out_in")

    def ffn(self, spec: FfnSpec, ffn: Ffn, inputs: list[LinearRef] | None = None) -> None:
        linears = iter(ffn.inputs)
        refs = ffn_inputs(self.bound, self.layer.stack, spec) if inputs is None else inputs
        for ref in refs:  # a fused input (parts > 1) takes its projections back in order
            parts = [next(linears) for _ in range(ref.parts)]
            if len(parts) == 1:  # nothing to join: no copy
                self.linear(ref, parts[0])
                continue
            biases = [p.bias for p in parts if p.bias is not None]
            self.linear(ref, Linear(torch.cat([p.weight for p in parts]), torch.cat(biases) if biases else None))
        self.put(spec.output.weight, ffn.output.weight, spec.output.layout)


def write_layer(
    writer: CheckpointWriter,
    bound: BoundArch,
    layer: LayerId,
    weights: LayerWeights,
    as_read: LayerWeights | None = None,
) -> None:
    """Write a layer's tensors back in the checkpoint's layout. With `as_read` (the weights as they
    were read, no view applied), a part the symmetries left as it was -- the very same object --
    is not rewritten: the writer copies its bytes unchanged instead of a float round trip."""
    stack = bound.layer_spec(layer)
    out = _LayerWriter(writer, bound, layer)
    if as_read is None or weights.attention is not as_read.attention:
        out.attention(stack.attention, weights.attention)
    if weights.ffn is not None and stack.ffn is not None and (as_read is None or weights.ffn is not as_read.ffn):
        out.ffn(stack.ffn, weights.ffn)
    experts = weights.experts
    if experts is not None and stack.experts is not None and (as_read is None or experts is not as_read.experts):
        out.linear(stack.experts.router, experts.router)
        for index, ffn in enumerate(experts.ffns):
            spec = stack.experts.expert(index)
            out.ffn(spec, ffn, list(spec.inputs))
