"""Model inputs from a user's file, in the formats every data-driven command accepts.

- `.jsonl`: one JSON object per line with a "text" field (or "sentence"/"input"; a second
  "text_pair" field for pairs) and optionally an integer "label"; tokenised with the checkpoint's
  own tokenizer.
- `.txt`: one text per line, no labels.
- `.safetensors` / `.npz`: ready model inputs as tensors with a leading batch axis
  (`input_ids`, `attention_mask`, `token_type_ids`, `pixel_values`, `labels`, ...), so vision
  models work too.

An encoder-decoder's decoder needs its own tokens: `decoder_input_ids` from the file when given,
else the labels (seq2seq targets) shifted right, else the encoder's `input_ids` shifted right
(teacher forcing on the source: enough to compare or accumulate the two models' activations).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch

from rotfuse.core.errors import InputError
from rotfuse.core.tensors import all_finite
from rotfuse.io.untrusted import parse_json

TEXT_KEYS = ("text", "sentence", "input", "content")
IGNORE_LABEL = -100  # transformers' "no target here"
INT64 = (-(2**63), 2**63 - 1)
T = TypeVar("T")


def load_inputs(
    path: Path,
    tokenizer_folder: Path | None = None,
    max_samples: int | None = None,
    max_length: int = 128,
    rows: tuple[int, int] | None = None,
) -> dict[str, torch.Tensor]:
    """All samples of a data file as a dict of tensors with a common leading axis; with `rows`
    (start, end), only those samples (of the first `max_samples`), checked as if alone. A
    `.safetensors` file is then read only there: a rank of a distributed job holds its share."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors" and rows is not None:  # rows of the first max_samples: no cut after
        tensors = _load_rows(path, *rows)
        max_samples, rows = None, None
    elif suffix in (".safetensors", ".npz"):
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
    config = _config(tokenizer_folder)
    check_inputs(path, tensors, config)
    tensors = with_decoder_inputs(tensors, config)
    if max_samples is not None:
        tensors = {name: t[:max_samples] for name, t in tensors.items()}
    if rows is not None:
        tensors = {name: t[rows[0] : rows[1]] for name, t in tensors.items()}
    return tensors


def count_samples(path: Path, tokenizer_folder: Path | None = None, max_samples: int | None = None) -> int:
    """How many samples `load_inputs` would give: from the header alone for `.safetensors` (its
    tensors must agree on it), else by loading the file."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" and path.exists():
        sizes = {name: shape[0] if shape else None for name, shape in _shapes(path).items()}
        if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
            raise InputError(f"{path}: inputs need one common leading (batch) axis, got sizes {sizes}")
        count = next(iter(sizes.values()))
    else:
        count = len(next(iter(load_inputs(path, tokenizer_folder).values())))
    assert count is not None
    return count if max_samples is None else min(count, max_samples)


def _config(folder: Path | None) -> dict[str, Any]:
    if folder is None or not (Path(folder) / "config.json").exists():
        return {}
    from rotfuse.io.checkpoint import read_config

    return read_config(Path(folder))


def check_inputs(path: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    """Every input tensor before any model runs: a common batch axis, real numbers, finite
    floats, token ids inside the vocabulary, masks of 0 and 1, and labels the head can score
    (0..classes-1, or -100 for "ignore"; a negative label is never quietly class 0)."""
    sizes = {name: (t.shape[0] if t.dim() else None) for name, t in tensors.items()}
    if not sizes or None in sizes.values() or len(set(sizes.values())) != 1:
        raise InputError(f"{path}: inputs need one common leading (batch) axis, got sizes {sizes}")
    section = config.get("text_config")
    text: dict[str, Any] = section if isinstance(section, dict) else config
    for name, tensor in tensors.items():
        where = f"{path}: tensor {name!r}"
        if tensor.is_complex():
            raise InputError(f"{where} has dtype {tensor.dtype}; inputs are real numbers")
        if tensor.is_floating_point():
            if not all_finite(tensor):
                raise InputError(f"{where} holds NaN or Inf values")
            continue
        if name in ("input_ids", "decoder_input_ids"):
            _within(tensor, 0, text.get("vocab_size"), where, "token ids", "the vocabulary")
        elif name == "token_type_ids":
            _within(tensor, 0, text.get("type_vocab_size"), where, "token type ids", "type_vocab_size")
        elif name == "attention_mask":
            _within(tensor, 0, 2, where, "mask values", "0 and 1")
    labels = tensors.get("labels")
    if labels is not None and not labels.is_floating_point():
        classes = _label_count(config)
        kept = labels[labels != IGNORE_LABEL]
        _within(kept, 0, classes, f"{path}: labels", "labels", "the model's classes (or -100 to ignore)")


def with_decoder_inputs(tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Add `decoder_input_ids` for an encoder-decoder that has none (see the module doc)."""
    if not config.get("is_encoder_decoder") or "decoder_input_ids" in tensors:
        return tensors
    labels = tensors.get("labels")
    source = labels if labels is not None and labels.dim() == 2 and not labels.is_floating_point() else None
    if source is None:
        source = tensors.get("input_ids")
    if source is None:
        return tensors
    pad = config.get("pad_token_id")
    start = config.get("decoder_start_token_id")
    start = start if isinstance(start, int) else pad if isinstance(pad, int) else 0
    shifted = torch.full_like(source, start)
    shifted[:, 1:] = source[:, :-1]
    shifted[shifted == IGNORE_LABEL] = pad if isinstance(pad, int) else 0
    return {**tensors, "decoder_input_ids": shifted}


