"""Outputs appear complete or not at all, and never at an input's expense.

Every command writes into a hidden sibling of its output folder and renames it into place only
when everything is written and flushed: every file and folder is fsynced before the rename and the
parent after it, so not even a crash or power loss can leave a complete-looking output with empty
files (`--no-fsync` skips the flushes, for scratch disks: then only errors and signals are
covered). An existing output is replaced only with `--overwrite`,
and only after the new one is complete; an error, Ctrl-C or SIGTERM removes the staging folder and
leaves whatever was there before untouched, and so are the parent folders a failed run created.

Before any work, `check_outputs` compares every path a command writes with every path it reads
(symlinks resolved, each file of an input folder on its own: a folder of links into another
folder counts as that folder). Staging folders carry their owner's pid and host, so a later run
in the same folder removes those whose process died (kill -9, power loss).
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from rotfuse.core import signals
from rotfuse.core.errors import OutputError, RotfuseError
from rotfuse.core.report import dumps_strict

STAGING_PREFIX = ".rotfuse-tmp-"  # a folder being written
OLD_PREFIX = ".rotfuse-old-"  # a replaced output, deleted once the new one is in place
TEMP_PREFIX = "rotfuse-interpolate-"  # interpolate's temporary checkpoints (system temp folder)
LABEL_CHARS = 32  # of the output's name in its staging folder's name: 255-byte names stay legal
_OWNED = re.compile(r"^(?:\.rotfuse-tmp-|\.rotfuse-old-|rotfuse-interpolate-)(\d+)-([0-9a-f]{8})-")


# ---------------------------------------------------------------------- who owns a staging folder


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag() -> str:
    """`<pid>-<host hash>-`: how a later run tells a dead run's staging folder from a live one."""
    return f"{os.getpid()}-{_host_tag()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, someone else's
        return True
    return True


def remove_stale(parent: Path) -> None:
    """Remove the staging folders in `parent` left by rotfuse runs of this host that no longer
    run (killed with -9, power loss). A replaced output caught mid-swap is put back instead."""
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    host = _host_tag()
    for entry in entries:
        found = _OWNED.match(entry.name)
        if found is None or found.group(2) != host or _alive(int(found.group(1))):
            continue
        path = Path(entry.path)
        if not entry.is_dir(follow_symlinks=False):
            try:
                path.unlink()  # a report's temp file
            except OSError:
                pass
            continue
        if entry.name.startswith(OLD_PREFIX):
            for previous in list(path.iterdir()) if path.is_dir() else []:
                if not (parent / previous.name).exists():  # the swap never finished: restore
                    try:
                        os.rename(previous, parent / previous.name)
                    except OSError:
                        continue
        shutil.rmtree(path, ignore_errors=True)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by setting
    and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(folder: bool) -> int:
    """The permissions `cp` or `save_pretrained` would give a new folder or file: 0777 or 0666
    less the umask. mkdtemp and mkstemp make 0700 / 0600, which teammates on a shared cluster
    could not read once the staging folder or temp file is renamed into place."""
    return (0o777 if folder else 0o666) & ~current_umask()


def make_owned_folder(parent: Path, prefix: str, label: str) -> Path:
    """A new folder `<prefix><pid>-<host>-<label>-<random>` in `parent`, after removing the
    stale ones of dead runs there."""
    remove_stale(parent)
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}{label[:LABEL_CHARS]}-", dir=parent))


@contextmanager
def temporary_folder(label: str, parent: Path | None = None) -> Iterator[Path]:
    """A scratch folder (in the system's temp folder by default), named with its owner like a
    staging folder, so that a later run removes it if this process is killed with -9."""
    path = make_owned_folder(Path(parent or tempfile.gettempdir()), TEMP_PREFIX, label)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------- the output rule


@dataclass(frozen=True)
class Target:
    """One path a command writes: a staged folder (`-o`) or a single file (`--report`, `--plot`).

    `report` is the file the command writes into the folder itself (e.g. rotfuse_report.json) and
    `holds` the names of the weight files it will hold: the two must not collide."""

    path: Path
    flag: str
    folder: bool = True
    report: str | None = None
    holds: tuple[str, ...] = ()
    what: str = "output"  # how messages call it: output, report, plot, result


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _input_locations(inputs: Sequence[Path | None]) -> list[tuple[Path, Path]]:
    """(where it really is, as the user named it) for every input and every file in an input
    folder: an HF-cache-style folder of symlinks is where its links point."""
    found: list[tuple[Path, Path]] = []
    for item in inputs:
        if item is None:
            continue
        item = Path(item)
        found.append((_resolved(item), item))
        if item.is_dir():
            for root, dirs, files in os.walk(item):
                for name in (*dirs, *files):
                    path = Path(root) / name
                    if path.is_symlink():
                        found.append((_resolved(path), item))
    return found


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def check_outputs(targets: Sequence[Target | None], inputs: Sequence[Path | None], overwrite: bool) -> None:
    """The one rule for every path a command writes, checked before any work:

    - it is not an input, not inside one, and contains none (symlinks resolved, file by file);
    - it does not contain the working directory (`-o . --overwrite` would replace it);
    - an existing one is replaced only with `--overwrite`; a folder output is not a file and a
      file output is not a folder;
    - outputs do not overlap, and the report a folder gets never takes a weight file's name.
    """
    chosen = [t for t in targets if t is not None]
    sources = _input_locations(inputs)
    cwd = _resolved(Path.cwd())
    seen: list[tuple[Path, Target]] = []
    for target in chosen:
        where = _resolved(target.path)
        shown = f"{target.path}"
        if _inside(cwd, where):
            raise OutputError(f"{shown}: {target.what} ({target.flag}) must not be or contain the working directory")
        written = "" if target.folder else " written"
        for source, item in sources:
            if where == source:
                raise OutputError(f"{shown}: the {target.what} ({target.flag}) would replace the input {item}")
            if _inside(where, source):
                raise OutputError(f"{shown}: {target.what} must not be{written} inside the input {item}")
            if _inside(source, where):
                raise OutputError(f"{shown}: {target.what} must not contain the input {item}")
        if target.folder:
            if where.exists() and not where.is_dir():
                raise OutputError(f"{shown}: exists and is not a folder")
        else:
            if where.is_dir():
                raise OutputError(f"{shown}: {target.flag} names a folder; give a file name")
            if where.parent.exists() and not where.parent.is_dir():
                raise OutputError(f"{shown}: {where.parent} is not a folder")
        if (where.exists() or Path(target.path).is_symlink()) and not overwrite:
            raise OutputError(f"{shown}: already exists (pass --overwrite to replace it)")
        if target.folder and target.report is not None and target.report in target.holds:
            raise OutputError(
                f"{shown}: the output holds a weight file named {target.report}, which its report "
                "would replace; write the report elsewhere with --report FILE"
            )
        for earlier, other in seen:
            if where == earlier or _inside(where, earlier) or _inside(earlier, where):
                raise OutputError(
                    f"{shown}: {target.flag} overlaps {other.flag} {other.path}; give them separate places"
                )
        seen.append((where, target))


