"""Function preservation, the one way every test checks it: run both checkpoints with transformers on
the same deterministic inputs and compare every output, relative to its scale (`assert_same_function`).

The tolerance rule: |a - b| <= rel * max(|a|_max, 1) per output tensor, rel = 2e-5 by default --
float32 rounding of a transformed model on tiny random inputs, far below what any broken symmetry
gives (tests/archs/test_archs_necessity.py shows those at 1e-2 and above)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from helpers.tiny_models import save_tiny
from rotfuse.eval.runtime import example_inputs, forward, load_model, main_output


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster on a machine whose cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def save_pair(tiny: str, root: Path, **overrides: Any) -> tuple[Path, Path]:
    """A tiny model (seed 0) and a different-seed anchor (seed 1) of the same config."""
    model = save_tiny(tiny, root / "model", seed=0, **overrides)
    anchor = save_tiny(tiny, root / "anchor", seed=1, **overrides)
    return model, anchor


def output_tensors(outputs: Any) -> list[torch.Tensor]:
    """Every floating tensor a model returned (nested outputs too, e.g. CLIP's two towers)."""
    if isinstance(outputs, torch.Tensor):
        return [outputs] if outputs.is_floating_point() else []
    if hasattr(outputs, "to_tuple"):
        outputs = outputs.to_tuple()
    if isinstance(outputs, (tuple, list)):
        return [t for item in outputs for t in output_tensors(item)]
    return []


def run(folder: Path, seeds: tuple[int, ...] = (0, 1), main_only: bool = False) -> list[torch.Tensor]:
    """The outputs of a checkpoint on a few deterministic example batches: all of them, or only
    the main one (logits; hidden states without a head)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    model = load_model(folder)
    results = [forward(model, example_inputs(config, batch=2, seq_len=12, seed=seed)) for seed in seeds]
    if main_only:
        return [main_output(result) for result in results]
    return [t for result in results for t in output_tensors(result)]


def max_relative_change(a: Path, b: Path, main_only: bool = False) -> float:
    """Largest output difference between two checkpoints, relative to each output's scale."""
    outs_a, outs_b = run(a, main_only=main_only), run(b, main_only=main_only)
    assert len(outs_a) == len(outs_b) > 0
    return max((x - y).abs().max().item() / max(x.abs().max().item(), 1.0) for x, y in zip(outs_a, outs_b))


def assert_same_function(a: Path, b: Path, rel: float = 2e-5, main_only: bool = False) -> None:
    """Every output of `b` equals `a`'s (with `main_only`, the main output: a residual map moves
    auxiliary outputs that are the stream itself, e.g. CLIP's towers' hidden states)."""
    change = max_relative_change(a, b, main_only)
    assert change <= rel, f"{b}: outputs differ from {a} by {change:.3g} (relative)"


def outputs(folder: Path, seed: int = 0) -> torch.Tensor:
    """The checkpoint's main output (logits, or hidden states without a head) on example inputs."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return main_output(forward(load_model(folder), example_inputs(config, batch=3, seq_len=11, seed=seed)))
