"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

Every artefact (checkpoints, exports, summaries, configs, plots) is written next to its destination under a temporary
name and moved into place with ``os.replace``, which is atomic on POSIX file systems: a reader sees the old file or
the new one, never a mix. A failed write removes its temporary file and raises one clear error.
"""
import csv
import errno
import functools
import json
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Union

from gcvimoe.errors import GcvimoeError

PathLike = Union[str, os.PathLike]


def temporary_path(path: PathLike) -> Path:
    """The hidden temporary name :func:`atomic_path` writes ``path`` under."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp")


@contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``path``, on failure it is removed.

    Example::

        with atomic_path("out/last.pth") as tmp:
            torch.save(state, tmp)
    """
    path = Path(path)
    tmp = temporary_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)  # a leftover of a killed write
        yield tmp
        _make_readable(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        _write_failed(e, path, tmp)


def _make_readable(path: Path) -> None:
    """Give written files the mode ``open()`` gives: some writers (safetensors) create private files (0600), and a
    model folder is written to be shared."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        os.chmod(file, _file_mode())


@functools.lru_cache(maxsize=1)
def _file_mode() -> int:
    """The mode a new file gets from ``open()``: 0666 less the process's umask (0644 under the usual 022)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _write_failed(e: BaseException, path: Path, tmp: Path) -> None:
    """Remove the temporary file or folder of a failed write, then raise: one line for a full disk, a read-only place
    or a file in the way, any other error as it is.

    Some writers wrap the OS error in their own (torch.save's RuntimeError, safetensors' SafetensorError): then the
    folder tells what went wrong, its free space read before the partial file is removed.
    """
    wrapped = isinstance(e, Exception) and not isinstance(e, (OSError, GcvimoeError))
    full = wrapped and _free_bytes(path.parent) < FULL_DISK_BYTES
    _remove(tmp)
    if isinstance(e, OSError):
        _raise_write_error(e, path)
    if full:
        _raise_write_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), path)
    if wrapped and path.parent.is_dir() and not os.access(path.parent, os.W_OK):
        _raise_write_error(OSError(_not_writable_errno(path.parent), "not writable"), path)
    raise e


def _not_writable_errno(folder: Path) -> int:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return errno.EROFS if read_only else errno.EACCES


FULL_DISK_BYTES = 1 << 20
"""A write that fails with less free space than this is taken as failed for lack of space."""


def _free_bytes(folder: Path) -> int:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return FULL_DISK_BYTES


def _remove(tmp: Path) -> None:
    """Remove a temporary file or folder; one that cannot be removed (a file system gone read-only) is left."""
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass


def _raise_write_error(e: OSError, path: Path) -> None:
    """A full disk, a read-only place or a file where a folder should be as one line; any other OSError as it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise GcvimoeError(f"no space left to write {path}; free disk space or choose another --output") from None
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise GcvimoeError(f"cannot write {path} ({os.strerror(e.errno)}); choose a writable --output") from None
    if e.errno in (errno.EEXIST, errno.ENOTDIR):
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path.parent)
        raise GcvimoeError(f"cannot write {path}: {blocker} is a file, not a folder; choose another --output") \
            from None
    if e.errno == errno.EISDIR:
        raise GcvimoeError(f"cannot write {path}: a folder of that name is in the way; choose another --output") \
            from None
    raise e


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


@contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """Yield a temporary folder to fill; on success it replaces the folder ``path``, on failure it is removed.

    A folder cannot be swapped in one step: the old one is first renamed aside, so a crash in between leaves the new
    folder complete under its temporary name and the old one intact, never a mix of both.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise GcvimoeError(f"{path} is a file, not a folder; choose another output path")
    tmp, old = temporary_path(path), path.with_name(f".{path.name}.old")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        yield tmp
        _make_readable(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        _write_failed(e, path, tmp)


def write_records(path: PathLike, records: List[Dict[str, Any]], columns: Optional[List[str]] = None) -> Path:
    """Write result rows atomically as ``.json`` (a list of objects) or ``.csv``; any other suffix is a one-line
    error. A CSV's header is ``columns`` (keys outside it are left out), else every key in order of first appearance.
    """
    path = Path(path)
    if path.suffix not in (".json", ".csv"):
        raise GcvimoeError(f"--results-file {path} must end in .json or .csv")
    if path.suffix == ".json":
        return write_text(path, json.dumps(records, indent=1) + "\n")
    if columns is None:
        columns = list(dict.fromkeys(key for record in records for key in record))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return path
