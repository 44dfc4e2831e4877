"""The optimisation: Adam on the map parameters (the relaxed FFN and head permutation matrices at a
rate of their own) for the loss of (1 - l) ANCHOR + l g(COPY) on the training data, l = 0.5
('fixed'), uniform in [0.3, 0.7] ('uniform') or in [0, 1] ('full') each step, at a constant
learning rate or one decayed to 0 along a cosine ('cosine'); then the exact maps (hard
permutations, rotations recomputed in float64) are applied and written: those of the last step,
or (keep='best', with held-out data) those of the logged step whose held-out loss was lowest --
early stopping on data the optimiser never saw.

The whole training set is scored before and after; the logged steps in between score a fixed
random subset of it (LOG_SAMPLES inputs) and the whole held-out set: on a training set of
thousands of inputs, scoring all of it every few steps took longer than the steps themselves.

The live model runs through `torch.func.functional_call` with the averaged tensors under its own
names (names.py), so any architecture `match` supports and transformers loads works."""

from __future__ import annotations

import copy as copying
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rotfuse.align.learned.build import Builder
from rotfuse.align.learned.maps import largest_condition, limit_conditions, relaxed_permutations
from rotfuse.align.learned.names import live_names
from rotfuse.align.learned.objective import batch_loss
from rotfuse.align.options import LAMBDA_RANGES, check_learn_choices
from rotfuse.align.pair import OpenedModel, counterpart, open_model
from rotfuse.archs.bind import LayerId
from rotfuse.core.errors import UsageError
from rotfuse.core.progress import Progress, show_note, start_stage
from rotfuse.eval.score import LABELS_ENSEMBLE, LossSpec, ensemble_labels, located, loss_spec, probabilities, score
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like

GIB = 1024**3
LOG_SAMPLES = 512  # training inputs the logged steps score (before and after: all of them)


@dataclass(frozen=True)
class LearnSettings:
    data: Path
    eval_data: Path | None = None
    steps: int = 300
    rate: float = 1e-2
    schedule: str = "uniform"
    seed: int = 0
    batch_size: int = 64
    log_every: int = 25
    device: str = "cpu"
    max_samples: int | None = None
    keep: str = "last"  # or "best": the logged step with the lowest held-out loss
    decay: str = "constant"  # or "cosine": the rate falls to 0 along a half cosine over the steps
    log_samples: int | None = None  # training inputs the logged steps score (None: LOG_SAMPLES)
    perm_rate: float | None = None  # the relaxed FFN/head permutation matrices' rate (None: `rate`)

    @property
    def permutation_rate(self) -> float:
        return self.rate if self.perm_rate is None else self.perm_rate


