"""Untrusted files end in exit 2 with one line naming the file, never in an internal error
(issue "Reliability II", item 3): hand-made bad files of every kind, then property-based fuzzing
that mutates valid files and requires exit 0 or 2 -- never 1 -- with nothing written on 2."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import assert_clean_exit, assert_one_line, run_cli, run_here
from helpers.files import edit_header, edit_json, header_of, leftovers, write_header
from helpers.tiny_models import save_tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """Tiny models (one sharded), data files and statistics folders, made once."""
    root = tmp_path_factory.mktemp("files")
    a, b = save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0)
    sharded = save_tiny("bert", root / "sharded", seed=0, max_shard_size="30KB")
    rng = np.random.default_rng(0)
    np.savez(
        root / "tokens.npz",
        input_ids=rng.integers(0, 61, (4, 6)),
        attention_mask=np.ones((4, 6), np.int64),
        labels=rng.integers(0, 3, 4),
    )
    for name, model in (("a", a), ("b", b)):
        for kind in ("regmean", "fisher"):
            result = run_cli(
                "stats",
                model,
                "--data",
                root / "tokens.npz",
                "--kind",
                kind,
                "-o",
                root / f"{name}_{kind}",
                "--device",
                "cpu",
                "-q",
            )
            assert result.returncode == 0, result.stderr
    return {
        "root": root,
        "a": a,
        "b": b,
        "sharded": sharded,
        "tokens": root / "tokens.npz",
        **{f"{n}_{k}": root / f"{n}_{k}" for n in "ab" for k in ("regmean", "fisher")},
    }


def _copy(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


def _first_entry(text: str) -> str:
    return next(k for k in json.loads(text) if k != "__metadata__")


# ---------------------------------------------------------------------- hand-made bad files


HEADER_DAMAGE = {
    "offset Infinity": lambda t: re.sub(r'"data_offsets":\[0,(\d+)\]', '"data_offsets":[0,Infinity]', t, count=1),
    "offset 1e400": lambda t: re.sub(r'"data_offsets":\[0,(\d+)\]', '"data_offsets":[0,1e400]', t, count=1),
    "shape Infinity": lambda t: re.sub(r'"shape":\[30\]', '"shape":[Infinity]', t, count=1),
    "metadata int": lambda t: t.replace('"__metadata__":{"format":"pt"}', '"__metadata__":5'),
    "metadata string": lambda t: t.replace('"__metadata__":{"format":"pt"}', '"__metadata__":"pt"'),
    "deep nesting": lambda t: t.replace(
        '"__metadata__":{"format":"pt"}', '"__metadata__":' + "[" * 100000 + "]" * 100000
    ),
    "duplicate name": lambda t: (
        t.rstrip()[:-1]
        + f',"{_first_entry(t)}":'
        + json.dumps(json.loads(t)[_first_entry(t)], separators=(",", ":"))
        + "}"
    ),
}


@pytest.mark.parametrize("damage", sorted(HEADER_DAMAGE))
def test_bad_safetensors_header_is_one_line(work, tmp_path, damage):
    model = _copy(work["b"], tmp_path / "model")
    edit_header(model / "model.safetensors", HEADER_DAMAGE[damage])
    result = run_cli("match", work["a"], model, "-o", tmp_path / "out")
    assert_one_line(result.returncode, result.stderr, "model.safetensors")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [5, None, ["x"], "../a/model.safetensors"])
def test_bad_shard_index_is_one_line(work, tmp_path, value):
    model = _copy(work["sharded"], tmp_path / "model")
    index = model / "model.safetensors.index.json"
    edit_json(index, lambda data: {**data, "weight_map": {**data["weight_map"], next(iter(data["weight_map"])): value}})
    result = run_cli("merge", work["sharded"], model, "-o", tmp_path / "out")
    assert_one_line(result.returncode, result.stderr, "model.safetensors.index.json", "weight_map")


def test_deeply_nested_config_is_one_line(work, tmp_path):
    model = _copy(work["b"], tmp_path / "model")
    (model / "config.json").write_text('{"x":' + "[" * 100000 + "]" * 100000 + "}")
    result = run_cli("match", work["a"], model, "-o", tmp_path / "out")
    assert_one_line(result.returncode, result.stderr, "config.json", "nested too deeply")


MANIFEST_DAMAGE = {
    "entry is a string": lambda linear, key: {**linear, key: "input_gram:x"},
    "entry is a list": lambda linear, key: {**linear, key: [1, 2]},
    "entry lacks layout": lambda linear, key: {**linear, key: {"gram": linear[key]["gram"]}},
}


@pytest.mark.parametrize("damage", sorted(MANIFEST_DAMAGE))
def test_bad_statistics_manifest_is_one_line(work, tmp_path, damage):
    stats = _copy(work["b_regmean"], tmp_path / "b_stats")
    manifest = stats / "rotfuse_stats.json"
    edit_json(manifest, lambda m: {**m, "linear": MANIFEST_DAMAGE[damage](m["linear"], sorted(m["linear"])[0])})
    result = run_cli(
        "merge", "-m", "regmean", work["a"], work["b"], "--stats", work["a_regmean"], stats, "-o", tmp_path / "out"
    )
    assert_one_line(result.returncode, result.stderr, "rotfuse_stats.json", "linear")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind, change, fragment",
    [
        ("regmean", lambda t: torch.zeros_like(t), "all zero"),
        ("regmean", lambda t: torch.full_like(t, 1e30), "corrupt statistics"),
        ("fisher", lambda t: t.to(torch.int32), "floating point"),
    ],
)
def test_degenerate_statistics_are_refused_by_name(work, tmp_path, kind, change, fragment):
    stats = _copy(work[f"b_{kind}"], tmp_path / "b_stats")
    tensors = load_file(str(stats / "stats.safetensors"))
    victim = sorted(tensors)[0]
    tensors = {name: change(t) if name == victim else t for name, t in tensors.items()}
    save_file(tensors, str(stats / "stats.safetensors"), metadata={"format": "pt"})
    result = run_cli(
        "merge", "-m", kind, work["a"], work["b"], "--stats", work[f"a_{kind}"], stats, "-o", tmp_path / "out"
    )
    assert_one_line(result.returncode, result.stderr, "stats.safetensors", victim, fragment)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "name, content, fragment",
    [
        ("data.txt", b"good line\n\xff\xfe bad bytes\n", "not UTF-8"),
        ("data.jsonl", b'{"text": "caf\xe9"}\n', "not UTF-8"),
        ("data.jsonl", b'{"text": "big", "label": 99999999999999999999999}\n', "label"),
        ("data.jsonl", b'{"text": ' + b"[" * 100000 + b"]" * 100000 + b"}\n", "nested too deeply"),
    ],
)
def test_bad_text_data_is_one_line(work, tmp_path, name, content, fragment):
    (tmp_path / name).write_bytes(content)
    result = run_cli(
        "stats", work["a"], "--data", tmp_path / name, "--kind", "regmean", "-o", tmp_path / "out", "--device", "cpu"
    )
    assert_one_line(result.returncode, result.stderr, name, fragment)


def test_labels_outside_the_head_are_refused_before_running(work, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", input_ids=rng.integers(0, 61, (4, 6)), labels=np.array([0, 1, 7, 2]))
    result = run_cli(
        "stats",
        work["a"],
        "--data",
        tmp_path / "d.npz",
        "--kind",
        "fisher",
        "--labels",
        "data",
        "-o",
        tmp_path / "out",
        "--device",
        "cpu",
    )
    assert_one_line(result.returncode, result.stderr, "d.npz", "labels", "0..2", "7")


def test_nan_pixels_are_refused(tmp_path):
    vit = save_tiny("vit", tmp_path / "vit", seed=0)
    pixels = np.random.default_rng(0).standard_normal((3, 3, 12, 12)).astype(np.float32)
    pixels[1, 0, 2, 2] = np.nan
    np.savez(tmp_path / "images.npz", pixel_values=pixels)
    result = run_cli(
        "stats", vit, "--data", tmp_path / "images.npz", "--kind", "regmean", "-o", tmp_path / "out", "--device", "cpu"
    )
    assert_one_line(result.returncode, result.stderr, "images.npz", "pixel_values", "NaN")


# ---------------------------------------------------------------------- fuzzing: exit 0 or 2, never 1

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def _fuzz_run(scratch: Path, *args) -> None:
    """Run a command in this process on mutated input: 0, or 2 with one line and nothing written."""
    out = scratch / "out"
    code, stderr = run_here(*args, "-o", out, cwd=scratch)
    assert_clean_exit(code, stderr)
    if code == 2:
        assert not out.exists(), stderr
    assert leftovers(scratch) == []


def _mutate(data: dict, path: list[str], value: object, delete: bool) -> dict:
    """`data` with the field at `path` (keys, as far as they exist) replaced or deleted."""
    node = data
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            break
        node = node[key]
    else:
        key = path[-1]
        if delete:
            node.pop(key, None)
        else:
            node[key] = value
        return data
    node[path[-1]] = value
    return data


@FUZZ
@given(
    entry=st.integers(0, 200),
    field=st.sampled_from(["dtype", "shape", "data_offsets", "x"]),
    value=JSON,
    delete=st.booleans(),
    flip=st.none() | st.tuples(st.integers(0, 10**6), st.integers(0, 255)),
)
def test_fuzz_safetensors_header(work, entry, field, value, delete, flip):
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = _copy(work["b"], scratch / "model")
        text, data = header_of(model / "model.safetensors")
        header = json.loads(text)
        names = list(header)
        name = names[entry % len(names)]
        if name == "__metadata__":
            header[name] = value
        else:
            _mutate(header, [name, field], value, delete)
        raw = bytearray(json.dumps(header).encode())
        if flip is not None:
            raw[flip[0] % len(raw)] = flip[1]
        write_header(model / "model.safetensors", bytes(raw), data)
        _fuzz_run(scratch, "match", work["a"], model)


@FUZZ
@given(
    entry=st.integers(0, 500), value=JSON, key=st.sampled_from(["weight_map", "metadata", "other"]), whole=st.booleans()
)
def test_fuzz_shard_index(work, entry, value, key, whole):
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = _copy(work["sharded"], scratch / "model")

        def change(index: dict) -> dict:
            if whole or key != "weight_map":
                index[key] = value
            else:
                names = sorted(index["weight_map"])
                index["weight_map"][names[entry % len(names)]] = value
            return index

        edit_json(model / "model.safetensors.index.json", change)
        _fuzz_run(scratch, "merge", work["sharded"], model)


CONFIG_KEYS = [
    "model_type",
    "num_hidden_layers",
    "num_attention_heads",
    "hidden_size",
    "intermediate_size",
    "position_embedding_type",
    "architectures",
    "vocab_size",
    "tie_word_embeddings",
    "auto_map",
]


@FUZZ
@given(
    key=st.sampled_from(CONFIG_KEYS), value=JSON | st.integers(-3, 100), delete=st.booleans(), residual=st.booleans()
)
def test_fuzz_config_json(work, key, value, delete, residual):
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        model = _copy(work["b"], scratch / "model")
        edit_json(model / "config.json", lambda config: _mutate(config, [key], value, delete))
        _fuzz_run(scratch, "match", work["a"], model, "-s", "default,residual" if residual else "default")


@FUZZ
@given(
    path=st.sampled_from(
        [
            ["kind"],
            ["checkpoint"],
            ["checkpoint", "fingerprint"],
            ["linear"],
            ["linear", "*"],
            ["linear", "*", "gram"],
            ["linear", "*", "layout"],
            ["inputs"],
        ]
    ),
    value=JSON,
    delete=st.booleans(),
)
def test_fuzz_statistics_manifest(work, path, value, delete):
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        stats = _copy(work["b_regmean"], scratch / "b_stats")

        def change(manifest: dict) -> dict:
            keys = [sorted(manifest["linear"])[0] if part == "*" else part for part in path]
            return _mutate(manifest, keys, value, delete)

        edit_json(stats / "rotfuse_stats.json", change)
        _fuzz_run(scratch, "merge", "-m", "regmean", work["a"], work["b"], "--stats", work["a_regmean"], stats)


JOB_KEYS = [
    "method",
    "weights",
    "alpha",
    "fisher_floor",
    "fisher_normalize",
    "exclude",
    "head_from",
    "match",
    "symmetries",
    "max_rounds",
    "dtype",
    "device",
    "allow_nonfinite",
    "fsync",
    "overwrite",
    "dry_run",
]
YAML_VALUE = (
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=True)
    | st.text(alphabet="abcdefimnoprstuwxyz0123456789.,-_ ", max_size=8)
    | st.lists(st.integers(-2, 3) | st.text(alphabet="ab01,.", max_size=3), max_size=3)
)


@FUZZ
@given(values=st.dictionaries(st.sampled_from(JOB_KEYS), YAML_VALUE, max_size=3), garbage=st.booleans())
def test_fuzz_job_file(work, values, garbage):
    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        job = {"models": [str(work["a"]), str(work["b"])], **values}
        text = yaml.safe_dump(job)
        if garbage:
            text = text.replace(":", ": [", 1)
        (scratch / "job.yaml").write_text(text)
        _fuzz_run(scratch, "merge", "--config", scratch / "job.yaml")


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(
    name=st.sampled_from(["input_ids", "attention_mask", "labels", "token_type_ids", "extra"]),
    values=st.lists(st.integers(-(2**40), 2**40) | st.floats(), min_size=1, max_size=4),
    dtype=st.sampled_from(["int64", "int8", "float32", "float64", "bool", "uint8"]),
    shape=st.sampled_from([None, (), (4,), (2, 6), (4, 6, 1)]),
    kind=st.sampled_from(["regmean", "fisher"]),
)
def test_fuzz_data_file(work, name, values, dtype, shape, kind):
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        arrays = dict(np.load(work["tokens"]))
        target = arrays.get(name, np.zeros((4, 6), np.int64))
        size = int(np.prod(shape)) if shape is not None else target.size
        with np.errstate(all="ignore"):
            filled = np.resize(np.array(values, dtype=np.float64), size)
            new = filled.astype(dtype) if dtype != "bool" else filled != 0
        arrays[name] = new.reshape(shape if shape is not None else target.shape)
        np.savez(scratch / "data.npz", **arrays)
        _fuzz_run(scratch, "stats", work["a"], "--data", scratch / "data.npz", "--kind", kind, "--device", "cpu")
