"""A checkpoint that ships its own Python code (`auto_map` in its config) is refused with one line
by every command that runs a model, and its code never runs, whatever is on stdin."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.tiny_models import save_tiny

pytestmark = pytest.mark.slow  # every test here starts the CLI in a separate process

EVIL = """
from pathlib import Path
Path({marker!r}).write_text("ran")
from transformers import BertModel as EvilModel, BertConfig as EvilConfig
"""


def poison(folder: Path, marker: Path, where: str = "config.json") -> None:
    """Give `folder` an evil.py that leaves `marker` when imported, named by `where`'s auto_map."""
    (folder / "evil.py").write_text(EVIL.format(marker=str(marker)))
    path = folder / where
    config = json.loads(path.read_text()) if path.exists() else {}
    config["auto_map"] = {
        "AutoModel": "evil.EvilModel",
        "AutoConfig": "evil.EvilConfig",
        "AutoTokenizer": ["evil.EvilModel", None],
    }
    config.pop("architectures", None)  # make transformers fall back to the Auto classes
    path.write_text(json.dumps(config))


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rotfuse", *map(str, args)],
        input="y\ny\ny\n",
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("command", ["verify", "stats", "interpolate", "match-data"])
def test_checkpoint_code_never_runs(tmp_path, command):
    good = save_tiny("bert", tmp_path / "good", seed=0)
    evil = save_tiny("bert", tmp_path / "evil", seed=1)
    marker = tmp_path / "ran.txt"
    poison(evil, marker)
    data = tmp_path / "data.safetensors"
    import torch
    from safetensors.torch import save_file

    save_file({"input_ids": torch.randint(0, 60, (4, 7)), "labels": torch.tensor([0, 1, 2, 0])}, str(data))
    args = {
        "verify": ["verify", "--json", good, evil],
        "stats": ["stats", evil, "--data", data, "--kind", "fisher", "-o", tmp_path / "st"],
        "interpolate": ["interpolate", good, evil, "--data", data, "--steps", "3", "--json"],
        "match-data": ["match", good, evil, "-o", tmp_path / "out", "-s", "default,residual", "--data", data, "--json"],
    }[command]
    result = run(*args)
    assert not marker.exists(), "the checkpoint's code ran"
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""  # no prompt, no half report on stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "auto_map" in lines[0] and "evil" in lines[0], result.stderr
    assert not (tmp_path / "st").exists() and not (tmp_path / "out").exists()


def test_tokenizer_config_with_code_is_refused(tmp_path):
    good = save_tiny("bert", tmp_path / "good", seed=0)
    evil = save_tiny("bert", tmp_path / "evil", seed=1)
    marker = tmp_path / "ran.txt"
    poison(evil, marker, where="tokenizer_config.json")
    result = run("verify", good, evil)
    assert not marker.exists()
    assert result.returncode == 2 and "tokenizer_config.json" in result.stderr, result.stderr