def _within(values: torch.Tensor, low: int, high: Any, where: str, what: str, range_name: str) -> None:
    """All integer `values` in [low, high) (no upper bound when `high` is not a positive int)."""
    if values.numel() == 0:
        return
    smallest, largest = int(values.min()), int(values.max())
    bounded = isinstance(high, int) and not isinstance(high, bool) and high > 0
    if smallest < low or (bounded and largest >= high):
        span = f"{low}..{high - 1}" if bounded else f">= {low}"
        bad = smallest if smallest < low else largest
        raise InputError(f"{where}: {what} must lie in {span} ({range_name}), found {bad}")


def _label_count(config: dict[str, Any]) -> int | None:
    """How many classes the head scores: the vocabulary for a language model, the labels of a
    classifier; None where labels are not class indices (regression, multi-label) or unknown."""
    from rotfuse.eval.runtime import language_model_kind

    if language_model_kind(config) is not None:
        text = config.get("text_config")
        return config.get("vocab_size") or (text.get("vocab_size") if isinstance(text, dict) else None)
    if config.get("problem_type") in ("regression", "multi_label_classification"):
        return None
    id2label = config.get("id2label")
    count = len(id2label) if isinstance(id2label, dict) and id2label else config.get("num_labels")
    return None if count == 1 else count


def batches(inputs: dict[str, torch.Tensor], batch_size: int) -> Iterator[dict[str, torch.Tensor]]:
    count = next(iter(inputs.values())).shape[0]
    for start in range(0, count, batch_size):
        yield {name: t[start : start + batch_size] for name, t in inputs.items()}


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


def _shapes(path: Path) -> dict[str, list[int]]:
    return _read_safetensors(path, lambda handle, name: list(handle.get_slice(name).get_shape()))


def _load_rows(path: Path, start: int, end: int) -> dict[str, torch.Tensor]:
    """Rows [start, end) of every tensor of a `.safetensors` file, reading no others."""
    return _read_safetensors(path, lambda handle, name: handle.get_slice(name)[start:end])


def _read_safetensors(path: Path, read: Callable[[Any, str], T]) -> dict[str, T]:
    """`read(handle, name)` for every tensor of a `.safetensors` file (a corrupt one: one line)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: read(handle, name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises various types for corrupt files
        raise InputError(f"{path}: cannot read input tensors ({type(exc).__name__}: {exc})") from exc


def _load_texts(path: Path) -> tuple[list[str], list[str] | None, list[int] | None]:
    texts: list[str] = []
    pairs: list[str] = []
    labels: list[int] = []
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix.lower() == ".txt":
            texts.append(line)
            continue
        record = parse_json(line, f"{path}:{number}", "the JSON line")
        key = next((k for k in TEXT_KEYS if isinstance(record, dict) and isinstance(record.get(k), str)), None)
        if key is None:
            raise InputError(f"{path}:{number}: no text field (expected one of {', '.join(TEXT_KEYS)})")
        texts.append(record[key])
        if "text_pair" in record:
            pairs.append(str(record["text_pair"]))
        if "label" in record:
            label = record["label"]
            if isinstance(label, bool) or not isinstance(label, int) or not INT64[0] <= label <= INT64[1]:
                raise InputError(f"{path}:{number}: label must be an integer (int64), got {str(label)[:40]}")
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
