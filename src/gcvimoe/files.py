"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

Every artefact (checkpoints, exports, summaries, configs, plots) is written next to its destination under a temporary
name and moved into place with ``os.replace``, which is atomic on POSIX file systems: a reader sees the old file or
the new one, never a mix. A failed write removes its temporary file and raises one clear error.
"""
import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        _raise_write_error(e, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _raise_write_error(e: OSError, path: Path) -> None:
    """A full disk or a read-only place as one line; any other OSError as it is."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise GcvimoeError(f"no space left to write {path}; free disk space or choose another --output") from None
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise GcvimoeError(f"cannot write {path} ({os.strerror(e.errno)}); choose a writable --output") from None
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
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_write_error(e, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
