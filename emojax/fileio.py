"""Durable writes: every file a later step reads is written to a temporary file beside it, fsynced, and renamed
over the target, so a crash or a full disk leaves either the old file or the new one, never half of one.

    write_text(path, text)        write_json(path, obj)        write_bytes(path, data)
    with atomic_path(path) as tmp: library_that_writes_a_file(tmp)

A full disk (ENOSPC) or a quota (EDQUOT) is a `DiskFullError` naming the file: the CLI prints it on one line,
and because the target was never touched, rerunning after freeing space completes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from emojax.errors import EmojaxError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(EmojaxError, OSError):
    """No space left (or quota exceeded) while writing a file; nothing already written was changed."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in _FULL


def disk_full(path: str | Path) -> DiskFullError:
    return DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; free some space "
                                       "(or point the output elsewhere) and rerun: finished work is kept")


def fsync_dir(folder: str | Path) -> None:
    """Makes a rename inside `folder` durable (a no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; on success it is fsynced and renamed over `path`.

    On any error the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full(path) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def move_aside(path: str | Path) -> Path | None:
    """Renames an existing output to `<path>.old-<YYYYmmdd-HHMMSS>[-N]` (never deletes); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    n = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{n}")
        n += 1
    path.rename(target)
    return target


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1, sort_keys: bool = False) -> Path:
    """`obj` as JSON plus a newline; non-JSON values (paths, numpy scalars) are written with str()."""
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


__all__ = ["DiskFullError", "atomic_path", "disk_full", "fsync_dir", "is_disk_full", "move_aside", "write_bytes",
           "write_json", "write_text"]
