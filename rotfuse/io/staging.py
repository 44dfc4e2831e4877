"""Outputs appear complete or not at all.

Every command writes into a hidden sibling of its output folder and renames it into place only
when everything is written and flushed: every file and folder is fsynced before the rename and the
parent after it, so not even a crash or power loss can leave a complete-looking output with empty
files (`--no-fsync` skips the flushes, for scratch disks: then only errors and signals are covered). An existing output is replaced only with `--overwrite`,
and only after the new one is complete; an error, Ctrl-C or SIGTERM removes the staging folder and
leaves whatever was there before untouched.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from types import TracebackType

from rotfuse.core.errors import OutputError

STAGING_PREFIX = ".rotfuse-tmp-"


def check_output_location(target: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse outputs that would clobber or nest inside an input, or an existing output."""
    resolved = target.resolve()
    for item in inputs:
        source = item.resolve()
        if resolved == source or source in resolved.parents:
            raise OutputError(f"{target}: output must not be inside the input {item}")
        if resolved in source.parents:
            raise OutputError(f"{target}: output must not contain the input {item}")
    if target.exists() and not overwrite:
        raise OutputError(f"{target}: already exists (pass --overwrite to replace it)")
    if target.exists() and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a folder")


def check_report_location(report: Path | None, inputs: list[Path]) -> None:
    """A report written beside the output (`--report FILE`) must not land inside an input:
    inputs are never modified, not even by a stray report."""
    if report is None:
        return
    resolved = Path(report).resolve()
    for item in inputs:
        if Path(item).resolve() in resolved.parents:
            raise OutputError(f"{report}: the report must not be written inside the input {item}")


class StagedFolder:
    """Context manager: `path` is the staging folder; `commit()` renames it to the target."""

    def __init__(self, target: Path, overwrite: bool = False, fsync: bool = True):
        self.target = Path(target)
        self.overwrite = overwrite
        self.fsync = fsync
        self.committed = False
        parent = self.target.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{self.target.name}-", dir=parent))
        except OSError as exc:
            raise OutputError(f"{self.target}: cannot create output folder ({exc.strerror or exc})") from exc

    def commit(self) -> None:
        final = self.target.resolve()
        old: Path | None = None
        if self.fsync:
            flush_tree(self.path)
        try:
            if final.exists():
                if not self.overwrite:
                    raise OutputError(f"{self.target}: appeared while rotfuse was running; not replaced")
                old = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}old-", dir=final.parent))
                os.rename(final, old / final.name)
            os.rename(self.path, final)
        except OSError as exc:
            if old is not None and not final.exists():
                os.rename(old / final.name, final)  # put the previous output back
            raise OutputError(f"{self.target}: cannot move output into place ({exc.strerror or exc})") from exc
        self.committed = True
        if self.fsync:
            flush_tree(final.parent, recursive=False)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.committed:
            shutil.rmtree(self.path, ignore_errors=True)


def flush_tree(folder: Path, recursive: bool = True) -> None:
    """fsync every file under `folder` (cheap for those already flushed), then the folders
    themselves, so their entries survive a crash too."""
    try:
        if recursive:
            for root, _dirs, files in os.walk(folder):
                for name in files:
                    _fsync_path(Path(root) / name, os.O_RDONLY)
                _fsync_path(Path(root), os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        else:
            _fsync_path(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise OutputError(f"{folder}: cannot flush output to disk ({exc.strerror or exc})") from exc


def _fsync_path(path: Path, flags: int) -> None:
    folder = bool(flags & getattr(os, "O_DIRECTORY", 0)) or path.is_dir()
    if folder and os.name == "nt":
        return  # Windows cannot open folders for fsync
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (folder and exc.errno in _UNSYNCABLE_FOLDER):
            raise  # some file systems (network, FUSE) cannot fsync a folder; their files are flushed
    finally:
        os.close(fd)


_UNSYNCABLE_FOLDER = {errno.EINVAL, errno.ENOTSUP, errno.EBADF}
