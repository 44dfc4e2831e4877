"""Streaming checkpoint writer: headers first, then each tensor's bytes at its offset.

The output layout (shard files, tensor order, dtypes, shapes) is fixed up front by a `ShardPlan`
list, usually copied from an input checkpoint (`plan_like`). Tensors may then arrive in any order;
the ones never handed over are copied byte for byte from the template with `finish()`, which
also checks that nothing was left out. Memory use is whatever the caller holds.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from rotfuse.core.distributed import Group
from rotfuse.core.errors import InputError, OutputError
from rotfuse.core.tensors import all_finite
from rotfuse.io.checkpoint import INDEX_FILE, Checkpoint
from rotfuse.io.dtypes import torch_dtype
from rotfuse.io.pickled import safetensors_name
from rotfuse.io.safetensors_file import FLOAT_DTYPES, FLOATING_DTYPES, copy_byte_range, encode_header, start_writeback
from rotfuse.io.staging import plain_mode

if TYPE_CHECKING:
    import torch

# Files that hold weights in another format: copying them next to transformed safetensors would
# leave a second, disagreeing copy of the weights in the output folder.
FOREIGN_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".safetensors", ".gguf")


@dataclass
class ShardPlan:
    """One output file: its name, its tensors in file order and its header metadata."""

    file_name: str
    tensors: list[tuple[str, str, tuple[int, ...]]]
    metadata: dict[str, str] = field(default_factory=dict)


def plan_like(template: Checkpoint, dtype: str | None = None) -> list[ShardPlan]:
    """The template's own layout; floating tensors recast to `dtype` when one is given."""
    plans = []
    for shard in template.shards:
        tensors = [
            (e.name, dtype if dtype and e.dtype in FLOAT_DTYPES else e.dtype, e.shape) for e in shard.entries.values()
        ]
        metadata = {"format": "pt"} if shard.path.suffix == ".bin" else dict(shard.metadata)
        plans.append(ShardPlan(safetensors_name(shard.path.name), tensors, metadata))
    return plans


def output_file_names(template: Checkpoint) -> tuple[str, ...]:
    """The weight files an output laid out like `template` holds (its shards and index)."""
    names = [plan.file_name for plan in plan_like(template)]
    if len(names) > 1 or template.index is not None:
        names.append(INDEX_FILE)
    return tuple(names)


