"""Which live parameter of the transformers model holds which checkpoint tensor.

transformers 5 renames modules in memory and converts on load (docs/design/symmetries.md section 8),
so names are never built by hand: a copy of the checkpoint whose float tensor number k holds the
value k + 1 everywhere is loaded once, and each live parameter is read back. A live tensor holding
several codes (fused or split on load) is refused: it cannot be fed by name."""

from __future__ import annotations

from pathlib import Path

import torch

from rotfuse.core.errors import InputError
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.staging import temporary_folder
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like


def live_names(checkpoint: Checkpoint, work_dir: Path | None = None) -> dict[str, list[str]]:
    """Checkpoint name -> the live state_dict names (parameters and buffers) that load it."""
    from rotfuse.eval.runtime import load_model

    floats = [n for n in checkpoint.names() if checkpoint.entry(n).dtype in FLOAT_DTYPES]
    with temporary_folder("names", work_dir) as tmp:
        folder = Path(tmp) / "probe"
        folder.mkdir()
        writer = CheckpointWriter(folder, plan_like(checkpoint, "F32"), checkpoint, fsync=False)
        try:
            for code, name in enumerate(floats, start=1):
                writer.write(name, torch.full(tuple(checkpoint.entry(name).shape), float(code)))
            writer.finish()
        finally:
            writer.abort()
        copy_side_files(checkpoint, folder)
        model = load_model(folder, "cpu", torch.float32)
    found: dict[str, list[str]] = {}
    for live, value in model.state_dict().items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        codes = torch.unique(value)
        if len(codes) != 1:
            raise InputError(
                f"{checkpoint.folder}: transformers builds {live!r} from several checkpoint tensors "
                "(fused on load), so learned matching cannot feed it by name"
            )
        code = int(codes[0])
        if float(code) == float(codes[0]) and 1 <= code <= len(floats):
            name = floats[code - 1]
            if tuple(value.shape) != tuple(checkpoint.entry(name).shape):
                raise InputError(
                    f"{checkpoint.folder}: {name!r} is reshaped on load into {live!r}; learned "
                    "matching cannot feed it by name"
                )
            found.setdefault(name, []).append(live)
    return found
