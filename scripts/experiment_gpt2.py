#!/usr/bin/env python
"""Learned matching on a second modality, offline: small byte-level language models trained on the
local Python installation's standard-library source.

- gpt2 (default): two GPT2LMHeadModels (pre-LN LayerNorm: the residual map is an orthogonal map
  keeping the all-ones direction), next-token cross-entropy;
- bert: two BertForMaskedLM (post-LN: the residual map is a permutation), masked-token
  cross-entropy (15 % of the bytes masked, fixed per sequence).

A and B of a pair are trained from different random initialisations and data orders on the same
training text. For each pair B is matched to A with `rotfuse.align.match.match` -- naive (no map),
the per-layer maps (`default`, from weights), + the residual map from weights, + the residual map
from activations on A's training text, + learned matching from there (the maps optimised for the
loss of the average on A's training text) -- and the path (1-l) A + l B is
scored on held-out text (other standard-library files): the l = 0.5 loss and the barrier. Every
matched copy is checked to compute B's function (`rotfuse verify`). Writes results.md and
results.json to --out. Deterministic given the seeds and `--threads`.

    nice -n 10 python scripts/experiment_gpt2.py --seeds 0,1,2 --hidden 128 --intermediate 512 --heads 2 \
        --learn-symmetries default,residual,linear --learn-rate 1.5e-3 --learn-perm-rate 4.5e-3 \
        --learn-steps 1500 --learn-decay cosine --lambda-schedule fixed --learn-log-every 100  # results/gpt2/
    nice -n 10 python scripts/experiment_gpt2.py --model bert          # results/bert-mlm/
    python scripts/experiment_gpt2.py --quick --out /tmp/q             # seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from training import fit_and_save

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.eval.interpolate import InterpolationSettings, grid, interpolate
from rotfuse.eval.runtime import offline
from rotfuse.eval.verify import VerifyOptions, verify
from rotfuse.symmetry.names import symmetry_set

# (name in tables, --symmetries, residual map from activations on A's training text, learn);
# the learned row's --symmetries are Config.learn_symmetries
VARIANTS = [
    ("naive", "none", False, False),
    ("per-layer (default)", "default", False, False),
    ("+residual (weights)", "default,residual", False, False),
    ("+residual (activations)", "default,residual", True, False),
    ("+learned", None, True, True),
]
MASK, PAD = 256, 257  # byte tokens 0-255, then the masked-LM's mask and padding ids
IGNORE = -100
EVERY_CORE = torch.get_num_threads()  # torch's default, before run() sets one thread for training


@dataclass(frozen=True)
class Config:
    model: str = "gpt2"
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    seq: int = 64
    train: int = 4096  # training sequences
    test: int = 512  # held-out sequences (other files)
    steps: int = 600  # training steps of each end model
    batch: int = 32
    lr: float = 3e-3
    seeds: tuple[int, ...] = (0, 1)
    grid: int = 11
    activation_samples: int = 256
    learn_steps: int = 300
    learn_batch: int = 32
    learn_rate: float = 1e-2
    learn_symmetries: str = "default,residual"
    lambda_schedule: str = "uniform"  # fixed, uniform ([0.3, 0.7]) or full ([0, 1])
    learn_decay: str = "constant"  # or cosine
    learn_log_every: int = 50
    learn_perm_rate: float | None = None  # the relaxed FFN/head permutation matrices' rate (None: learn_rate)
    threads: int = 0  # CPU threads for matching, learning and scoring (0: every core); training uses one


FULL = Config()
QUICK = Config(hidden=32, intermediate=64, train=256, test=64, steps=40, seeds=(0,), grid=3, learn_steps=10)


# ---------------------------------------------------------------------- data and training


def stdlib_text() -> tuple[bytes, bytes]:
    """The standard library's top-level .py files, sorted; every fifth file is held out."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = b"\n".join(f.read_bytes() for i, f in enumerate(files) if i % 5 != 4)
    held = b"\n".join(f.read_bytes() for i, f in enumerate(files) if i % 5 == 4)
    return train, held


