"""Writing files so that a crash never leaves a half-written one: the one atomic writer of the package.

Every artefact (checkpoints, exports, summaries, configs, plots) is written next to its destination under a temporary
name and moved into place with ``os.replace``, which is atomic on POSIX file systems: a reader sees the old file or
the new one, never a mix. A failed write removes its temporary file and raises one clear error.
"""
import errno
import os
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
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise GcvimoeError(f"no space left to write {path}; free disk space or choose another --output") from None
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise GcvimoeError(f"cannot write {path} ({os.strerror(e.errno)}); choose a writable --output") from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
