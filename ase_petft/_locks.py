"""Exclusive advisory locks held in a sidecar file: one writer per buffer or work directory.

The lock lives in its own small file (``.NAME.lock`` next to what it guards), never in
the file it guards: HDF5 takes its own ``flock`` on data files whenever
``HDF5_USE_FILE_LOCKING`` asks for it (clusters set it either way), and two locks on
one file from one process conflict. The lock file is never deleted (deleting lock
files races with the next locker); it is empty.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
from typing import Callable

try:  # POSIX advisory locks; without them a second writer is not detected
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = ["ExclusiveLock", "sidecar"]


def sidecar(path: pathlib.Path) -> pathlib.Path:
    """The lock file guarding ``path``: ``.NAME.lock`` in the same directory."""
    path = pathlib.Path(path)
    return path.with_name(f".{path.name}.lock")


class ExclusiveLock:
    """``flock(LOCK_EX | LOCK_NB)`` on ``sidecar(target)``, held until :meth:`release`.

    ``busy(target)`` and ``unusable(target, exc)`` build the exceptions raised when
    another holder has it, or when the lock file cannot be created or locked.
    """

    def __init__(self, target: pathlib.Path, *, busy: Callable, unusable: Callable):
        self.path = sidecar(target)
        self.fd = -1
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        except OSError as exc:
            raise unusable(target, exc) from exc
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise busy(target) from None
            raise unusable(target, exc) from exc
        self.fd = fd

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = -1

    def __del__(self):  # dropped without release(): do not keep it locked
        with contextlib.suppress(Exception):
            self.release()
