"""Which layers each rank of a distributed job transforms, and putting the ranks' results back
together in layer order (so reports and sums are those of one process)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from rotfuse.align.pair import OpenedModel
from rotfuse.archs.bind import LayerId
from rotfuse.archs.layer_io import layer_tensor_names
from rotfuse.core.distributed import Group, assign
from rotfuse.core.report import Timings

IO_BYTES_PER_S = 1e9  # rough rates: only the ratio between layers and ranks matters
FLOPS_PER_S = 2e10


def layer_cost(model: OpenedModel, layer: LayerId, ffn_perm: bool) -> float:
    """Estimated seconds for one layer: its bytes read and written, plus the FFN assignment's score
    GEMM (dff^2 * hidden, from the layer's largest matrix) when FFN permutation is on -- it dominates."""
    entries = [model.checkpoint.entry(n) for n in layer_tensor_names(model.bound, layer, model.checkpoint)]
    seconds = 2 * sum(e.nbytes for e in entries) / IO_BYTES_PER_S
    if ffn_perm:
        matrices = [e.shape for e in entries if len(e.shape) == 2]
        if matrices:
            rows, cols = max(matrices, key=lambda s: s[0] * s[1])
            seconds += 2.0 * max(rows, cols) ** 2 * min(rows, cols) / FLOPS_PER_S
    return seconds


def my_layers(
    group: Group, model: OpenedModel, layers: Sequence[LayerId], ffn_perm: bool, outside_bytes: int = 0
) -> list[LayerId]:
    """This rank's layers, in layer order: balanced by estimated cost, rank 0 starting with the
    tensors outside the layers (it copies or moves them)."""
    costs = [layer_cost(model, layer, ffn_perm) for layer in layers]
    start = [2 * outside_bytes / IO_BYTES_PER_S] + [0.0] * (group.world - 1)
    owner = assign(costs, group.world, start)
    return [layer for layer, rank in zip(layers, owner) if rank == group.rank]


def in_layer_order(group: Group, layers: Sequence[LayerId], mine: Sequence[LayerId], rows: Sequence[Any]) -> list[Any]:
    """Every rank's per-layer rows, gathered and put back in the order of `layers`."""
    position = {layer: i for i, layer in enumerate(layers)}
    placed: list[Any] = [None] * len(layers)
    for ranks_layers, ranks_rows in group.gather((list(mine), list(rows))):
        for layer, row in zip(ranks_layers, ranks_rows):
            placed[position[layer]] = row
    return placed


def merge_timings(group: Group, timings: Timings) -> None:
    """Sum every rank's stage seconds into `timings` (seconds summed over threads and ranks)."""
    everyone = group.gather(dict(timings.seconds))
    timings.seconds.clear()
    for seconds in everyone:
        for stage, value in seconds.items():
            timings.add(stage, value)


def summable_in_layer_order(
    group: Group,
    layers: Sequence[LayerId],
    mine: Sequence[LayerId],
    rows: Sequence[tuple[dict[str, torch.Tensor], float]],
) -> list[tuple[dict[str, torch.Tensor], float]]:
    """Every layer's (score matrix per stream, distance) on every rank, in the order of `layers`.

    Each matrix is all-reduced from its owner's copy and zeros elsewhere: x + 0 is exact, so the
    caller sums the very floats one process sums, in the same order (partial sums per rank would
    round differently and change the residual map's bytes). One matrix at a time travels.
    """
    import torch.distributed as dist

    shapes = in_layer_order(
        group,
        layers,
        mine,
        [
            ({stream: (tuple(c.shape), str(c.dtype).removeprefix("torch.")) for stream, c in parts.items()}, after)
            for parts, after in rows
        ],
    )
    own = {layer: row[0] for layer, row in zip(mine, rows)}
    result = []
    for layer, (described, after) in zip(layers, shapes):
        parts = {}
        for stream in sorted(described):
            shape, dtype = described[stream]
            mine_part = own[layer][stream] if layer in own else None
            where = mine_part.device if mine_part is not None else torch.device("cpu")
            buffer = (
                mine_part.to(group.device, copy=True)
                if mine_part is not None
                else torch.zeros(shape, dtype=getattr(torch, dtype), device=group.device)
            )
            dist.all_reduce(buffer, group=group.tensors)
            parts[stream] = buffer.to(where)
        result.append((parts, after))
    return result
