"""`rotfuse stats`: a checkpoint's statistics on user data, for Fisher and RegMean merging.

The checkpoint runs with transformers (offline, rotfuse/eval/runtime.py) on the user's data
(rotfuse/eval/data.py); the results are written as a statistics folder (merge/stats/folder.py), keyed
by the checkpoint's own tensor names and stamped with its fingerprint.

RegMean (`--kind regmean`): a forward pre-hook on every nn.Linear and transformers Conv1D
accumulates the Gram matrix `X^T X` of the layer's input rows. Padding rows are dropped (rows are
selected by the attention mask wherever the input is laid out `[batch, tokens, ...]`) and not
counted; products and sums are float32 whatever the model's dtype (x^T x overflows float16; a
float64 sum would double the d_in^2 memory, 1 GiB per 11008-wide input, for no useful digit); the
sum is divided by the number of rows seen, so every model weighs the same in a merge whatever the
size of its data. Layers that read the very same input tensor in a forward pass (q/k/v, gate/up)
share one Gram -- observed, not guessed from names -- so memory is `d_in^2` per input. A linear
whose weight is tied to another tensor (GPT-2's lm_head is the token embedding) gets no Gram: one
tensor, one rule, and for a tensor that is also an embedding that rule is the simple average.

Fisher (`--kind fisher`): the diagonal Fisher `F = E_x E_{y ~ p(y|x)} [(d log p(y|x) / d theta)^2]`,
estimated with one backward pass per example and one sampled label per example (per token for
token-level and language-model heads), `y` drawn from the model's own prediction (so unlabeled
data works), or taken from the data's `labels` with `--labels data` (the "empirical" Fisher).
Per-example squares are the faithful diagonal: squaring a batch gradient (the RegMean reference
code) adds cross terms between examples, and the argmax label (ibid.) is not a sample. For
token-level heads an example's log-likelihood sums over its (unpadded) tokens; the cross terms
between its tokens vanish in expectation, each token's label being drawn independently. The sum
is divided by the number of examples. Categorical heads use softmax, `problem_type`
multi_label_classification Bernoulli, single-output (regression) heads a unit Gaussian.

Mapping live parameters to tensor names: transformers 5 renames modules in memory (ViT:
`vit.layers.0.attention.q_proj`) but saves the checkpoint's names; its own
`revert_weight_conversion` (the function `save_pretrained` uses) maps the live parameters back,
passing the very tensor objects through for renamings. A name is accepted only if that tensor is
in the checkpoint with the same shape and the same values; parameters transformers converts
(fused, split or transposed on load) have no single tensor on disk and get no statistics (the
manifest lists them; merge averages them simply).
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rotfuse import __version__
from rotfuse.core.errors import InputError, UsageError
from rotfuse.core.progress import Progress
from rotfuse.eval.data import batches, load_inputs
from rotfuse.eval.runtime import accepted_inputs, load_model, refuse_remote_code
from rotfuse.io.checkpoint import Checkpoint
from rotfuse.io.dtypes import parse_dtype_flag, torch_dtype
from rotfuse.io.safetensors_file import FLOAT_DTYPES
from rotfuse.io.staging import StagedFolder, Target, check_outputs
from rotfuse.merge.stats.folder import GRAM_PREFIX, KINDS, SCHEMA, write_stats

LABEL_MODES = ("auto", "sampled", "data")
FISHER_ESTIMATOR = "per-example squared gradient of log p(y|x), y sampled from the model or from the data"


@dataclass(frozen=True)
class StatsOptions:
    kind: str = "regmean"
    max_samples: int | None = 256
    batch_size: int = 8  # examples per forward pass (regmean; fisher takes one example per backward)
    max_length: int = 128  # tokens per text
    labels: str = "auto"  # fisher: auto (data labels when present, else sampled), sampled or data
    seed: int = 0  # fisher: label sampling
    device: str = "auto"
    model_dtype: str = "auto"  # auto: regmean on CUDA the checkpoint's dtype, else float32


def _validate(options: StatsOptions) -> None:
    if options.kind not in KINDS:
        raise UsageError(f"unknown --kind {options.kind!r} (use one of {', '.join(KINDS)})")
    if options.labels not in LABEL_MODES:
        raise UsageError(f"unknown --labels {options.labels!r} (use one of {', '.join(LABEL_MODES)})")
    if options.batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    if options.max_samples is not None and options.max_samples < 1:
        raise UsageError("--max-samples must be at least 1")


def _model_dtype(flag: str, kind: str, checkpoint: Checkpoint, device: str) -> torch.dtype:
    """auto: float32 for Fisher (float16 gradients underflow) and on CPU; else the checkpoint's."""
    if flag != "auto":
        return torch_dtype(parse_dtype_flag(flag))
    if device == "cpu" or kind == "fisher":
        return torch.float32
    stored = Counter(checkpoint.entry(n).dtype for n in checkpoint.names() if checkpoint.entry(n).dtype in FLOAT_DTYPES)
    return torch_dtype(stored.most_common(1)[0][0]) if stored else torch.float32


