"""`rotfuse interpolate`: the interpolated checkpoints are exact (endpoints bit for bit, the midpoint
the average, loaded through transformers' own name conversion), the losses follow transformers'
own loss definitions, the barrier is a pure function with the right invariances, and the CLI writes
JSON and a real PNG with several curves."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers.tiny_models import save_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.core.errors import InputError
from rotfuse.eval.interpolate import InterpolationSettings, barrier, grid, interpolate, write_interpolated
from rotfuse.eval.runtime import load_model
from rotfuse.eval.score import LossSpec, loss_spec, score
from rotfuse.io.checkpoint import Checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def vit_data(samples: int = 20, labels: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """Inputs for tiny_models' vit (3x12x12 images, 5 classes)."""
    g = torch.Generator().manual_seed(seed)
    data = {"pixel_values": torch.randn(samples, 3, 12, 12, generator=g)}
    if labels:
        data["labels"] = torch.randint(0, 5, (samples,), generator=g)
    return data


def hf_loss(folder: Path, inputs: dict[str, torch.Tensor]) -> float:
    """transformers' own task loss on all samples at once: the independent reference."""
    with torch.no_grad():
        return float(load_model(folder)(**inputs).loss)


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    return save_tiny("vit", tmp_path / "a", seed=0), save_tiny("vit", tmp_path / "b", seed=1)


def test_endpoints_equal_the_models_own_losses(pair):
    a, b = pair
    inputs = vit_data()
    curve = interpolate(a, b, inputs, InterpolationSettings(grid(3), batch_size=7))
    assert curve.lambdas == [0.0, 0.5, 1.0] and curve.labels == "data"
    assert curve.losses[0] == pytest.approx(hf_loss(a, inputs), abs=1e-5)
    assert curve.losses[-1] == pytest.approx(hf_loss(b, inputs), abs=1e-5)
    assert curve.losses[1] != pytest.approx(curve.losses[0], abs=1e-3)  # the middle is a different model
    direct = score(load_model(a), inputs, LossSpec("data"), batch_size=20)
    assert curve.accuracies is not None and curve.accuracies[0] == direct.accuracy


