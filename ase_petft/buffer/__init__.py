"""Crash-safe HDF5 buffer of reference labels: :class:`LabelBuffer`.

Reference calculations are the most expensive thing a user owns: an append that has
returned is on disk, and no reader ever sees a partial frame.

Schema (version 1)
------------------
Root attributes (written once, at creation):
``format`` = ``"ase_petft.label_buffer"``, ``schema_version`` = 1, ``created_with``
(``"ase_petft X.Y.Z"``), ``created_at`` (ISO 8601 UTC), ``require_forces`` (0/1),
``allowed_elements`` (int64 atomic numbers; empty = any element).

Two groups with the same layout: ``/labels`` (labelled frames) and ``/failures``
(structures whose reference calculation failed). Each holds four 1-D, chunked,
unlimited datasets:

``atoms``      one row per atom: ``position`` f8[3] (Å), ``number`` i4, ``force`` f8[3]
               (eV/Å; NaN when the frame has no forces)
``text``       uint8: UTF-8 JSON documents, one per frame, back to back
``frames``     one row per frame: ``atom_start``, ``n_atoms`` (rows in ``atoms``),
               ``text_start``, ``text_length`` (bytes in ``text``), ``energy`` f8 (eV;
               NaN in ``/failures``), ``cell`` f8[3,3] (Å), ``pbc`` u1[3], ``stress``
               f8[6] (Voigt, eV/Å³, ASE sign), ``has_forces`` u1, ``has_stress`` u1,
               ``variant`` S64 (e.g. ``b"energy/pbe0"``; may be empty in ``/failures``),
               ``checksum`` u4 (CRC32, see below)
``committed``  never written: its **length** is the number of committed frames

Only the first ``len(committed)`` rows of ``frames`` exist; rows of ``atoms``/``text``
not referenced by them are leftovers of an interrupted append and are ignored (and
overwritten by the next one). The JSON document of a label holds ``reference``
(``{"name", "class", "parameters"}`` or null), ``wall_time_s``, ``labelled_at``,
``appended_at``, ``ase_petft_version`` and ``metadata`` (free, JSON; numeric numpy
arrays as ``{"__ndarray__": [...], "dtype", "shape"}``). A failure's document holds
``reference``, ``error``, ``error_type``, ``recorded_at``, ``ase_petft_version`` and
``metadata``. Floats are stored as float64 exactly (JSON floats round-trip exactly).
Reading a frame gives an ``ase.Atoms`` with results on a ``SinglePointCalculator``
and ``info`` keys listed in :mod:`ase_petft._provenance` plus the metadata keys.

Durability and concurrency
--------------------------
* The file uses the latest HDF5 format and the writer holds it in **SWMR** (single
  writer, multiple readers) mode from the moment it opens it. In SWMR mode HDF5
  writes its metadata in dependency order, so the file on disk is valid at every
  instant: any number of readers (``mode="r"``, other processes) can follow the
  writer, and a writer killed at any moment (SIGKILL, OOM, segfault) leaves a file
  that opens.
* An append writes the atoms and text rows, then the frame rows (each dataset's
  flush writes its data before its header), then extends ``committed`` (a
  metadata-only change) and flushes it, then calls ``fsync`` once. A reader reads
  ``len(committed)`` first and never looks past it, so a killed append is invisible
  and a returned append is on disk.
* Every frame row carries a CRC32 of itself, its atom rows and its text; readers
  verify it. A power loss during an append (whose writes the kernel may persist in
  any order before the ``fsync``) can therefore never pass a torn frame off as a
  label: recovery drops a torn last append, reading refuses a damaged frame.
  (HDF5 itself does not order its metadata writes for power losses, so a power
  loss mid-append may, rarely, damage the file's structure; killing the process
  cannot.)
* A writer holds an exclusive ``flock`` on the file until it closes, so a second
  writer is refused. A file still flagged "open for write" by HDF5 whose lock we
  obtain was left by a writer that died: opening it for writing copies its
  committed frames into a fresh file (read the way a SWMR reader reads it),
  fsyncs it and atomically renames it over the old one (a warning is logged).
  Readers that had the old file open keep seeing the old copy: reopen them.
* New files are built under a temporary name and hard-linked into place, so a
  path never holds a half-created buffer.
* With ``fsync=False`` appends survive the death of the writing process but not a
  power loss or kernel crash.
* One ``LabelBuffer`` object may be shared by threads (an MD thread appending, a
  refit thread reading): its operations are serialised by a lock.

Files written in SWMR mode need HDF5 >= 1.10 (h5py >= 2.5) to be read. The layers:
``file`` (open, lock, create, recover), ``table`` (datasets and the append/read
protocol), ``records`` (validation, Atoms <-> rows), ``exchange`` (files of ase.io).
"""

