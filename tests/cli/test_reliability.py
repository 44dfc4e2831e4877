"""Bad input gets one clear line and exit 2; outputs appear complete or not at all, whatever
happens mid-write (SIGTERM, Ctrl-C, a full disk); the same command gives the same bytes."""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line_error
from helpers.functions import assert_same_function
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import REPORT_NAME


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".rotfuse-tmp-"))


# ---------------------------------------------------------------------- bad input


def test_nonfinite_tensor_is_refused_unless_allowed(cli, tmp_path):
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    model = save_tiny("bert", tmp_path / "model", seed=0)
    tensors = load_file(str(model / "model.safetensors"))
    name = "bert.encoder.layer.1.intermediate.dense.weight"
    tensors[name][3, 4] = float("nan")
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    assert_one_line_error(cli("match", anchor, model, "-o", tmp_path / "out"), name, "NaN or Inf", "--allow-nonfinite")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    result = cli("match", anchor, model, "-o", tmp_path / "out", "--allow-nonfinite", "--json", "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert "skipped" in report["layers"][1]["modules"]["ffn"]  # left alone, not mangled
    assert "skipped" not in report["layers"][0]["modules"]["ffn"]


def test_pickled_bin_checkpoint_is_read_safely(cli, tmp_path):
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    model = save_tiny("bert", tmp_path / "model", seed=0)  # then convert, as older transformers saved it
    torch.save(load_file(str(model / "model.safetensors")), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    result = cli("match", anchor, tmp_path / "model", "-o", tmp_path / "out", "-q")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out" / "model.safetensors").exists()
    assert not (tmp_path / "out" / "pytorch_model.bin").exists()  # no stale copy of the old weights
    assert_same_function(tmp_path / "model", tmp_path / "out")


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_runs_code_is_refused(cli, tmp_path):
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "config.json").write_text((anchor / "config.json").read_text())
    marker = tmp_path / "pwned"
    with open(evil / "pytorch_model.bin", "wb") as handle:
        pickle.dump({"bert.embeddings.word_embeddings.weight": _Exploit(marker)}, handle)
    assert_one_line_error(cli("match", anchor, evil, "-o", tmp_path / "out"), "pytorch_model.bin", "refused")
    assert not marker.exists()


def test_mixed_dtypes_between_anchor_and_model_work(tmp_path, cli):
    """An fp32 anchor and a bf16 model: the math runs in fp32, the output keeps the model's dtypes."""
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    model = save_tiny("bert", tmp_path / "model", seed=0, dtype=torch.bfloat16)
    assert cli("match", anchor, model, "-o", tmp_path / "out", "-q").returncode == 0
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert {t.dtype for t in out.values() if t.is_floating_point()} == {torch.bfloat16}


def test_dry_run_writes_nothing(cli, tmp_path):
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    model = save_tiny("bert", tmp_path / "model", seed=0)
    result = cli("match", anchor, model, "-o", tmp_path / "out", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["dry_run"] is True and plan["layers"] == ["0", "1"]
    assert plan["tensors"]["transformed"] > 0 and plan["tensors"]["copied"] > 0
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert_one_line_error(
        cli("match", anchor, tmp_path / "none", "-o", tmp_path / "out", "--dry-run"), "no such checkpoint"
    )


# ---------------------------------------------------------------------- interrupted or failing writes


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory) -> tuple[Path, Path]:
    """Large enough that matching takes a few seconds: time to interrupt it mid-write."""
    root = tmp_path_factory.mktemp("big")
    sizes = dict(
        hidden_size=256,
        num_attention_heads=8,
        intermediate_size=1400,
        num_hidden_layers=10,
        vocab_size=3000,
        max_position_embeddings=64,
    )
    return save_tiny("bert", root / "anchor", seed=1, **sizes), save_tiny("bert", root / "model", seed=0, **sizes)


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_keeps_the_old_output(big_pair, tmp_path, sig, code):
    anchor, model = big_pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous.txt").write_text("the old output")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rotfuse",
            "match",
            str(anchor),
            str(model),
            "-o",
            str(out),
            "--overwrite",
            "--device",
            "cpu",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(
        (p / "model.safetensors").exists() for p in tmp_path.glob(".rotfuse-tmp-*")
    ):
        time.sleep(0.02)
    assert process.poll() is None, "finished before it could be interrupted"
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == code, stderr
    assert "no output was written" in stderr and "Traceback" not in stderr
    assert (out / "previous.txt").read_text() == "the old output"
    assert sorted(p.name for p in out.iterdir()) == ["previous.txt"]
    assert leftovers(tmp_path) == []


def test_disk_full_gives_a_clear_error_and_no_output(big_pair, tmp_path):
    anchor, model = big_pair

    def small_disk() -> None:  # writes past 256 KiB fail with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "rotfuse",
            "match",
            str(anchor),
            str(model),
            "-o",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        preexec_fn=small_disk,
    )
    assert_one_line_error(result, "File too large")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_unwritable_output_location(cli, tmp_path):
    anchor = save_tiny("bert", tmp_path / "anchor", seed=1)
    (tmp_path / "blocker").write_text("a file, not a folder")
    assert_one_line_error(cli("match", anchor, anchor, "-o", tmp_path / "blocker" / "out"), "blocker")


