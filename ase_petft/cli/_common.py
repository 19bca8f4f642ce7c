"""What every ``petft`` subcommand shares: exit codes, the parser, progress bars, label files.

Exit codes: 0 success, 2 bad usage or bad input, 1 the work failed. The code of an
error is :func:`ase_petft.errors.exit_code`: every
:class:`~ase_petft.errors.InputError` (this module's :class:`UsageError` included)
is 2, every other error 1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pathlib
import sys
from typing import Dict, Iterator, List, NoReturn

from ..buffer.sources import buffer_frames, file_frames, is_buffer, memory_buffer, read_labels
from ..errors import EXIT_FAILED, EXIT_INPUT, EXIT_OK, UsageError, exit_code

__all__ = ["EXIT_OK", "EXIT_FAILED", "EXIT_INPUT", "UsageError", "exit_code", "Parser",
           "one_line", "existing_file", "existing_dir", "step_bar", "epoch_bar",
           "read_labels", "read_replay", "file_size", "memory_buffer"]


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr and exit code 2.

    argparse prints the whole usage block before the error; the command's ``--help``
    has it, so the error line only points there. Subcommand parsers inherit the class.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_INPUT, f"{self.prog}: error: {' '.join(message.split())} "
                              f"(see '{self.prog} --help')\n")


def one_line(exc: BaseException) -> str:
    """The message of ``exc`` on one line (no traceback, no line breaks)."""
    text = str(exc)
    if isinstance(exc, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) \
            and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {str(exc.filename)!r}"
    return " ".join(text.split()) or type(exc).__name__


def existing_file(path: str, what: str) -> pathlib.Path:
    """``path`` as a Path, or a :class:`UsageError` if it is not an existing file."""
    found = pathlib.Path(path)
    if not found.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if not found.is_file():
        raise UsageError(f"{what} {path!r} is not a file")
    return found


def existing_dir(path: str, what: str) -> pathlib.Path:
    """``path`` as a Path, or a :class:`UsageError` if it is not an existing directory."""
    found = pathlib.Path(path)
    if not found.exists():
        raise UsageError(f"{what} {path!r} does not exist")
    if not found.is_dir():
        raise UsageError(f"{what} {path!r} is not a directory")
    return found


# ---------------------------------------------------------------------- progress
class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def step_bar(total: int, desc: str, quiet: bool):
    """A tqdm bar on stderr (context manager with ``update(n)``), or one that draws nothing
    when ``quiet`` or without tqdm."""
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


class EpochBar:
    """``progress(epoch, n_epochs)`` callback drawing a tqdm bar on stderr (or nothing)."""

    def __init__(self, desc: str, quiet: bool) -> None:
        self._desc, self._quiet, self._bar = desc, quiet, None

    def __call__(self, epoch: int, n_epochs: int) -> None:
        if self._quiet:
            return
        if self._bar is None:
            try:
                from tqdm import tqdm
            except ImportError:
                self._quiet = True
                return
            self._bar = tqdm(total=n_epochs, desc=self._desc, unit="epoch",
                             file=sys.stderr, leave=False)
        self._bar.update(max(0, epoch - self._bar.n))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@contextlib.contextmanager
def epoch_bar(desc: str, quiet: bool) -> Iterator[EpochBar]:
    bar = EpochBar(desc, quiet)
    try:
        yield bar
    finally:
        bar.close()


# ---------------------------------------------------------------------- label files
def read_replay(paths: List[str], *, exclude: str, default_variant: str) -> Dict[str, list]:
    """``{variant: frames}`` of replay files: every variant of a buffer except
    ``exclude``; all frames of another file as ``default_variant``."""
    replay: Dict[str, list] = {}
    for name in paths:
        path = existing_file(name, "replay file")
        if is_buffer(path):
            groups: Dict[str, list] = {}
            for atoms in buffer_frames(path):
                groups.setdefault(atoms.info["variant"], []).append(atoms)
            groups.pop(exclude, None)
            if not groups:
                raise UsageError(f"replay buffer {name!r} has no labels of a variant other "
                                 f"than {exclude!r}: nothing to replay")
        else:
            if default_variant == exclude:
                raise UsageError(f"--replay-variant is {exclude!r}, the variant being "
                                 "trained: replay is for the other variants")
            groups = {default_variant: file_frames(path, default_variant)}
        for variant, frames in groups.items():
            replay.setdefault(variant, []).extend(frames)
    return replay


def file_size(path: pathlib.Path) -> str:
    size = float(os.stat(path).st_size)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
