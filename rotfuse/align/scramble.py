"""`rotfuse scramble`: a copy of a model moved by a random member of its symmetry group."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.align.copy import write_copy
from rotfuse.align.layer import scramble_layer
from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import layer_settings, open_model, select_layers
from rotfuse.align.pool import Stream
from rotfuse.align.residual.scores import StreamSide
from rotfuse.align.residual.setup import gains_from, prepare_residual
from rotfuse.archs.bind import LayerId
from rotfuse.core.device import resolve_device
from rotfuse.core.progress import Progress
from rotfuse.io.staging import StagedFolder, Target, check_outputs
from rotfuse.io.writer import side_files
from rotfuse.symmetry.residual import random_stream_map
from rotfuse.symmetry.weights import LayerWeights


def scramble(
    model_path: Path,
    out: Path,
    options: MatchOptions,
    seed: int,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write a copy of MODEL moved by a random member of the symmetry group (same function)."""
    device = resolve_device(options.device)
    model = open_model(model_path, options.arch, options.arch_spec, options.allow_nonfinite)
    check_outputs([Target(out, "-o")], [model_path, options.arch_spec], overwrite)
    side_files(model.checkpoint)
    layers = select_layers(model.bound, options.layers)
    residual = prepare_residual(model, model, options)

    def generator(label: str) -> torch.Generator:
        # one generator per layer: the same seed gives the same output whatever the thread timing
        digest = hashlib.sha256(f"{seed}:{label}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    side = StreamSide(model.checkpoint, {}, {})
    if residual is not None:
        side = residual.model.moved(
            {  # a copy in the model's own gains, as a differently trained model has
                stack: random_stream_map(p.hidden_size, p.orthogonal, generator(f"residual:{stack}"), p.keeps_ones)
                for stack, p in residual.model.plans.items()
            },
            gains_from(model, model, residual.model)[0],
        )

    def transform(layer: LayerId, weights: LayerWeights) -> tuple[LayerWeights, None]:
        settings = layer_settings(model.bound, layer, options.symmetries, options.max_rounds, options.allow_nonfinite)
        return scramble_layer(weights, settings, generator(str(layer))), None

    with StagedFolder(out, overwrite, options.fsync) as staged:
        write_copy(
            model,
            staged.path,
            layers,
            device,
            options.workers,
            transform,
            side,
            Stream(),
            progress,
            fsync=options.fsync,
            allow_nonfinite=options.allow_nonfinite,
        )
        staged.commit()
    return {
        "tool": "rotfuse",
        "version": __version__,
        "command": "scramble",
        "model": str(model_path),
        "output": str(out),
        "arch": model.bound.spec.name,
        "seed": seed,
        "symmetries": sorted(model.bound.applicable(options.symmetries)),
        "layers": [str(layer) for layer in layers],
        "restrictions": model.bound.notes,
        **({"residual": residual.describe(options)} if residual is not None else {}),
    }