# ---------------------------------------------------------------------- determinism


def test_same_command_twice_gives_identical_bytes(cli, tmp_path):
    anchor = save_tiny("roberta", tmp_path / "anchor", seed=1)
    model = save_tiny("roberta", tmp_path / "model", seed=0, max_shard_size="30KB")
    reports = []
    for name in ("one", "two"):
        result = cli("match", anchor, model, "-o", tmp_path / name, "--json", "-q")
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        report.pop("timings"), report.pop("output")
        reports.append(report)
    assert reports[0] == reports[1]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    for relative in files:
        if relative.name != REPORT_NAME:
            assert (tmp_path / "one" / relative).read_bytes() == (tmp_path / "two" / relative).read_bytes(), relative


# ------------------------------------------------------- every bad input, through the CLI, for match and merge


def _break(kind: str, folder: Path) -> str:
    """Damage a checkpoint folder in one way; returns a fragment the error line must contain."""
    weights = folder / "model.safetensors"
    if kind == "no-config":
        (folder / "config.json").unlink()
        return "config.json"
    if kind == "no-weights":
        weights.unlink()
        return "no weights found"
    if kind == "truncated":
        weights.write_bytes(weights.read_bytes()[:-64])
        return "truncated"
    if kind == "corrupt-header":
        data = bytearray(weights.read_bytes())
        data[10:20] = b"@@@@@@@@@@"
        weights.write_bytes(bytes(data))
        return "model.safetensors"
    if kind == "unknown-type":
        config = json.loads((folder / "config.json").read_text())
        config["model_type"] = "nonesuch"
        (folder / "config.json").write_text(json.dumps(config))
        return "nonesuch"
    if kind == "nan":
        tensors = load_file(str(weights))
        tensors["bert.encoder.layer.0.output.dense.weight"][0, 0] = float("inf")
        save_file(tensors, str(weights), metadata={"format": "pt"})
        return "'bert.encoder.layer.0.output.dense.weight' contains NaN or Inf"
    if kind == "missing-shard":
        save_tiny("bert", folder, seed=0, max_shard_size="20KB")
        (folder / "model.safetensors").unlink(missing_ok=True)
        victim = sorted(folder.glob("model-*.safetensors"))[1]
        victim.unlink()
        return victim.name
    if kind == "other-shapes":
        save_tiny("bert", folder, seed=0, hidden_size=36, num_attention_heads=3)
        return "shape"
    raise ValueError(kind)


@pytest.mark.parametrize("command", ["match", "merge"])
@pytest.mark.parametrize(
    "kind",
    ["no-config", "no-weights", "truncated", "corrupt-header", "missing-shard", "unknown-type", "other-shapes", "nan"],
)
def test_bad_checkpoint_is_one_line_and_exit_2(cli, tmp_path, command, kind):
    good = save_tiny("bert", tmp_path / "good", seed=1)
    bad = save_tiny("bert", tmp_path / "bad", seed=0)
    fragment = _break(kind, bad)
    args = ["match", good, bad] if command == "match" else ["merge", good, bad]
    if command == "merge" and kind == "unknown-type":
        fragment = "model_type"  # merge needs no spec, but the two checkpoints must be of one type
    before = {p: p.read_bytes() for p in good.rglob("*") if p.is_file()}
    assert_one_line_error(cli(*args, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []
    assert {p: p.read_bytes() for p in good.rglob("*") if p.is_file()} == before  # inputs untouched


def test_merge_with_statistics_of_another_checkpoint_is_refused(cli, tmp_path):
    """Statistics computed before matching do not belong to the matched checkpoint."""
    import numpy as np

    a = save_tiny("bert", tmp_path / "a", seed=0)
    b = save_tiny("bert", tmp_path / "b", seed=1)
    np.savez(tmp_path / "inputs.npz", input_ids=np.random.default_rng(0).integers(0, 60, (8, 6)))
    for name in ("a", "b"):
        result = cli(
            "stats",
            tmp_path / name,
            "--data",
            tmp_path / "inputs.npz",
            "--kind",
            "regmean",
            "-o",
            tmp_path / f"{name}_stats",
            "-q",
        )
        assert result.returncode == 0, result.stderr
    assert cli("match", a, b, "-o", tmp_path / "b_aligned", "-q").returncode == 0
    assert_one_line_error(
        cli(
            "merge",
            "--method",
            "regmean",
            a,
            tmp_path / "b_aligned",
            "--stats",
            tmp_path / "a_stats",
            tmp_path / "b_stats",
            "-o",
            tmp_path / "merged",
        ),
        "b_stats",
        "another checkpoint",
    )
    assert not (tmp_path / "merged").exists()
