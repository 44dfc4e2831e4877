"""The experiments' training recipe (experiment_digits.py, experiment_gpt2.py): AdamW with weight
decay 0.01 under a one-cycle learning-rate schedule, one step per batch, then saved as a checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch


def fit_and_save(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], lr: float, total_steps: int, folder: Path
) -> Path:
    """Train `model` on `batches` (model inputs with labels; `total_steps` of them) and save it to `folder`."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps)
    for inputs in batches:
        loss = model(**inputs).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    model.save_pretrained(str(folder))  # type: ignore[operator]
    return folder
