"""Writing a transformed copy of a checkpoint: layers through a transform, every other tensor
moved with the residual stream or copied byte for byte, side files, config updates."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import torch

from rotfuse.align.pair import OpenedModel, counterpart, in_layers
from rotfuse.align.pool import Stream, transform_layers
from rotfuse.align.residual.scores import StreamSide
from rotfuse.archs.bind import LayerId
from rotfuse.core import distributed
from rotfuse.core.progress import Progress
from rotfuse.core.report import Distance
from rotfuse.core.tensors import sq_distance
from rotfuse.io.writer import CheckpointWriter, ShardPlan, copy_side_files, open_writer, plan_like, side_files


def _layout(model: OpenedModel, side: StreamSide) -> list[ShardPlan]:
    """The model's own layout, plus the heads an untie adds (next to the tensor they start from)."""
    plans = plan_like(model.checkpoint)
    for residual in side.plans.values():
        for new, source in residual.added.items():
            entry = model.checkpoint.entry(source)
            target = next(p for p in plans if any(name == source for name, _, _ in p.tensors))
            target.tensors.append((new, entry.dtype, entry.shape))
    return plans


class _Expressing:
    """A CheckpointWriter whose every tensor goes through `side.express` first."""

    def __init__(self, writer: CheckpointWriter, side: StreamSide):
        self._writer, self._side = writer, side

    def write(self, name: str, tensor: torch.Tensor) -> None:
        self._writer.write(name, self._side.express(name, tensor))

    def __getattr__(self, attribute: str) -> Any:  # finish, abort, copy: as they are
        return getattr(self._writer, attribute)


def write_copy(
    model: OpenedModel,
    folder: Path,
    layers: list[LayerId],
    device: str,
    workers: int,
    transform: Any,
    side: StreamSide,
    stream: Stream,
    progress: Progress | None,
    anchor: OpenedModel | None = None,
    anchor_side: StreamSide | None = None,
    unmoved: StreamSide | None = None,
    stored_ffn: bool = False,
    fsync: bool = True,
    allow_nonfinite: bool = False,
    ffn_perm: bool = False,
) -> tuple[list[Any], Distance, list[str]]:
    """Write MODEL into `folder`: layers through `transform` (read through `side.view`, FFN
    tensors in their stored dtype with `stored_ffn`), every other tensor moved with the stream or
    copied byte for byte. With an anchor, also returns the distance over the tensors outside the
    layers (before: `unmoved`, after: `side`). What is written goes through `side.express` (the
    norm gains the copy is expressed in).

    In a distributed job (core/distributed.py) each rank transforms its share of the layers
    (`ffn_perm`: the FFN assignment dominates their cost) and writes them at their offsets in the
    same files; rank 0 also writes every other tensor, the index and the side files. Every rank
    returns the rows of all layers, in layer order."""
    group = distributed.current()
    main = group is None or group.is_main
    writer: Any = open_writer(folder, _layout(model, side), model.checkpoint, fsync, allow_nonfinite, group)
    if side.into is not None:
        writer = _Expressing(writer, side)
    outside = Distance()
    layer_names = in_layers(model, layers)
    rest = [n for n in model.checkpoint.names() if n not in layer_names]
    mine = layers
    if group is not None:
        from rotfuse.align.share import my_layers

        mine = my_layers(group, model, layers, ffn_perm, sum(model.checkpoint.entry(n).nbytes for n in rest))
        ours = in_layers(model, mine)  # rank 0: and every tensor outside the layers
        writer.leave_to_others([n for n in writer.pending if n not in ours and (n in layer_names or not main)])
    fixed, moving = [n for n in rest if not side.on_stream(n)], [n for n in rest if side.on_stream(n)]
    against = (anchor, anchor_side, unmoved) if anchor and anchor_side and unmoved else None

    def measure(name: str, raw: torch.Tensor, moved: torch.Tensor | None = None) -> None:
        assert against is not None
        theirs, theirs_side, before_side = against
        other = counterpart(name, model, theirs)
        if other in theirs.checkpoint:
            ref = theirs_side.read(other)
            before = sq_distance(before_side.view(name, raw), ref)
            outside.add(before, before if moved is None else sq_distance(moved, ref))

    def measure_fixed() -> None:
        for name in fixed:
            measure(name, model.checkpoint.get(name))

    def copy_fixed() -> None:  # before the layers: their shards are flushed early
        stream.timed("copy", lambda: writer.copy_unwritten(fixed))

    def write_all() -> list[Any]:
        rows = transform_layers(
            model,
            writer,
            mine,
            device,
            transform,
            stream,
            progress,
            workers,
            view=side.layer_view,
            stored_ffn=stored_ffn,
            alongside=measure_fixed if against and main else None,
            meanwhile=copy_fixed if main else None,
        )
        for name in moving if main else ():
            raw = stream.timed("read", partial(model.checkpoint.get, name))
            moved = side.view(name, raw)
            stream.timed("write", partial(writer.write, name, moved))
            if against:
                measure(name, raw, moved)
        for residual in side.plans.values() if main else ():
            for new, source in residual.added.items():
                writer.write(new, side.read(new, source))
        stream.timed("copy", lambda: writer.finish(index=main))
        return rows

    try:
        rows = write_all() if group is None else group.agree("write layers", write_all)
    finally:
        writer.abort()
    if group is not None:
        from rotfuse.align.share import in_layer_order, merge_timings

        rows = in_layer_order(group, layers, mine, rows)
        outside = group.broadcast(outside)
        merge_timings(group, stream.timings)
        return (
            rows,
            outside,
            group.agree(
                "side files",
                lambda: _side_files(model, side, folder) if main else list(side_files(model.checkpoint).skipped),
            ),
        )
    return rows, outside, _side_files(model, side, folder)


def _side_files(model: OpenedModel, side: StreamSide, folder: Path) -> list[str]:
    """Config, tokenizer and the like, with the config updates the stream maps need."""
    skipped = copy_side_files(model.checkpoint, folder)
    updates = {k: v for p in side.plans.values() for k, v in p.config_updates.items()}
    if updates:
        config_path = folder / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **updates}, indent=2) + "\n")
    return skipped
