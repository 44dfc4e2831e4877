"""The streaming pass shared by every command that walks a checkpoint layer by layer.

Layers are read and transformed in a small thread pool and handed back in order, so memory is a
few layers whatever the depth (tests/align/test_pool.py guards this).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from rotfuse.archs.bind import LayerId
from rotfuse.archs.layer_io import (
    TensorView,
    layer_tensor_names,
    read_layer,
    write_layer,
)
from rotfuse.core.progress import Progress
from rotfuse.core.report import Timings
from rotfuse.symmetry.weights import LayerWeights

if TYPE_CHECKING:
    from rotfuse.align.pair import OpenedModel
    from rotfuse.io.writer import CheckpointWriter

T = TypeVar("T")


@dataclass
class Stream:
    """Shared state of one streaming pass: timings (summed over worker threads) and the tensors
    already handled."""

    timings: Timings = field(default_factory=Timings)
    handled: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def timed(self, stage: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            return fn()
        finally:
            with self.lock:
                self.timings.add(stage, time.perf_counter() - start)


@contextmanager
def threads_per_op(workers: int) -> Iterator[None]:
    """Split torch's intra-op threads among `workers` threads that each run their own ops.

    Every op fanning out over all cores from each of several threads oversubscribes the cores,
    and OpenMP's spin-waiting turns that into a loss on small ops. Threads started inside take
    the new count.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, before // max(1, workers)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def transform_layers(
    model: OpenedModel,
    writer: CheckpointWriter | None,
    layers: list[LayerId],
    device: str,
    transform: Callable[[LayerId, LayerWeights], tuple[LayerWeights, T]],
    stream: Stream,
    progress: Progress | None,
    workers: int,
    view: TensorView | None = None,
    stored_ffn: bool = False,
    alongside: Callable[[], None] | None = None,
    meanwhile: Callable[[], None] | None = None,
) -> list[T]:
    """Read and transform layers in a small thread pool, write them in order on this thread.

    Reading (safetensors), torch math and scipy's assignment solver all release the GIL, so with
    `workers` threads one layer's I/O overlaps another's solve and independent layers' FFN
    assignments run concurrently. At most `workers + 1` layers are in flight: memory stays a few
    layers whatever the depth. Returns each layer's extra result, in layer order. `view` sees
    every tensor as it is read, `stored_ffn` keeps FFN tensors in their stored dtype (see
    layer_io.read_layer); without a writer nothing is written. `alongside` runs in the pool after
    the last layer is taken (work that needs no writer, such as measuring the tensors outside the
    layers), on a thread that would otherwise idle while the last layers finish. `meanwhile` runs
    on this thread once the first layers are in the pool, before any layer is written (work for the
    writer that would otherwise keep the pool waiting, such as copying the tensors outside the
    layers).
    """

    def job(layer: LayerId) -> tuple[LayerWeights, LayerWeights, T]:
        weights = stream.timed(
            "read", lambda: read_layer(model.checkpoint, model.bound, layer, device, view, stored_ffn)
        )
        return (weights, *transform(layer, weights))

    extras: list[T] = []
    pending: deque[tuple[LayerId, Future]] = deque()

    def finish_oldest() -> None:
        layer, future = pending.popleft()
        as_read, new, extra = future.result()
        names = layer_tensor_names(model.bound, layer, model.checkpoint)
        if writer is not None:  # without a view, parts left as they were are copied, not rewritten
            stream.timed("write", lambda: write_layer(writer, model.bound, layer, new, None if view else as_read))
            if writer.template is not None:
                stream.timed("copy", lambda: writer.copy_unwritten(names))
        stream.handled.update(names)
        extras.append(extra)
        if progress:
            progress(len(extras), len(layers))

    with threads_per_op(workers):
        pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="rotfuse-layer")
        try:
            for layer in layers:
                pending.append((layer, pool.submit(job, layer)))
                if len(pending) > workers:
                    if meanwhile is not None:
                        meanwhile()
                        meanwhile = None
                    finish_oldest()
            # queued after every layer: the first thread that finds no layer left takes it, while
            # the others finish theirs (first, it would hold a thread back from the first layers)
            side_job = pool.submit(alongside) if alongside is not None else None
            if meanwhile is not None:
                meanwhile()
            while pending:
                finish_oldest()
            if side_job is not None:
                side_job.result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    return extras
