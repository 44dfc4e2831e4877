"""Checkpoint I/O: layouts survive matching (sharding, dtypes, names), untouched tensors are copied
byte for byte, unknown tensors come along, inputs are never modified, bad files are refused."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from helpers.files import folder_digest
from helpers.functions import assert_same_function
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.pair import open_model
from rotfuse.align.scramble import scramble
from rotfuse.archs.layer_io import layer_tensor_names
from rotfuse.core.errors import InputError
from rotfuse.core.tensors import sq_distance
from rotfuse.io.checkpoint import INDEX_FILE, Checkpoint
from rotfuse.io.safetensors_file import read_header, start_writeback
from rotfuse.io.writer import CheckpointWriter, copy_side_files, plan_like


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
        assert [(e.name, e.dtype, e.shape) for e in a.entries.values()] == [
            (e.name, e.dtype, e.shape) for e in b.entries.values()
        ]
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
    touched = {
        name for layer in opened.bound.layers() for name in layer_tensor_names(opened.bound, layer, opened.checkpoint)
    }
    untouched = [name for name in src.names() if name not in touched]
    assert "bert.embeddings.word_embeddings.weight" in untouched and "my_adapter.extra_buffer" in untouched
    assert "bert.encoder.layer.0.attention.output.dense.bias" in untouched  # b_O never moves
    for name in untouched:
        assert raw_bytes(src, name) == raw_bytes(out, name), name
    assert raw_bytes(src, "bert.encoder.layer.0.attention.self.query.weight") != raw_bytes(
        out, "bert.encoder.layer.0.attention.self.query.weight"
    )
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


def test_attention_only_match_copies_the_ffn_and_measures_it_in_its_stored_dtype(tmp_path):
    """Without FFN permutation the FFN is only measured: read in bf16, never rewritten."""
    model = save_tiny("llama", tmp_path / "model", seed=0, dtype=torch.bfloat16, max_shard_size="40KB")
    anchor = save_tiny("llama", tmp_path / "anchor", seed=1, dtype=torch.bfloat16)
    report = match(
        anchor, model, tmp_path / "out", MatchOptions(device="cpu", symmetries=frozenset({"qk.rot", "vo.rot"}))
    )
    src, ref, out = Checkpoint.open(model), Checkpoint.open(anchor), Checkpoint.open(tmp_path / "out")
    ffn = [n for n in src.names() if ".mlp." in n]
    for name in ffn:
        assert raw_bytes(src, name) == raw_bytes(out, name), name
    assert raw_bytes(src, "model.layers.0.self_attn.q_proj.weight") != raw_bytes(
        out, "model.layers.0.self_attn.q_proj.weight"
    )
    for row in report["layers"]:
        names = [n for n in ffn if n.startswith(f"model.layers.{row['layer']}.")]
        expected = sum(float((src.get(n).double() - ref.get(n).double()).square().sum()) for n in names) ** 0.5
        assert row["modules"]["ffn"]["before"] == row["modules"]["ffn"]["after"] == pytest.approx(expected, rel=1e-6)


def test_writer_copies_what_nobody_wrote_early_and_only_that(tmp_path):
    model = save_tiny("bert", tmp_path / "model", seed=0)
    src = Checkpoint.open(model)
    first, second, *rest = src.names()
    (tmp_path / "out").mkdir()
    writer = CheckpointWriter(tmp_path / "out", plan_like(src), src)
    writer.write(first, torch.zeros(src.entry(first).shape))
    writer.copy_unwritten([first, second])
    assert writer.pending == set(rest)
    writer.finish()
    copy_side_files(src, tmp_path / "out")
    out = Checkpoint.open(tmp_path / "out")
    assert not out.get(first).any()
    for name in [second, *rest]:
        assert raw_bytes(src, name) == raw_bytes(out, name), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(), (0, 3), (5,), (3000, 7), (4, 300, 9)])
def test_sq_distance_matches_a_float64_reference_in_any_chunking(dtype, shape):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g).to(dtype) for _ in range(2))
    expected = float((a.double() - b.double()).square().sum())
    for chunk in (1, 64, 1 << 18):
        assert sq_distance(a, b, chunk) == pytest.approx(expected, rel=1e-6, abs=1e-12)
    if len(shape) == 2:  # a transposed view, as in-out layouts are read
        assert sq_distance(a.T, b.T, 64) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_start_writeback_leaves_the_bytes_alone(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"x" * 10000)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"y" * 100, 5000)
        start_writeback(fd, 5000, 100)
        start_writeback(fd, 0, 0)  # nothing to do
    finally:
        os.close(fd)
    assert path.read_bytes() == b"x" * 5000 + b"y" * 100 + b"x" * 4900


def test_copy_checks_a_tensor_for_nan_unless_it_was_checked_when_read(tmp_path, monkeypatch):
    """Copied bytes are checked for NaN/Inf like every tensor read -- once: a tensor this run has
    read (a layer's, checked then) is copied without reading it again; one never read is read and
    checked, and refused if it holds NaN."""
    import rotfuse.io.checkpoint as checkpoint_module

    model = save_tiny("bert", tmp_path / "model", seed=0)
    first, second, third, *_ = (n for n in Checkpoint.open(model).names() if n.endswith("weight"))
    tensors = load_file(str(model / "model.safetensors"))
    tensors[third] = tensors[third].clone()
    tensors[third].view(-1)[0] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    src = Checkpoint.open(model)
    checked: list[int] = []
    all_finite = checkpoint_module.all_finite
    monkeypatch.setattr(checkpoint_module, "all_finite", lambda t: checked.append(1) or all_finite(t))
    src.get(first)
    assert len(checked) == 1
    (tmp_path / "out").mkdir()
    writer = CheckpointWriter(tmp_path / "out", plan_like(src), src)
    writer.copy(first)
    assert len(checked) == 1, "read and checked already: copied as bytes, not read again"
    writer.copy(second)
    assert len(checked) == 2, "never read: checked as it is copied"
    with pytest.raises(InputError, match="NaN or Inf"):
        writer.copy(third)
    writer.abort()
