"""Running a checkpoint with transformers: for the commands that need outputs, not just tensors.

`match` and `merge --method simple` never import this module (nor transformers). `stats`,
`verify` and `interpolate` do. Nothing here touches the network: models load from their folder
with `local_files_only`, and the hub is switched off for the process. Nothing from the checkpoint
runs either: a folder whose configs name their own code (`auto_map`) is refused before
transformers sees it, and every load passes `trust_remote_code=False` (transformers then raises
instead of prompting on stdin).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from rotfuse.core.errors import InputError

# model classes by the head their name says they have (transformers' naming)
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
CLASSIFIER_SUFFIXES = (
    "ForSequenceClassification",
    "ForImageClassification",
    "ForTokenClassification",
    "ForAudioClassification",
)
GENERATION_SUFFIXES = ("ForConditionalGeneration", "ForSeq2SeqLM")  # seq2seq, or a multimodal causal LM


def language_model_kind(config: dict[str, Any]) -> str | None:
    """'causal' (labels are the next tokens: shifted), 'seq2seq' (labels are the decoder's own
    targets, position by position), or None (not a language model)."""
    architectures = [a for a in config.get("architectures") or () if isinstance(a, str)]
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures):
        return "causal"
    if any(a.endswith(GENERATION_SUFFIXES) for a in architectures):
        return "seq2seq" if config.get("is_encoder_decoder") else "causal"  # Gemma 3 with images: causal
    return None


def offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def refuse_remote_code(folder: str | Path) -> None:
    """Refuse a checkpoint whose configs ask transformers to import Python files shipped with it
    (`auto_map` in config.json, tokenizer_config.json, ...): rotfuse never runs a checkpoint's code."""
    import json

    folder = Path(folder)
    for path in sorted(folder.glob("*.json")):
        if not (path.name == "config.json" or path.name.endswith("_config.json")):
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            continue  # unreadable side files are the loader's to report
        if isinstance(data, dict) and _names_code(data):
            raise InputError(
                f"{path}: names Python code shipped with the checkpoint (auto_map); rotfuse never "
                "runs a checkpoint's own code -- use a checkpoint of an architecture built into transformers"
            )


def _names_code(config: dict[str, Any]) -> bool:
    """True when a config dict (or a sub-config in it) carries an `auto_map`."""
    if config.get("auto_map"):
        return True
    return any(isinstance(value, dict) and value.get("auto_map") for value in config.values())


def model_class(config: dict[str, Any]) -> Any:
    """The transformers class named by config.json's `architectures` (AutoModel when absent)."""
    offline()
    import transformers

    for name in config.get("architectures") or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_model(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = torch.float32) -> torch.nn.Module:
    """Load a checkpoint folder with transformers, offline, in eval mode."""

    from rotfuse.io.checkpoint import read_config

    folder = Path(folder)
    config = read_config(folder)
    refuse_remote_code(folder)
    cls = model_class(config)
    try:
        model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False, dtype=dtype)
    except Exception as exc:  # transformers raises many types; the user needs the one line
        raise InputError(f"{folder}: transformers cannot load this checkpoint ({type(exc).__name__}: {exc})") from exc
    return model.to(device).eval()


# transformers' activation modules that compose tanh-GELU from ~8 elementwise ops: the same formula
# as torch's fused gelu(approximate="tanh"), to float rounding
TANH_GELU_COMPOSED = ("NewGELUActivation", "FastGELUActivation")