class CheckpointWriter:
    """Writes the weight files of one checkpoint into `folder` (a staging folder).

    With `fsync` (the default) every shard is on disk when `finish()` returns: writeback starts as
    each tensor lands and a shard is fsynced in the background once complete, so the flush overlaps
    the work. Without it the OS writes back when it likes (scratch outputs, temporary checkpoints).

    Several processes may write one checkpoint: one creates the files (`create`, headers and
    sizes), the others open them after it (`create=False`); each writes its own tensors at their
    offsets (disjoint byte ranges) and hands the rest to the others with `leave_to_others`.
    """

    def __init__(
        self,
        folder: Path,
        plans: list[ShardPlan],
        template: Checkpoint | None = None,
        fsync: bool = True,
        allow_nonfinite: bool = False,
        create: bool = True,
    ):
        self.folder = folder
        self.template = template
        self.fsync = fsync
        self.allow_nonfinite = allow_nonfinite  # else a NaN or Inf in a result is refused, never written
        self._plans = plans
        self._where: dict[str, tuple[int, str, tuple[int, ...], int]] = {}  # name -> fd, dtype, shape, begin
        self._pending: set[str] = set()
        self._fds: list[int] = []
        self._files: dict[int, Path] = {}  # fd -> its file, for messages
        self._unwritten: dict[int, int] = {}  # fd -> tensors still to come
        self._syncs: list[Future] = []  # a shard is flushed in the background once it is complete
        self._sync_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rotfuse-fsync")
        current = folder
        try:
            for plan in plans:
                current = folder / plan.file_name
                header, offsets = encode_header(plan.tensors, plan.metadata)
                flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC if create else os.O_RDWR
                fd = os.open(current, flags, 0o666)  # less the umask, as cp
                self._fds.append(fd)
                self._files[fd] = current
                if create:
                    os.pwrite(fd, header, 0)
                    os.ftruncate(fd, max((e for _, e in offsets.values()), default=len(header)))
                for name, dtype, shape in plan.tensors:
                    self._where[name] = (fd, dtype, shape, offsets[name][0])
                    self._pending.add(name)
                self._unwritten[fd] = len(plan.tensors)
                if not plan.tensors:  # nothing will complete this shard: flush its header now
                    self._flush(fd)
        except OSError as exc:
            self.abort()
            raise OutputError(f"{current}: cannot create output file ({exc.strerror or exc})") from exc

    def dtype_of(self, name: str) -> str:
        return self._where[name][1]

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Cast `tensor` to the planned dtype and write it in place. A result holding NaN or Inf
        (an overflow, or a non-finite input let through) is refused unless `allow_nonfinite`."""
        import torch

        fd, dtype, shape, begin = self._slot(name)
        if tuple(tensor.shape) != shape:
            raise InputError(f"tensor {name!r}: shape {list(tensor.shape)} does not fit the output's {list(shape)}")
        data = tensor.detach().to(device="cpu", dtype=torch_dtype(dtype)).contiguous().reshape(-1)
        if not self.allow_nonfinite and not all_finite(data):
            raise InputError(
                f"tensor {name!r}: the result holds NaN or Inf values (in its output dtype {dtype}); "
                "nothing was written"
            )
        raw = data.view(torch.uint8).numpy()
        self._pwrite(fd, raw.data, begin, name)
        self._start_writeback(fd, begin, raw.nbytes)
        self._done(name, fd)

    def copy(self, name: str, source: Checkpoint | None = None) -> None:
        """Copy a tensor's bytes unchanged from `source` (default: the template). Its values are
        checked for NaN/Inf first, like every tensor read (unless the source allows them, or
        checked them when they were read)."""
        source = source or self.template
        if source is None:
            raise ValueError("no template checkpoint to copy from")
        fd, dtype, shape, begin = self._slot(name)
        entry = source.entry(name)
        if entry.dtype in FLOATING_DTYPES:
            source.ensure_finite(name)  # refuses NaN/Inf, naming the file and the tensor
        if entry.dtype != dtype or entry.shape != shape or entry.begin < 0:
            self.write(name, source.get(name))  # a cast, or a pickled source without byte ranges
            return
        src_fd = os.open(source.shard_of(name).path, os.O_RDONLY)
        try:
            copy_byte_range(src_fd, fd, entry.begin, begin, entry.nbytes)
            self._start_writeback(fd, begin, entry.nbytes)
        except OSError as exc:
            raise OutputError(f"{self._files[fd]}: cannot write tensor {name!r} ({exc.strerror or exc})") from exc
        finally:
            os.close(src_fd)
        self._done(name, fd)

    def copy_unwritten(self, names: Iterable[str]) -> None:
        """Copy those of `names` nobody wrote from the template now rather than in `finish`: a
        shard is flushed as soon as its last tensor is in, while later layers are still solved."""
        for name in names:
            if name in self._pending:
                self.copy(name)

    def leave_to_others(self, names: Iterable[str]) -> None:
        """Tensors another process writes: neither written nor copied here, not waited for."""
        for name in names:
            self._done(name, self._slot(name)[0])

    @property
    def pending(self) -> set[str]:
        return set(self._pending)

    def finish(self, index: bool = True) -> None:
        """Copy every tensor nobody wrote from the template, write the index (unless another
        process does), flush to disk."""
        for name in sorted(self._pending, key=lambda n: self._where[n][3]):
            if self.template is None or name not in self.template:
                raise OutputError(f"internal: tensor {name!r} was never written")
            self.copy(name)
        template_index = self.template.index if self.template is not None else None
        if index and (len(self._plans) > 1 or template_index is not None):
            self._write_index(dict((template_index or {}).get("metadata") or {}))
        try:
            for future in self._syncs:  # one per shard, each submitted when it was complete
                future.result()
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot flush output ({exc.strerror or exc})") from exc
        self._close()

    def abort(self) -> None:
        self._close()

    # ------------------------------------------------------------------ internals
    def _slot(self, name: str) -> tuple[int, str, tuple[int, ...], int]:
        try:
            return self._where[name]
        except KeyError:
            raise InputError(f"tensor {name!r} is not part of the output layout") from None

    def _pwrite(self, fd: int, data: memoryview, offset: int, name: str) -> None:
        try:
            while len(data):
                written = os.pwrite(fd, data, offset)
                data, offset = data[written:], offset + written
        except OSError as exc:
            raise OutputError(f"{self._files[fd]}: cannot write tensor {name!r} ({exc.strerror or exc})") from exc

    def _write_index(self, metadata: dict) -> None:
        from rotfuse.io.safetensors_file import DTYPE_SIZES

        total = 0
        weight_map: dict[str, str] = {}
        for plan in self._plans:
            for name, dtype, shape in plan.tensors:
                weight_map[name] = plan.file_name
                count = 1
                for dim in shape:
                    count *= dim
                total += count * DTYPE_SIZES[dtype]
        meta = {**metadata, "total_size": total}
        text = json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        try:
            (self.folder / INDEX_FILE).write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            raise OutputError(f"{self.folder}: cannot write {INDEX_FILE} ({exc.strerror or exc})") from exc

    def _done(self, name: str, fd: int) -> None:
        if name in self._pending:
            self._pending.discard(name)
            self._unwritten[fd] -= 1
            if self._unwritten[fd] == 0:  # the shard is complete: flush it while others are written
                self._flush(fd)

    def _start_writeback(self, fd: int, offset: int, length: int) -> None:
        if self.fsync:
            start_writeback(fd, offset, length)

    def _flush(self, fd: int) -> None:
        if self.fsync:
            self._syncs.append(self._sync_pool.submit(os.fsync, fd))

    def _close(self) -> None:
        self._sync_pool.shutdown(wait=True)
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def open_writer(
    folder: Path,
    plans: list[ShardPlan],
    template: Checkpoint | None,
    fsync: bool,
    allow_nonfinite: bool,
    group: Group | None,
) -> CheckpointWriter:
    """The writer; in a distributed job rank 0 creates the files (one step), then the other ranks
    open them (the next step)."""

    def open_here(create: bool) -> CheckpointWriter:
        return CheckpointWriter(folder, plans, template, fsync, allow_nonfinite, create)

    if group is None:
        return open_here(True)
    created = group.agree("create output", lambda: open_here(True) if group.is_main else None)
    joined = group.agree("open output", lambda: None if group.is_main else open_here(False))
    return created or joined  # type: ignore[return-value]


@dataclass(frozen=True)
class SideFiles:
    """The non-weight files of a checkpoint folder (config, tokenizer, ...) an output gets, and the
    other weight files it deliberately does not."""

    copied: tuple[str, ...]
    skipped: tuple[str, ...]


def side_files(source: Checkpoint) -> SideFiles:
    """Which files `copy_side_files` will copy, each checked now -- before any work -- so that a
    dangling link, a FIFO (which would block the copy forever) or an unreadable file is refused
    naming it, not found after all the matching under the staging folder's name."""
    own = set(source.weight_files)
    copied: list[str] = []
    skipped: list[str] = []
    for item in sorted(source.folder.iterdir()):
        if item.name in own or item.name.startswith("."):
            continue
        if item.suffix in FOREIGN_WEIGHT_SUFFIXES or item.name.endswith(".bin.index.json"):
            skipped.append(item.name)
            continue
        _check_copyable(item)
        copied.append(item.name)
    return SideFiles(tuple(copied), tuple(skipped))


