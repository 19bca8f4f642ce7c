"""Damaged buffers fail fast and change nothing; recovery; HDF5_USE_FILE_LOCKING; locks.

Opening a damaged file runs in a child process under a timeout: before the fix, HDF5's
SWMR reader retried checksums for hours and Ctrl-C could not stop it.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest

import ase_petft
from ase_petft.buffer import LabelBuffer, recover_buffer
from ase_petft.errors import LabelBufferError

if str(pathlib.Path(__file__).parent) not in sys.path:
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _buffer_writer import make_frame  # noqa: E402

REPO = pathlib.Path(ase_petft.__file__).resolve().parents[1]
N_FRAMES = 300


def _env(**extra):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _python(code: str, *, cwd, timeout=60, **env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd,
                          env=_env(**env), capture_output=True, text=True, timeout=timeout)


def _digest(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> pathlib.Path:
    """A real buffer of 300 labels and 3 failures, several chunks of every dataset."""
    path = tmp_path_factory.mktemp("good") / "labels.h5"
    with LabelBuffer(path, "w-", fsync=False) as buffer:
        for i in range(N_FRAMES):
            atoms, variant, metadata = make_frame(f"f-{i}")
            buffer.append(atoms, variant=variant, **metadata)
        for i in range(3):
            atoms, _, _ = make_frame(f"x-{i}")
            buffer.record_failure(atoms, error=RuntimeError("SCF did not converge"))
    return path


def _damaged(good: pathlib.Path, tmp_path: pathlib.Path, kind: str, where: float) -> pathlib.Path:
    path = tmp_path / "damaged.h5"
    shutil.copyfile(good, path)
    size = path.stat().st_size
    if kind == "truncate":
        os.truncate(path, int(size * where))
    else:  # flip 16 bytes at an offset
        offset = int(where) if where >= 1 else int(size * where)
        with open(path, "r+b") as fh:
            fh.seek(offset)
            data = fh.read(16)
            fh.seek(offset)
            fh.write(bytes(b ^ 0xFF for b in data))
    return path


OPEN_ALL = """
    import sys
    from ase_petft.buffer import LabelBuffer
    from ase_petft.errors import LabelBufferError
    for mode in ("r", "a"):
        try:
            with LabelBuffer(sys.argv[1] if len(sys.argv) > 1 else "damaged.h5", mode) as b:
                n = len(b)
                frames = list(b.frames())
                failures = b.failures()
            print(mode, "read", n, len(frames), len(failures))
        except LabelBufferError as exc:
            print(mode, "LabelBufferError", str(exc).replace(chr(10), " "))
"""


@pytest.mark.parametrize("kind, where", [
    ("truncate", 0.1), ("truncate", 0.5), ("truncate", 0.9), ("truncate", 0.99),
    ("flip", 100), ("flip", 1000), ("flip", 0.5), ("flip", 0.95),
])
def test_damaged_buffer_fails_fast_and_is_not_modified(good, tmp_path, kind, where):
    path = _damaged(good, tmp_path, kind, where)
    before = _digest(path)
    run = _python(OPEN_ALL, cwd=tmp_path, timeout=60)  # hung for hours before
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert len(lines) == 2, run.stdout
    for line in lines:
        if "LabelBufferError" in line:
            assert "damaged" in line and "petft buffer recover" in line, line
        else:  # damage the reader never touches: everything it returns is intact
            assert line.split()[1:] == ["read", str(N_FRAMES), str(N_FRAMES), "3"], line
    if kind == "truncate":
        assert all("LabelBufferError" in line and "truncated" in line for line in lines)
    assert _digest(path) == before, "a damaged file was modified"


@pytest.mark.parametrize("kind, where", [("truncate", 0.5), ("truncate", 0.9), ("flip", 0.5)])
def test_recover_copies_exactly_the_intact_frames(good, tmp_path, kind, where):
    path = _damaged(good, tmp_path, kind, where)
    before = _digest(path)
    counts = recover_buffer(path, tmp_path / "new.h5")
    assert _digest(path) == before
    assert counts["labels"] + counts["labels_lost"] == N_FRAMES
    assert 0 < counts["labels"] < N_FRAMES or kind == "flip"
    with LabelBuffer(tmp_path / "new.h5", "a") as new, LabelBuffer(good, "r") as old:
        assert len(new) == counts["labels"]
        expected = {a.info["frame_id"]: a for a in old.frames()}
        for atoms in new.frames():  # every recovered frame is bit-identical to the original
            ref = expected[atoms.info["frame_id"]]
            assert (atoms.positions == ref.positions).all()
            assert (atoms.get_forces() == ref.get_forces()).all()
            assert atoms.get_potential_energy() == ref.get_potential_energy()
            assert atoms.info["variant"] == ref.info["variant"]
        atoms, variant, _ = make_frame("after")
        new.append(atoms, variant=variant)  # the recovered buffer is a normal buffer
    with pytest.raises(LabelBufferError, match="exists"):
        recover_buffer(path, tmp_path / "new.h5")


def test_cli_info_and_recover_on_a_damaged_buffer(good, tmp_path):
    path = _damaged(good, tmp_path, "truncate", 0.9)
    info = subprocess.run([sys.executable, "-m", "ase_petft.cli", "buffer", "info", path.name],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60)
    assert info.returncode == 2 and "truncated" in info.stderr, info.stderr
    rec = subprocess.run([sys.executable, "-m", "ase_petft.cli", "buffer", "recover", path.name,
                          "-o", "new.h5"], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=60)
    assert rec.returncode == 0, rec.stderr
    assert "recovered" in rec.stdout
    with LabelBuffer(tmp_path / "new.h5", "r") as new:
        assert 0 < len(new) < N_FRAMES


LOCKING = """
    import subprocess, sys
    from ase_petft.buffer import LabelBuffer
    from ase_petft.errors import LabelBufferError
    sys.path.insert(0, {tests!r})
    from _buffer_writer import make_frame
    def add(buffer, i):
        atoms, variant, meta = make_frame(f"l-{{i}}")
        buffer.append(atoms, variant=variant, **meta)
    with LabelBuffer("locked.h5", "a") as writer:
        add(writer, 0)
        try:
            LabelBuffer("locked.h5", "a")
            print("second writer accepted")
        except LabelBufferError as exc:
            print("second writer refused")
        add(writer, 1)
        other = subprocess.run([sys.executable, "-c", "from ase_petft.buffer import LabelBuffer;"
                                "b = LabelBuffer('locked.h5', 'r'); print(len(b))"],
                               capture_output=True, text=True)
        print("other process reads", other.stdout.strip(), other.stderr.strip()[-300:])
    with LabelBuffer("locked.h5", "a") as writer:
        add(writer, 2)
        print("reopened", len(writer))
