"""Matching before merging helps on a real (small) task: two models trained from different seeds.

The task: 11 tokens drawn from three groups of the vocabulary; the label is the group with the
most tokens. The two tiny BERT classifiers share their embedding/head initialisation (as two
fine-tunes of one pretrained embedding would) but their transformer layer starts from different
seeds, and each trains on its own data stream. Their layers then compute similar functions with
differently ordered neurons and differently rotated heads -- what `rotfuse match` undoes -- so the
average of the matched pair must fit the task better than the plain average.

(symmetries.md section 8: with everything trained from different seeds the residual stream
differs too, and the per-layer symmetries alone barely help; this test does not claim more.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.tiny_models import build

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.eval.runtime import load_model
from rotfuse.merge.engine import MergeOptions, merge

SIZES = dict(
    num_hidden_layers=1,
    intermediate_size=96,
    initializer_range=0.02,
    hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0,
)
LAYER_SEEDS = (3, 4)
STEPS = 120


def task(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 60, (count, 12), generator=generator)
    ids[:, 0] = 1  # a fixed first token for the pooler
    group = (ids[:, 1:] - 3) % 3
    counts = torch.stack([(group == g).sum(1) for g in range(3)], dim=1).float()
    labels = (counts + 0.1 * torch.rand(count, 3, generator=generator)).argmax(1)  # random tie-break
    return ids, labels


def train(layer_seed: int, folder: Path) -> Path:
    model = build("bert", layer_seed, **SIZES)
    shared = build("bert", 0, **SIZES).state_dict()
    model.load_state_dict({k: v for k, v in shared.items() if ".encoder.layer." not in k}, strict=False)
    ids, labels = task(4096, 100 + layer_seed)
    generator = torch.Generator().manual_seed(layer_seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        batch = torch.randint(0, len(ids), (64,), generator=generator)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(str(folder))
    return folder


def loss(folder: Path) -> float:
    ids, labels = task(1000, 999)
    with torch.no_grad():
        return float(load_model(folder)(input_ids=ids, labels=labels).loss)


@pytest.mark.slow
def test_merging_after_match_gives_a_lower_loss(tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: faster, and the same training on every machine
    try:
        a, b = (train(seed, tmp_path / f"model_{seed}") for seed in LAYER_SEEDS)
    finally:
        torch.set_num_threads(threads)
    chance = float(torch.log(torch.tensor(3.0)))
    assert loss(a) < 0.8 * chance and loss(b) < 0.8 * chance  # both learned the task

    match(a, b, tmp_path / "b_aligned", MatchOptions(device="cpu"))
    merge([a, b], tmp_path / "plain", MergeOptions())
    merge([a, tmp_path / "b_aligned"], tmp_path / "matched", MergeOptions())
    plain, matched = loss(tmp_path / "plain"), loss(tmp_path / "matched")
    assert matched < plain, f"merge after match: loss {matched:.4f}, without: {plain:.4f}"
