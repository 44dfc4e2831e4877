"""`rotfuse verify`: real transformers runs of both checkpoints. A matched pair agrees (exit 0), a
perturbed copy does not (exit 3), half-precision checkpoints get a tolerance that fits them, text
data goes through the checkpoint's tokenizer, and bad input is one line with exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import save_tiny
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.core.errors import InputError
from rotfuse.eval.verify import OutputDiff, Tolerance, VerifyOptions, default_tolerance, verify


def matched_pair(tmp_path: Path, arch: str, dtype: torch.dtype | None = None) -> tuple[Path, Path]:
    model = save_tiny(arch, tmp_path / "model", seed=0, dtype=dtype)
    anchor = save_tiny(arch, tmp_path / "anchor", seed=1, dtype=dtype)
    report = match(anchor, model, tmp_path / "aligned", MatchOptions(device="cpu"))
    assert report["totals"]["matched"]["after"] < report["totals"]["matched"]["before"]  # it really moved
    return model, tmp_path / "aligned"


def perturb(folder: Path, scale: float) -> None:
    """Add noise to one attention weight of a checkpoint, in place."""
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    name = next(n for n in sorted(tensors) if n.endswith("query.weight"))
    noise = torch.randn(tensors[name].shape, generator=torch.Generator().manual_seed(0))
    tensors[name] = tensors[name] + scale * noise.to(tensors[name].dtype)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_matched_pair_agrees_and_perturbed_one_does_not(tmp_path, cli):
    model, aligned = matched_pair(tmp_path, "vit")
    result = cli("verify", model, aligned, "--json", "--samples", "6")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)  # --json: nothing but JSON on stdout
    assert report["agree"] is True
    assert 0 <= report["max_abs_diff"] < 1e-4 and report["elements"] > 0

    perturb(aligned, 1e-2)
    result = cli("verify", model, aligned, "--json", "--samples", "6")
    assert result.returncode == 3, result.stderr
    report = json.loads(result.stdout)
    assert report["agree"] is False and report["max_abs_diff"] > 1e-4


def test_random_token_inputs_for_a_text_model(tmp_path):
    model, aligned = matched_pair(tmp_path, "bert")
    report = verify(model, aligned, VerifyOptions(samples=5, seq_len=9, seed=2))
    assert report["agree"] and report["inputs"] == {"source": "random (seed 2)", "samples": 5}
    assert report["elements"] == 5 * 3  # logits of 5 samples, 3 labels
    perturb(aligned, 1e-3)
    assert not verify(model, aligned, VerifyOptions(samples=5, seq_len=9, seed=2))["agree"]


def test_human_output_flags_and_tolerance(tmp_path, cli):
    model, aligned = matched_pair(tmp_path, "vit")
    result = cli("verify", model, aligned)
    assert result.returncode == 0
    assert result.stdout == ""
    assert "max abs diff" in result.stderr and "max rel diff" in result.stderr and "SAME FUNCTION" in result.stderr
    perturb(aligned, 1e-3)
    result = cli("verify", model, aligned, "-q")
    assert (result.returncode, result.stderr) == (3, "")
    assert cli("verify", model, aligned, "-q", "--atol", "1", "--rtol", "0").returncode == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pair_agrees_with_its_default_tolerance(tmp_path, dtype):
    model, aligned = matched_pair(tmp_path, "bert", dtype)
    report = verify(model, aligned, VerifyOptions())
    assert report["agree"], report
    assert report["atol"] == default_tolerance({"BF16" if dtype == torch.bfloat16 else "F16"}).atol
    assert report["max_abs_diff"] > 0  # the weights were rounded back to 16 bits
    # the fp32 tolerance would be too strict for a 16-bit checkpoint
    assert not verify(model, aligned, VerifyOptions(atol=1e-6, rtol=1e-6))["agree"]


def test_real_minilm_on_text_data(tmp_path, cli, minilm_dir):
    scramble(minilm_dir, tmp_path / "scrambled", MatchOptions(device="cpu"), seed=3)
    data = tmp_path / "sentences.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"text": t})
            for t in ["A man is eating food.", "The cat sleeps on the sofa all afternoon.", "Hello"]
        )
        + "\n"
    )
    result = cli("verify", minilm_dir, tmp_path / "scrambled", "--data", data, "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["inputs"] == {"source": str(data), "samples": 3}
    assert report["max_rel_diff"] < 1e-4


def test_bad_input_is_one_line_and_exit_2(tmp_path, cli):
    model = save_tiny("vit", tmp_path / "model")
    result = cli("verify", model, tmp_path / "missing")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "missing" in result.stderr and "Traceback" not in result.stderr
    other = save_tiny("bert", tmp_path / "bert")
    result = cli("verify", model, other)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_output_diff_semantics():
    diff = OutputDiff(Tolerance(atol=0.1, rtol=0.5))
    reference = torch.tensor([[1.0, -2.0, 0.0]])
    diff.add(reference, reference + torch.tensor([[0.55, -0.0, 0.09]]))  # 0.55 < 0.1 + 0.5*1: inside
    assert diff.agree and math.isclose(diff.max_abs, 0.55, rel_tol=1e-6)
    assert math.isclose(diff.max_rel, 0.275, rel_tol=1e-6)  # relative to the largest |reference|
    diff.add(reference, reference + torch.tensor([[0.0, 0.0, 0.11]]))  # 0.11 > 0.1 at a zero output
    assert not diff.agree
    nan = OutputDiff(Tolerance(1.0, 1.0))
    nan.add(reference, torch.tensor([[float("nan"), -2.0, 0.0]]))
    assert not nan.agree
    with pytest.raises(InputError):
        OutputDiff(Tolerance(1, 1)).add(reference, torch.zeros(3))
    assert default_tolerance({"F32", "BF16", "I64"}) == default_tolerance({"BF16"})
    assert default_tolerance({"I64"}) == default_tolerance({"F32"})
