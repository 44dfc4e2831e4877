#!/usr/bin/env python
"""A tiny classifier example, offline: two BERT sequence classifiers of one architecture (random
weights from two seeds, 3 labels) and a labelled input file -- what `rotfuse interpolate` and
`rotfuse stats --kind fisher` need, which the quick start's bare encoder cannot give.

    python scripts/example_classifier.py example/
    rotfuse interpolate example/a example/b --data example/data.safetensors
    rotfuse stats example/a --data example/data.safetensors --kind fisher -o example/a_fisher

Writes DIR/a/, DIR/b/ (checkpoint folders) and DIR/data.safetensors (input_ids, attention_mask,
labels). Needs transformers (`pip install 'rotfuse[models]'`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def build(folder: Path, samples: int = 64) -> list[Path]:
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
    )
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        BertForSequenceClassification(config).eval().save_pretrained(str(folder / name))
        written.append(folder / name)
    generator = torch.Generator().manual_seed(2)
    inputs = {
        "input_ids": torch.randint(3, config.vocab_size, (samples, 16), generator=generator),
        "attention_mask": torch.ones(samples, 16, dtype=torch.long),
        "labels": torch.randint(0, config.num_labels, (samples,), generator=generator),
    }
    save_file(inputs, str(folder / "data.safetensors"))
    return [*written, folder / "data.safetensors"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where to write a/, b/ and data.safetensors")
    for path in build(parser.parse_args().folder):
        print(path)


if __name__ == "__main__":
    main()