# ---------------------------------------------------------------------- writing


def _message_with(exc: BaseException, staging: Path, target: Path) -> None:
    """Name the output the user asked for, not its hidden staging folder, in an error."""
    if isinstance(exc, RotfuseError) and exc.args:
        exc.args = (str(exc.args[0]).replace(str(staging), str(target)), *exc.args[1:])


class StagedFolder:
    """Context manager: `path` is the staging folder; `commit()` renames it to the target."""

    def __init__(self, target: Path, overwrite: bool = False, fsync: bool = True):
        self.target = Path(target)
        self.overwrite = overwrite
        self.fsync = fsync
        self.committed = False
        parent = _resolved(self.target).parent
        self._created: list[Path] = []  # parent folders this run made, deepest first
        missing = parent
        while not missing.exists() and missing != missing.parent:
            self._created.append(missing)
            missing = missing.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.path = make_owned_folder(parent, STAGING_PREFIX, self.target.name)
            os.chmod(self.path, plain_mode(folder=True))  # what the output folder ends up with
        except OSError as exc:
            self._remove_created()
            raise OutputError(f"{self.target}: cannot create output folder ({exc.strerror or exc})") from exc

    def commit(self) -> None:
        final = _resolved(self.target)
        old: Path | None = None
        if self.fsync:
            flush_tree(self.path)
        signals.output_complete(self.target)  # from the first rename on, a signal waits for the end
        try:
            if final.exists():
                if not self.overwrite:
                    raise OutputError(f"{self.target}: appeared while rotfuse was running; not replaced")
                old = make_owned_folder(final.parent, OLD_PREFIX, final.name)
                os.rename(final, old / final.name)
            os.rename(self.path, final)
        except BaseException as exc:
            signals.output_incomplete(self.target)
            if old is not None and not final.exists():
                os.rename(old / final.name, final)  # put the previous output back
                shutil.rmtree(old, ignore_errors=True)
            if isinstance(exc, OSError):
                raise OutputError(f"{self.target}: cannot move output into place ({exc.strerror or exc})") from exc
            raise
        self.committed = True
        if self.fsync:
            flush_tree(final.parent, recursive=False)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> StagedFolder:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self.committed:
            return
        shutil.rmtree(self.path, ignore_errors=True)
        self._remove_created()
        if exc is None:
            return
        _message_with(exc, self.path, self.target)
        if isinstance(exc, OSError) and exc.filename and str(exc.filename).startswith(str(self.path)):
            shown = str(exc.filename).replace(str(self.path), str(self.target))
            raise OutputError(f"{shown}: cannot write ({exc.strerror or exc})") from exc

    def _remove_created(self) -> None:
        for folder in self._created:
            try:
                folder.rmdir()  # only if still empty
            except OSError:
                break


def write_file_atomically(path: Path, write: Callable[[BinaryIO], object], what: str, output: bool = False) -> None:
    """Write one file through a temp file beside it and a rename. `output`: it is one of the
    command's outputs (from the rename on, a signal waits for the command's end)."""
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{STAGING_PREFIX}{owner_tag()}", dir=path.parent)
        os.chmod(tmp, plain_mode(folder=False))
        with os.fdopen(fd, "wb") as handle:
            write(handle)
        if output:
            signals.output_complete(path)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        if output:
            signals.output_incomplete(path)
        raise OutputError(f"{path}: cannot write {what} ({exc.strerror or exc})") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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


def write_json(path: Path, data: dict[str, object], output: bool = False) -> None:
    """Write strict JSON atomically (a temp file in the same folder, then a rename). `output`: the
    file is one of the command's outputs (not a file inside a staging folder), so once it is
    renamed a signal no longer means "no output was written" (rotfuse/signals.py)."""
    text = dumps_strict(data) + "\n"
    write_file_atomically(Path(path), lambda handle: handle.write(text.encode("utf-8")), "report", output)
