"""g(MODEL)'s tensors from the learned maps, under the checkpoint's own names.

The matched copy is folded once (every foldable norm gain folded into its readers, as the
residual search sees it); each call then moves the stream by T, applies the per-layer maps to the
canonical layer weights (archs/layer_io reads and writes them: Conv1D transposes, fused QKV) and
unfolds into the copy's own norm gains -- the anchor's after a residual match. All of it is
differentiable in the map parameters; in float64 with exact maps it is what gets written.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, cast

import torch

from rotfuse.align.learned.maps import LayerMaps, StreamMaps, along
from rotfuse.align.pair import OpenedModel, layer_settings
from rotfuse.archs.bind import LayerId
from rotfuse.archs.layer_io import read_layer, write_layer
from rotfuse.archs.residual import ResidualPlan, residual_plans
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.symmetry.names import FFN_PERM, RESIDUAL
from rotfuse.symmetry.residual import StreamMap
from rotfuse.symmetry.weights import Circuit, Ffn, LayerWeights, Linear, qk_circuit, vo_circuit, with_qk, with_vo


class _Tensors:
    """A dict of tensors that `read_layer` can read like a Checkpoint."""

    def __init__(self, values: dict[str, torch.Tensor], folder: Any):
        self.values, self.folder = values, folder

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def entry(self, name: str) -> Any:
        return SimpleNamespace(shape=tuple(self.values[name].shape))

    def shard_of(self, name: str) -> Any:
        return SimpleNamespace(path=self.folder)

    def get(self, name: str, device: str = "cpu", check: bool = True) -> torch.Tensor:
        return self.values[name]


class _Collect:
    """What `write_layer` writes, kept in a dict."""

    def __init__(self, values: dict[str, torch.Tensor]):
        self.values = values

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self.values[name] = tensor


def _circuit(
    circuit: Circuit,
    heads: torch.Tensor | None,
    rotation: torch.Tensor | None,
    scale: torch.Tensor | None,
    linear: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Circuit:
    """Head permutation (groups axis), then `left <- a R^T left`, `right <- R^T right / a`, then
    `left <- B left`, `right <- B^-T right` (`linear` = (B, B^-T))."""

    def side(blocks: tuple[torch.Tensor, ...], power: int) -> tuple[torch.Tensor, ...]:
        out = []
        for block in blocks:
            if heads is not None:
                block = along(block, heads, 0)
            if rotation is not None:
                block = torch.einsum("gji,ghjn->ghin", rotation.to(block.dtype), block)
            if scale is not None:
                block = block * (scale.to(block.dtype) ** power)[:, None, None, None]
            if linear is not None:
                block = torch.einsum("gij,ghjn->ghin", linear[0 if power > 0 else 1].to(block.dtype), block)
            out.append(block)
        return tuple(out)

    return Circuit(side(circuit.left, 1), side(circuit.right, -1))


def apply_layer(maps: LayerMaps, weights: LayerWeights, exact: bool) -> LayerWeights:
    att = weights.attention
    heads = maps.head_permutation(exact)
    att = with_qk(att, _circuit(qk_circuit(att), heads, maps.rotation("qk"), maps.scale("qk"), maps.linear("qk")))
    att = with_vo(att, _circuit(vo_circuit(att), heads, maps.rotation("vo"), maps.scale("vo"), maps.linear("vo")))
    ffn = weights.ffn
    q = maps.ffn_permutation(exact)
    if q is not None and ffn is not None:  # (an attention-only stack has no FFN)
        inputs = [Linear(along(x.weight, q, 0), None if x.bias is None else along(x.bias, q, 0)) for x in ffn.inputs]
        ffn = Ffn(inputs, Linear(along(ffn.output.weight, q, 1)))
    return LayerWeights(att, ffn)


def stream_kind(plan: ResidualPlan) -> str:
    return "permutation" if not plan.orthogonal else "keeps_ones" if plan.keeps_ones else "orthogonal"


@dataclass
class Builder:
    """The matched copy, folded, and how to turn maps into its transformed tensors."""

    model: OpenedModel
    plans: dict[str, ResidualPlan]
    layers: list[LayerId]
    base: dict[str, torch.Tensor]  # float64, folded, on the device
    gains: dict[str, torch.Tensor]  # the copy's own norm gains (what it is unfolded into)
    device: str

    @classmethod
    def of(cls, model: OpenedModel, layers: list[LayerId], symmetries: frozenset[str], device: str) -> Builder:
        checkpoint = model.checkpoint
        plans = residual_plans(model.bound, checkpoint) if RESIDUAL in symmetries else {}
        gain_names = {fold.gain for plan in plans.values() for fold in plan.folds}
        gains = {name: checkpoint.get(name).double() for name in gain_names}
        base: dict[str, torch.Tensor] = {}
        stack_of = {name: stack for stack, plan in plans.items() for name in plan.tensors}
        for name in checkpoint.names():
            if checkpoint.entry(name).dtype not in FLOAT_DTYPES:
                continue
            value = checkpoint.get(name).double()
            if name in stack_of:
                plan = plans[stack_of[name]]
                value = plan.transform(name, value, StreamMap.identity(plan.hidden_size), lambda g: gains[g])
            base[name] = value.to(device)
        return cls(model, plans, layers, base, {k: v.to(device) for k, v in gains.items()}, device)

    def make_maps(self, symmetries: frozenset[str]) -> torch.nn.ModuleDict:
        maps = torch.nn.ModuleDict()
        for stack, plan in self.plans.items():
            maps[f"stream{stack}"] = StreamMaps(plan.hidden_size, stream_kind(plan))
        view = _Tensors(self.base, self.model.folder)
        for layer in self.layers:
            settings = layer_settings(self.model.bound, layer, symmetries, 1)
            weights = read_layer(cast(Any, view), self.model.bound, layer, self.device)
            att = weights.attention
            maps[f"layer{layer.stack}_{layer.index}"] = LayerMaps(
                settings.symmetries - {RESIDUAL} - ({FFN_PERM} if weights.ffn is None else set()),
                att.num_kv_heads,
                att.head_dim,
                weights.ffn.width if weights.ffn is not None else 0,
                settings.rotary_dim,
            )
        return maps.to(self.device)

    def transformed(
        self, maps: torch.nn.ModuleDict, dtype: torch.dtype, exact: bool = False
    ) -> dict[str, torch.Tensor]:
        """Every floating tensor of g(copy), in `dtype` (gradients flow to `maps` unless `exact`)."""
        values = {name: value.to(dtype) for name, value in self.base.items()}
        for stack, plan in self.plans.items():
            q = cast(StreamMaps, maps[f"stream{stack}"]).matrix(exact).to(dtype)
            folded = {fold.gain for fold in plan.folds}
            for name, entry in plan.tensors.items():
                if name in values and name not in folded:  # folded gains are all ones: nothing to move
                    value = values[name]
                    for axis in entry.axes:
                        value = along(value, q, axis)
                    values[name] = value
        view = _Tensors(values, self.model.folder)
        for layer in self.layers:
            weights = read_layer(cast(Any, view), self.model.bound, layer, self.device)
            moved = apply_layer(cast(LayerMaps, maps[f"layer{layer.stack}_{layer.index}"]), weights, exact)
            write_layer(cast(Any, _Collect(values)), self.model.bound, layer, moved)
        for plan in self.plans.values():
            for name in plan.tensors:
                if name in values:
                    values[name] = plan.unfold(name, values[name], lambda g: self.gains[g].to(dtype))
        return values
