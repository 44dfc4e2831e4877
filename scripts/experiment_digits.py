#!/usr/bin/env python
"""The paper's model-fusion experiment at laptop scale, offline: small ViTs on scikit-learn's digits.

Two settings, several seed pairs each:
- independent: A and B trained from different random initialisations (and data orders);
- shared-init: one ViT pretrained briefly, then fine-tuned twice on disjoint halves of the data
  (different data orders) -- the paper's setting, where both ends start from one checkpoint.

For each pair and each symmetry subset (none, perm, rot, perm+rot, perm+rot+scale; then past the
paper: + head permutation, + a residual-stream map from weights or from activations on A's
training images) B is matched to A with `rotfuse.align.match.match`, then the path (1-l)*A + l*B
is scored on held-out data with
`rotfuse.eval.interpolate`: l = 0.5 is the simple-averaged merge, the curve gives the loss barrier.
Fisher and RegMean merges (`rotfuse.merge`) use statistics computed on each model's own training
data with `rotfuse.merge.stats.collect`, on the matched B (statistics belong to the checkpoint being merged).
Writes results.md (tables), results.json and one PNG per setting to --out. Deterministic given
the seeds. `--quick` is the CI-size version.

    nice -n 10 python scripts/experiment_digits.py            # full run, results/digits/
    python scripts/experiment_digits.py --quick --out /tmp/q  # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from training import fit_and_save

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import folded_view
from rotfuse.eval.interpolate import Curve, InterpolationSettings, grid, interpolate
from rotfuse.eval.runtime import load_model, offline
from rotfuse.eval.score import LossSpec, score
from rotfuse.eval.verify import VerifyOptions, verify
from rotfuse.merge.engine import MergeOptions, merge
from rotfuse.merge.stats.collect import StatsOptions, compute_stats
from rotfuse.symmetry.names import symmetry_set

# (name in tables, --symmetries value, residual map from activations on A's training images)
# The first five are the paper's symmetries; the last three go past it (issue 8): whole-head
# permutation, then one map of the residual stream, found from weights or from activations.
VARIANTS = [
    ("none", "none", False),
    ("perm", "perm", False),
    ("rot", "rot", False),
    ("perm+rot", "perm,rot", False),
    ("perm+rot+scale", "perm,rot,scale", False),
    ("+heads", "perm,heads,rot,scale", False),
    ("+residual (weights)", "perm,heads,rot,scale,residual", False),
    ("+residual (activations)", "perm,heads,rot,scale,residual", True),
    ("+learned", "perm,heads,rot,scale,residual", True),
    ("+learned (fixed l)", "perm,heads,rot,scale,residual", True),
]
# learned matching (issue 16): from the activation-matched solution, the same maps optimised for the loss of
# the average on A's training images (l uniform in [0.3, 0.7] per step, or fixed at 0.5); the test set only
# scores the result. Settings per run: LEARN_STEPS steps of batch 64, Adam at 1e-2.
LEARN_STEPS = 300
SETTINGS = ("independent", "shared-init")
STATS_MERGES = ("fisher", "regmean")  # besides the simple average, which is l = 0.5 of the curve


@dataclass(frozen=True)
class Config:
    """Model, training and evaluation sizes; FULL and QUICK below."""

    hidden: int = 64
    layers: int = 3
    heads: int = 4
    intermediate: int = 128
    patch: int = 2
    epochs: int = 20  # independent models, from scratch
    pretrain_epochs: int = 10  # shared-init: the common starting point
    finetune_epochs: int = 20  # shared-init: each half
    lr: float = 3e-3
    finetune_lr: float = 3e-3
    batch: int = 64
    train: int = 1200  # training images; the rest of the 1797 are the held-out test set
    test: int = 597
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int = 11
    fisher_samples: int = 32  # examples per Fisher estimate (one backward pass each)
    regmean_samples: int = 128
    activation_samples: int = 600  # A's training images for the activation-matched residual map
    settings: tuple[str, ...] = SETTINGS
    variants: tuple[str, ...] = tuple(v[0] for v in VARIANTS)
    learn_steps: int = LEARN_STEPS


FULL = Config()
QUICK = Config(
    hidden=24,
    layers=2,
    heads=4,
    intermediate=48,
    patch=4,
    epochs=4,
    pretrain_epochs=2,
    finetune_epochs=3,
    train=300,
    test=100,
    seeds=(0,),
    steps=3,
    fisher_samples=4,
    regmean_samples=32,
    activation_samples=64,
    learn_steps=20,
)


# ---------------------------------------------------------------------- data and training


@dataclass
class Digits:
    images: torch.Tensor  # [N, 1, 8, 8], standardised
    labels: torch.Tensor
    train: torch.Tensor  # indices
    test: torch.Tensor

    def inputs(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[indices], "labels": self.labels[indices]}


def load_digits(config: Config, seed: int = 1234) -> Digits:
    """scikit-learn's 8x8 digits (shipped with the package, no download), one fixed split."""
    from sklearn.datasets import load_digits as sk_digits

    raw = sk_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    order = torch.randperm(len(raw.target), generator=torch.Generator().manual_seed(seed))
    return Digits(
        images, torch.tensor(raw.target), order[: config.train], order[config.train : config.train + config.test]
    )


