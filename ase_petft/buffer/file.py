"""Files of :class:`ase_petft.LabelBuffer`: SWMR opening, locking, creation, recovery.

See the module docstring of :mod:`ase_petft.buffer` for the schema and the durability
design. This module knows HDF5 files; it does not know ASE.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
from typing import Optional

import h5py
from h5py import h5f, h5p

from .._locks import ExclusiveLock
from ..errors import LabelBufferError
from . import _native
from .table import DATASETS, GROUPS, check_format, create_layout, ends, frame_intact

logger = logging.getLogger(__name__)

_COPY_BLOCK = 1 << 18


# -- opening ----------------------------------------------------------------------------


def _fapl(*, chunk_cache_bytes: Optional[int] = None):
    fapl = h5p.create(h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5f.LIBVER_LATEST, h5f.LIBVER_LATEST)
    fapl.set_fclose_degree(h5f.CLOSE_STRONG)
    fapl.set_file_locking(False, True)  # we lock ourselves (see WriterLock)
    _native.limit_read_attempts(fapl)  # a damaged file fails fast instead of hanging
    if chunk_cache_bytes is not None:
        cache = list(fapl.get_cache())
        cache[2] = chunk_cache_bytes
        fapl.set_cache(*cache)
    return fapl


def open_reader(path: pathlib.Path, *, refuse_truncated: bool = True) -> h5py.File:
    """Open for SWMR reading (works on a file a live or crashed writer holds)."""
    if refuse_truncated:
        check_not_truncated(path)
    try:
        fid = h5f.open(os.fsencode(path), h5f.ACC_RDONLY | h5f.ACC_SWMR_READ,
                       fapl=_fapl(chunk_cache_bytes=0))
    except FileNotFoundError as exc:
        raise LabelBufferError(f"no label buffer at {str(path)!r}: the file does not exist. "
                               "Create it with mode='a' or mode='w-'.") from exc
    except PermissionError as exc:
        raise LabelBufferError(f"cannot read {str(path)!r}: permission denied. Check the "
                               "file's permissions.") from exc
    except (OSError, RuntimeError) as exc:
        raise LabelBufferError(f"{str(path)!r} is not a readable HDF5 file ({exc}). "
                               f"{_damage_hint(exc)}") from exc
    return h5py.File(fid)


def _damage_hint(exc: BaseException) -> str:
    text = str(exc)
    if "lock" in text:
        value = os.environ.get("HDF5_USE_FILE_LOCKING")
        return ("HDF5 could not lock the file: if the file system does not support locks, "
                "set HDF5_USE_FILE_LOCKING=BEST_EFFORT (it is "
                f"{value!r} now); ase_petft keeps its own single-writer lock either way.")
    return ("If it is a label buffer, it is damaged: copy out the intact frames with "
            "'petft buffer recover FILE -o NEW.h5'.")


def check_not_truncated(path: pathlib.Path) -> None:
    """Refuse a file shorter than its HDF5 superblock says (copied partially, disk full).

    A file a writer still holds (or held when it died) may legitimately lag behind its
    superblock; its frames are then checked one by one by their checksums.
    """
    try:
        head = _native.superblock(path)
        size = os.stat(path).st_size
    except FileNotFoundError:
        return  # reported by the open that follows
    except OSError as exc:
        raise LabelBufferError(f"cannot read {str(path)!r}: {exc}") from exc
    if head is not None and not head.open_for_write and size < head.end_of_file:
        raise LabelBufferError(
            f"{str(path)!r} is damaged: it is {size} bytes long but HDF5 wrote "
            f"{head.end_of_file} (the file was truncated: a partial copy, a full disk or a "
            "lost write). Nothing was changed. Copy out the intact frames with "
            f"'petft buffer recover {path.name} -o NEW.h5', or restore a backup.")


def _open_writer(path: pathlib.Path) -> h5py.File:
    try:
        fid = h5f.open(os.fsencode(path), h5f.ACC_RDWR | h5f.ACC_SWMR_WRITE, fapl=_fapl())
    except PermissionError as exc:
        raise LabelBufferError(f"cannot open {str(path)!r} for writing: permission denied "
                               "(a read-only file or mount). Open it with mode='r' to read, "
                               "or copy it somewhere writable.") from exc
    return h5py.File(fid)


def open_path(path: pathlib.Path, *, mode: str, layout: dict) -> tuple:
    """Open the buffer at ``path``: ``(h5py.File, WriterLock or None, stored settings)``.

    ``"r"``: a SWMR reader, no lock. ``"a"``/``"w-"``: create the file if needed, lock
    it, check it is a buffer (without modifying it), then open it as the SWMR writer
    (recovering it if its last writer died).
    """
    where = repr(str(path))
    if mode == "r":
        file = open_reader(path)
        try:
            with reading(where):
                return file, None, check_format(file, where)
        except BaseException:
            file.close()
            raise
    _create_if_needed(path, mode, layout, where)
    lock = WriterLock(path)
    try:
        remove_stale_temps(path)
        with open_reader(path) as probe, reading(where):
            settings = check_format(probe, where)
        file, lock, _ = open_writer(path, lock)
    except BaseException:
        lock.release()
        raise
    return file, lock, settings


def _create_if_needed(path: pathlib.Path, mode: str, layout: dict, where: str) -> None:
    if mode == "a" and path.exists():
        return
    check_free_space(path, 1 << 18)  # an empty buffer and its first appends
    try:
        create_file(path, **layout)
    except FileExistsError:
        if mode == "w-":
            raise LabelBufferError(f"{where} already exists and mode='w-' never overwrites; "
                                   "use mode='a' to append to it, or delete it.") from None
    except (OSError, RuntimeError) as exc:
        raise LabelBufferError(f"cannot create the label buffer {where} ({type(exc).__name__}: "
                               f"{' '.join(str(exc).split())}); is the directory writable and the disk not full? "
                               "Nothing was created.") from exc
    else:
        logger.info("created label buffer %s", path)


@contextlib.contextmanager
def reading(where: str):
    """Report HDF5 failures while reading a buffer as damage (LabelBufferError)."""
    try:
        yield
    except LabelBufferError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise LabelBufferError(
            f"{where} is damaged: HDF5 cannot read it ({type(exc).__name__}: {exc}). Nothing "
            "was changed. Copy out the intact frames with 'petft buffer recover FILE -o "
            "NEW.h5', or restore a backup.") from exc


# HDF5 cannot recover from a failed write: the open file can then be neither flushed
# nor closed (a later close or garbage collection crashes the process). So writes are
# refused up front when the disk lacks room for them plus this margin.
FREE_SPACE_MARGIN = 1 << 20


def check_free_space(path: pathlib.Path, needed: int) -> None:
    """LabelBufferError unless the file system of ``path`` has ``needed`` bytes plus
    ``FREE_SPACE_MARGIN`` free (for the data, HDF5's chunks and metadata)."""
    try:
        stats = os.statvfs(path.parent)
    except (OSError, AttributeError):  # no statvfs (Windows) or an odd mount: try anyway
        return
    free = stats.f_bavail * stats.f_frsize
    if stats.f_blocks == 0:  # a pseudo file system (/proc, /sys): nothing can be written there
        raise LabelBufferError(f"cannot write a label buffer at {str(path)!r}: its folder is "
                               "on a pseudo file system; choose a folder on a disk")
    if free < needed + FREE_SPACE_MARGIN:
        raise LabelBufferError(
            f"not enough free disk space for {str(path)!r}: {free / 2**20:.2f} MiB free, "
            f"{(needed + FREE_SPACE_MARGIN) / 2**20:.2f} MiB needed; nothing was written. "
            "Free some space and retry (the labels already in the buffer are safe).")


# -- writer lock -----------------------------------------------------------------------------


def _busy(path: pathlib.Path) -> LabelBufferError:
    return LabelBufferError(f"{str(path)!r} is already open for writing (by another process or "
                            "another LabelBuffer); a buffer has one writer at a time. Open it "
                            "with mode='r' to read while the other one writes, or close the "
                            "other one first.")


def _unlockable(path: pathlib.Path, exc: OSError) -> LabelBufferError:
    return LabelBufferError(f"cannot lock {str(path)!r} for writing ({exc}); appending needs a "
                            "writable directory. Open it with mode='r' to read, or copy it "
                            "to a writable place.")


class WriterLock:
    """The writer's exclusive lock (a sidecar ``.NAME.lock`` file, see
    :mod:`ase_petft._locks`) and a descriptor of the data file for ``fsync``.

    HDF5's own locking is disabled where possible (an HDF5 SWMR writer drops its lock
    after opening, and ``HDF5_USE_FILE_LOCKING`` may switch it on or off); this lock is
    held until close, so a second writer is refused whatever that variable says, and
    a file flagged "open for write" whose lock we obtain was left by a writer that died.
    """

    def __init__(self, path: pathlib.Path):
        self.path = pathlib.Path(path)
        self._lock = ExclusiveLock(self.path, busy=_busy, unusable=_unlockable)
        self.fd = -1
        try:
            self.reopen()
        except BaseException:
            self._lock.release()
            raise

    def reopen(self) -> None:
        """Point the ``fsync`` descriptor at the file now at ``path`` (after a rebuild)."""
        fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd

    def fsync(self) -> None:
        os.fsync(self.fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._lock.release()

    def __del__(self):  # a buffer dropped without close() must not keep the file locked
        with contextlib.suppress(Exception):
            self.release()


def sync(root: h5py.Group, path: pathlib.Path, lock: Optional[WriterLock]) -> None:
    """Put what was flushed to ``root``'s file on disk: through the writer's ``lock``
    (its open descriptor), or by flushing and fsyncing ``path`` (a caller's h5py object)."""
    if lock is not None:
        lock.fsync()
        return
    root.file.flush()
    with contextlib.suppress(OSError):
        fsync_path(path)


def fsync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: pathlib.Path) -> None:
    with contextlib.suppress(OSError):  # not supported everywhere (e.g. Windows)
        fsync_path(path.parent)


def _temp_path(path: pathlib.Path, tag: str) -> pathlib.Path:
    return path.with_name(f".{path.name}.{tag}-{os.getpid()}.tmp")


def remove_stale_temps(path: pathlib.Path) -> None:
    """Delete temporary files of creations/recoveries whose process died."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"(create|recover)-(\d+)\.tmp$")
    for candidate in path.parent.glob(f".{path.name}.*.tmp"):
        match = pattern.match(candidate.name)
        if match and not _pid_alive(int(match.group(2))):
            with contextlib.suppress(OSError):
                candidate.unlink()
                logger.info("removed stale temporary file %s", candidate)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


# -- creation and recovery ---------------------------------------------------------------------


def create_file(path: pathlib.Path, **layout) -> None:
    """Create a complete, empty buffer at ``path`` atomically; FileExistsError if present.

    The file is built under a temporary name, fsynced, then hard-linked into place
    (which fails if ``path`` exists), so ``path`` never holds a half-created buffer.
    """
    tmp = _temp_path(path, "create")
    try:
        with h5py.File(tmp, "w", libver="latest", locking=False) as root:
            create_layout(root, **layout)
        fsync_path(tmp)
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise
        except OSError:  # file systems without hard links
            if path.exists():
                raise FileExistsError(path) from None
            os.rename(tmp, path)
        _fsync_dir(path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def open_writer(path: pathlib.Path, lock: WriterLock) -> tuple:
    """Open ``path`` (locked by ``lock``) for SWMR writing, recovering it if needed.

    Returns ``(h5py.File, lock, recovered)``. A file still flagged "open for write" by
    a writer that died is rebuilt from its committed frames (see :func:`rebuild`).
    """
    try:
        return _open_writer(path), lock, False
    except OSError as exc:
        if "already open" not in str(exc):
            raise LabelBufferError(f"cannot open {str(path)!r} for writing ({exc}). "
                                   f"{_damage_hint(exc)}") from exc
    logger.warning("label buffer %s was not closed cleanly (its writer died); rebuilding it "
                   "from its committed frames", path)
    lock = rebuild(path, lock)
    return _open_writer(path), lock, True


def rebuild(path: pathlib.Path, lock: WriterLock) -> WriterLock:
    """Copy the committed frames of ``path`` into a fresh file and replace ``path`` with it.

    The damaged file is only read (SWMR read, as a concurrent reader would); the new
    file is complete and fsynced before it atomically replaces the old one, so a crash
    during recovery leaves the old file as it was. Returns ``lock``, now pointing at the
    new file.
    """
    tmp = _temp_path(path, "recover")
    try:
        with open_reader(path) as src, _new_file(tmp, path) as dst:
            check_format(src, repr(str(path)))
            for key, value in src.attrs.items():
                dst.attrs[key] = value
            for name in GROUPS:
                _copy_committed(src[name], dst.create_group(name), name)
        fsync_path(tmp)
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
        os.replace(tmp, path)
        _fsync_dir(path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    lock.reopen()
    return lock


def _new_file(tmp: pathlib.Path, path: pathlib.Path) -> h5py.File:
    try:
        return h5py.File(tmp, "w", libver="latest", locking=False)
    except (OSError, RuntimeError) as exc:
        raise LabelBufferError(
            f"{str(path)!r} was left open by a writer that died and must be rebuilt before "
            f"appending, but a new file cannot be written next to it ({exc}). Open it with "
            "mode='r' to read it, or copy it to a writable place.") from exc


def _copy_committed(src: h5py.Group, dst: h5py.Group, name: str) -> None:
    for dname, (dtype, chunk) in DATASETS.items():
        dst.create_dataset(dname, shape=(0,), maxshape=(None,), chunks=(chunk,), dtype=dtype)
    n = _intact_prefix(src, src["committed"].shape[0], name)
    frames = src["frames"][:n]
    atom_end, text_end = ends(frames)
    dst["frames"].resize((n,))
    dst["frames"][:] = frames
    dst["committed"].resize((n,))
    for dname, end in (("atoms", atom_end), ("text", text_end)):
        dst[dname].resize((end,))
        for start in range(0, end, _COPY_BLOCK):
            stop = min(end, start + _COPY_BLOCK)
            dst[dname][start:stop] = src[dname][start:stop]
    logger.info("recovered %d committed %s", n, name)


def _intact_prefix(src: h5py.Group, n: int, name: str) -> int:
    """Number of leading committed frames whose checksums hold; only a torn tail is dropped."""
    bad = []
    for start in range(0, n, 4096):
        rows = src["frames"][start:min(n, start + 4096)]
        a0, t0 = int(rows["atom_start"].min()), int(rows["text_start"].min())
        a1, t1 = ends(rows)
        atoms, text = src["atoms"][a0:a1], src["text"][t0:t1].tobytes()
        for i, row in enumerate(rows):
            if not frame_intact(row, atoms, text, a0, t0):
                bad.append(start + i)
    if not bad:
        return n
    if bad != list(range(bad[0], n)):
        raise LabelBufferError(f"{name} frames {bad} of the buffer are damaged (checksum "
                               "mismatch) and are not only the last append; refusing to "
                               "recover automatically. Copy the intact frames out with mode='r'.")
    logger.error("dropping %d torn %s frame(s) %s (checksum mismatch: interrupted by a power "
                 "loss?)", len(bad), name, bad)
    return bad[0]
