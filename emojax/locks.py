"""One writer at a time: an advisory lock (fcntl.flock) on an output folder, held for the whole write.

    with WriterLock(run_dir):        # a second writer fails at once, naming the folder and the holder's pid
        ...

The lock is the file `<folder>/.emojax.lock`; it holds the pid and command line of the process that holds it.
The kernel releases the lock when that process dies (even by SIGKILL), so a crashed writer never leaves a stale
lock behind. Readers never take it. Re-entering a lock the same process already holds on the same folder is
allowed (the run takes the run folder, then the dump takes the store inside it).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

from emojax.errors import EmojaxError

LOCK_NAME = ".emojax.lock"
_held: dict[str, int] = {}  # resolved folder -> depth, for re-entry in one process


class LockedError(EmojaxError):
    """Another process is writing the same output."""


class WriterLock:
    def __init__(self, folder: str | Path, what: str = "output"):
        self.folder = Path(folder)
        self.what = what
        self._fd: int | None = None
        self._key = ""

    def __enter__(self) -> WriterLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        self._key = str(self.folder.resolve())
        if _held.get(self._key):
            _held[self._key] += 1
            return self
        path = self.folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise LockedError(f"{self.folder}: another emojax process is writing this {self.what} "
                              f"(holder: {holder}); wait for it to finish or stop it, then rerun") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}: {' '.join(sys.argv)[:300]}\n".encode(), 0)
        self._fd = fd
        _held[self._key] = 1
        return self

    def __exit__(self, *exc) -> None:
        _held[self._key] -= 1
        if _held[self._key]:
            return
        del _held[self._key]
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def writer_lock(location: str | Path, what: str = "output"):
    """WriterLock for a local folder (a path or file://...); for an object store URL (gs://, s3://, ...), where
    fcntl locks do not exist, no lock (a null context)."""
    location = str(location)
    if "://" in location and not location.startswith("file://"):
        return contextlib.nullcontext()
    return WriterLock(location.removeprefix("file://"), what=what)


def holder(folder: str | Path) -> str | None:
    """The holder line of a folder's lock if some process holds it now, else None (for messages and tests)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = ["LOCK_NAME", "LockedError", "WriterLock", "holder", "writer_lock"]