class TanhGelu(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.gelu(x, approximate="tanh")


def with_fused_activations(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with every composed tanh-GELU module replaced by torch's fused one (GPT-2's gelu_new:
    ~18 % of a small GPT-2's forward and backward). For learning, where the step time counts; written
    checkpoints, verify and interpolate run the model as its config says."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__ in TANH_GELU_COMPOSED:
                setattr(parent, name, TanhGelu())
    return model


def example_inputs(config: dict[str, Any], batch: int = 2, seq_len: int = 16, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random inputs valid for the architecture: token ids within the vocabulary
    (and decoder token ids for an encoder-decoder), pixel tensors of the configured size, or both (CLIP)."""
    generator = torch.Generator().manual_seed(seed)
    text = config.get("text_config") or config
    vision = config.get("vision_config") or config
    inputs: dict[str, torch.Tensor] = {}
    if "vocab_size" in text:
        limit = text.get("max_position_embeddings") or text.get("n_positions") or seq_len
        length = min(seq_len, int(limit))
        inputs["input_ids"] = torch.randint(0, int(text["vocab_size"]), (batch, length), generator=generator)
        inputs["attention_mask"] = torch.ones(batch, length, dtype=torch.long)
        if text.get("is_encoder_decoder") and isinstance(text.get("eos_token_id"), int):
            inputs["input_ids"] = _ending_with(inputs["input_ids"], text["eos_token_id"], int(text["vocab_size"]))
        # T5 needs decoder inputs (BART would shift input_ids); a sequence classifier pools the decoder's
        # states at the eos tokens of input_ids, so it gets none and shifts input_ids itself
        if text.get("is_encoder_decoder") and not _is_sequence_classifier(config):
            decoder_length = max(1, length - 3)  # another length than the encoder's
            inputs["decoder_input_ids"] = torch.randint(
                0, int(text["vocab_size"]), (batch, decoder_length), generator=generator
            )
    if "image_size" in vision:
        size = int(vision["image_size"])
        channels = int(vision.get("num_channels", 3))
        inputs["pixel_values"] = torch.randn(batch, channels, size, size, generator=generator)
    if not inputs:
        raise InputError("cannot build example inputs: config has neither vocab_size nor image_size")
    block, image_token = image_block(config), _image_token(config)
    if block and image_token is not None and "input_ids" in inputs and "pixel_values" in inputs:
        inputs.update(_with_image_block(inputs["input_ids"], block, image_token, int(text["vocab_size"])))
    return inputs


def _ending_with(ids: torch.Tensor, eos: int, vocab: int) -> torch.Tensor:
    """Each row ending with one eos token and holding no other, as a tokenizer writes an encoder's text:
    BART's sequence classifier reads the states at the eos tokens, the same number in every row."""
    ids = torch.where(ids == eos, (eos + 1) % vocab, ids)
    ids[:, -1] = eos
    return ids


def _is_sequence_classifier(config: dict[str, Any]) -> bool:
    return any(str(name).endswith("ForSequenceClassification") for name in config.get("architectures") or ())


def _image_token(config: dict[str, Any]) -> int | None:
    """The id of the placeholder token an image feature replaces (config keys differ by family)."""
    value = config.get("image_token_index", config.get("image_token_id"))
    return None if value is None else int(value)


def image_block(config: dict[str, Any]) -> list[int]:
    """The token ids an image takes in the text of an image-text model whose text holds one
    placeholder token per image feature (Gemma 3: begin-of-image, `mm_tokens_per_image` image
    tokens, end-of-image, as its processor lays them out); empty for other models."""
    count, image_token = config.get("mm_tokens_per_image"), _image_token(config)
    if count is None or image_token is None:
        return []
    ends = [config.get(key) for key in ("boi_token_index", "eoi_token_index")]
    image = [image_token] * int(count)
    return ([int(ends[0])] if ends[0] is not None else []) + image + ([int(ends[1])] if ends[1] is not None else [])


def _with_image_block(ids: torch.Tensor, block: list[int], image_token: int, vocab: int) -> dict[str, torch.Tensor]:
    """Each row's text with one image block after its first token (one image per row, as
    `pixel_values` has one per row), so the image tokens match the image features in number; text
    tokens equal to the image token are moved off it. `token_type_ids` marks the image tokens (1),
    as the processor's do."""
    batch, length = ids.shape
    text = torch.where(ids == image_token, (image_token + 1) % vocab, ids)
    tail = max(length - 1 - len(block), 1)  # at least one text token after the image
    row = torch.tensor(block, dtype=ids.dtype).expand(batch, -1)
    new = torch.cat([text[:, :1], row, text[:, 1 : 1 + tail]], dim=1)
    return {
        "input_ids": new,
        "attention_mask": torch.ones_like(new),
        "token_type_ids": (new == image_token).long(),
    }


def accepted_inputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inputs the model's forward takes by name (data files may carry more, e.g. labels for
    another head)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in inputs.items() if k in accepted}


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], **flags: Any) -> Any:
    """Call the model with the inputs its forward accepts; `flags` (output_hidden_states=True, ...)
    always go through -- transformers 5 takes them as **kwargs."""
    with torch.no_grad():
        return model(**accepted_inputs(model, inputs), **flags)


def main_output(outputs: Any) -> torch.Tensor:
    """The tensor that stands for "the function": logits when the model has a head, else hidden states."""
    for key in ("logits", "logits_per_image", "last_hidden_state", "pooler_output"):
        value = getattr(outputs, key, None) if not isinstance(outputs, dict) else outputs.get(key)
        if value is not None:
            return value
    if isinstance(outputs, tuple) and outputs:
        return outputs[0]
    raise InputError("the model returned no logits or hidden states to compare")