"""


@pytest.mark.parametrize("value", ["TRUE", "1", "BEST_EFFORT", "FALSE"])
def test_buffer_works_under_every_hdf5_locking_setting(tmp_path, value):
    code = LOCKING.format(tests=str(pathlib.Path(__file__).parent))
    run = _python(code, cwd=tmp_path, HDF5_USE_FILE_LOCKING=value)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["second writer refused", "other process reads 2 ",
                                       "reopened 3"], run.stdout


def test_a_read_only_directory_gives_a_clear_error(good, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    folder = tmp_path / "ro"
    folder.mkdir()
    shutil.copyfile(good, folder / "labels.h5")
    folder.chmod(0o555)
    try:
        with LabelBuffer(folder / "labels.h5", "r") as buffer:  # reading needs no lock
            assert len(buffer) == N_FRAMES
        with pytest.raises(LabelBufferError, match="writable"):
            LabelBuffer(folder / "labels.h5", "a")
        with pytest.raises(LabelBufferError, match="permission|writable"):
            LabelBuffer(folder / "new.h5", "a")
    finally:
        folder.chmod(0o755)


def test_frames_can_skip_a_damaged_frame(good, tmp_path):
    import h5py

    path = tmp_path / "one-bad.h5"
    shutil.copyfile(good, path)
    with h5py.File(path, "r+") as f:  # change one stored force of frame 7 by one ulp
        start = int(f["labels/frames"][7]["atom_start"])
        rows = f["labels/atoms"][start:start + 1]
        rows["force"][0, 0] = __import__("numpy").nextafter(rows["force"][0, 0], 1e9)
        f["labels/atoms"][start:start + 1] = rows
    with LabelBuffer(path, "r") as buffer:
        with pytest.raises(LabelBufferError, match="frame 7 .* damaged.*petft buffer recover"):
            list(buffer.frames())
        kept = list(buffer.frames(skip_damaged=True))
        assert [a.info["frame_id"] for a in kept] == [f"f-{i}" for i in range(N_FRAMES) if i != 7]
        assert buffer.to_extxyz(tmp_path / "out.xyz", variant=buffer.variants[0],
                                skip_damaged=True) == len(buffer.indices(buffer.variants[0])) - (
                                    buffer.indices(buffer.variants[0]).count(7))


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (needs the right to mount; skipped elsewhere)."""
    folder = tmp_path / "small"
    folder.mkdir()
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                           capture_output=True, text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mount.stderr.strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_disk_gives_buffer_errors_and_keeps_committed_frames(small_disk):
    path = small_disk / "labels.h5"
    (small_disk / "filler").write_bytes(b"x" * 400_000)
    committed = []
    with pytest.raises(LabelBufferError, match="not enough free disk space.*nothing was written"):
        with LabelBuffer(path, "a") as buffer:
            for i in range(100000):
                atoms, variant, meta = make_frame(f"d-{i}")
                buffer.append(atoms, variant=variant, **meta)
                committed.append(f"d-{i}")
    assert len(committed) > 5
    with LabelBuffer(path, "r") as buffer:  # everything that returned is there
        assert [a.info["frame_id"] for a in buffer.frames()] == committed
    with pytest.raises(LabelBufferError, match="not enough free disk space"):
        LabelBuffer(small_disk / "another.h5", "w-")
    assert not (small_disk / "another.h5").exists()
    (small_disk / "filler").unlink()  # space freed: the same buffer takes labels again
    with LabelBuffer(path, "a") as buffer:
        atoms, variant, meta = make_frame("after")
        buffer.append(atoms, variant=variant, **meta)
        assert len(buffer) == len(committed) + 1
