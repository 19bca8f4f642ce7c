"""Copy the intact frames of a damaged label buffer into a new one (``petft buffer recover``).

The damaged file is only read. Each frame is read on its own, so damage to one frame,
to a block of the file or to its end loses only the frames it touches; a frame is kept
only if its checksum holds, and it is copied row for row (positions, results, variant,
provenance and metadata exactly as stored).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Dict

import numpy as np

from .. import __version__
from .. import _provenance as prov
from ..errors import LabelBufferError
from . import file
from .table import FRAME_DTYPE, GROUPS, Table, check_format, frame_intact

__all__ = ["recover_buffer"]

logger = logging.getLogger(__name__)

_ERRORS = (OSError, RuntimeError, KeyError, ValueError, LabelBufferError)


def recover_buffer(source, destination) -> Dict[str, int]:
    """Copy every intact frame of the buffer ``source`` into a new buffer ``destination``.

    ``destination`` must not exist. Returns counts: ``labels``/``failures`` copied and
    ``labels_lost``/``failures_lost`` (committed frames that could not be read or fail
    their checksum). Raises :class:`LabelBufferError` if nothing of ``source`` can be
    read (its root metadata are destroyed).
    """
    source, destination = pathlib.Path(source), pathlib.Path(destination)
    if destination.exists():
        raise LabelBufferError(f"{str(destination)!r} exists; recovery writes a new file and "
                               "never overwrites one. Choose another name.")
    where = repr(str(source))
    src = file.open_reader(source, refuse_truncated=False)
    try:
        try:
            settings = check_format(src, where)
        except _ERRORS as exc:
            raise LabelBufferError(f"nothing can be recovered from {where}: its HDF5 root "
                                   f"metadata are unreadable ({exc}).") from exc
        layout = {"require_forces": settings["require_forces"],
                  "allowed_elements": settings["allowed_elements"],
                  "created_with": f"ase_petft {__version__} (recovered)",
                  "created_at": prov.utc_now()}
        counts = {}
        file.create_file(destination, **layout)
        lock = file.WriterLock(destination)
        try:
            dst, lock, _ = file.open_writer(destination, lock)
            with dst:
                for name in GROUPS:
                    kept, lost = _copy_group(src, dst, name)
                    counts[name], counts[f"{name}_lost"] = kept, lost
                dst.flush()
            lock.fsync()
        finally:
            lock.release()
    finally:
        src.close()
    logger.warning("recovered %s into %s: %d labels (%d lost), %d failures (%d lost)", source,
                   destination, counts["labels"], counts["labels_lost"], counts["failures"],
                   counts["failures_lost"])
    return counts


def _copy_group(src, dst, name: str) -> tuple:
    try:
        group = src[name]
        n = group["committed"].shape[0]
    except _ERRORS as exc:
        logger.error("group %s of the damaged buffer is unreadable (%s)", name, exc)
        return 0, 0
    target = Table(dst[name], swmr_reader=False)
    kept = 0
    for i in range(n):
        frame = _read_frame(group, i)
        if frame is None:
            continue
        row, atoms, text = frame
        target.append(row, atoms, text, lambda: None)
        kept += 1
    return kept, n - kept


def _read_frame(group, i: int):
    """(row with batch-relative offsets, atom rows, text) of frame ``i``, or None if damaged."""
    try:
        row = np.array(group["frames"][i:i + 1], dtype=FRAME_DTYPE)
        if len(row) != 1:
            return None
        a0, t0 = int(row["atom_start"][0]), int(row["text_start"][0])
        a1, t1 = a0 + int(row["n_atoms"][0]), t0 + int(row["text_length"][0])
        atoms = group["atoms"][a0:a1]
        text = group["text"][t0:t1].tobytes()
    except _ERRORS:
        return None
    if not frame_intact(row[0], atoms, text, a0, t0):
        return None
    row["atom_start"] -= a0
    row["text_start"] -= t0
    return row, atoms, text
