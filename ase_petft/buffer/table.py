"""Layout of a label buffer's HDF5 groups and the append/read protocol of one group.

See :mod:`ase_petft.buffer` for the schema and the durability design. This module
knows HDF5 datasets and the buffer's settings; it does not know ase.Atoms.
"""

from __future__ import annotations

import zlib
from typing import Iterator, Optional

import h5py
import numpy as np
from ase.data import atomic_numbers, chemical_symbols

from ..errors import LabelBufferError

FORMAT = "ase_petft.label_buffer"
SCHEMA_VERSION = 1
GROUPS = ("labels", "failures")
VARIANT_BYTES = 64
ATOM_DTYPE = np.dtype([("position", "<f8", (3,)), ("number", "<i4"), ("force", "<f8", (3,))])
FRAME_DTYPE = np.dtype([
    ("atom_start", "<i8"), ("n_atoms", "<i8"), ("text_start", "<i8"), ("text_length", "<i8"),
    ("energy", "<f8"), ("cell", "<f8", (3, 3)), ("pbc", "u1", (3,)), ("stress", "<f8", (6,)),
    ("has_forces", "u1"), ("has_stress", "u1"), ("variant", f"S{VARIANT_BYTES}"),
    ("checksum", "<u4"),
])
DATASETS = {  # name: (dtype, chunk length)
    "atoms": (ATOM_DTYPE, 512),
    "text": (np.dtype("u1"), 8192),
    "frames": (FRAME_DTYPE, 64),
    "committed": (np.dtype("u1"), 4096),
}


def check_format(root: h5py.Group, where: str) -> dict:
    """The buffer settings stored in ``root``; LabelBufferError if it is not a buffer."""
    attrs = root.attrs
    fmt = attrs.get("format")
    if isinstance(fmt, bytes):
        fmt = fmt.decode()
    if fmt != FORMAT:
        raise LabelBufferError(f"{where} is not an ase_petft label buffer (attribute 'format' "
                               f"is {fmt!r}, expected {FORMAT!r}). Use a new file, or import "
                               "labelled data with LabelBuffer.import_file().")
    version = int(attrs.get("schema_version", -1))
    if version > SCHEMA_VERSION:
        raise LabelBufferError(f"{where} uses label-buffer schema version {version}, newer than "
                               f"the {SCHEMA_VERSION} this ase_petft understands. Upgrade ase_petft.")
    if version < 1 or any(name not in root for name in GROUPS):
        raise LabelBufferError(f"{where} has an invalid schema (version {version}, groups "
                               f"{sorted(root)}); the file is damaged or not a buffer.")
    elements = np.asarray(attrs.get("allowed_elements", []), dtype=np.int64)
    return {
        "schema_version": version,
        "require_forces": bool(attrs.get("require_forces", True)),
        "allowed_elements": frozenset(elements.tolist()) if elements.size else None,
    }


def create_layout(root: h5py.Group, *, require_forces: bool, allowed_elements, created_with: str,
                  created_at: str) -> None:
    """Write the schema: root attributes, then the empty groups and datasets."""
    root.attrs["format"] = FORMAT
    root.attrs["schema_version"] = SCHEMA_VERSION
    root.attrs["created_with"] = created_with
    root.attrs["created_at"] = created_at
    root.attrs["require_forces"] = np.uint8(require_forces)
    root.attrs["allowed_elements"] = np.array(sorted(allowed_elements or ()), dtype=np.int64)
    for name in GROUPS:
        group = root.create_group(name)
        for dname, (dtype, chunk) in DATASETS.items():
            group.create_dataset(dname, shape=(0,), maxshape=(None,), chunks=(chunk,), dtype=dtype)


def open_group(group: h5py.Group, *, mode: str, layout: dict, where: str) -> dict:
    """Use a caller's open h5py group as a buffer (creating the layout for "a"/"w-")."""
    if mode != "r" and group.file.mode != "r+":
        raise LabelBufferError(f"{where} is open read-only in h5py; mode={mode!r} needs it "
                               "opened for writing.")
    if "format" not in group.attrs and mode != "r":
        if len(group) or len(group.attrs):
            raise LabelBufferError(f"{where} is not empty and not a label buffer; use an "
                                   "empty group.")
        create_layout(group, **layout)
    elif mode == "w-":
        raise LabelBufferError(f"{where} already holds a label buffer and mode='w-' never "
                               "overwrites; use mode='a'.")
    return check_format(group, where)


def normalise_elements(elements) -> Optional[frozenset]:
    """Atomic numbers of ``allowed_elements`` (symbols or numbers), or None for any."""
    if elements is None:
        return None
    if isinstance(elements, (str, int)):
        elements = [elements]
    numbers = set()
    for element in elements:
        if isinstance(element, str) and atomic_numbers.get(element, 0) > 0:
            numbers.add(atomic_numbers[element])
        elif isinstance(element, (int, np.integer)) and 1 <= int(element) <= 118:
            numbers.add(int(element))
        else:
            raise LabelBufferError(f"allowed_elements: {element!r} is not a chemical element; "
                                   "give symbols like 'Cu' or atomic numbers 1..118.")
    if not numbers:
        raise LabelBufferError("allowed_elements is empty; pass None to allow any element.")
    return frozenset(numbers)


def check_settings(stored: dict, wanted: dict, where: str) -> None:
    """Refuse creation-time settings that differ from the ones stored in the file."""
    for key in ("allowed_elements", "require_forces"):
        if wanted[key] is not None and wanted[key] != stored[key]:
            raise LabelBufferError(
                f"{where} was created with {key}={_show(stored[key])}, but "
                f"{key}={_show(wanted[key])} was requested; this setting is fixed at "
                "creation. Omit it, or use a new file.")


