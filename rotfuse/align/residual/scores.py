"""Finding the residual-stream map T that brings MODEL's stream onto ANCHOR's.

T couples every layer, so it cannot be solved layer by layer. Two ways:

- weights (data-free): C = sum over every tensor on the stream of S A^T, with S and A the
  model's and the anchor's values laid out stream-axis-first; T = argmax <T, C> over
  permutations (Hungarian) or, where the norms fold, orthogonal maps (Procrustes; for LayerNorm
  restricted to the maps that keep the all-ones direction). The per-layer maps (heads,
  rotations, FFN neurons) act on other axes and commute
  with T, so the two are alternated: T from the tensors outside the layers first (embeddings,
  heads), then per-layer maps given T, then T from everything, ... until the distance stops
  falling (the GLMC weight-matching scheme, made exact for standard checkpoints).
- activations (`--data`): T from the correlation (permutation) or cross-covariance (orthogonal)
  of the two models' hidden states on the same inputs, summed over layers.

Every tensor is compared as `StreamSide.view` sees it: norm gains folded into their readers
where the plan allows orthogonal maps (on both sides, so like is compared with like), and the
model's stream moved by the current T. The written copy is then unfolded into the anchor's gains
(`StreamSide.into`), so that it has the anchor's parameterisation and averages with it directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import cast

import torch

from rotfuse.archs.layer_io import TensorView
from rotfuse.archs.residual import GainSource, ResidualPlan, StreamTensor
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.symmetry.permutation import best_assignment
from rotfuse.symmetry.residual import StreamMap, keeping_ones, ones_frame
from rotfuse.symmetry.rotation import procrustes
from rotfuse.symmetry.weights import LayerWeights, Linear


@dataclass
class StreamSide:
    """One checkpoint as the matching sees it: gains folded where allowed, stream moved by `maps`;
    `express` then gives a tensor as written, in the gains `into` gives (None: left folded)."""

    checkpoint: Checkpoint
    plans: dict[str, ResidualPlan]
    maps: dict[str, StreamMap]
    into: GainSource | None = None
    _stacks_of: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._stacks_of = {}  # most tensors sit on one stream; a bridge (a projector) on two, on other axes
        for stack, plan in self.plans.items():
            for name in plan.tensors:
                self._stacks_of.setdefault(name, []).append(stack)

    @classmethod
    def unmoved(cls, checkpoint: Checkpoint, plans: dict[str, ResidualPlan]) -> StreamSide:
        return cls(checkpoint, plans, {stack: StreamMap.identity(p.hidden_size) for stack, p in plans.items()})

    def moved(self, maps: dict[str, StreamMap], into: GainSource | None = None) -> StreamSide:
        return replace(self, maps=maps, into=into)

    def on_stream(self, name: str) -> bool:
        return name in self._stacks_of

    def entries(self, name: str) -> list[StreamTensor]:
        """How the streams index a tensor on them (stack, axes and role), one entry per stream."""
        return [self.plans[stack].tensors[name] for stack in self._stacks_of[name]]

    @property
    def layer_view(self) -> TensorView | None:
        """`view` for layer readers, None when no tensor is on the stream: a reader without a view
        lets the writer copy the parts a solve left unchanged byte for byte."""
        return self.view if self.plans else None

    def view(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor's value in this side's basis (a `layer_io.TensorView`)."""
        for stack in self._stacks_of.get(name, ()):  # on other axes each: the maps commute
            tensor = self.plans[stack].transform(name, tensor, self.maps[stack], self._gain)
        return tensor

    def express(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A viewed tensor (after any per-layer maps too) in the gains of `into`, to be written."""
        if self.into is None:
            return tensor
        for stack in self._stacks_of.get(name, ()):
            tensor = self.plans[stack].unfold(name, tensor, self.into)
        return tensor

    def read(self, name: str, source: str | None = None) -> torch.Tensor:
        """A whole tensor in this side's basis, in its stored dtype. `source`: read the value of
        another tensor (an untied head starts from the embedding's value)."""
        return self.view(name, self.checkpoint.get(source or name))

    def _gain(self, name: str) -> torch.Tensor:
        return self.checkpoint.get(name).float()


def stream_scores(src: torch.Tensor, anchor: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    """sum over the stream axes of S A^T (`[d, d]`, float64), each axis laid out first in turn."""
    total = None
    for axis in axes:
        s = src.float().movedim(axis, 0).reshape(src.shape[axis], -1)
        a = anchor.float().movedim(axis, 0).reshape(anchor.shape[axis], -1)
        part = (s @ a.T).double()
        total = part if total is None else total + part
    assert total is not None
    return total


def layer_stream_scores(src: LayerWeights, anchor: LayerWeights) -> torch.Tensor:
    """The layer's contribution to C from its projections into the stream (Q, K, V, FFN inputs,
    router and expert inputs: `[out, d]`) and out of it (O, FFN and expert outputs: `[d, in]`), in
    canonical layout."""
    return cast(torch.Tensor, sum(layer_stream_parts(src, anchor).values()))


def layer_stream_parts(src: LayerWeights, anchor: LayerWeights) -> dict[str, torch.Tensor]:
    """`layer_stream_scores` by layer-spec role (q, k, v, o, ffn_inputs, ffn_output): the roles
    may sit on different streams (cross-attention K/V read the encoder's). A MoE layer's router and
    routed experts (in the anchor's expert order) count as FFN inputs and outputs."""
    parts = {
        role: stream_scores(getattr(src.attention, role).weight, getattr(anchor.attention, role).weight, (1,))
        for role in ("q", "k", "v")
    }
    parts["o"] = stream_scores(src.attention.o.weight, anchor.attention.o.weight, (0,))
    readers: list[tuple[Linear, Linear]] = []
    writers: list[tuple[Linear, Linear]] = []
    ffns = [(src.ffn, anchor.ffn)] if src.ffn is not None and anchor.ffn is not None else []
    if src.experts is not None and anchor.experts is not None:
        readers.append((src.experts.router, anchor.experts.router))
        ffns += list(zip(src.experts.ffns, anchor.experts.ffns, strict=True))
    for s_ffn, a_ffn in ffns:
        readers += list(zip(s_ffn.inputs, a_ffn.inputs))
        writers.append((s_ffn.output, a_ffn.output))
    if readers:
        parts["ffn_inputs"] = cast(torch.Tensor, sum(stream_scores(s.weight, a.weight, (1,)) for s, a in readers))
    if writers:
        parts["ffn_output"] = cast(torch.Tensor, sum(stream_scores(s.weight, a.weight, (0,)) for s, a in writers))
    return parts


def to_unmoved_basis(scores: torch.Tensor, stream_map: StreamMap) -> torch.Tensor:
    """C from scores measured on a stream already moved by T: C = Q C_T (readers W Q and writers
    Q^T W both give C_T = Q^T C)."""
    if stream_map.perm is not None:
        out = torch.empty_like(scores)
        out[stream_map.perm.to(scores.device)] = scores
        return out
    return stream_map.as_matrix().to(scores.device) @ scores


def solve_stream_map(scores: torch.Tensor, orthogonal: bool, keep_ones: bool = False) -> StreamMap:
    """argmax over T of <T, C>: Hungarian for a permutation, Procrustes for an orthogonal map.
    `keep_ones` (LayerNorm): over the maps with T 1 = 1, i.e. T = H diag(1, R) H (`ones_frame`),
    where <T, C> = (H C H)[0, 0] + <R, (H C H)[1:, 1:]>: Procrustes on the block."""
    if not orthogonal:
        return StreamMap(perm=best_assignment(scores))
    if not keep_ones:
        return StreamMap(matrix=procrustes(scores.double()[None])[0].cpu())
    frame = ones_frame(scores.shape[0])
    block = (frame @ scores.double().cpu() @ frame)[1:, 1:]
    return keeping_ones(procrustes(block[None])[0])


def stream_agreement(scores: torch.Tensor, stream_map: StreamMap) -> float:
    """<T, C>: the objective the map maximises (reported per round)."""
    return float((stream_map.as_matrix().to(scores.device) * scores.double()).sum())
