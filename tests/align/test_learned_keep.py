"""Learned matching's choice of step (--learn-keep) and its progress display (stages, live loss)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.functions import assert_same_function, one_thread, save_pair
from safetensors.torch import load_file, save_file

from rotfuse.align.match import match
from rotfuse.align.options import REPORT_NAME, MatchOptions
from rotfuse.core.errors import UsageError
from rotfuse.eval.interpolate import InterpolationSettings, interpolate
from rotfuse.symmetry.names import symmetry_set


def _tokens(path: Path, seed: int) -> Path:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 61, (24, 10), generator=g)
    save_file({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, str(path))
    return path


class Recorder:
    """A progress display that keeps what it was told (counts, stages, notes)."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def __call__(self, done: int, total: int) -> None:
        self.events.append(("count", done, total))

    def stage(self, description: str, unit: str) -> None:
        self.events.append(("stage", description, unit))

    def note(self, text: str) -> None:
        self.events.append(("note", text))


def _options(tmp_path: Path, **changes) -> MatchOptions:
    settings = dict(
        symmetries=symmetry_set("default,residual"),
        device="cpu",
        data=_tokens(tmp_path / "train.safetensors", 0),
        learn=True,
        eval_data=_tokens(tmp_path / "held.safetensors", 1),
        learn_steps=30,
        data_batch_size=16,
    )
    return MatchOptions(**{**settings, **changes})


@pytest.mark.slow
def test_best_keeps_the_logged_step_with_the_lowest_held_out_loss(tmp_path: Path) -> None:
    model, anchor = save_pair("llama", tmp_path)
    # logged steps 0, 25, 30; at this rate the held-out loss is lowest at step 25 here
    options = _options(tmp_path, learn_keep="best", learn_rate=0.05)
    with one_thread():
        report = match(anchor, model, tmp_path / "best", options, overwrite=True)
        last = match(anchor, model, tmp_path / "last", _options(tmp_path, learn_rate=0.05), overwrite=True)
    learned = report["learned"]
    lowest = min(learned["log"], key=lambda row: row["eval_loss"])
    assert learned["keep"] == "best" and learned["kept_step"] == lowest["step"]
    assert learned["after"] == lowest
    assert last["learned"]["kept_step"] == 30  # the default keeps the last step
    assert_same_function(model, tmp_path / "best")
    # the written copy is the kept step's: its average with the anchor scores the reported held-out loss
    held = load_file(str(options.eval_data))
    with one_thread():
        curve = interpolate(anchor, tmp_path / "best", held, InterpolationSettings([0.5], batch_size=16))
    assert curve.losses[0] == pytest.approx(lowest["eval_loss"], rel=1e-4)
    if lowest["step"] != 30:  # then the two outputs must differ
        one = load_file(str(tmp_path / "best" / "model.safetensors"))
        two = load_file(str(tmp_path / "last" / "model.safetensors"))
        assert any(not torch.equal(one[name], two[name]) for name in one)


def test_best_needs_held_out_data(tmp_path: Path) -> None:
    model, anchor = save_pair("llama", tmp_path)
    with pytest.raises(UsageError, match="--learn-keep best .*--eval-data"):
        match(anchor, model, tmp_path / "out", _options(tmp_path, learn_keep="best", eval_data=None))
    with pytest.raises(UsageError, match="--learn-keep 'first'"):
        match(anchor, model, tmp_path / "out", _options(tmp_path, learn_keep="first"))
    assert not (tmp_path / "out").exists()


def test_learning_is_its_own_progress_stage_with_the_batch_loss(tmp_path: Path) -> None:
    model, anchor = save_pair("llama", tmp_path)
    shown = Recorder()
    with one_thread():
        match(anchor, model, tmp_path / "out", _options(tmp_path, learn_steps=4), progress=shown)
    stages = [e for e in shown.events if e[0] == "stage"]
    assert stages == [("stage", "learning", "step")]
    after = shown.events[shown.events.index(stages[0]) + 1 :]
    assert [e[1:] for e in after if e[0] == "count"] == [(step, 4) for step in range(1, 5)]
    notes = [e[1] for e in after if e[0] == "note"]
    assert len(notes) == 4 and all(n.startswith("batch loss ") and float(n.split()[-1]) > 0 for n in notes)
    before = shown.events[: shown.events.index(stages[0])]
    assert before and all(e[0] == "count" for e in before)  # the layers were counted first


def test_cli_keeps_the_best_step_and_logs_learning_in_a_pipe(tmp_path: Path) -> None:
    import json
    import os

    from helpers.cli import assert_one_line_error, run_cli

    model, anchor = save_pair("llama", tmp_path)
    train, held = _tokens(tmp_path / "train.safetensors", 0), _tokens(tmp_path / "held.safetensors", 1)
    env = {**os.environ, "ROTFUSE_LOG_INTERVAL": "0", "OMP_NUM_THREADS": "1"}
    common = [anchor, model, "-s", "default,residual", "--learn", "--data", train, "--learn-steps", "6"]
    chosen = ["--eval-data", held, "--learn-keep", "best", "--learn-log-every", "2", "--learn-perm-rate", "0.03"]
    result = run_cli("match", *common, "-o", tmp_path / "out", *chosen, env=env)
    assert result.returncode == 0, result.stderr
    assert "learning: step 6/6" in result.stderr and "batch loss" in result.stderr
    report = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert report["learned"]["keep"] == "best"
    assert report["learned"]["perm_rate"] == 0.03 and report["learned"]["rate"] == 0.01
    assert [row["step"] for row in report["learned"]["log"]] == [0, 2, 4, 6]
    assert report["learned"]["kept_step"] in (0, 2, 4, 6)
    refused = run_cli("match", *common, "-o", tmp_path / "no", "--learn-keep", "best", env=env)
    assert_one_line_error(refused, "--learn-keep best", "--eval-data")
    assert not (tmp_path / "no").exists()


def test_cosine_decay_and_the_full_lambda_range(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--learn-decay cosine takes the rate down to 0 over the steps; --lambda-schedule full draws l in
    [0, 1] (beyond uniform's [0.3, 0.7]); the copy still computes MODEL's function."""
    from rotfuse.align.learned import loop

    model, anchor = save_pair("llama", tmp_path)
    rates: list[float] = []
    real_step = torch.optim.Adam.step

    def step(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        rates.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    with one_thread():
        report = match(
            anchor,
            model,
            tmp_path / "out",
            _options(tmp_path, learn_steps=8, learn_rate=0.02, learn_decay="cosine", lambda_schedule="full"),
        )
    assert report["learned"]["decay"] == "cosine" and report["learned"]["lambda_schedule"] == "full"
    assert rates[0] == pytest.approx(0.02) and all(a > b for a, b in zip(rates, rates[1:], strict=False))
    assert rates[-1] < 0.02 * 0.05
    assert loop.LAMBDA_RANGES["full"] == (0.0, 1.0) and loop.LAMBDA_RANGES["uniform"] == (0.3, 0.7)
    assert_same_function(model, tmp_path / "out")
    for bad, flag in (({"learn_decay": "linear"}, "--learn-decay 'linear'"), ({"lambda_schedule": "wide"}, "'wide'")):
        with pytest.raises(UsageError, match=flag):
            match(anchor, model, tmp_path / "no", _options(tmp_path, **bad))
    assert not (tmp_path / "no").exists()
