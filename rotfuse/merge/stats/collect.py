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

import hashlib
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
from rotfuse.core.distributed import Group, job, split_in_order
from rotfuse.core.errors import InputError, UsageError
from rotfuse.core.progress import Progress
from rotfuse.eval.data import count_samples, load_inputs
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


def accumulate_grams(
    model: torch.nn.Module,
    linears: dict[str, _Linear],
    inputs: dict[str, torch.Tensor],
    options: StatsOptions,
    device: str,
    share: Sequence[int],
    progress: Progress | None,
    first: int = 0,
) -> GramCollector:
    """The Gram sums (float32) and row counts over the batches numbered in `share` (all of them in
    one process; a rank's range in a distributed job). `inputs` start at example `first`."""
    collector = GramCollector()
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_pre_hook(collector.hook(name), with_kwargs=True) for name in linears]
    size = options.batch_size
    try:
        with torch.no_grad():
            for done, number in enumerate(share, start=1):
                batch = {k: v[number * size - first : (number + 1) * size - first] for k, v in inputs.items()}
                mask = batch.get("attention_mask")
                collector.start(mask.to(device) if mask is not None else None)
                model(**_model_inputs(model, batch, device))
                collector.end()
                if progress:
                    progress(done, len(share))
    finally:
        for handle in handles:
            handle.remove()
    return collector


def gram_tensors(
    collector: GramCollector, linears: dict[str, _Linear], skipped: dict[str, str]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The normalised Gram matrices (float32) and the manifest entries that say who reads which."""
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


def sum_grams(group: Group, collector: GramCollector) -> GramCollector:
    """Every rank's Gram sums and rows added up on rank 0 (float64, rank order: stats/scaleout).
    Which modules share a Gram is the union of what the ranks observed (a rank may have seen
    no batch); ranks that disagree are the one-process error of a module that reads a shared
    input in one batch but not in another."""
    seen = group.gather(
        (collector.leader, {name: (tuple(t.shape), collector.rows[name]) for name, t in collector.sums.items()})
    )
    total = GramCollector()
    for leaders, _ in seen:
        for module, leader in leaders.items():
            if total.leader.setdefault(module, leader) != leader:
                raise RuntimeError(f"module {module} read the same input as {leader} in one batch but not in another")
    shapes = {name: shape for _, sums in seen for name, (shape, _) in sums.items()}
    for name in sorted(shapes):
        local = collector.sums.get(name)
        summed = group.sum_on_main(local if local is not None else torch.zeros(shapes[name]))
        if summed is not None:
            total.sums[name] = summed.float()
            total.rows[name] = sum(sums[name][1] for _, sums in seen if name in sums)
    return total


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


def example_generator(seed: int, index: int, device: str) -> torch.Generator:
    """Example `index`'s own label sampler: the labels do not depend on which rank draws them.
    The pair is hashed because the CPU generator keeps only a seed's low 32 bits."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest, "little") >> 1)


def accumulate_fisher(
    model: torch.nn.Module,
    parameters: Sequence[torch.Tensor],
    inputs: dict[str, torch.Tensor],
    options: StatsOptions,
    device: str,
    data: Path,
    use_labels: bool,
    share: Sequence[int],
    progress: Progress | None,
    first: int = 0,
) -> list[torch.Tensor]:
    """Per `parameters`, the sum (float32) of the squared per-example gradients over the
    examples numbered in `share`, one backward pass each. `inputs` start at example `first`."""
    problem_type = getattr(model.config, "problem_type", None)
    sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in parameters]
    for done, index in enumerate(share, start=1):
        example = _example(inputs, index - first)
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
        generator = example_generator(options.seed, index, device)
        log_likelihood(
            logits, labels, mask.to(device) if mask is not None else None, problem_type, generator
        ).backward()
        for parameter, total in zip(parameters, sums):
            if parameter.grad is not None:
                total.add_(parameter.grad.detach().float().pow(2))
        if progress:
            progress(done, len(share))
    model.zero_grad(set_to_none=True)
    return sums