def memory_need(model: OpenedModel, inputs: dict[str, torch.Tensor], batch_size: int) -> int:
    """Bytes: the copy folded in float64, anchor and averaged tensors, maps, gradients and Adam
    (~ 20 bytes a parameter), and a batch's activations (Korthikanti et al.: s b h (34 + 5 a s / h)
    per layer at 2 bytes, doubled for float32), with logits."""
    params = sum(int(torch.Size(model.checkpoint.entry(n).shape).numel()) for n in model.checkpoint.names())
    first = next(iter(inputs.values()))
    seq = int(first.shape[1]) if first.dim() >= 2 and "input_ids" in inputs else 1
    if "pixel_values" in inputs:
        config = model.checkpoint.config.get("vision_config") or model.checkpoint.config
        seq = (int(config.get("image_size", 1)) // int(config.get("patch_size", 1))) ** 2 + 1
    acts = 0
    for dims in model.bound.dims.values():
        layers = len(model.bound.layers())
        h, a = dims.hidden_size, dims.num_heads
        acts += 4 * layers * seq * batch_size * (34 * h + 5 * a * seq) // max(1, len(model.bound.dims))
    vocab = int(model.checkpoint.config.get("vocab_size") or 0)
    return 40 * params + acts + 12 * batch_size * seq * vocab


def available(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def check_memory(model: OpenedModel, inputs: dict[str, torch.Tensor], settings: LearnSettings) -> int:
    need, free = memory_need(model, inputs, settings.batch_size), available(settings.device)
    if need > 0.9 * free:
        raise UsageError(
            f"--learn needs about {need / GIB:.1f} GiB on {settings.device} but {free / GIB:.1f} GiB are "
            "free: lower --batch-size, or use --device cuda with a larger GPU"
        )
    return need


def make_optimiser(maps: torch.nn.ModuleDict, settings: LearnSettings) -> torch.optim.Adam:
    """Adam over every map parameter; the relaxed FFN and head permutation matrices at their own rate
    (`relaxed_permutations`). Adam moves each of their entries by about the rate per step, so the
    rate sets when the hard permutations (identity-initialised, margin 1) begin to change."""
    relaxed = relaxed_permutations(maps)
    chosen = {id(p) for p in relaxed}
    rest = [p for p in maps.parameters() if id(p) not in chosen]
    groups = [{"params": rest, "lr": settings.rate}, {"params": relaxed, "lr": settings.permutation_rate}]
    return torch.optim.Adam([g for g in groups if g["params"]], lr=settings.rate)


def _load(path: Path, tokenizer: Path, limit: int | None) -> dict[str, torch.Tensor]:
    from rotfuse.eval.data import load_inputs

    return load_inputs(path, tokenizer_folder=tokenizer, max_samples=limit)


def learn_into(
    anchor: OpenedModel,
    copy_folder: Path,
    out: Path,
    layers: list[LayerId],
    symmetries: frozenset[str],
    settings: LearnSettings,
    log: Callable[[str], None] | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Refine the matched copy in `copy_folder`, write g(copy) to `out`; returns the report section.
    `log` gets a line per logged step; `progress` counts the steps, with the batch loss as its note."""
    from rotfuse.eval.runtime import accepted_inputs, load_model, with_fused_activations

    started = time.perf_counter()
    check_learn_choices(settings.schedule, settings.decay, settings.keep, settings.eval_data is not None)
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    device = settings.device
    copy = open_model(copy_folder)
    train = _load(settings.data, copy_folder, settings.max_samples)
    held = _load(settings.eval_data, copy_folder, settings.max_samples) if settings.eval_data else None
    need = check_memory(copy, train, settings)
    spec = loss_spec(copy.checkpoint.config, train, where=str(settings.data))

    builder = Builder.of(copy, layers, symmetries, device)
    maps = builder.make_maps(symmetries)
    names = live_names(copy.checkpoint)
    anchor_values = {name: anchor.checkpoint.get(counterpart(name, copy, anchor)).float().to(device) for name in names}
    model = with_fused_activations(load_model(copy_folder, device))
    for p in model.parameters():
        p.requires_grad_(False)

    def reference(inputs: dict[str, torch.Tensor] | None) -> torch.Tensor | None:
        if inputs is None or spec.labels != LABELS_ENSEMBLE:
            return None
        probs = [
            probabilities(load_model(f, device), inputs, settings.batch_size) for f in (anchor.folder, copy_folder)
        ]
        return ensemble_labels(probs, inputs)

    train_ref, held_ref = reference(train), reference(held)
    count = next(iter(train.values())).shape[0]
    # its own generator: the batches and l draw the same numbers whatever the subset's size
    sampled = settings.log_samples or LOG_SAMPLES
    subset = torch.randperm(count, generator=torch.Generator().manual_seed(settings.seed))[:sampled]
    subset = subset.sort().values
    monitor = {k: v[subset] for k, v in train.items()}
    monitor_ref = train_ref[subset] if train_ref is not None else None

    def averaged(values: dict[str, torch.Tensor], lam: float | torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            live: (1 - lam) * anchor_values[name] + lam * values[name].float()
            for name, lives in names.items()
            for live in lives
        }

    def evaluate(inputs: dict[str, torch.Tensor], ref: torch.Tensor | None) -> float:
        with torch.no_grad():
            model.load_state_dict(averaged(builder.transformed(maps, torch.float32, True), 0.5), strict=False)
        with located(f"{anchor.folder} + {copy_folder}"):
            return score(model, inputs, LossSpec(spec.labels, spec.shift), ref, settings.batch_size).loss

    def measure(step: int, batch_loss_value: float | None) -> dict[str, Any]:
        """A logged step: the loss at l = 0.5 on the training subset and the held-out set."""
        row: dict[str, Any] = {"step": step, "train_loss": evaluate(monitor, monitor_ref)}
        if held is not None:
            row["eval_loss"] = evaluate(held, held_ref)
        if batch_loss_value is not None:
            row["batch_loss"] = batch_loss_value
        if log is not None:
            log(
                f"learn step {step}/{settings.steps}: loss at l=0.5 train {row['train_loss']:.4f}"
                + (f", held-out {row['eval_loss']:.4f}" if "eval_loss" in row else "")
            )
        return row

    def on_all(row: dict[str, Any], when: str) -> dict[str, Any]:
        """`row` with the training loss of the maps now set on all training inputs."""
        if len(subset) == count:
            return row
        whole = {**row, "train_loss": evaluate(train, train_ref)}
        if log is not None:
            log(f"learn {when}: loss at l=0.5 on all {count} training inputs {whole['train_loss']:.4f}")
        return whole

    history = [measure(0, None)]
    before = on_all(history[0], "before")
    best = (history[0].get("eval_loss", float("inf")), 0, copying.deepcopy(maps.state_dict()))
    start_stage(progress, "learning", "step")
    optimiser = make_optimiser(maps, settings)
    decay = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, settings.steps) if settings.decay == "cosine" else None
    )
    low, high = LAMBDA_RANGES[settings.schedule]
    order = torch.randperm(count, generator=generator)
    at = 0
    for step in range(1, settings.steps + 1):
        if at + settings.batch_size > count:
            order, at = torch.randperm(count, generator=generator), 0
        index = order[at : at + settings.batch_size]
        at += settings.batch_size
        batch = {k: v[index] for k, v in train.items()}
        ref = train_ref[index] if train_ref is not None else None
        lam = 0.5 if low == high else low + (high - low) * float(torch.rand((), generator=generator))
        features = accepted_inputs(model, {k: v.to(device) for k, v in batch.items() if k != "labels"})
        # every live name of a tied tensor is fed (names.py), so the tie needs no re-tying here
        outputs = torch.func.functional_call(
            model, averaged(builder.transformed(maps, torch.float32), lam), args=(), kwargs=features, tie_weights=False
        )
        loss = batch_loss(
            outputs, {k: v.to(device) for k, v in batch.items()}, spec, None if ref is None else ref.to(device)
        )
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        limit_conditions(maps)
        if decay is not None:
            decay.step()
        if progress is not None:
            progress(step, settings.steps)
        show_note(progress, f"batch loss {float(loss.detach()):.4f}")
        if step % settings.log_every == 0 or step == settings.steps:
            history.append(measure(step, float(loss.detach())))
            if settings.keep == "best" and history[-1]["eval_loss"] < best[0]:
                best = (history[-1]["eval_loss"], step, copying.deepcopy(maps.state_dict()))

    kept = history[-1]
    if settings.keep == "best":
        maps.load_state_dict(best[2])
        kept = next(row for row in history if row["step"] == best[1])
    after = on_all(kept, f"after (step {kept['step']})")
    with torch.no_grad():
        final = builder.transformed(maps, torch.float64, exact=True)
    writer = CheckpointWriter(out, plan_like(copy.checkpoint), copy.checkpoint)
    try:
        for name, value in final.items():
            writer.write(name, value.cpu())
        writer.finish()
    finally:
        writer.abort()
    copy_side_files(copy.checkpoint, out)
    return {
        "data": str(settings.data),
        "eval_data": str(settings.eval_data) if settings.eval_data else None,
        "steps": settings.steps,
        "rate": settings.rate,
        "perm_rate": settings.permutation_rate,
        "lambda_schedule": settings.schedule,
        "decay": settings.decay,
        "seed": settings.seed,
        "batch_size": settings.batch_size,
        "labels": spec.labels,
        "device": device,
        "stream_maps": {
            stack or "stream": m.kind
            for stack, m in ((k[len("stream") :], maps[k]) for k in maps if k.startswith("stream"))
        },
        "keep": settings.keep,
        "kept_step": kept["step"],
        "before": before,
        "after": after,
        "log": history,
        "log_train_samples": len(subset),
        "linear_condition": largest_condition(maps),
        "memory_estimate_bytes": need,
        "seconds": time.perf_counter() - started,
    }
