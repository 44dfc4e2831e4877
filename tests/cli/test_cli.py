"""The command line as a shell pipeline sees it: exit codes, stdout holds only JSON with --json,
stderr holds one line per error and no traceback, the report follows its schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error
from helpers.tiny_models import save_tiny

from rotfuse.align.match import REPORT_NAME


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    return save_tiny("bert", root / "anchor", seed=1), save_tiny("bert", root / "model", seed=0)


def test_match_writes_checkpoint_and_report(cli, pair, tmp_path):
    anchor, model = pair
    result = cli("match", anchor, model, "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # human output goes to stderr
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["tool"] == "rotfuse" and report["command"] == "match" and report["schema"] == 1
    assert report["arch"] == "bert" and report["device"] == "cpu"
    assert report["symmetries"] == [  # the default set less whole-expert permutation: BERT has no experts
        "ffn.perm",
        "heads.perm",
        "qk.rot",
        "qk.scale",
        "vo.rot",
        "vo.scale",
    ]
    assert {"read", "solve", "write", "total"} <= set(report["timings"])
    assert len(report["layers"]) == 2
    for row in report["layers"]:
        assert set(row["modules"]) == {"attn.qk", "attn.vo", "ffn"}
        for entry in row["modules"].values():
            assert {"before", "after", "reduction", "applied", "rounds"} <= set(entry)
            assert entry["after"] <= entry["before"]
    for key in ("matched", "model"):
        assert {"before", "after", "reduction", "tensors"} <= set(report["totals"][key])
    assert report["anchor"]["fingerprint"] and report["model"]["fingerprint"]
    assert (tmp_path / "out" / "config.json").exists()


def test_json_goes_to_stdout_alone_and_quiet_is_silent(cli, pair, tmp_path):
    anchor, model = pair
    result = cli(
        "match",
        anchor,
        model,
        "-o",
        tmp_path / "out",
        "--json",
        "--quiet",
        "--report",
        tmp_path / "r.json",
        "--symmetries",
        "rot",
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report["symmetries"] == ["qk.rot", "vo.rot"]
    assert json.loads((tmp_path / "r.json").read_text())["layers"] == report["layers"]
    assert not (tmp_path / "out" / REPORT_NAME).exists()  # --report moved it


def test_layers_flag(cli, pair, tmp_path):
    anchor, model = pair
    result = cli("match", anchor, model, "-o", tmp_path / "out", "--layers", "1", "--json", "-q")
    assert [row["layer"] for row in json.loads(result.stdout)["layers"]] == ["1"]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["--symmetries", "perm,twist"], ["unknown symmetry 'twist'"]),
        (["--layers", "0-x"], ["--layers"]),
        (["--layers", "7"], ["layer 7 does not exist"]),
        (["--device", "tpu"], ["unknown --device"]),
        (["--arch", "nonsense"], ["unknown --arch 'nonsense'"]),
    ],
)
def test_bad_flags_exit_2_with_one_line(cli, pair, tmp_path, args, fragments):
    anchor, model = pair
    assert_one_line_error(cli("match", anchor, model, "-o", tmp_path / "out", *args), *fragments)
    assert not (tmp_path / "out").exists()


def test_missing_input_folder(cli, pair, tmp_path):
    anchor, _ = pair
    assert_one_line_error(
        cli("match", anchor, tmp_path / "nope", "-o", tmp_path / "out"), "nope", "no such checkpoint folder"
    )


def test_existing_output_needs_overwrite(cli, pair, tmp_path):
    anchor, model = pair
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    assert_one_line_error(cli("match", anchor, model, "-o", tmp_path / "out"), "already exists", "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    result = cli("match", anchor, model, "-o", tmp_path / "out", "--overwrite", "-q")
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_output_inside_an_input_is_refused(cli, pair):
    anchor, model = pair
    assert_one_line_error(cli("match", anchor, model, "-o", model / "aligned"), "must not be inside the input")


@pytest.mark.parametrize("command", ["match", "match-many", "merge"])
def test_report_inside_an_input_is_refused(cli, pair, tmp_path, command):
    anchor, model = pair
    report = model / "report.json"
    args = {
        "match": ["match", anchor, model],
        "match-many": ["match", anchor, model, model],
        "merge": ["merge", anchor, model],
    }[command]
    assert_one_line_error(cli(*args, "-o", tmp_path / "out", "--report", report), "report must not be written inside")
    assert not report.exists() and not (tmp_path / "out").exists()


def test_different_architectures_are_refused(cli, pair, tmp_path):
    anchor, _ = pair
    vit = save_tiny("vit", tmp_path / "vit", seed=0)
    assert_one_line_error(cli("match", anchor, vit, "-o", tmp_path / "out"), "architecture 'vit' differs")


def test_different_shapes_name_the_tensor(cli, pair, tmp_path):
    anchor, _ = pair
    wider = save_tiny("bert", tmp_path / "wider", seed=0, intermediate_size=41)
    assert_one_line_error(cli("match", anchor, wider, "-o", tmp_path / "out"), "intermediate.dense.", "has shape [41]")


def test_unknown_model_type_names_it(cli, pair, tmp_path):
    anchor, _ = pair
    odd = save_tiny("bert", tmp_path / "odd", seed=0)
    config = json.loads((odd / "config.json").read_text())
    config["model_type"] = "mystery-net"
    (odd / "config.json").write_text(json.dumps(config))
    assert_one_line_error(
        cli("match", odd, odd, "-o", tmp_path / "out"), "'mystery-net' is not supported", "--arch-spec"
    )


def test_debug_shows_the_traceback(cli, pair, tmp_path):
    anchor, _ = pair
    result = cli("match", anchor, tmp_path / "nope", "-o", tmp_path / "out", "--debug")
    assert result.returncode == 2
    assert "Traceback" in result.stderr


def test_scramble_and_match_back_via_cli(cli, pair, tmp_path):
    _, model = pair
    assert cli("scramble", model, "-o", tmp_path / "s", "--seed", "3", "-q").returncode == 0
    report = json.loads(cli("match", model, tmp_path / "s", "-o", tmp_path / "back", "--json", "-q").stdout)
    assert report["totals"]["matched"]["after"] < 1e-5 * report["totals"]["matched"]["before"]


def test_archs_lists_builtin_specs(cli):
    result = cli("archs", "--json")
    assert result.returncode == 0
    names = {row["name"] for row in json.loads(result.stdout)["architectures"]}
    assert {"bert", "roberta", "vit"} <= names


def test_usage_error_exit_code(cli):
    result = cli("match")
    assert result.returncode == 2
    assert cli("--version").stdout.startswith("rotfuse ")


def test_match_path_does_not_import_transformers(pair, tmp_path):
    anchor, model = pair
    code = (
        "import sys; from pathlib import Path\n"
        "from rotfuse.align.match import match\nfrom rotfuse.align.options import MatchOptions\n"
        f"match(Path({str(anchor)!r}), Path({str(model)!r}), Path({str(tmp_path / 'out')!r}),"
        " MatchOptions(device='cpu'))\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_startup_does_not_import_torch():
    code = (
        "import sys; import rotfuse.cli; "
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)[:3]"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["archs", "match", "merge"])
def test_commands_collect_garbage_again_once_their_imports_are_in(pair, tmp_path, command):
    """`main` switches the cyclic collector off for the imports; every command must switch it
    back on (with the import-time objects frozen), or a long run would never free a cycle."""
    anchor, model = pair
    argv = {
        "archs": ["archs", "--json"],
        "match": ["match", str(anchor), str(model), "-o", str(tmp_path / "m"), "-q", "--device", "cpu"],
        "merge": ["merge", str(anchor), str(model), "-o", str(tmp_path / "g"), "-q"],
    }[command]
    code = (
        "import atexit, gc, sys\n"
        "atexit.register(lambda: print('collector', gc.isenabled(), gc.get_freeze_count() > 1000, file=sys.stderr))\n"
        f"sys.argv = ['rotfuse', *{argv!r}]\n"
        "from rotfuse.cli import main\n"
        "main()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "collector True True" in result.stderr, result.stderr