def vit_config(config: Config) -> Any:
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8,
        patch_size=config.patch,
        num_channels=1,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate,
        num_labels=10,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def train(
    config: Config,
    digits: Digits,
    indices: torch.Tensor,
    folder: Path,
    init_seed: int,
    order_seed: int,
    epochs: int,
    lr: float,
    start: Path | None = None,
) -> Path:
    """Train a ViT (from `start`, or from scratch with `init_seed`) and save it as a checkpoint folder."""
    from transformers import ViTForImageClassification

    torch.manual_seed(init_seed)
    model = (
        ViTForImageClassification.from_pretrained(str(start), local_files_only=True)
        if start
        else ViTForImageClassification(vit_config(config))
    )
    order = torch.Generator().manual_seed(order_seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for _ in range(epochs):
            shuffled = indices[torch.randperm(len(indices), generator=order)]
            for first in range(0, len(shuffled), config.batch):
                batch = shuffled[first : first + config.batch]
                yield {"pixel_values": digits.images[batch], "labels": digits.labels[batch]}

    per_epoch = math.ceil(len(indices) / config.batch)
    return fit_and_save(model, batches(), lr, epochs * per_epoch, folder)


@dataclass
class EndModel:
    folder: Path
    data: Path  # its training data as model inputs (for its merge statistics)


def train_pair(config: Config, digits: Digits, setting: str, seed: int, work: Path) -> tuple[EndModel, EndModel]:
    """The two end models of one seed pair in one setting."""
    if setting == "independent":
        parts = [digits.train, digits.train]
        starts: list[Path | None] = [None, None]
        init_seeds, epochs, lr = [2 * seed, 2 * seed + 1], config.epochs, config.lr
    else:
        base = train(
            config,
            digits,
            digits.train,
            work / "pretrained",
            1000 + seed,
            1000 + seed,
            config.pretrain_epochs,
            config.lr,
        )
        halves = digits.train[torch.randperm(len(digits.train), generator=torch.Generator().manual_seed(seed))]
        parts = [halves[: len(halves) // 2], halves[len(halves) // 2 :]]
        starts, init_seeds, epochs, lr = [base, base], [0, 0], config.finetune_epochs, config.finetune_lr
    ends = []
    for number, name in enumerate("ab"):
        folder = train(
            config,
            digits,
            parts[number],
            work / name,
            init_seeds[number],
            2 * seed + number,
            epochs,
            lr,
            starts[number],
        )
        save_file(digits.inputs(parts[number]), str(work / f"data-{name}.safetensors"))
        ends.append(EndModel(folder, work / f"data-{name}.safetensors"))
    return ends[0], ends[1]


# ---------------------------------------------------------------------- one pair, every variant


@dataclass
class Row:
    """One seed pair, one symmetry subset."""

    setting: str
    seed: int
    variant: str
    distance: float  # ||B_matched - A|| over every tensor, norm gains folded (folded_distance)
    function_change: float  # max |logits(B_matched) - logits(B)| on B's training images (rotfuse verify)
    acc_a: float
    acc_b: float
    merged_acc: float  # simple average, l = 0.5
    merged_loss: float
    barrier: float
    fisher_acc: float
    fisher_loss: float
    regmean_acc: float
    regmean_loss: float
    curve: Curve = field(repr=False)
    learn_seconds: float = 0.0
    learned: dict[str, Any] | None = field(default=None, repr=False)


def stats_merges(
    config: Config, a: EndModel, b: EndModel, work: Path, test: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Fisher and RegMean merges of A and (matched) B, scored on the test set."""
    scores: dict[str, float] = {}
    samples = {"fisher": config.fisher_samples, "regmean": config.regmean_samples}
    for kind in STATS_MERGES:
        folders = []
        for end in (a, b):
            folder = end.folder.parent / f"{end.folder.name}.{kind}"
            if not folder.exists():  # A's statistics serve every variant
                options = StatsOptions(kind=kind, max_samples=samples[kind], labels="sampled", device="cpu")
                compute_stats(end.folder, end.data, folder, options)
            folders.append(folder)
        merged = work / f"{b.folder.name}.{kind}-merge"
        merge([a.folder, b.folder], merged, MergeOptions(method=kind, stats=tuple(folders), device="cpu"))
        result = score(load_model(merged), test, LossSpec("data"), batch_size=256)
        scores[f"{kind}_acc"], scores[f"{kind}_loss"] = float(result.accuracy or 0.0), result.loss
    return scores


def folded_distance(a: Path, b: Path) -> float:
    """||B - A|| over every tensor with each model's LayerNorm gains folded into the weights that
    read them (gain 1, bias / gain): a distance that does not depend on how a model splits a scale
    between a norm and its readers -- the space the residual search works in, and the same for
    every variant (the copies with a residual map take the anchor's gains, the others keep B's)."""
    mine, theirs = folded_view(b), folded_view(a)
    return math.sqrt(
        sum(float((mine.read(n).double() - theirs.read(n).double()).pow(2).sum()) for n in mine.checkpoint.names())
    )


def run_pair(config: Config, digits: Digits, setting: str, seed: int, work: Path) -> list[Row]:
    a, b = train_pair(config, digits, setting, seed, work)
    test = digits.inputs(digits.test)
    settings = InterpolationSettings(grid(config.steps), batch_size=256, device="cpu", work_dir=work)
    rows = []
    save_file(test, str(work / "test.safetensors"))
    for name, symmetries, activations in VARIANTS:
        if name not in config.variants:
            continue
        matched = EndModel(work / f"b-{name.replace(' ', '_').replace('(', '').replace(')', '')}", b.data)
        learn = name.startswith("+learned")
        options = MatchOptions(
            symmetries=symmetry_set(symmetries),
            device="cpu",
            data=a.data if activations else None,
            data_samples=config.activation_samples,
            learn=learn,
            eval_data=work / "test.safetensors" if learn else None,
            learn_steps=config.learn_steps,
            data_batch_size=64 if learn else 16,
            lambda_schedule="fixed" if "fixed" in name else "uniform",
            seed=seed,
        )
        report = match(a.folder, b.folder, matched.folder, options)
        same = verify(b.folder, matched.folder, VerifyOptions(data=b.data, batch_size=256))
        curve = interpolate(a.folder, matched.folder, test, settings, label=name)
        middle = curve.at(0.5)
        accs = curve.accuracies or []
        rows.append(
            Row(
                setting,
                seed,
                name,
                folded_distance(a.folder, matched.folder),
                same["max_abs_diff"],
                accs[0],
                accs[-1],
                float(middle["accuracy"] or 0.0),
                float(middle["loss"] or 0.0),
                curve.barrier,
                curve=curve,
                **stats_merges(config, a, matched, work, test),
                learn_seconds=report.get("learned", {}).get("seconds", 0.0),
                learned=report.get("learned"),
            )
        )
    return rows


# ---------------------------------------------------------------------- summaries


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def summarize(rows: list[Row]) -> dict[str, dict[str, dict[str, Any]]]:
    """Per setting and variant: mean and std over seed pairs of every reported number."""
    summary: dict[str, dict[str, dict[str, Any]]] = {}
    for setting in dict.fromkeys(r.setting for r in rows):
        summary[setting] = {}
        baseline = {r.seed: r.distance or 1.0 for r in rows if r.setting == setting and r.variant == "none"}
        for variant in dict.fromkeys(r.variant for r in rows):
            chosen = [r for r in rows if r.setting == setting and r.variant == variant]
            columns = {
                "distance": [r.distance for r in chosen],
                "function_change": [r.function_change for r in chosen],
                "relative_distance": [r.distance / baseline[r.seed] for r in chosen],
                "endpoint_acc": [(r.acc_a + r.acc_b) / 2 for r in chosen],
                "merged_acc": [r.merged_acc for r in chosen],
                "merged_loss": [r.merged_loss for r in chosen],
                "barrier": [r.barrier for r in chosen],
                "fisher_acc": [r.fisher_acc for r in chosen],
                "fisher_loss": [r.fisher_loss for r in chosen],
                "regmean_acc": [r.regmean_acc for r in chosen],
                "regmean_loss": [r.regmean_loss for r in chosen],
                "learn_seconds": [r.learn_seconds for r in chosen],
            }
            summary[setting][variant] = {
                key: dict(zip(("mean", "std"), mean_std(vals)), values=vals) for key, vals in columns.items()
            }
    return summary


def mean_curves(rows: list[Row], setting: str) -> list[Curve]:
    """One curve per variant: the mean over seed pairs, with the std as its spread; the label
    carries the mean barrier of the runs (the table's number, not the mean curve's barrier)."""
    curves = []
    for variant in dict.fromkeys(r.variant for r in rows):
        chosen = [r for r in rows if r.setting == setting and r.variant == variant]
        losses = [mean_std(list(x)) for x in zip(*(r.curve.losses for r in chosen))]
        accs = [mean_std(list(x)) for x in zip(*(r.curve.accuracies or [] for r in chosen))]
        label = f"{variant} (barrier {fmt([r.barrier for r in chosen], 2)})"
        curves.append(
            Curve(
                label,
                chosen[0].curve.lambdas,
                [m for m, _ in losses],
                [m for m, _ in accs],
                loss_spread=[s for _, s in losses],
                accuracy_spread=[s for _, s in accs],
            )
        )
    return curves


TITLES = {
    "independent": "Independent seeds: A and B trained from different random initialisations",
    "shared-init": "Shared init: one ViT pretrained briefly, fine-tuned twice on disjoint data halves",
}


def markdown(config: Config, rows: list[Row], summary: dict[str, Any], command: str) -> str:
    n = len(config.seeds)
    lines = [
        "# rotfuse on digits ViTs: matching, then merging",
        "",
        f"Produced by `{command}`. ViTForImageClassification, {config.layers} layers, hidden {config.hidden}, "
        f"{config.heads} heads, FFN {config.intermediate}, patch {config.patch}x{config.patch} on 8x8 digits; "
        f"{config.train} training / {config.test} held-out test images. Mean ± std over {n} seed pair(s) "
        f"(seeds {', '.join(map(str, config.seeds))}). Every accuracy and loss is measured on the held-out test set.",
        "",
        "- distance: `||B_matched - A||` over all tensors, each model's LayerNorm gains folded into the weights "
        "reading them (relative: divided by the distance without matching)",
        "- function change: largest `|logits(B_matched) - logits(B)|` on B's training images (`rotfuse verify`); "
        "matching must leave B's function unchanged",
        "- simple: the plain average `(A + B_matched) / 2`, i.e. l = 0.5 on the interpolation path",
        f"- barrier: `max_l L(l) - ((1-l) L(A) + l L(B))` of the test cross-entropy, {config.steps}-point grid",
        f"- Fisher: diagonal Fisher from {config.fisher_samples} training examples per model (labels sampled from "
        f"the model); RegMean: input Gram matrices from {config.regmean_samples} training examples, alpha 0.9 -- "
        "both computed on the matched B",
        "",
    ]
    for setting, variants in summary.items():
        endpoint = variants["none"]["endpoint_acc"]
        lines += [
            f"## {TITLES[setting]}",
            "",
            f"End models' test accuracy: {fmt(endpoint['values'])}. "
            f"Plot: [barrier_{setting}.png](barrier_{setting}.png)",
            "",
            "| matching | distance | relative distance | function change | simple: accuracy | simple: loss "
            "| loss barrier "
            "| learning s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {variant} | {fmt(cell['distance']['values'], 2)} | {fmt(cell['relative_distance']['values'])} | "
            f"{max(cell['function_change']['values']):.1e} | "
            f"{fmt(cell['merged_acc']['values'])} | {fmt(cell['merged_loss']['values'])} | "
            f"{fmt(cell['barrier']['values'])} | {fmt(cell['learn_seconds']['values'], 0)} |"
            for variant, cell in variants.items()
        ]
        lines += [
            "",
            "| matching | Fisher: accuracy | Fisher: loss | RegMean: accuracy | RegMean: loss |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {variant} | {fmt(cell['fisher_acc']['values'])} | {fmt(cell['fisher_loss']['values'])} | "
            f"{fmt(cell['regmean_acc']['values'])} | {fmt(cell['regmean_loss']['values'])} |"
            for variant, cell in variants.items()
        ]
        lines.append("")
    lines += [
        "## Per seed pair",
        "",
        "| setting | seed | matching | distance | acc A | acc B | simple acc | barrier | Fisher acc | RegMean acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.setting} | {r.seed} | {r.variant} | {r.distance:.2f} | {r.acc_a:.3f} | {r.acc_b:.3f} | "
        f"{r.merged_acc:.3f} | {r.barrier:.3f} | {r.fisher_acc:.3f} | {r.regmean_acc:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def run(config: Config, out: Path, command: str, work_root: Path | None = None, log: Any = print) -> dict[str, Any]:
    """The whole experiment; returns what results.json holds."""
    from rotfuse.eval.plot import plot_curves

    offline()
    torch.use_deterministic_algorithms(True)
    # Models this small gain nothing from intra-op threads, and on a busy machine two OpenMP threads
    # competing for a core run ~10x slower than one; one thread also keeps results bit-reproducible.
    torch.set_num_threads(1)
    digits = load_digits(config)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="rotfuse-digits-", dir=work_root) as tmp:
        for setting in config.settings:
            for seed in config.seeds:
                started = time.perf_counter()
                work = Path(tmp) / f"{setting}-{seed}"
                work.mkdir()
                pair = run_pair(config, digits, setting, seed, work)
                rows += pair
                log(
                    f"{setting} seed {seed}: "
                    + ", ".join(f"{r.variant} dist {r.distance:.1f} merged {r.merged_acc:.3f}" for r in pair)
                    + f" ({time.perf_counter() - started:.0f}s)"
                )
    summary = summarize(rows)
    out.mkdir(parents=True, exist_ok=True)
    for setting in summary:
        plot_curves(
            mean_curves(rows, setting),
            out / f"barrier_{setting}.png",
            f"{TITLES[setting]}\nmean ± std over {len(config.seeds)} seed pair(s), held-out test set",
            barrier_in_legend=False,
        )
    (out / "results.md").write_text(markdown(config, rows, summary, command), encoding="utf-8")
    result = {
        "command": command,
        "config": asdict(config),
        "summary": summary,
        "runs": [{**{k: v for k, v in asdict(r).items() if k != "curve"}, "curve": r.curve.as_dict()} for r in rows],
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed pair (CI)")
    parser.add_argument("--out", type=Path, default=Path("results/digits"), help="results folder")
    parser.add_argument("--seeds", type=str, default=None, help="comma-separated seed pairs, e.g. 0,1,2")
    parser.add_argument("--work", type=Path, default=None, help="where temporary checkpoints go")
    parser.add_argument("--settings", type=str, default=None, help="comma-separated: independent,shared-init")
    parser.add_argument("--variants", type=str, default=None, help="comma-separated variant names (default: all)")
    parser.add_argument("--learn-steps", type=int, default=None, help="steps of each learned matching")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.settings:
        config = replace(config, settings=tuple(args.settings.split(",")))
    if args.variants:
        config = replace(config, variants=tuple(v.strip() for v in args.variants.split(",")))
    if args.learn_steps is not None:
        config = replace(config, learn_steps=args.learn_steps)
    if args.seeds:
        config = replace(config, seeds=tuple(int(s) for s in args.seeds.split(",")))
    command = "python scripts/experiment_digits.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    run(config, args.out, command.strip(), args.work, log=lambda line: print(line, file=sys.stderr))
    print(
        f"wrote {args.out}/results.md, results.json and plots in {time.perf_counter() - started:.0f}s", file=sys.stderr
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