def fisher_tensors(
    parameters: Sequence[torch.Tensor],
    sums: Sequence[torch.Tensor],
    count: int,
    names: dict[int, list[str]],
    labels: str,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The diagonal Fishers (the sums over `count` examples, averaged) under every checkpoint name."""
    tensors: dict[str, torch.Tensor] = {}
    for parameter, total in zip(parameters, sums):
        fisher = (total / count).cpu()
        for name in names[id(parameter)]:
            tensors[name] = fisher.clone()  # safetensors refuses shared storage
    return tensors, {"estimator": FISHER_ESTIMATOR, "labels": labels, "parameters": sorted(tensors)}


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


@dataclass
class _Run:
    """Everything checked and loaded before the model runs (the same on every rank)."""

    model_path: Path
    data_path: Path
    options: StatsOptions
    device: str
    checkpoint: Checkpoint
    inputs: dict[str, torch.Tensor]
    model: torch.nn.Module
    names: dict[int, list[str]]
    unmapped: list[str]
    use_labels: bool
    samples: int  # in the whole data (`inputs` may hold a rank's share)
    first: int  # the example `inputs` start at


def _unit_size(options: StatsOptions) -> int:
    """The examples in a unit of work: a batch (regmean) or one example (fisher)."""
    return options.batch_size if options.kind == "regmean" else 1


def _units(options: StatsOptions, samples: int) -> list[int]:
    """The examples in each unit of work (the last one may be short)."""
    size = _unit_size(options)
    return [min(size, samples - start) for start in range(0, samples, size)]


def _my_units(units: list[int], group: Group | None) -> list[int]:
    """This rank's batches (regmean) or examples (fisher): consecutive ranges of about equal
    example counts, one per rank; all of them in one process."""
    if group is None:
        return list(range(len(units)))
    owner = split_in_order([float(n) for n in units], group.world)
    return [unit for unit, rank in enumerate(owner) if rank == group.rank]


def _my_rows(options: StatsOptions, samples: int, group: Group | None) -> tuple[int, int]:
    """The examples [first, end) this process runs on: all in one process."""
    units = _units(options, samples)
    mine, size = _my_units(units, group), _unit_size(options)
    return (mine[0] * size, mine[-1] * size + units[mine[-1]]) if mine else (0, 0)


def _prepare(
    model_path: Path,
    data_path: Path,
    out: Path,
    options: StatsOptions,
    overwrite: bool,
    inputs_read: Sequence[Path],
    group: Group | None = None,
) -> _Run:
    """Check the inputs and load the model and the data this process runs on: all of it in one
    process, a rank's consecutive share in a distributed job (a `.safetensors` file is read only
    there; other formats are read whole and cut)."""
    from rotfuse.core.device import resolve_device

    _validate(options)
    check_outputs([Target(Path(out), "-o")], [Path(model_path), Path(data_path), *inputs_read], overwrite)
    device = resolve_device(options.device)
    checkpoint = Checkpoint.open(model_path)
    refuse_remote_code(model_path)
    data, folder = Path(data_path), Path(model_path)
    if group is not None and data.suffix.lower() == ".safetensors":
        samples = count_samples(data, folder, options.max_samples)
        first, end = _my_rows(options, samples, group)
        inputs = load_inputs(data, folder, options.max_samples, options.max_length, (first, end))
    else:
        inputs = load_inputs(data, folder, options.max_samples, options.max_length)
        samples = len(next(iter(inputs.values())))
        first, end = _my_rows(options, samples, group)
        inputs = {name: tensor[first:end] for name, tensor in inputs.items()}
    if samples == 0:
        raise InputError(f"{data_path}: no samples")
    use_labels = options.kind == "fisher" and _labels_for(inputs, options.labels, Path(data_path))
    model = load_model(model_path, device, _model_dtype(options.model_dtype, options.kind, checkpoint, device))
    names, unmapped = checkpoint_names(model, checkpoint)
    return _Run(
        Path(model_path),
        Path(data_path),
        options,
        device,
        checkpoint,
        inputs,
        model,
        names,
        unmapped,
        use_labels,
        samples,
        first,
    )


def _statistics(
    run: _Run, group: Group | None, progress: Progress | None
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Run the model on this rank's share and return the statistics (rank 0 of a distributed
    job: every rank's sums added up; None on the other ranks)."""
    model, options, share = run.model, run.options, _my_units(_units(run.options, run.samples), group)

    def accumulate() -> Any:
        with fitting(run.data_path, run.model_path):
            if options.kind == "regmean":
                return accumulate_grams(model, linears, run.inputs, options, run.device, share, progress, run.first)
            return accumulate_fisher(
                model,
                parameters,
                run.inputs,
                options,
                run.device,
                run.data_path,
                run.use_labels,
                share,
                progress,
                run.first,
            )

    if options.kind == "regmean":
        linears, skipped = _linear_modules(model, run.names)
        collector: GramCollector = accumulate() if group is None else group.agree("compute statistics", accumulate)
        if group is not None:
            collector = group.agree("sum statistics", lambda: sum_grams(group, collector))
            if not group.is_main:
                return None
        return gram_tensors(collector, linears, skipped)
    parameters = [p for p in model.parameters() if id(p) in run.names]
    sums: list[torch.Tensor] = accumulate() if group is None else group.agree("compute statistics", accumulate)
    if group is not None:
        sums = group.agree("sum statistics", lambda: [group.sum_on_main(total) for total in sums])
        if not group.is_main:
            return None
        sums = [total.float() for total in sums]
    return fisher_tensors(parameters, sums, run.samples, run.names, "data" if run.use_labels else "sampled")


