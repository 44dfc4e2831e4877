"""A missing optional dependency is bad input, not a crash (issue 20 item 4): exit 2 with one line
naming the package and the install command, before any work; interpolate writes --out before it
plots. The dependency is made unimportable in a fresh process by a meta-path finder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers.cli import assert_one_line_error
from helpers.merge_data import save_inputs, token_inputs
from helpers.tiny_models import save_tiny

WRAPPER = """
import sys

class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r} or name.startswith({blocked!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Refuse())
sys.argv = ["rotfuse", *{args!r}]
from rotfuse.__main__ import main
main()
"""


def run_without(blocked: str, *args: object) -> subprocess.CompletedProcess:
    code = WRAPPER.format(blocked=blocked, args=[str(a) for a in args])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    data = save_inputs(root / "in.safetensors", token_inputs(4, 8, 61, seed=0, labels=2))
    return save_tiny("bert", root / "a", seed=1), save_tiny("bert", root / "b", seed=0), data


@pytest.mark.parametrize("command", ["verify", "stats", "interpolate", "match"])
def test_missing_transformers_is_bad_input_naming_the_install(pair, tmp_path, command):
    a, b, data = pair
    out = tmp_path / "out"
    args = {
        "verify": ["verify", a, b],
        "stats": ["stats", a, "--data", data, "--kind", "regmean", "-o", out],
        "interpolate": ["interpolate", a, b, "--data", data, "-o", out],
        "match": ["match", a, b, "-o", out, "-s", "default,residual", "--data", data, "--allow-stream-output"],
    }[command]
    result = run_without("transformers", *args)
    assert_one_line_error(result, "transformers", "pip install 'rotfuse[models]'")
    assert not out.exists()


def test_interpolate_plot_without_matplotlib_answers_before_computing(pair, tmp_path):
    a, b, data = pair
    result = run_without(
        "matplotlib", "interpolate", a, b, "--data", data, "--plot", tmp_path / "p.png", "-o", tmp_path / "r.json"
    )
    assert_one_line_error(result, "matplotlib", "pip install 'rotfuse[models]'")
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "p.png").exists()


@pytest.mark.slow
def test_interpolate_writes_out_before_plotting(pair, tmp_path):
    """The plot fails at its very end (matplotlib's drawing backend missing): the numbers are kept."""
    a, b, data = pair
    result = run_without(
        "matplotlib.backends.backend_agg",
        "interpolate",
        a,
        b,
        "--data",
        data,
        "--steps",
        "2",
        "--plot",
        tmp_path / "p.png",
        "-o",
        tmp_path / "r.json",
        "--device",
        "cpu",
    )
    assert result.returncode != 0
    assert (tmp_path / "r.json").exists() and not (tmp_path / "p.png").exists()