def test_interpolated_checkpoint_is_exact(pair, tmp_path):
    a, b = pair
    ca, cb = Checkpoint.open(a), Checkpoint.open(b)
    for lam, name in ((0.0, "l0"), (1.0, "l1"), (0.5, "mid")):
        (tmp_path / name).mkdir()
        write_interpolated(ca, cb, lam, tmp_path / name)
    ta, tb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    t0, t1 = (
        load_file(str(tmp_path / "l0" / "model.safetensors")),
        load_file(str(tmp_path / "l1" / "model.safetensors")),
    )
    tm = load_file(str(tmp_path / "mid" / "model.safetensors"))
    assert ta.keys() == t0.keys() == tm.keys()
    for name in ta:
        assert torch.equal(t0[name], ta[name]) and torch.equal(t1[name], tb[name])
        if ta[name].is_floating_point():
            assert torch.allclose(tm[name], (ta[name] + tb[name]) / 2, atol=1e-6)
    # the midpoint, loaded from files, computes what averaging the two live models computes
    live_a, live_b = load_model(a), load_model(b)
    averaged = {
        k: (v + live_b.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in live_a.state_dict().items()
    }
    live_a.load_state_dict(averaged)
    x = vit_data(4, labels=False)["pixel_values"]
    with torch.no_grad():
        assert torch.allclose(
            load_model(tmp_path / "mid")(pixel_values=x).logits, live_a(pixel_values=x).logits, atol=1e-5
        )


def test_barrier_of_a_model_with_itself_is_zero(pair):
    a, _ = pair
    curve = interpolate(a, a, vit_data(), InterpolationSettings(grid(5)))
    assert curve.barrier == 0.0 and curve.accuracy_drop == 0.0
    assert len(set(curve.losses)) == 1


def test_barrier_values():
    assert barrier([0, 0.5, 1], [1.0, 3.0, 2.0]) == (1.5, 0.5)
    assert barrier([0, 0.25, 0.5, 0.75, 1], [2.0, 1.0, 1.0, 1.0, 2.0]) == (0.0, 0)  # below the line
    assert barrier([0, 0.5, 1], [0.9, 0.5, 0.7], higher_is_worse=False) == (pytest.approx(0.3), 0.5)
    with pytest.raises(ValueError):
        barrier([0.1, 1], [1.0, 2.0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=3, max_size=12), st.floats(-3, 3), st.floats(-3, 3))
def test_barrier_ignores_a_linear_trend_and_is_never_negative(values, offset, slope):
    lambdas = grid(len(values))
    height, _ = barrier(lambdas, values)
    tilted = [v + offset + slope * lam for v, lam in zip(values, lambdas)]
    assert height >= 0
    assert barrier(lambdas, tilted)[0] == pytest.approx(height, abs=1e-9)


def test_unlabelled_classifier_is_scored_against_the_endpoint_ensemble(pair):
    a, b = pair
    inputs = vit_data(labels=False)
    assert loss_spec(Checkpoint.open(a).config, inputs, "a").labels == "ensemble"
    itself = interpolate(a, a, inputs, InterpolationSettings(grid(3)))
    assert itself.labels == "ensemble" and itself.accuracies == [1.0, 1.0, 1.0]  # agrees with itself
    other = interpolate(a, b, inputs, InterpolationSettings(grid(3)))
    assert other.accuracies is not None and min(other.accuracies) < 1.0


def test_causal_lm_next_token_loss_matches_transformers(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "lm"
    )
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (4, 10), generator=g)
    mask = torch.ones(4, 10, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 3:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    curve = interpolate(tmp_path / "lm", tmp_path / "lm", inputs, InterpolationSettings(grid(2), batch_size=3))
    assert curve.labels == "next-token"
    labels = ids.masked_fill(mask == 0, -100)
    assert curve.losses[0] == pytest.approx(hf_loss(tmp_path / "lm", {**inputs, "labels": labels}), abs=1e-5)


def test_regression_head_uses_mean_squared_error_like_transformers(tmp_path):
    folder = save_tiny("bert", tmp_path / "reg", num_labels=1)
    g = torch.Generator().manual_seed(2)
    inputs = {"input_ids": torch.randint(0, 61, (6, 7), generator=g), "labels": torch.randn(6, generator=g)}
    result = score(load_model(folder), inputs, loss_spec(Checkpoint.open(folder).config, inputs, "reg"), batch_size=4)
    assert result.accuracy is None
    assert result.loss == pytest.approx(hf_loss(folder, inputs), rel=1e-5)


def test_bare_model_without_labels_is_refused(tmp_path):
    bare = save_tiny("bert-bare", tmp_path / "bare")
    with pytest.raises(InputError, match="no classification or language-model head"):
        interpolate(bare, bare, {"input_ids": torch.zeros(2, 4, dtype=torch.long)}, InterpolationSettings(grid(2)))


def test_cli_several_curves_json_and_png(pair, tmp_path, cli):
    a, b = pair
    match(a, b, tmp_path / "b_aligned", MatchOptions(device="cpu"))
    data = tmp_path / "data.safetensors"
    inputs = vit_data(16)
    save_file(inputs, str(data))
    plot, saved = tmp_path / "curves.png", tmp_path / "curves.json"
    result = cli(
        "interpolate",
        a,
        b,
        tmp_path / "b_aligned",
        "--data",
        data,
        "--steps",
        "3",
        "--plot",
        plot,
        "--label",
        "before",
        "--label",
        "after",
        "--out",
        saved,
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report == json.loads(saved.read_text())
    before, after = report["curves"]
    assert (before["label"], after["label"]) == ("before", "after")
    assert before["loss"][0] == pytest.approx(hf_loss(a, inputs), abs=1e-5) == pytest.approx(after["loss"][0], abs=1e-5)
    # the aligned B is the same function as B: same endpoint loss, different path
    assert after["loss"][-1] == pytest.approx(before["loss"][-1], abs=1e-4)
    assert after["loss"][1] != pytest.approx(before["loss"][1], abs=1e-6)
    assert before["barrier"] == pytest.approx(barrier(before["lambdas"], before["loss"])[0])
    assert_png(plot)

    again = tmp_path / "again.png"
    result = cli("interpolate", a, a, "--data", data, "--steps", "2", "--overlay", saved, "--plot", again, "-q")
    assert (result.returncode, result.stderr) == (0, "")
    assert_png(again)


def assert_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_cli_bad_input(pair, tmp_path, cli):
    a, _ = pair
    bert = save_tiny("bert", tmp_path / "bert")
    data = tmp_path / "data.safetensors"
    save_file(vit_data(4), str(data))
    result = cli("interpolate", a, bert, "--data", data)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and str(bert) in result.stderr
    result = cli("interpolate", a, a, "--data", tmp_path / "nothing.npz")
    assert result.returncode == 2 and "nothing.npz" in result.stderr