# ---------------------------------------------------------------------- live parameters -> names


def checkpoint_names(model: torch.nn.Module, checkpoint: Checkpoint) -> tuple[dict[int, list[str]], list[str]]:
    """`id(parameter) -> checkpoint tensor names holding it` (tied parameters: every name on disk),
    and the live names of parameters with no verified tensor in the checkpoint."""
    live = dict(model.named_parameters(remove_duplicate=False))
    by_id = {id(p): p for p in live.values()}
    try:
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, dict(live))  # type: ignore[arg-type]
    except ImportError:  # transformers 4: the names in memory are the names on disk
        saved = dict(live)
    names: dict[int, list[str]] = {}
    for disk_name, tensor in saved.items():
        parameter = by_id.get(id(tensor))
        if (
            parameter is not None
            and parameter is tensor
            and disk_name in checkpoint
            and _same_values(parameter, checkpoint, disk_name)
        ):
            names.setdefault(id(parameter), []).append(disk_name)
    return names, sorted(n for n, p in model.named_parameters() if id(p) not in names)


def _same_values(parameter: torch.Tensor, checkpoint: Checkpoint, name: str, samples: int = 4096) -> bool:
    """Shape and (a strided sample of) values agree, after the load-time dtype cast."""
    if tuple(checkpoint.entry(name).shape) != tuple(parameter.shape):
        return False
    step = max(1, parameter.numel() // samples)
    live = parameter.detach().reshape(-1)[::step].cpu()
    return bool(torch.equal(checkpoint.get(name).reshape(-1)[::step].to(live.dtype), live))


# ---------------------------------------------------------------------- running the model


def _model_inputs(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    """The batch's tensors the model's forward accepts (labels never: rotfuse makes its own loss)."""
    return {k: v.to(device) for k, v in accepted_inputs(model, batch).items() if k != "labels"}


def _example(inputs: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """One example; right padding cut off (tokens beyond the mask change nothing but the cost)."""
    row = {k: v[index : index + 1] for k, v in inputs.items()}
    mask = row.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        length, width = int(mask.sum()), mask.shape[1]
        if 0 < length < width and bool(mask[0, :length].all()):
            row = {k: v[:, :length] if v.dim() == 2 and v.shape[1] == width else v for k, v in row.items()}
    return row


# ---------------------------------------------------------------------- RegMean


@dataclass
class _Linear:
    module: str  # live module name (messages only)
    weights: list[str]  # checkpoint names of its weight
    layout: str  # out_in (nn.Linear) or in_out (Conv1D)


@dataclass
class GramCollector:
    """Forward pre-hooks that accumulate one Gram matrix per distinct linear-layer input."""

    mask: torch.Tensor | None = None  # the current batch's attention mask
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # leader module -> sum of x^T x (float32)
    rows: dict[str, int] = field(default_factory=dict)
    leader: dict[str, str] = field(default_factory=dict)  # module -> the module whose Gram it shares
    _seen: dict[int, tuple[torch.Tensor, str]] = field(default_factory=dict)  # this forward: id(x) -> (x, leader)

    def start(self, mask: torch.Tensor | None) -> None:
        self.mask, self._seen = mask, {}

    def end(self) -> None:
        self._seen = {}  # the inputs may be freed now; their ids will be reused

    def hook(self, name: str) -> Callable[..., None]:
        def pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            seen = self._seen.get(id(x))
            shared = seen[1] if seen is not None and seen[0] is x else None
            if name not in self.leader:  # sharing is decided on the batch that first calls the module
                self.leader[name] = shared or name
            leader = self.leader[name]
            if leader != name:
                if shared != leader:
                    raise RuntimeError(f"module {name} read the same input as {leader} in one batch but not in another")
                return
            self._accumulate(name, x.detach())
            self._seen[id(x)] = (x, name)

        return pre_hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        rows = self._rows(x).float()
        if name not in self.sums:
            self.sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float32, device=rows.device)
            self.rows[name] = 0
        self.sums[name].addmm_(rows.T, rows)
        self.rows[name] += rows.shape[0]

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """The input as `[rows, d_in]`, padding rows dropped where the layout shows tokens."""
        mask = self.mask
        if mask is not None:
            if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
                return x[mask.bool()].reshape(-1, x.shape[-1])
            if x.dim() == 2 and mask.shape[1] > 1 and x.shape[0] == mask.numel():
                return x[mask.reshape(-1).bool()]
        return x.reshape(-1, x.shape[-1])


def _linear_modules(model: torch.nn.Module, names: dict[int, list[str]]) -> tuple[dict[str, _Linear], dict[str, str]]:
    """Every linear layer with its checkpoint weight names; and the weights left out, with why."""
    conv1d: type | None
    try:
        from transformers.pytorch_utils import Conv1D as conv1d
    except ImportError:  # pragma: no cover - transformers without Conv1D
        conv1d = None
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    linears: dict[str, _Linear] = {}
    skipped: dict[str, str] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            layout = "out_in"
        elif conv1d is not None and isinstance(module, conv1d):
            layout = "in_out"
        else:
            continue
        weights = names.get(id(module.weight), [])
        if uses[id(module.weight)] > 1:
            for weight in weights:
                skipped[weight] = f"tied to another tensor ({module_name} shares its weight): simple average"
        elif weights:
            linears[module_name] = _Linear(module_name, weights, layout)
        else:
            skipped[module_name] = "no single checkpoint tensor holds this weight (transformers converts it on load)"
    return linears, skipped


def collect_grams(
    model: torch.nn.Module,
    names: dict[int, list[str]],
    inputs: dict[str, torch.Tensor],
    options: StatsOptions,
    device: str,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The normalised Gram matrices (float32) and the manifest entries that say who reads which."""
    linears, skipped = _linear_modules(model, names)
    collector = GramCollector()
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(collector.hook(name), with_kwargs=True) for name in linears]
    total = -(-len(next(iter(inputs.values()))) // options.batch_size)
    try:
        with torch.no_grad():
            for done, batch in enumerate(batches(inputs, options.batch_size), start=1):
                mask = batch.get("attention_mask")
                collector.start(mask.to(device) if mask is not None else None)
                model(**_model_inputs(model, batch, device))
                collector.end()
                if progress:
                    progress(done, total)
    finally:
        for handle in handles:
            handle.remove()

    tensors: dict[str, torch.Tensor] = {}
    grams: dict[str, dict[str, Any]] = {}
    linear: dict[str, dict[str, str]] = {}
    for module_name, entry in linears.items():
        leader = collector.leader.get(module_name)
        if leader is None or collector.rows.get(leader, 0) == 0:
            for weight in entry.weights:
                skipped[weight] = "the layer saw no input rows on this data: simple average"
            continue
        gram_name = GRAM_PREFIX + linears[leader].weights[0]
        if gram_name not in tensors:
            tensors[gram_name] = (collector.sums[leader] / collector.rows[leader]).cpu()
            grams[gram_name] = {"rows": collector.rows[leader], "dim": tensors[gram_name].shape[0], "readers": []}
        for weight in entry.weights:
            linear[weight] = {"gram": gram_name, "layout": entry.layout}
            grams[gram_name]["readers"].append(weight)
    return tensors, {"linear": linear, "inputs": grams, "skipped": skipped}


# ---------------------------------------------------------------------- Fisher


def log_likelihood(
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    mask: torch.Tensor | None,
    problem_type: str | None,
    generator: torch.Generator,
) -> torch.Tensor:
    """`sum log p(y|x)` over the examples (and valid tokens) of `logits`; `y` sampled from the
    model when `labels` is None. Padding tokens and labels of -100 do not count."""
    logits = logits.float()
    detached = logits.detach()
    valid: torch.Tensor | None = None
    if problem_type == "regression" or (logits.shape[-1] == 1 and problem_type != "multi_label_classification"):
        noise = torch.randn(logits.shape, generator=generator, device=logits.device)
        target = labels.to(logits).reshape(logits.shape) if labels is not None else detached + noise
        per_item = -0.5 * (target - logits).pow(2).sum(-1)
    elif problem_type == "multi_label_classification":
        target = labels.to(logits) if labels is not None else torch.bernoulli(detached.sigmoid(), generator=generator)
        per_item = -torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(-1)
    else:
        log_p = torch.log_softmax(logits, dim=-1)
        if labels is None:
            flat = log_p.detach().exp().reshape(-1, log_p.shape[-1])
            target = torch.multinomial(flat, 1, generator=generator).reshape(log_p.shape[:-1])
        else:
            target = labels.to(logits.device).long()
            valid = target != -100
        per_item = log_p.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    if valid is not None:
        per_item = per_item * valid
    if mask is not None and per_item.shape == mask.shape:
        per_item = per_item * mask.to(per_item)
    return per_item.sum()


def _labels_for(inputs: dict[str, torch.Tensor], mode: str, data: Path) -> bool:
    """Whether the data's labels are used (else labels are sampled from the model)."""
    if mode == "data" and "labels" not in inputs:
        raise UsageError(f"--labels data: {data} has no labels (a 'label' field per JSON line or a 'labels' tensor)")
    return mode == "data" or (mode == "auto" and "labels" in inputs)


def collect_fisher(
    model: torch.nn.Module,
    names: dict[int, list[str]],
    inputs: dict[str, torch.Tensor],
    options: StatsOptions,
    device: str,
    data: Path,
    progress: Progress | None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The diagonal Fisher of every mapped parameter (float32), one backward pass per example."""
    use_labels = _labels_for(inputs, options.labels, data)
    problem_type = getattr(model.config, "problem_type", None)
    parameters = [p for p in model.parameters() if id(p) in names]
    sums = {id(p): torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters}
    generator = torch.Generator(device=device).manual_seed(options.seed)
    count = len(next(iter(inputs.values())))
    for index in range(count):
        example = _example(inputs, index)
        model.zero_grad(set_to_none=True)
        outputs = model(**_model_inputs(model, example, device))
        logits = getattr(outputs, "logits", None)
        if logits is None:
            folder = getattr(model, "name_or_path", "") or "the checkpoint"
            raise InputError(
                f"{folder}: {type(model).__name__} returns no logits: Fisher statistics need a model "
                "with a prediction head (use --kind regmean for a bare encoder)"
            )
        labels = example.get("labels") if use_labels else None
        if labels is not None and tuple(labels.shape) != tuple(logits.shape[: labels.dim()]):
            raise InputError(
                f"{data}: labels of shape {list(labels.shape[1:])} per example do not fit the "
                f"model's predictions {list(logits.shape[1:])}; use --labels sampled"
            )
        mask = example.get("attention_mask")
        log_likelihood(
            logits, labels, mask.to(device) if mask is not None else None, problem_type, generator
        ).backward()
        for parameter in parameters:
            if parameter.grad is not None:
                sums[id(parameter)].add_(parameter.grad.detach().float().pow(2))
        if progress:
            progress(index + 1, count)
    model.zero_grad(set_to_none=True)
    tensors: dict[str, torch.Tensor] = {}
    for parameter in parameters:
        fisher = (sums[id(parameter)] / count).cpu()
        for name in names[id(parameter)]:
            tensors[name] = fisher.clone()  # safetensors refuses shared storage
    return tensors, {
        "estimator": FISHER_ESTIMATOR,
        "labels": "data" if use_labels else "sampled",
        "parameters": sorted(tensors),
    }


# ---------------------------------------------------------------------- the command


@contextmanager
def fitting(data: Path, model: Path) -> Iterator[None]:
    """Inputs the model cannot take (a wrong shape, an id its embedding lacks) are the data's
    fault: one line naming both files, exit 2 -- as `evaluate.run_batches` does for scoring."""
    try:
        yield
    except (ValueError, TypeError, IndexError, RuntimeError) as exc:
        raise InputError(
            f"{data}: the inputs do not fit {model} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"
        ) from exc


def compute_stats(
    model_path: Path,
    data_path: Path,
    out: Path,
    options: StatsOptions,
    overwrite: bool = False,
    progress: Progress | None = None,
    inputs_read: Sequence[Path] = (),
) -> dict[str, Any]:
    """Run MODEL on DATA and write its statistics to OUT; returns the manifest. `inputs_read`:
    other files the command read (its job file), which the output must not replace."""
    from rotfuse.core.device import resolve_device

    started = time.perf_counter()
    _validate(options)
    check_outputs([Target(Path(out), "-o")], [Path(model_path), Path(data_path), *inputs_read], overwrite)
    device = resolve_device(options.device)
    checkpoint = Checkpoint.open(model_path)
    refuse_remote_code(model_path)
    inputs = load_inputs(Path(data_path), Path(model_path), options.max_samples, options.max_length)
    if len(next(iter(inputs.values()))) == 0:
        raise InputError(f"{data_path}: no samples")
    model = load_model(model_path, device, _model_dtype(options.model_dtype, options.kind, checkpoint, device))
    names, unmapped = checkpoint_names(model, checkpoint)
    with fitting(data_path, model_path):
        if options.kind == "regmean":
            tensors, details = collect_grams(model, names, inputs, options, device, progress)
        else:
            tensors, details = collect_fisher(model, names, inputs, options, device, Path(data_path), progress)
    mask = inputs.get("attention_mask")
    samples = len(next(iter(inputs.values())))
    manifest: dict[str, Any] = {
        "tool": "rotfuse",
        "version": __version__,
        "schema": SCHEMA,
        "command": "stats",
        "kind": options.kind,
        "created_by": sys.argv,
        "checkpoint": {"path": str(model_path), "fingerprint": checkpoint.fingerprint()},
        "data": {"path": str(data_path), "samples": samples, "tokens": int(mask.sum()) if mask is not None else None},
        "settings": {
            "max_samples": options.max_samples,
            "batch_size": options.batch_size,
            "max_length": options.max_length,
            "labels": options.labels,
            "seed": options.seed,
            "device": device,
            "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        },
        **details,
        "unmapped_parameters": unmapped,
        "seconds": round(time.perf_counter() - started, 3),
    }
    with StagedFolder(Path(out), overwrite) as staged:
        write_stats(staged.path, tensors, manifest)
        staged.commit()
    return manifest