def _tokens(run: _Run) -> int | None:
    """The unpadded tokens of the examples this process holds (None without a mask)."""
    mask = run.inputs.get("attention_mask")
    return int(mask.sum()) if mask is not None else None


def _manifest(run: _Run, details: dict[str, Any], started: float, tokens: int | None) -> dict[str, Any]:
    options = run.options
    return {
        "tool": "rotfuse",
        "version": __version__,
        "schema": SCHEMA,
        "command": "stats",
        "kind": options.kind,
        "created_by": sys.argv,
        "checkpoint": {"path": str(run.model_path), "fingerprint": run.checkpoint.fingerprint()},
        "data": {
            "path": str(run.data_path),
            "samples": run.samples,
            "tokens": tokens,
        },
        "settings": {
            "max_samples": options.max_samples,
            "batch_size": options.batch_size,
            "max_length": options.max_length,
            "labels": options.labels,
            "seed": options.seed,
            "device": run.device,
            "model_dtype": str(next(run.model.parameters()).dtype).replace("torch.", ""),
        },
        **details,
        "unmapped_parameters": run.unmapped,
        "seconds": round(time.perf_counter() - started, 3),
    }


def _write(out: Path, overwrite: bool, tensors: dict[str, torch.Tensor], manifest: dict[str, Any]) -> None:
    with StagedFolder(Path(out), overwrite) as staged:
        write_stats(staged.path, tensors, manifest)
        staged.commit()


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
    other files the command read (its job file), which the output must not replace.

    Under torchrun / srun (core/distributed.py) every rank checks the inputs and runs the model
    on its consecutive range of the batches (fisher: of the examples); rank 0 adds the ranks'
    float32 sums in float64, in rank order, writes the folder and commits; a failure on any rank
    fails every rank and leaves nothing. The result is one process's up to the float32 summation
    order (the README states the measured tolerance)."""
    started = time.perf_counter()
    with job() as group:
        if group is None:
            run = _prepare(model_path, data_path, out, options, overwrite, inputs_read)
            found = _statistics(run, None, progress)
            assert found is not None
            manifest = _manifest(run, found[1], started, _tokens(run))
            _write(out, overwrite, found[0], manifest)
            return manifest
        run = group.agree(
            "check inputs", lambda: _prepare(model_path, data_path, out, options, overwrite, inputs_read, group)
        )
        found = _statistics(run, group, progress)
        counts = group.gather(_tokens(run))  # each rank holds its own examples
        tokens = None if None in counts else sum(counts)
        manifest = _manifest(run, found[1] if found is not None else {}, started, tokens)
        group.agree("write", lambda: _write(out, overwrite, found[0], manifest) if found is not None else None)
        return group.broadcast(manifest if group.is_main else None)
