"""Batch jobs for `rotfuse match` (issue 20 item 1): job files, --skip-existing, each model moved
into place when done, --models-from and --shard for array jobs."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.cli import assert_one_line, run_here
from helpers.files import folder_digest
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.options import REPORT_NAME


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {name: save_tiny("bert", root / name, seed=seed) for seed, name in enumerate(["a", "b", "c", "d"])}


def _json(code_err_out: tuple[int, str], path: Path) -> dict:
    code, err = code_err_out
    assert code == 0, err
    return json.loads(path.read_text())


def test_config_job_file_with_flags_winning(models, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(
        f"anchor: {models['a']}\nmodels: [{models['b']}, {models['c']}]\nout: {tmp_path / 'out'}\n"
        "max-rounds: 3\ndevice: cpu\nsymmetries: rot,scale\n"
    )
    report = _json(run_here("match", "--config", job, "-q"), tmp_path / "out" / REPORT_NAME)
    assert [m["settings"]["max_rounds"] for m in report["models"]] == [3, 3]
    assert report["models"][0]["symmetries"] == ["qk.rot", "qk.scale", "vo.rot", "vo.scale"]
    assert (tmp_path / "out" / "b" / REPORT_NAME).is_file() and (tmp_path / "out" / "c" / "model.safetensors").is_file()
    report = _json(
        run_here("match", "--config", job, "-q", "--max-rounds", "5", "-o", tmp_path / "out2"),
        tmp_path / "out2" / REPORT_NAME,
    )
    assert [m["settings"]["max_rounds"] for m in report["models"]] == [5, 5]


def test_config_unknown_key_and_missing_models_are_exit_2(models, tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text(f"anchor: {models['a']}\nmodle: [{models['b']}]\nout: {tmp_path / 'out'}\n")
    assert_one_line(*run_here("match", "--config", job), str(job), "modle")
    job.write_text(f"anchor: {models['a']}\nout: {tmp_path / 'out'}\n")
    assert_one_line(*run_here("match", "--config", job), "MODEL")


def test_skip_existing_keeps_a_finished_output_and_redoes_a_stale_one(models, tmp_path):
    out = tmp_path / "out"
    base = ["match", models["a"], models["b"], "-o", out, "--device", "cpu", "-q"]
    assert run_here(*base)[0] == 0
    before = folder_digest(out)
    assert_one_line(*run_here(*base), "already exists")  # without the flag: the refusal stays
    code, err = run_here(*base, "--skip-existing")
    assert code == 0, err
    assert folder_digest(out) == before
    assert "skipped" not in json.loads((out / REPORT_NAME).read_text())  # the kept report is the original one
    # other settings: stale, redone
    assert run_here(*base, "--skip-existing", "--max-rounds", "2")[0] == 0
    assert json.loads((out / REPORT_NAME).read_text())["settings"]["max_rounds"] == 2
    # an altered output: redone
    (out / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:-8])
    assert run_here(*base, "--skip-existing", "--max-rounds", "2")[0] == 0
    assert load_file(str(out / "model.safetensors"))  # whole again


def test_skip_existing_says_skipped_in_json(models, tmp_path, capsys):
    from rotfuse.cli import run

    out = tmp_path / "out"
    args = ["match", str(models["a"]), str(models["b"]), str(models["c"]), "-o", str(out), "--device", "cpu", "-q"]
    assert run(args) == 0
    capsys.readouterr()
    assert run([*args, "--skip-existing", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [m["skipped"] for m in result["models"]] == [True, True]


def _poison_last_layer(source: Path, folder: Path) -> Path:
    import shutil

    shutil.copytree(source, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in sorted(tensors) if "layer.1." in n and n.endswith("output.dense.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_a_later_model_failing_keeps_the_finished_ones_and_a_rerun_resumes(models, tmp_path):
    bad = _poison_last_layer(models["c"], tmp_path / "bad")
    out = tmp_path / "out"
    code, err = run_here("match", models["a"], models["b"], bad, "-o", out, "--device", "cpu", "-q")
    assert_one_line(code, err, "NaN")
    assert (out / "b" / "model.safetensors").is_file() and (out / "b" / REPORT_NAME).is_file()
    assert not (out / "bad").exists()
    kept = folder_digest(out / "b")
    shutil_copy = __import__("shutil").copyfile
    shutil_copy(models["c"] / "model.safetensors", bad / "model.safetensors")  # fixed
    code, err = run_here("match", models["a"], models["b"], bad, "-o", out, "--device", "cpu", "-q", "--skip-existing")
    assert code == 0, err
    assert folder_digest(out / "b") == kept
    report = json.loads((out / REPORT_NAME).read_text())
    assert [m.get("skipped", False) for m in report["models"]] == [True, False]


def test_models_from_and_shards(models, tmp_path):
    listing = tmp_path / "models.txt"
    listing.write_text(f"# three models\n{models['b']}\n\n{models['c']}\n{models['d']}\n")
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        code, err = run_here(
            "match", models["a"], "--models-from", listing, "-o", out, "--shard", shard, "--device", "cpu", "-q"
        )
        assert code == 0, err
    first = json.loads((out / "rotfuse_report.shard-0-of-2.json").read_text())
    second = json.loads((out / "rotfuse_report.shard-1-of-2.json").read_text())
    assert sorted(first["outputs"]) == ["b", "d"] and sorted(second["outputs"]) == ["c"]
    for name in "bcd":
        assert (out / name / REPORT_NAME).is_file()


@pytest.mark.parametrize("shard", ["2/2", "1", "a/b", "-1/3"])
def test_bad_shard_is_exit_2(models, tmp_path, shard):
    assert_one_line(
        *run_here("match", models["a"], models["b"], models["c"], "-o", tmp_path / "o", "--shard", shard),
        "--shard",
        "I/N",
    )


def test_empty_models_list_is_exit_2(models, tmp_path):
    (tmp_path / "none.txt").write_text("# nothing\n")
    assert_one_line(
        *run_here("match", models["a"], "--models-from", tmp_path / "none.txt", "-o", tmp_path / "o"), "none.txt"
    )


def test_a_killed_batch_keeps_finished_models_and_resumes(models, tmp_path):
    """SIGTERM right after the first model is in place: it stays, the exit line names it, and a
    rerun with --skip-existing does only the rest."""
    out = tmp_path / "out"
    args = ["match", str(models["a"]), str(models["b"]), str(models["c"]), "-o", str(out), "--device", "cpu"]
    code = (
        "import os, sys\n"
        "from rotfuse.core import signals\n"
        "original = signals.output_finished\n"
        "def finished(path):\n"
        f"    os.kill(os.getpid(), {int(signal.SIGTERM)})\n"
        "    original(path)\n"
        "signals.output_finished = finished\n"
        f"sys.argv = ['rotfuse', *{args!r}]\n"
        "from rotfuse.__main__ import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 143, result.stderr
    assert str(out / "b") in result.stderr and "--skip-existing" in result.stderr
    assert (out / "b" / REPORT_NAME).is_file() and not (out / "c").exists()
    kept = folder_digest(out / "b")
    code2, err = run_here(*args, "--skip-existing", "-q")
    assert code2 == 0, err
    assert folder_digest(out / "b") == kept and (out / "c" / "model.safetensors").is_file()
    assert torch.isfinite(load_file(str(out / "c" / "model.safetensors"))["classifier.weight"]).all()


def test_example_match_job_file_runs(models, tmp_path):
    """configs/examples/match.yaml is a real match job: run it with its folders swapped in."""
    example = Path(__file__).resolve().parents[2] / "configs" / "examples" / "match.yaml"
    import yaml

    job = yaml.safe_load(example.read_text())
    assert set(job) >= {"anchor", "models", "out"}
    job.update(anchor=str(models["a"]), models=[str(models["b"]), str(models["c"])], out=str(tmp_path / "aligned"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    code, err = run_here("match", "--config", tmp_path / "job.yaml", "--device", "cpu", "-q")
    assert code == 0, err
    assert (tmp_path / "aligned" / "b" / REPORT_NAME).is_file() and (tmp_path / "aligned" / REPORT_NAME).is_file()
