"""Settings of the HDF5 library that h5py does not expose, and a look at the superblock.

h5py has no binding for ``H5Pset_metadata_read_attempts``. In SWMR-read mode HDF5
re-reads metadata whose checksum fails up to 100 times with a doubling sleep (1 ns,
2 ns, ...), so a damaged file keeps a reader busy for longer than anyone waits (30
attempts already take ~1 s; 40 take many minutes). We call the function from the HDF5
library h5py itself loaded (found in the process's memory map), so every damaged read
fails within a fraction of a second. Where that library cannot be found the setting is
skipped (logged once) and the cheap checks of :func:`superblock` still apply.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import pathlib
import struct
from typing import NamedTuple, Optional

logger = logging.getLogger(__name__)

# 2**24 ns of doubling sleeps (~17 ms) per damaged object: still enough for a reader
# that races a live writer's flush (the race resolves on the first re-read).
METADATA_READ_ATTEMPTS = 24
_SIGNATURE = b"\x89HDF\r\n\x1a\n"


@functools.lru_cache(maxsize=1)
def _library() -> Optional[ctypes.CDLL]:
    import h5py  # noqa: F401  (loads the library we look for)

    candidates = []
    maps = pathlib.Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            path = line.split()[-1] if line.split() else ""
            name = os.path.basename(path)
            if name.startswith("libhdf5") and "_hl" not in name and path not in candidates:
                candidates.append(path)
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
            lib.H5Pset_metadata_read_attempts.argtypes = [ctypes.c_int64, ctypes.c_uint]
            lib.H5Pset_metadata_read_attempts.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError):
            continue
    logger.info("HDF5 library not found in the process map: damaged label buffers may "
                "take long to be reported")
    return None


def limit_read_attempts(fapl) -> None:
    """Bound SWMR metadata re-reads on the file-access property list ``fapl``."""
    lib = _library()
    if lib is not None:
        lib.H5Pset_metadata_read_attempts(fapl.id, METADATA_READ_ATTEMPTS)


class Superblock(NamedTuple):
    version: int
    open_for_write: bool  # consistency flags set: a (live or dead) writer has it open
    end_of_file: int  # bytes the file must have, per HDF5


def superblock(path: pathlib.Path) -> Optional[Superblock]:
    """The start of an HDF5 version-2/3 superblock at offset 0 (what buffers use).

    None for files this cheap check does not understand (older superblock versions,
    user blocks): HDF5 itself then decides. Raises OSError if the file cannot be read.
    """
    with open(path, "rb") as fh:
        head = fh.read(48)
    if len(head) < 48 or not head.startswith(_SIGNATURE):
        return None
    version, size_offsets, _size_lengths, flags = head[8], head[9], head[10], head[11]
    if version not in (2, 3) or size_offsets != 8:
        return None
    (_base, _extension, end_of_file, _root) = struct.unpack_from("<4Q", head, 12)
    return Superblock(version, bool(flags), end_of_file)
