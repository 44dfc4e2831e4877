"""Checkpoint I/O: layouts survive matching (sharding, dtypes, names), untouched tensors are copied
byte for byte, unknown tensors come along, inputs are never modified, bad files are refused."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_tiny
from test_match import assert_same_function

from rotfuse.errors import InputError
from rotfuse.io.checkpoint import INDEX_FILE, Checkpoint
from rotfuse.io.safetensors_file import read_header
from rotfuse.archs.layer_io import layer_tensor_names
from rotfuse.pipeline import MatchOptions, match, open_model, scramble


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def raw_bytes(checkpoint: Checkpoint, name: str) -> bytes:
    entry = checkpoint.entry(name)
    with open(checkpoint.shard_of(name).path, "rb") as handle:
        handle.seek(entry.begin)
        return handle.read(entry.nbytes)


def test_sharded_in_sharded_out_with_the_same_index(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0, max_shard_size="20KB")
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)  # single file: layouts may differ
    src = Checkpoint.open(model)
    assert len(src.shards) > 2 and src.index is not None
    match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    out = Checkpoint.open(tmp_path / "out")
    assert [s.path.name for s in out.shards] == [s.path.name for s in src.shards]
    assert json.loads((tmp_path / "out" / INDEX_FILE).read_text())["weight_map"] == src.index["weight_map"]
    for a, b in zip(src.shards, out.shards):
        assert [(e.name, e.dtype, e.shape) for e in a.entries.values()] == \
               [(e.name, e.dtype, e.shape) for e in b.entries.values()]
    assert_same_function(model, tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_round_trip(tmp_path, dtype):
    model = save_tiny("bert", tmp_path / "model", seed=0, dtype=dtype)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1, dtype=dtype)
    match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in out.values() if t.is_floating_point()} == {dtype}
    # the transform is exact; only the final cast rounds, so outputs agree to that dtype's precision
    assert_same_function(model, tmp_path / "out", rel=3e-2 if dtype == torch.bfloat16 else 5e-3)


def test_untouched_tensors_are_byte_identical_and_extras_copied(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    path = model / "model.safetensors"
    tensors = load_file(str(path))
    tensors["my_adapter.extra_buffer"] = torch.arange(7, dtype=torch.int32)
    save_file(tensors, str(path), metadata={"format": "pt", "note": "kept"})
    report = match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    src, out = Checkpoint.open(model), Checkpoint.open(tmp_path / "out")
    assert "my_adapter.extra_buffer" in report["unpaired_tensors"]
    opened = open_model(model)
    touched = {name for layer in opened.bound.layers()
               for name in layer_tensor_names(opened.bound, layer, opened.checkpoint)}
    untouched = [name for name in src.names() if name not in touched]
    assert "bert.embeddings.word_embeddings.weight" in untouched and "my_adapter.extra_buffer" in untouched
    assert "bert.encoder.layer.0.attention.output.dense.bias" in untouched  # b_O never moves
    for name in untouched:
        assert raw_bytes(src, name) == raw_bytes(out, name), name
    assert raw_bytes(src, "bert.encoder.layer.0.attention.self.query.weight") != \
           raw_bytes(out, "bert.encoder.layer.0.attention.self.query.weight")
    assert out.shards[0].metadata == {"format": "pt", "note": "kept"}


def test_inputs_are_never_modified(tmp_path):
    model = save_tiny("vit", tmp_path / "model", seed=0)
    anchor = save_tiny("vit", tmp_path / "anchor", seed=1)
    before = folder_digest(model), folder_digest(anchor)
    match(anchor, model, tmp_path / "out", MatchOptions(device="cpu"))
    scramble(model, tmp_path / "scrambled", MatchOptions(device="cpu"), seed=0)
    assert (folder_digest(model), folder_digest(anchor)) == before


def test_fingerprint_tells_a_matched_copy_from_its_original(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    scramble(model, tmp_path / "scrambled", MatchOptions(device="cpu"), seed=0)
    a, b = Checkpoint.open(model), Checkpoint.open(tmp_path / "scrambled")
    assert a.fingerprint() == Checkpoint.open(model).fingerprint()
    assert a.fingerprint() != b.fingerprint()


def test_writer_output_is_readable_by_safetensors(tmp_path):
    model = save_tiny("roberta", tmp_path / "model", seed=0, max_shard_size="30KB")
    scramble(model, tmp_path / "out", MatchOptions(device="cpu"), seed=0)
    for shard in sorted((tmp_path / "out").glob("*.safetensors")):
        loaded = load_file(str(shard))
        assert set(loaded) == set(read_header(shard).entries)


# ---------------------------------------------------------------------- bad files


def test_truncated_file_is_refused(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    path = model / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(InputError, match=r"model\.safetensors: truncated file: tensor"):
        Checkpoint.open(model)


def test_garbage_header_is_refused(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    (model / "model.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!" + b"\0" * 20)
    with pytest.raises(InputError, match="corrupt safetensors header"):
        Checkpoint.open(model)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0, max_shard_size="20KB")
    victim = sorted(model.glob("model-*.safetensors"))[1]
    os.remove(victim)
    with pytest.raises(InputError, match=f"names shard '{victim.name}', which does not exist"):
        Checkpoint.open(model)


def test_missing_config_and_missing_weights(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="missing config file"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(InputError, match="no weights found"):
        Checkpoint.open(tmp_path / "empty")
    with pytest.raises(InputError, match="no such checkpoint folder"):
        Checkpoint.open(tmp_path / "nowhere")
