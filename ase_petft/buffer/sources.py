"""Labelled frames from files: a label buffer (HDF5) or anything ``ase.io`` reads.

One place for what ``finetune(checkpoint, "labels.h5")``, ``petft finetune`` and
``petft buffer import`` need: tell a buffer from other files, read a buffer's labels of
one variant, and validate other files' frames exactly like buffer labels (through a
buffer in memory, never a temporary file).
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Iterator, List, Optional

from ..errors import LabelBufferError

__all__ = ["is_buffer", "buffer_frames", "file_frames", "memory_buffer", "read_labels"]


def is_buffer(path: pathlib.Path) -> bool:
    """True for an HDF5 file (a :class:`~ase_petft.LabelBuffer`)."""
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def buffer_frames(path: pathlib.Path, variant: Optional[str] = None) -> List:
    """Labels of a buffer file (of ``variant`` when given; an error if it has none)."""
    from . import LabelBuffer

    with LabelBuffer(path, mode="r") as buffer:
        if variant is not None and variant not in buffer.variants:
            have = list(buffer.variants) or "no labels"
            raise LabelBufferError(f"buffer {str(path)!r} has no labels of variant {variant!r} "
                                   f"(it has {have}); choose one of these")
        return list(buffer.frames(variant=variant))


def file_frames(path: pathlib.Path, variant: str, *, index: str = ":") -> List:
    """Labelled frames of any file ``ase.io`` reads, validated like buffer labels.

    The frames go through a :class:`~ase_petft.LabelBuffer` in memory (its
    ``import_file``), so a missing energy, a NaN or a wrong shape is a clear
    :class:`~ase_petft.LabelBufferError`. Forces are optional.
    """
    with memory_buffer(require_forces=False) as buffer:
        buffer.import_file(path, variant=variant, index=index, skip_duplicates=False)
        return list(buffer.frames())


@contextlib.contextmanager
def memory_buffer(**settings) -> Iterator:
    """A :class:`~ase_petft.LabelBuffer` in memory (an HDF5 file that is never written
    to disk): validates labels without temporary files a killed process would leave."""
    import uuid

    import h5py

    from . import LabelBuffer

    with h5py.File(f"petft-check-{uuid.uuid4().hex}.h5", "w", driver="core",
                   backing_store=False) as root:
        with LabelBuffer(root, mode="w-", **settings) as buffer:
            yield buffer


def read_labels(path: pathlib.Path, variant: str, *, index: str = ":") -> List:
    """Frames of ``variant`` from a buffer (.h5) or any labelled file ASE reads."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise LabelBufferError(f"no labelled frames at {str(path)!r}: the file does not exist")
    if is_buffer(path):
        return _indexed(buffer_frames(path, variant), index, path)
    return file_frames(path, variant, index=index)


def _indexed(frames: List, index, path) -> List:
    """``frames[index]`` for an ASE index string (":", "0:4", "-10:", "3"), counted over
    the frames of the variant, as ``ase.io.read`` counts a file's frames."""
    from ase.io.formats import string2index

    if index in (None, ":"):
        return frames
    try:
        chosen = string2index(str(index))
        picked = frames[chosen]
    except (ValueError, IndexError) as exc:
        raise LabelBufferError(f"index {index!r} does not select labels of {str(path)!r} "
                               f"({len(frames)} of the variant): {exc}") from exc
    return picked if isinstance(chosen, slice) else [picked]