def _show(value):
    if isinstance(value, frozenset):
        return sorted(chemical_symbols[z] for z in value)
    return value


def frame_intact(row: np.void, atoms: np.ndarray, text: bytes, a0: int, t0: int) -> bool:
    """Whether a stored frame matches its checksum (atoms/text start at rows a0/t0)."""
    a, t = int(row["atom_start"]) - a0, int(row["text_start"]) - t0
    k, m = int(row["n_atoms"]), int(row["text_length"])
    if a < 0 or t < 0 or k < 1 or m < 0 or a + k > len(atoms) or t + m > len(text):
        return False
    return checksum(row, atoms[a:a + k], text[t:t + m]) == int(row["checksum"])


def ends(frames: np.ndarray) -> tuple:
    """(atom rows, text bytes) used by the committed ``frames`` rows."""
    if len(frames) == 0:
        return 0, 0
    return (int(np.max(frames["atom_start"] + frames["n_atoms"])),
            int(np.max(frames["text_start"] + frames["text_length"])))


class Table:
    """The four datasets of one group (``labels`` or ``failures``).

    ``committed`` never holds data: its *length* is the number of committed frames,
    and it is extended only after the frame rows and their atoms and text are flushed.
    """

    def __init__(self, group: h5py.Group, *, swmr_reader: bool):
        # ``committed`` is read first: a writer may append while the others are opened,
        # and a reader must never know of more frames than the data it has opened.
        self.committed = group["committed"]
        self.n = self.committed.shape[0]
        self.atoms, self.text, self.frames = group["atoms"], group["text"], group["frames"]
        self._swmr_reader = swmr_reader
        if swmr_reader:
            self._refresh_data()
        self.atom_end, self.text_end = ends(self.frames[self.n - 1:self.n] if self.n else
                                            np.empty(0, FRAME_DTYPE))

    def refresh(self) -> int:
        """Pick up frames committed by another process (SWMR readers only)."""
        if self._swmr_reader:
            self.committed.refresh()
            n = self.committed.shape[0]
            if n != self.n:
                self._refresh_data()
                self.n = n
        return self.n

    def _refresh_data(self) -> None:
        for dset in (self.frames, self.atoms, self.text):
            dset.refresh()

    def append(self, rows: np.ndarray, atoms: np.ndarray, text: bytes, sync) -> range:
        """Write frames (rows with offsets relative to this batch), then commit them.

        Each dataset's flush writes its data before its own header, and ``committed``
        is flushed last, so the file never shows a frame whose data is not written.
        """
        n, a0, t0 = self.n, self.atom_end, self.text_end
        rows = rows.copy()
        for i, row in enumerate(rows):
            a, t = int(row["atom_start"]), int(row["text_start"])
            rows["checksum"][i] = checksum(row, atoms[a:a + int(row["n_atoms"])],
                                           text[t:t + int(row["text_length"])], a0, t0)
        rows["atom_start"] += a0
        rows["text_start"] += t0
        _write(self.atoms, a0, atoms)
        _write(self.text, t0, np.frombuffer(text, dtype=np.uint8))
        _write(self.frames, n, rows)
        self.committed.resize((n + len(rows),))
        self.committed.flush()
        sync()
        self.n, self.atom_end, self.text_end = n + len(rows), a0 + len(atoms), t0 + len(text)
        return range(n, self.n)

    def rows(self, start: int, stop: int) -> np.ndarray:
        rows = self.frames[start:stop]
        if len(rows) < stop - start and self._swmr_reader:
            self._refresh_data()  # metadata older than ``committed``: read it again
            rows = self.frames[start:stop]
        if len(rows) < stop - start:
            raise LabelBufferError(f"frames {start}..{stop - 1} are committed but only "
                                   f"{len(rows)} of them are readable; the file is damaged.")
        return rows

    def payload(self, rows: np.ndarray) -> tuple:
        """(atom rows, text bytes, atom offset, text offset) covering ``rows``."""
        a0 = int(rows["atom_start"].min())
        t0 = int(rows["text_start"].min())
        a1, t1 = ends(rows)
        return self.atoms[a0:a1], self.text[t0:t1].tobytes(), a0, t0

    def variants(self, start: int, stop: int) -> np.ndarray:
        return self.frames.fields("variant")[start:stop] if stop > start else np.empty(0, "S1")


def checksum(row: np.void, atoms: np.ndarray, text: bytes, a0: int = 0, t0: int = 0) -> int:
    """CRC32 of a frame: its row (absolute offsets, checksum zeroed), atom rows and text.

    Detects a frame torn by a power loss during its append (the only write an
    ``fsync`` per append leaves unordered) or damaged on disk.
    """
    head = np.array(row, dtype=FRAME_DTYPE)
    head["atom_start"] += a0
    head["text_start"] += t0
    head["checksum"] = 0
    crc = zlib.crc32(head.tobytes())
    crc = zlib.crc32(np.ascontiguousarray(atoms).tobytes(), crc)
    return zlib.crc32(text, crc)


def _write(dset: h5py.Dataset, start: int, data: np.ndarray) -> None:
    stop = start + len(data)
    if dset.shape[0] < stop:
        dset.resize((stop,))
    if len(data):
        dset[start:stop] = data
    dset.flush()


def iter_blocks(indices, block: int) -> Iterator[tuple]:
    """Split sorted indices into (start, stop, [indices]) blocks of at most ``block`` rows."""
    current, start = [], None
    for i in indices:
        if start is None:
            start = i
        if i - start >= block:
            yield start, current[-1] + 1, current
            current, start = [], i
        current.append(i)
    if current:
        yield start, current[-1] + 1, current
