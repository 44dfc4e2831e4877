"""Model inputs from a user's file, in the formats every data-driven command accepts.

- `.jsonl`: one JSON object per line with a "text" field (or "sentence"/"input"; a second
  "text_pair" field for pairs) and optionally an integer "label"; tokenised with the checkpoint's
  own tokenizer.
- `.txt`: one text per line, no labels.
- `.safetensors` / `.npz`: ready model inputs as tensors with a leading batch axis
  (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels`, ...), so vision
  models work too.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from rotfuse.core.errors import InputError

TEXT_KEYS = ("text", "sentence", "input", "content")


def load_inputs(path: Path, tokenizer_folder: Path | None = None, max_samples: int | None = None,
                max_length: int = 128) -> dict[str, torch.Tensor]:
    """All samples of a data file as a dict of tensors with a common leading axis."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix in (".safetensors", ".npz"):
        tensors = _load_tensors(path)
    elif suffix in (".jsonl", ".txt"):
        texts, pairs, labels = _load_texts(path)
        if tokenizer_folder is None:
            raise InputError(f"{path}: text data needs a checkpoint with a tokenizer")
        tensors = _tokenize(texts, pairs, tokenizer_folder, max_length)
        if labels is not None:
            tensors["labels"] = torch.tensor(labels, dtype=torch.long)
    else:
        raise InputError(f"{path}: unknown data format {suffix!r} (use .jsonl, .txt, .safetensors or .npz)")
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if not sizes or len(set(sizes.values())) != 1:
        raise InputError(f"{path}: inputs need one common leading (batch) axis, got sizes {sizes}")
    if max_samples is not None:
        tensors = {name: t[:max_samples] for name, t in tensors.items()}
    return tensors


def batches(inputs: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    count = next(iter(inputs.values())).shape[0]
    for start in range(0, count, batch_size):
        yield {name: t[start:start + batch_size] for name, t in inputs.items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix.lower() == ".npz":
            import numpy as np

            with np.load(path, allow_pickle=False) as archive:
                return {name: torch.from_numpy(archive[name].copy()) for name in archive.files}
        from safetensors.torch import load_file

        return dict(load_file(str(path)))
    except Exception as exc:  # numpy / safetensors raise various types for corrupt files
        raise InputError(f"{path}: cannot read input tensors ({type(exc).__name__}: {exc})") from exc


def _load_texts(path: Path) -> tuple[list[str], list[str] | None, list[int] | None]:
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".txt":
            texts.append(line)
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        key = next((k for k in TEXT_KEYS if isinstance(record, dict) and isinstance(record.get(k), str)), None)
        if key is None:
            raise InputError(f"{path}:{number}: no text field (expected one of {', '.join(TEXT_KEYS)})")
        texts.append(record[key])
        if "text_pair" in record:
            pairs.append(str(record["text_pair"]))
        if "label" in record:
            if not isinstance(record["label"], int):
                raise InputError(f"{path}:{number}: label must be an integer, got {record['label']!r}")
            labels.append(record["label"])
    if not texts:
        raise InputError(f"{path}: no samples")
    if pairs and len(pairs) != len(texts):
        raise InputError(f"{path}: text_pair must be given on every line or on none")
    if labels and len(labels) != len(texts):
        raise InputError(f"{path}: label must be given on every line or on none")
    return texts, pairs or None, labels or None


def _tokenize(texts: list[str], pairs: list[str] | None, folder: Path, max_length: int) -> dict[str, torch.Tensor]:
    from rotfuse.eval.runtime import offline, refuse_remote_code

    offline()
    refuse_remote_code(folder)
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as exc:
        raise InputError(f"{folder}: no usable tokenizer for text data ({type(exc).__name__}: {exc})") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    encoded = tokenizer(texts, pairs, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {name: value for name, value in encoded.items()}
