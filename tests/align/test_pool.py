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