def sequences(text: bytes, count: int, seq: int, seed: int) -> torch.Tensor:
    """`count` windows of `seq` bytes at evenly spread offsets, in a seeded order."""
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    starts = torch.linspace(0, len(data) - seq - 1, count).long()
    starts = starts[torch.randperm(count, generator=torch.Generator().manual_seed(seed))]
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


def as_inputs(config: Config, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """Model inputs: the bytes (causal LM), or 15 % masked with the labels there (masked LM)."""
    mask = torch.ones_like(ids)
    if config.model == "gpt2":
        return {"input_ids": ids, "attention_mask": mask}
    chosen = torch.rand(ids.shape, generator=torch.Generator().manual_seed(seed)) < 0.15
    return {
        "input_ids": torch.where(chosen, torch.full_like(ids, MASK), ids),
        "attention_mask": mask,
        "labels": torch.where(chosen, ids, torch.full_like(ids, IGNORE)),
    }


def model_config(config: Config) -> Any:
    if config.model == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=256,
            n_positions=config.seq,
            n_embd=config.hidden,
            n_layer=config.layers,
            n_head=config.heads,
            n_inner=config.intermediate,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
        )
    from transformers import BertConfig

    return BertConfig(
        vocab_size=258,
        hidden_size=config.hidden,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        intermediate_size=config.intermediate,
        max_position_embeddings=config.seq,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=PAD,
    )


def train(config: Config, ids: torch.Tensor, folder: Path, init_seed: int, order_seed: int) -> Path:
    from transformers import BertForMaskedLM, GPT2LMHeadModel

    torch.manual_seed(init_seed)
    cls = GPT2LMHeadModel if config.model == "gpt2" else BertForMaskedLM
    model = cls(model_config(config))
    order = torch.Generator().manual_seed(order_seed)

    def batches() -> Iterator[dict[str, torch.Tensor]]:
        for step in range(config.steps):
            index = torch.randint(0, len(ids), (config.batch,), generator=order)
            inputs = as_inputs(config, ids[index], 10_000 * order_seed + step)  # masks differ per step
            if config.model == "gpt2":
                inputs["labels"] = inputs["input_ids"]
            yield inputs

    return fit_and_save(model, batches(), config.lr, config.steps, folder)


# ---------------------------------------------------------------------- one pair


@contextmanager
def cpu_threads(count: int) -> Iterator[None]:
    """torch's CPU threads set to `count` (0: every core) inside the block."""
    before = torch.get_num_threads()
    torch.set_num_threads(count or EVERY_CORE)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class Row:
    seed: int
    variant: str
    function_change: float
    loss_a: float
    loss_b: float
    merged_loss: float
    barrier: float
    learn_seconds: float
    curve: dict[str, Any]
    verified: bool = True  # `rotfuse verify` accepts the matched copy (same function as B)


def run_pair(config: Config, train_ids: torch.Tensor, held: Path, seed: int, work: Path, log: Any) -> list[Row]:
    started = time.perf_counter()
    a = train(config, train_ids, work / "a", 2 * seed, 2 * seed)
    b = train(config, train_ids, work / "b", 2 * seed + 1, 2 * seed + 1)
    log(f"seed {seed}: trained A and B in {time.perf_counter() - started:.0f}s")
    data_a = work / "data-a.safetensors"
    save_file(as_inputs(config, train_ids, 7), str(data_a))  # A's training text (fixed masks)
    test = load_file(str(held))
    settings = InterpolationSettings(grid(config.grid), batch_size=128, device="cpu", work_dir=work)

    def matched_and_scored(index: int, name: str, symmetries: str | None, activations: bool, learn: bool) -> Row:
        folder = work / f"b-{index}"
        options = MatchOptions(
            symmetries=symmetry_set(symmetries or config.learn_symmetries),
            device="cpu",
            data=data_a if activations else None,
            data_samples=config.activation_samples,
            learn=learn,
            eval_data=held if learn else None,
            learn_steps=config.learn_steps,
            learn_rate=config.learn_rate,
            lambda_schedule=config.lambda_schedule,
            learn_decay=config.learn_decay,
            learn_log_every=config.learn_log_every,
            learn_perm_rate=config.learn_perm_rate,
            data_batch_size=config.learn_batch if learn else 16,
            seed=seed,
        )
        report = match(a, b, folder, options)
        same = verify(b, folder, VerifyOptions(data=held, batch_size=128))
        curve = interpolate(a, folder, test, settings, label=name)
        seconds = float(report.get("learned", {}).get("seconds", 0.0))
        row = Row(
            seed,
            name,
            float(same["max_abs_diff"]),
            curve.losses[0],
            curve.losses[-1],
            float(curve.at(0.5)["loss"] or 0.0),
            curve.barrier,
            seconds,
            curve.as_dict(),
            bool(same["agree"]),
        )
        log(f"seed {seed} {name}: midpoint {row.merged_loss:.4f} barrier {row.barrier:.4f} ({seconds:.0f}s learning)")
        return row

    with cpu_threads(config.threads):
        return [matched_and_scored(i, *variant) for i, variant in enumerate(VARIANTS)]