from __future__ import annotations

import logging
import operator
import os
import pathlib
import threading
from typing import Iterable, Iterator, Optional

import h5py
import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .. import __version__
from .. import _provenance as prov
from ..errors import LabelBufferError
from ..variants import validate_variant
from . import exchange, file
from .salvage import recover_buffer
from .records import failure_record, label_record, pack_records, record_key, row_to_atoms
from .table import (VARIANT_BYTES, Table, check_settings, frame_intact, iter_blocks,
                     normalise_elements, open_group)

__all__ = ["LabelBuffer", "recover_buffer"]

logger = logging.getLogger(__name__)

_MODES = ("r", "a", "w-")
_READ_BLOCK = 256


class LabelBuffer:
    """A crash-safe, append-only HDF5 file of reference labels (see the module docstring).

    :param path: file path, or an open ``h5py.Group``/``h5py.File`` to use as is (it is
        never closed by the buffer; the crash-safety guarantee then depends on how the
        caller opened it: it holds only for files LabelBuffer opens itself).
    :param mode: ``"r"`` read only (follows a concurrent writer), ``"a"`` create or
        append, ``"w-"`` create and fail if the file exists. There is no overwrite mode.
    :param allowed_elements: elements (symbols or atomic numbers) labels may contain,
        fixed at creation; None allows any element.
    :param require_forces: refuse labels without forces (default True), fixed at creation.
    :param fsync: ``fsync`` every append (default). Without it, appends survive the
        death of the process but not a power loss.
    """

    def __init__(self, path, mode: str = "a", *, allowed_elements: Optional[Iterable] = None,
                 require_forces: Optional[bool] = None, fsync: bool = True):
        self._closed = True
        self._failed_write = None
        self._mutex = threading.RLock()
        self._file = self._root = self._writer_lock = None
        if mode not in _MODES:
            raise LabelBufferError(
                f"invalid mode {mode!r}: use 'r' (read), 'a' (create or append) or 'w-' "
                "(create, fail if the file exists). There is no overwrite mode: delete the "
                "file yourself to start again.")
        self._mode, self._fsync = mode, bool(fsync)
        wanted = {"allowed_elements": normalise_elements(allowed_elements),
                  "require_forces": None if require_forces is None else bool(require_forces)}
        layout = {"require_forces": wanted["require_forces"] is not False,
                  "allowed_elements": wanted["allowed_elements"],
                  "created_with": f"ase_petft {__version__}", "created_at": prov.utc_now()}
        if isinstance(path, h5py.Group):
            self._path, self._owns = pathlib.Path(path.file.filename), False
            self._where = f"{path.file.filename!r}:{path.name}"
            settings = open_group(path, mode=mode, layout=layout, where=self._where)
            self._root = path
        else:
            if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
                raise LabelBufferError(
                    f"a label buffer path must be a non-empty str or path (or an open h5py "
                    f"group), got {path!r}; e.g. LabelBuffer('labels.h5', mode='a')")
            self._path, self._owns = pathlib.Path(os.fspath(path)).absolute(), True
            self._where = repr(str(self._path))
            if mode != "r":  # like `open(..., "a")` in a new run folder: create it
                try:
                    self._path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc:
                    raise LabelBufferError(f"cannot create the folder of {self._where}: "
                                           f"{exc}") from exc
            self._file, self._writer_lock, settings = file.open_path(self._path, mode=mode,
                                                                    layout=layout)
            self._root = self._file
        self._closed = False
        try:
            check_settings(settings, wanted, self._where)
            self._require_forces = settings["require_forces"]
            self._allowed = settings["allowed_elements"]
            with file.reading(self._where):
                self._labels = Table(self._root["labels"], swmr_reader=mode == "r")
                self._failures = Table(self._root["failures"], swmr_reader=mode == "r")
        except BaseException:
            self.close()
            raise
        self._variant_cache = np.empty(0, dtype=f"S{VARIANT_BYTES}")

    # -- properties ----------------------------------------------------------------------

    @property
    def path(self) -> pathlib.Path:
        return self._path

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def require_forces(self) -> bool:
        return self._require_forces

    @property
    def allowed_elements(self) -> Optional[tuple]:
        """Symbols of the allowed elements (sorted by atomic number), or None for any."""
        return None if self._allowed is None else tuple(chemical_symbols[z] for z in sorted(self._allowed))

    @property
    def variants(self) -> tuple:
        """Sorted names of the energy variants that have labels."""
        return tuple(sorted({v.decode() for v in self._variant_column()}))

    def __repr__(self) -> str:
        if self._closed:
            return f"<LabelBuffer {self._where} (closed)>"
        return (f"<LabelBuffer {self._where} mode={self._mode!r}: {len(self)} labels, "
                f"variants {list(self.variants)}>")

    # -- writing -------------------------------------------------------------------------

    def append(self, atoms: Atoms, *, variant: str, **metadata) -> int:
        """Validate and store one labelled structure; returns its index once it is on disk.

        The results are read from ``atoms.calc.results`` (never computed here); the
        provenance keys that :func:`ase_petft.label` puts in ``atoms.info`` are stored
        with it, other ``atoms.info`` entries are not: pass what you want to keep as
        ``metadata`` (numbers, strings, bools, None, lists, dicts, numeric arrays).
        """
        return self._write_labels([atoms], variant, metadata, single=True)[0]

    def extend(self, frames: Iterable[Atoms], *, variant: str, **metadata) -> range:
        """Store several labelled structures at once (all or none); returns their indices."""
        return self._write_labels(list(frames), variant, metadata, single=False)

    def _write_labels(self, frames: list, variant: str, metadata: dict, *, single: bool) -> range:
        self._check_writable()
        records = [
            label_record(atoms, variant=variant, metadata=metadata,
                         where="the structure" if single else f"frame {i} of {len(frames)}",
                         allowed=self._allowed, require_forces=self._require_forces,
                         version=__version__)
            for i, atoms in enumerate(frames)
        ]
        return self._commit_labels(records)

    def _commit_labels(self, records: list) -> range:
        with self._mutex:
            self._variant_column()  # the cache must cover every frame before these
            indices = self._commit(self._labels, records)
            added = np.array([r.variant.encode() for r in records], dtype=self._variant_cache.dtype)
            self._variant_cache = np.concatenate([self._variant_cache, added])
        return indices

    def record_failure(self, atoms: Atoms, *, error, variant: Optional[str] = None,
                       reference=None, **metadata) -> int:
        """Record a structure whose reference calculation failed (``error``: exception or text).

        Kept apart from the labels (see :meth:`failures`), so a learner can report
        and skip structures its reference cannot handle.
        """
        self._check_writable()
        record = failure_record(atoms, error=error, variant=variant, reference=reference,
                                metadata=metadata, where="the failed structure",
                                version=__version__)
        return self._commit(self._failures, [record])[0]

    def import_file(self, path, *, variant: str, index=":", format: Optional[str] = None,
                    energy_key: Optional[str] = None, forces_key: Optional[str] = None,
                    stress_key: Optional[str] = None, skip_duplicates: bool = True,
                    **metadata) -> range:
        """Import labelled structures from any file ``ase.io.read`` reads (extxyz, .traj, db).

        Results come from the calculator ASE attaches when reading, or from the
        ``atoms.info``/``atoms.arrays`` keys given as ``energy_key``, ``forces_key``,
        ``stress_key``. JSON-able ``atoms.info`` entries become metadata, with
        ``source`` (the file) and ``source_index``. All frames are validated before any
        is written. With ``skip_duplicates`` (default), a frame identical to a label of
        ``variant`` already in the buffer (or earlier in the file) — same atoms,
        positions, cell and energy, bit for bit — is skipped and counted in a warning
        (importing a file twice adds nothing). Returns the new indices.
        """
        self._check_writable()
        records = exchange.read_records(
            path, variant=variant, index=index, format=format, energy_key=energy_key,
            forces_key=forces_key, stress_key=stress_key, metadata=metadata,
            allowed=self._allowed, require_forces=self._require_forces, version=__version__)
        if skip_duplicates:
            seen = {record_key(a.numbers, a.positions, a.cell, a.pbc,
                               a.calc.results["energy"], variant)
                    for a in self.frames(variant=variant)}
            kept = []
            for record in records:
                key = record_key(record.numbers, record.positions, record.cell, record.pbc,
                                 record.energy, record.variant)
                if key not in seen:
                    seen.add(key)
                    kept.append(record)
            if len(kept) < len(records):
                logger.warning("skipped %d of %d frames of %s: already in %s as labels of %r",
                               len(records) - len(kept), len(records), path, self._where,
                               variant)
            records = kept
        if not records:
            return range(len(self), len(self))
        return self._commit_labels(records)

    def _commit(self, table: Table, records: list) -> range:
        rows, atoms, text = pack_records(records)
        with self._mutex:
            self._check_writable()
            if self._owns:  # a full disk would break the open HDF5 file for good
                file.check_free_space(self._path, 2 * (rows.nbytes + atoms.nbytes + len(text)))
            try:
                return table.append(rows, atoms, text, self._sync)
            except Exception as exc:
                self._failed_write = exc
                raise LabelBufferError(f"writing to {self._where} failed ({type(exc).__name__}: "
                                       f"{' '.join(str(exc).split())}); the frames were not "
                                       "committed.") from exc

    def _sync(self) -> None:
        if self._fsync:
            file.sync(self._root, self._path, self._writer_lock)

    # -- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._mutex, file.reading(self._where):
            self._check_open()
            return self._labels.refresh()

    def refresh(self) -> int:
        """Pick up labels appended by another process; returns the number of labels."""
        return len(self)

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, slice):
            return self._read(self._labels, list(range(n)[index]))
        if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"buffer indices must be integers or slices, not {type(index).__name__}")
        i = operator.index(index)
        if not -n <= i < n:
            raise IndexError(f"label index {i} is out of range: the buffer holds {n} labels")
        return self._read(self._labels, [i % n])[0]

    def __iter__(self) -> Iterator[Atoms]:
        return self.frames()

    def indices(self, variant: Optional[str] = None) -> list:
        """Indices of the labels (of ``variant`` when given)."""
        column = self._variant_column()
        if variant is None:
            return list(range(len(column)))
        variant = validate_variant(variant)  # "pbe0" for "energy/pbe0" would match nothing
        return np.flatnonzero(column == variant.encode()).tolist()

    def frames(self, variant: Optional[str] = None, *, skip_damaged: bool = False
               ) -> Iterator[Atoms]:
        """Iterate over the labels (of ``variant`` when given), read in blocks.

        A damaged frame raises :class:`LabelBufferError`, or with ``skip_damaged=True``
        is left out (logged). ``petft buffer recover`` copies the intact frames to a new
        file once and for all.
        """
        indices = self.indices(variant)
        for start in range(0, len(indices), _READ_BLOCK):
            yield from self._read(self._labels, indices[start:start + _READ_BLOCK],
                                  skip_damaged=skip_damaged)

    def failures(self) -> list:
        """The recorded failures: structures with ``info["error"]`` etc., no results."""
        with self._mutex, file.reading(self._where):
            self._check_open()
            n = self._failures.refresh()
        return self._read(self._failures, list(range(n)))

    def _variant_column(self) -> np.ndarray:
        with self._mutex, file.reading(self._where):
            self._check_open()
            n = self._labels.refresh()
            have = len(self._variant_cache)
            if n > have:
                self._variant_cache = np.concatenate(
                    [self._variant_cache, self._labels.variants(have, n)])
            return self._variant_cache[:n]

    def _read(self, table: Table, indices: list, *, skip_damaged: bool = False) -> list:
        found = {}
        for start, stop, chosen in iter_blocks(sorted(set(indices)), _READ_BLOCK):
            try:
                found.update(self._read_block(table, start, stop, chosen))
            except LabelBufferError:
                if not skip_damaged:
                    raise
                for i in chosen:  # one at a time: keep what is intact
                    try:
                        found.update(self._read_block(table, i, i + 1, [i]))
                    except LabelBufferError as exc:
                        logger.warning("skipping damaged label %d: %s", i, exc)
        out, seen = [], set()
        for i in indices:  # a repeated index gets its own copy
            if i in found:
                out.append(found[i].copy() if i in seen else found[i])
                seen.add(i)
        return out

    def _read_block(self, table: Table, start: int, stop: int, chosen: list) -> dict:
        with self._mutex, file.reading(self._where):
            self._check_open()
            rows = table.rows(start, stop)[np.asarray(chosen) - start]
            atom_rows, text, a0, t0 = table.payload(rows)
        found = {}
        for i, row in zip(chosen, rows):
            if not frame_intact(row, atom_rows, text, a0, t0):
                raise LabelBufferError(
                    f"frame {i} of {self._where} is damaged (checksum mismatch); the file "
                    "was corrupted on disk. Copy out the intact frames with 'petft buffer "
                    "recover FILE -o NEW.h5', or read with frames(skip_damaged=True).")
            found[i] = row_to_atoms(row, atom_rows, text, a0, t0, i)
        return found

    # -- export --------------------------------------------------------------------------

    def to_extxyz(self, path, variant: Optional[str] = None, *,
                  skip_damaged: bool = False) -> int:
        """Write the labels (of one variant) as extended XYZ for metatrain; returns the count.

        Keys: info ``energy`` (eV), array ``forces`` (eV/Å), info ``stress`` (3x3,
        eV/Å³, ASE sign), plus info ``variant`` and ``buffer_index``. In metatrain's
        ``options.yaml`` use ``key: energy``, ``forces: {key: forces}``,
        ``stress: {key: stress}``. Forces (stress) are written only when every exported
        frame has them. The file is written under a temporary name and renamed.
        """
        variants = self.variants
        if variant is None and len(variants) > 1:
            raise LabelBufferError(f"{self._where} holds labels of several variants {list(variants)}; "
                                   "one training file must hold one level of theory: pass variant=.")
        indices = self.indices(variant)
        if not indices:
            raise LabelBufferError(f"{self._where} has no labels" +
                                   (f" of variant {variant!r} (it has {list(variants)})" if variant else ""))
        return exchange.write_extxyz(path, self._read(self._labels, indices,
                                                      skip_damaged=skip_damaged))

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent). An h5py object given by the caller stays open.

        Committed frames are on disk whatever happens here; a failure to close (a full
        disk, a vanished mount) is a :class:`LabelBufferError`.
        """
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            try:
                if self._owns and self._file is not None and self._failed_write is not None:
                    # HDF5 cannot flush this file any more (full disk, lost mount) and
                    # crashes at exit if its close is retried: leave it to the garbage
                    # collector. Committed frames are on disk; the next open recovers.
                    logger.error("not closing %s cleanly after a failed write (%s); its "
                                 "committed frames are on disk", self._where,
                                 self._failed_write)
                elif self._owns and self._file is not None:
                    self._file.close()
                elif self._mode != "r":
                    self._root.file.flush()
            except Exception as exc:
                raise LabelBufferError(
                    f"closing {self._where} failed ({type(exc).__name__}: {exc}); the frames "
                    "committed before are on disk. Check free space, then reopen it (an "
                    "unclean close is recovered on the next open).") from exc
            finally:
                if self._writer_lock is not None:
                    self._writer_lock.release()

    def __enter__(self) -> "LabelBuffer":
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # never mask the error that ends the block
            self.close()
        except LabelBufferError as exc:
            logger.error("%s", exc)

    def _check_open(self) -> None:
        if self._closed:
            raise LabelBufferError(f"label buffer {self._where} is closed; open it again.")

    def _check_writable(self) -> None:
        self._check_open()
        if self._mode == "r":
            raise LabelBufferError(f"label buffer {self._where} is open read-only (mode='r'); "
                                   "nothing was written. Open it with mode='a' to append.")