def _check_copyable(path: Path) -> None:
    """A regular file or a folder of them (symlinks followed), readable."""
    try:
        status = path.stat()
    except FileNotFoundError:
        raise InputError(
            f"{path}: a symbolic link to nothing ({os.readlink(path) if path.is_symlink() else '?'}); "
            "remove it or point it at a file"
        ) from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    if stat.S_ISDIR(status.st_mode):
        for child in sorted(path.iterdir()):
            _check_copyable(child)
    elif not stat.S_ISREG(status.st_mode):
        raise InputError(
            f"{path}: not a regular file (a FIFO, socket or device); rotfuse copies only files and folders"
        )
    elif not os.access(path, os.R_OK):
        raise InputError(f"{path}: cannot read (permission denied)")


def copy_side_files(source: Checkpoint, dest: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files of `source` into `dest`.

    Returns the names of files deliberately not copied (weights in another format).
    """
    plan = side_files(source)
    for name in plan.copied:
        item, target = source.folder / name, dest / name
        try:
            if item.is_dir():
                shutil.copytree(item, target, symlinks=False)
            else:
                shutil.copy2(item, target)
                os.chmod(target, stat.S_IMODE(item.stat().st_mode) & plain_mode(folder=False))  # as cp: less the umask
        except (OSError, shutil.Error) as exc:
            raise OutputError(f"{target}: cannot copy {item} ({getattr(exc, 'strerror', None) or exc})") from exc
    return list(plan.skipped)
