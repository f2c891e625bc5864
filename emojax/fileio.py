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
import re
import time
from collections.abc import Iterator
from pathlib import Path

from emojax.errors import EmojaxError

_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(EmojaxError, OSError):
    """No space left (or quota exceeded) while writing a file; nothing already written was changed."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]" prefix
        return self.strerror or super().__str__()


# Libraries that wrap OS errors in their own types say so in the text: TensorStore "[os_error_code='28']",
# safetensors "(os error 28)".
_FULL_TEXT = re.compile(r"os_error_code='(28|122)'|\(os error (28|122)\)|No space left on device|Disk quota exceeded")


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC or EDQUOT: an OSError with that errno, or a library's error whose text reports one."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in _FULL
    return bool(_FULL_TEXT.search(" ".join(str(error).split())))


def disk_full_cause(error: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error anywhere in `error`'s chain of causes and contexts (Beam and orbax re-raise what a
    worker thread raised, wrapped), or None."""
    seen, todo = set(), [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if is_disk_full(e):
            return e
        todo += [e.__cause__, e.__context__]
    return None


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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e) and not isinstance(e, DiskFullError):
            raise disk_full(path) from None
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


__all__ = ["DiskFullError", "atomic_path", "disk_full", "disk_full_cause", "fsync_dir", "is_disk_full", "move_aside",
           "write_bytes", "write_json", "write_text"]