# ---------------------------------------------------------------------- summaries


def fmt(values: list[float], digits: int = 3) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


LAMBDAS = {"fixed": "l = 0.5", "uniform": "l uniform in [0.3, 0.7]", "full": "l uniform in [0, 1]"}


def markdown(config: Config, rows: list[Row], command: str) -> str:
    kind = (
        "GPT2LMHeadModel (pre-LN; next-token loss)"
        if config.model == "gpt2"
        else "BertForMaskedLM (post-LN; masked-token loss, 15 % of bytes masked)"
    )
    n = len(config.seeds)
    variants = list(dict.fromkeys(r.variant for r in rows))
    cells = {v: [r for r in rows if r.variant == v] for v in variants}
    ends = [x for r in cells[variants[0]] for x in (r.loss_a, r.loss_b)]
    perm_rate = "" if config.learn_perm_rate is None else f", FFN/head permutations {config.learn_perm_rate}"
    cosine = ", cosine decay" if config.learn_decay == "cosine" else ""
    lines = [
        f"# rotfuse on byte-level {config.model} language models: matching, then averaging",
        "",
        f"Produced by `{command}`. {kind}, {config.layers} layers, hidden {config.hidden}, {config.heads} heads, "
        f"FFN {config.intermediate}, byte tokens, {config.seq}-byte windows of the Python standard library's "
        f"top-level modules: {config.train} training windows, {config.test} held-out windows from other files. "
        f"A and B: different initialisation and data order, {config.steps} AdamW steps of batch {config.batch}. "
        f"Mean ± std over {n} independent seed pair(s) (seeds {', '.join(map(str, config.seeds))}); every loss is "
        "on the held-out text.",
        "",
        "- midpoint loss: the plain average `(A + B_matched) / 2` (l = 0.5)",
        f"- barrier: `max_l L(l) - ((1-l) L(A) + l L(B))`, {config.grid}-point grid",
        "- function change: largest `|logits(B_matched) - logits(B)|` on the held-out text, and whether "
        "`rotfuse verify` accepts every pair's copy (within its float32 tolerance)",
        f"- +learned: `-s {config.learn_symmetries}`, from the activation-matched copy, {config.learn_steps} Adam "
        f"steps (rate {config.learn_rate}{perm_rate}{cosine}, batch "
        f"{config.learn_batch}) on A's training text, {LAMBDAS[config.lambda_schedule]}; learning s is its wall "
        f"time on {config.threads or EVERY_CORE} CPU thread(s) (the end models train on one)",
        "",
        f"End models' held-out loss: {fmt(ends)} (nats per token).",
        "",
        "| matching | midpoint loss | barrier | function change, verify | learning s |",
        "|---|---|---|---|---|",
    ]
    for v in variants:
        chosen = cells[v]
        lines.append(
            f"| {v} | {fmt([r.merged_loss for r in chosen])} | {fmt([r.barrier for r in chosen])} | "
            f"{max(r.function_change for r in chosen):.1e}, "
            f"{'accepted' if all(r.verified for r in chosen) else 'REJECTED'} | "
            f"{fmt([r.learn_seconds for r in chosen], 0)} |"
        )
    lines += ["", *ratio_line(cells)]
    lines += ["## Per seed pair", "", "| seed | matching | loss A | loss B | midpoint loss | barrier |"]
    lines.append("|---|---|---|---|---|---|")
    lines += [
        f"| {r.seed} | {r.variant} | {r.loss_a:.3f} | {r.loss_b:.3f} | {r.merged_loss:.3f} | {r.barrier:.3f} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


def ratio_line(cells: dict[str, list[Row]]) -> list[str]:
    """The learned barrier over the best data-free/activation barrier, both as means over the pairs."""
    learned = cells.get("+learned")
    before = {v: statistics.mean(r.barrier for r in cells[v]) for v in cells if v.startswith("+residual")}
    if not learned or not before:
        return []
    best = min(before, key=before.__getitem__)
    ratio = statistics.mean(r.barrier for r in learned) / before[best]
    return [f"+learned barrier / {best} barrier (the better of the two; means over the pairs): {100 * ratio:.1f} %", ""]


def run(config: Config, out: Path, command: str, work_root: Path | None, log: Any) -> dict[str, Any]:
    offline()
    torch.set_num_threads(1)
    text, held_text = stdlib_text()
    train_ids = sequences(text, config.train, config.seq, 0)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix=f"rotfuse-{config.model}-", dir=work_root) as tmp:
        held = Path(tmp) / "held.safetensors"
        save_file(as_inputs(config, sequences(held_text, config.test, config.seq, 1), 8), str(held))
        for seed in config.seeds:
            work = Path(tmp) / f"pair-{seed}"
            work.mkdir()
            rows += run_pair(config, train_ids, held, seed, work, log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(markdown(config, rows, command), encoding="utf-8")
    result = {"command": command, "config": asdict(config), "runs": [asdict(r) for r in rows]}
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("gpt2", "bert"), default="gpt2")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one seed pair")
    parser.add_argument("--out", type=Path, default=None, help="results folder (results/gpt2 or results/bert-mlm)")
    parser.add_argument("--seeds", type=str, default=None, help="comma-separated seed pairs, e.g. 0,1")
    parser.add_argument("--work", type=Path, default=None, help="where temporary checkpoints go")
    # overrides of Config's fields (None: the --quick or full default)
    overrides = {
        "steps": (int, "training steps of each end model"),
        "hidden": (int, "end models' width"),
        "layers": (int, "end models' depth"),
        "heads": (int, "end models' attention heads"),
        "intermediate": (int, "end models' FFN width"),
        "learn_steps": (int, "learning steps"),
        "learn_rate": (float, "learning rate"),
        "learn_batch": (int, "learning batch size"),
        "learn_symmetries": (str, "the learned row's --symmetries, e.g. default,residual,linear"),
        "lambda_schedule": (str, "fixed, uniform or full"),
        "learn_decay": (str, "constant or cosine"),
        "learn_log_every": (int, "steps between logged steps"),
        "learn_perm_rate": (float, "the relaxed FFN/head permutation matrices' learning rate (default: --learn-rate)"),
        "threads": (int, "CPU threads for matching and learning (0: every core)"),
    }
    for field, (kind, text) in overrides.items():
        parser.add_argument("--" + field.replace("_", "-"), type=kind, default=None, help=text)
    args = parser.parse_args(argv)
    config = replace(QUICK if args.quick else FULL, model=args.model)
    if args.seeds:
        config = replace(config, seeds=tuple(int(s) for s in args.seeds.split(",")))
    config = replace(config, **{f: getattr(args, f) for f in overrides if getattr(args, f) is not None})
    out = args.out or Path("results/gpt2" if args.model == "gpt2" else "results/bert-mlm")
    command = "python scripts/experiment_gpt2.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.perf_counter()
    run(config, out, command.strip(), args.work, log=lambda line: print(line, file=sys.stderr, flush=True))
    print(f"wrote {out}/results.md and results.json in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
