"""The streaming design, guarded functionally (no timings): the number of tensors the loader has
handed out and that are still alive stays bounded by a few layers, however deep the model."""

from __future__ import annotations

import gc
import weakref

import pytest
from helpers.tiny_models import save_tiny

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.io.checkpoint import Checkpoint


class LiveTensorCounter:
    """Wraps Checkpoint.get: counts tensors handed out and not yet garbage-collected."""

    def __init__(self, monkeypatch):
        self.live = 0
        self.peak = 0
        original = Checkpoint.get

        def counted(checkpoint, name, device="cpu"):
            tensor = original(checkpoint, name, device)
            self.live += 1
            self.peak = max(self.peak, self.live)
            weakref.finalize(tensor, self._release)
            return tensor

        monkeypatch.setattr(Checkpoint, "get", counted)

    def _release(self) -> None:
        self.live -= 1


def peak_live_tensors(tmp_path, monkeypatch, layers: int, workers: int) -> int:
    sizes = dict(num_hidden_layers=layers)
    model = save_tiny("bert", tmp_path / f"model{layers}", seed=0, **sizes)
    anchor = save_tiny("bert", tmp_path / f"anchor{layers}", seed=1, **sizes)
    counter = LiveTensorCounter(monkeypatch)
    gc.collect()
    match(anchor, model, tmp_path / f"out{layers}", MatchOptions(device="cpu", workers=workers))
    gc.collect()
    assert counter.live == 0  # nothing leaked
    monkeypatch.undo()
    return counter.peak


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_live_tensors_do_not_grow_with_depth(tmp_path, monkeypatch, workers):
    shallow = peak_live_tensors(tmp_path, monkeypatch, layers=2, workers=workers)
    deep = peak_live_tensors(tmp_path, monkeypatch, layers=8, workers=workers)
    per_layer = 2 * 12  # both checkpoints: q, k, v (+bias), o, ffn in (+bias), ffn out
    assert deep <= shallow + per_layer  # a layer or so of jitter from thread timing, no growth
    assert deep <= (workers + 2) * per_layer


def test_scramble_is_deterministic_across_worker_counts(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0, num_hidden_layers=4)
    scramble(model, tmp_path / "one", MatchOptions(device="cpu", workers=1), seed=9)
    scramble(model, tmp_path / "three", MatchOptions(device="cpu", workers=3), seed=9)
    assert (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "three" / "model.safetensors"
    ).read_bytes()


def test_threads_per_op_are_shared_among_workers_and_restored(tmp_path, monkeypatch):
    import threading

    import torch

    seen: list[int] = []
    original = Checkpoint.get

    def recording(checkpoint, name, device="cpu"):
        if threading.current_thread().name.startswith("rotfuse-layer"):
            seen.append(torch.get_num_threads())
        return original(checkpoint, name, device)

    model = save_tiny("bert", tmp_path / "model", seed=0)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    before = torch.get_num_threads()
    monkeypatch.setattr(Checkpoint, "get", recording)
    match(anchor, model, tmp_path / "out", MatchOptions(device="cpu", workers=2))
    assert torch.get_num_threads() == before
    assert seen and max(seen) <= max(1, before // 2)


@pytest.mark.parametrize(("layers", "workers"), [(4, 2), (2, 2), (3, 1)])
def test_the_tensors_outside_the_layers_are_copied_while_the_first_layers_run(tmp_path, monkeypatch, layers, workers):
    """`match` copies the tensors outside the layers (embeddings, final norm) on the writing
    thread once the first layers are in the pool -- not before, keeping the pool waiting -- and
    before any layer is written (their shards first, as before); the output is the same."""
    import threading

    from rotfuse.io.writer import CheckpointWriter

    events: list[str] = []
    submitted = threading.Event()
    original_copy, original_write = CheckpointWriter.copy_unwritten, CheckpointWriter.write
    original_get = Checkpoint.get

    def get(checkpoint, name, device="cpu"):
        if threading.current_thread().name.startswith("rotfuse-layer") and ".layer." in name:
            submitted.set()
        return original_get(checkpoint, name, device)

    def copy_unwritten(writer, names):
        if not events:  # the first copy: the tensors outside the layers
            events.append("copy outside" if submitted.wait(timeout=10) else "copy before any layer ran")
        return original_copy(writer, names)

    def write(writer, name, tensor):
        events.append("write layer")
        return original_write(writer, name, tensor)

    sizes = dict(num_hidden_layers=layers)
    model = save_tiny("bert", tmp_path / "model", seed=0, **sizes)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1, **sizes)
    match(anchor, model, tmp_path / "before", MatchOptions(device="cpu", workers=workers))
    monkeypatch.setattr(Checkpoint, "get", get)
    monkeypatch.setattr(CheckpointWriter, "copy_unwritten", copy_unwritten)
    monkeypatch.setattr(CheckpointWriter, "write", write)
    match(anchor, model, tmp_path / "after", MatchOptions(device="cpu", workers=workers))
    assert events[0] == "copy outside" and "write layer" in events[1:]
    same = (tmp_path / "before" / "model.safetensors").read_bytes() == (
        tmp_path / "after" / "model.safetensors"
    ).read_bytes()
    assert same
