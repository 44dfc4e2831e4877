"""Opening a checkpoint with its architecture spec, and checking that two of them can be matched."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rotfuse.align.layer import LayerSettings
from rotfuse.align.residual.scores import StreamSide
from rotfuse.archs.bind import BoundArch, LayerId, bind, select_spec
from rotfuse.archs.layer_io import check_layer_pair, layer_tensor_names
from rotfuse.core.errors import InputError, UsageError
from rotfuse.core.selection import LayerRanges
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.compat import PairRule, compare_tensors


@dataclass
class OpenedModel:
    """A checkpoint and its architecture spec bound to it."""

    checkpoint: Checkpoint
    bound: BoundArch

    @property
    def folder(self) -> Path:
        return self.checkpoint.folder


def open_model(
    path: Path, arch: str | None = None, arch_spec: Path | None = None, allow_nonfinite: bool = False
) -> OpenedModel:
    checkpoint = Checkpoint.open(path, allow_nonfinite=allow_nonfinite)
    where = str(Path(path) / "config.json")
    spec = select_spec(checkpoint.config, arch, arch_spec, where=where)
    return OpenedModel(checkpoint, bind(spec, checkpoint.config, checkpoint, where=str(path)))


def folded_view(path: Path) -> StreamSide:
    """A checkpoint as the residual search compares it: every foldable norm folded into its
    readers, the stream not moved -- values that do not depend on how the model splits a scale
    between a norm and the weights after it."""
    from rotfuse.archs.residual import residual_plans

    model = open_model(path)
    return StreamSide.unmoved(model.checkpoint, residual_plans(model.bound, model.checkpoint))


def counterpart(name: str, model: OpenedModel, anchor: OpenedModel) -> str:
    """The anchor's name for a model tensor (their key prefixes may differ, e.g. bert. vs none, and
    their naming eras, the spec's `renames`)."""
    prefix = model.bound.prefix
    if model.bound.layout != anchor.bound.layout:
        return anchor.bound.name(model.bound.canonical(name))
    if prefix and name.startswith(prefix):
        return anchor.bound.prefix + name[len(prefix) :]
    if not prefix and anchor.bound.prefix and not name.startswith(anchor.bound.prefix):
        candidate = anchor.bound.prefix + name
        if candidate in anchor.checkpoint:
            return candidate
    return name


def check_compatible(anchor: OpenedModel, model: OpenedModel) -> list[str]:
    """Refuse pairs that cannot be matched; return the names of model tensors without an anchor twin."""
    if anchor.bound.spec.name != model.bound.spec.name:
        raise InputError(
            f"{model.folder}: architecture {model.bound.spec.name!r} differs from the anchor's "
            f"{anchor.bound.spec.name!r}"
        )
    rule = PairRule(rename=lambda name: counterpart(name, model, anchor), extra_ok=True, missing_ok=True)
    unpaired = compare_tensors(anchor.checkpoint, model.checkpoint, rule).extra
    for stack, dims in model.bound.dims.items():
        theirs = anchor.bound.dims[stack]
        for key, value in vars(dims).items():
            if value != getattr(theirs, key):
                where = f"{stack} " if stack else ""
                raise InputError(
                    f"{model.folder / 'config.json'}: {where}{key} is {value} but the anchor's is "
                    f"{getattr(theirs, key)}"
                )
    for layer in model.bound.layers():
        check_layer_pair(model.checkpoint, model.bound, anchor.checkpoint, anchor.bound, layer)
    return unpaired


def in_layers(model: OpenedModel, layers: list[LayerId]) -> set[str]:
    """Every tensor name the layers' symmetries read and write."""
    return {n for layer in layers for n in layer_tensor_names(model.bound, layer, model.checkpoint)}


def select_layers(bound: BoundArch, wanted: LayerRanges | frozenset[int] | None) -> list[LayerId]:
    """The layers `--layers` names, checked against the model's count before any is used (ranges
    are never expanded: `--layers 0-99999999999` is refused at once)."""
    layers = bound.layers()
    if wanted is None:
        return layers
    available = {layer.index for layer in layers}
    if isinstance(wanted, LayerRanges):
        missing = wanted.first_missing(available)
    else:
        missing = min(wanted - available, default=None)
    if missing is not None:
        raise UsageError(f"--layers: layer {missing} does not exist (the model has layers 0-{max(available)})")
    return [layer for layer in layers if layer.index in wanted]


def layer_settings(
    bound: BoundArch, layer: LayerId, symmetries: frozenset[str], max_rounds: int, allow_nonfinite: bool = True
) -> LayerSettings:
    return LayerSettings(
        symmetries=symmetries - bound.disabled_in(layer.stack),
        rotary_dim=bound.dims[layer.stack].rotary_dim,
        max_rounds=max_rounds,
        may_be_nonfinite=allow_nonfinite,
    )
