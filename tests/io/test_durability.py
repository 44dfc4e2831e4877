"""Outputs are flushed to disk before they are moved into place (default), or left to the OS with
--no-fsync: which files and folders get fsynced is recorded from the real system calls, and the
bytes written are the same either way."""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

import pytest
from helpers.files import folder_digest
from helpers.tiny_models import save_tiny

import rotfuse.io.writer as writer_module
from rotfuse.align.match import match
from rotfuse.align.options import MatchOptions
from rotfuse.align.scramble import scramble
from rotfuse.cli import app
from rotfuse.merge.engine import MergeOptions, merge

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads fsynced paths from /proc/self/fd")

REPORTS = {"rotfuse_report.json", "rotfuse_merge.json"}  # hold timings: differ between any two runs


class SyncLog:
    """Every path fsynced and every file given a writeback start, through the real calls."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.fsynced: list[Path] = []
        self.written_back: list[Path] = []
        self._lock = threading.Lock()
        real_fsync, real_writeback = os.fsync, writer_module.start_writeback

        def fsync(fd: int) -> None:
            self._record(self.fsynced, fd)
            real_fsync(fd)

        def start_writeback(fd: int, offset: int, length: int) -> None:
            self._record(self.written_back, fd)
            real_writeback(fd, offset, length)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(writer_module, "start_writeback", start_writeback)

    def _record(self, into: list[Path], fd: int) -> None:
        with self._lock:
            into.append(Path(os.readlink(f"/proc/self/fd/{fd}")))


def flushed_relative(log: SyncLog, out: Path) -> set[str]:
    """The fsynced paths inside the staging folder of `out`, relative to it ('.' for the folder)."""
    names = set()
    for path in log.fsynced:
        if path.parent == out.parent and path.name.startswith(".rotfuse-tmp-"):
            names.add(".")
        for parent in path.parents:
            if parent.parent == out.parent and parent.name.startswith(".rotfuse-tmp-"):
                names.add(str(path.relative_to(parent)))
    return names


def every_entry(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*")} | {"."}


@pytest.fixture
def pair(tmp_path: Path) -> tuple[Path, Path]:
    anchor = save_tiny("llama", tmp_path / "a", seed=0, max_shard_size="20KB")
    model = save_tiny("llama", tmp_path / "b", seed=1, max_shard_size="20KB")
    return anchor, model


def test_match_flushes_every_file_and_folder_before_the_rename(pair, tmp_path, monkeypatch):
    anchor, model = pair
    log = SyncLog(monkeypatch)
    out = tmp_path / "nested" / "out"
    match(anchor, model, out, MatchOptions(device="cpu"))
    assert len(list(out.glob("*.safetensors"))) > 1, "a sharded output"
    assert flushed_relative(log, out) == every_entry(out)  # shards, index, config, report, the folder
    assert out.parent in log.fsynced, "the rename itself is flushed (the parent folder's entry)"
    assert log.written_back, "writeback starts as tensors land, so the flush overlaps the work"


def test_no_fsync_flushes_nothing_and_writes_the_same_bytes(pair, tmp_path, monkeypatch):
    anchor, model = pair
    flushed, loose = tmp_path / "flushed", tmp_path / "loose"
    match(anchor, model, flushed, MatchOptions(device="cpu"))
    log = SyncLog(monkeypatch)
    match(anchor, model, loose, MatchOptions(device="cpu", fsync=False))
    assert log.fsynced == [] and log.written_back == []
    same = {k: v for k, v in folder_digest(flushed).items() if k not in REPORTS}
    assert same == {k: v for k, v in folder_digest(loose).items() if k not in REPORTS}


def test_merge_and_scramble_honour_fsync(pair, tmp_path, monkeypatch):
    anchor, model = pair
    log = SyncLog(monkeypatch)
    merge([anchor, model], tmp_path / "merged", MergeOptions(fsync=False))
    scramble(model, tmp_path / "scrambled", MatchOptions(device="cpu", fsync=False), seed=3)
    assert log.fsynced == [] and log.written_back == []
    merge([anchor, model], tmp_path / "merged-flushed", MergeOptions())
    assert flushed_relative(log, tmp_path / "merged-flushed") == every_entry(tmp_path / "merged-flushed")


def test_no_fsync_from_the_command_line_and_the_job_file(pair, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    anchor, model = pair
    log = SyncLog(monkeypatch)
    runner = CliRunner()
    result = runner.invoke(
        app, ["match", str(anchor), str(model), "-o", str(tmp_path / "m"), "--no-fsync", "-q", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    job = tmp_path / "job.yaml"
    job.write_text(f"models: [{anchor}, {model}]\nout: {tmp_path / 'j'}\nfsync: false\n")
    result = runner.invoke(app, ["merge", "--config", str(job), "-q", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["output"]["path"] == str(tmp_path / "j")
    assert log.fsynced == [] and log.written_back == []
    result = runner.invoke(app, ["merge", "--config", str(job), "-q", "--fsync", "-o", str(tmp_path / "k")])
    assert result.exit_code == 0, result.output  # the flag wins over the job file
    assert flushed_relative(log, tmp_path / "k") == every_entry(tmp_path / "k")
