"""LabelBuffer: round trips, validation, durability under SIGKILL, concurrent reading, export."""

from __future__ import annotations

import gc
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, molecule
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

import ase_petft
from ase_petft.buffer import LabelBuffer
from ase_petft.buffer import file as buffer_file
from ase_petft.buffer import table as buffer_table
from ase_petft.errors import LabelBufferError, VariantError
from ase_petft.labelling import label, label_many

if str(pathlib.Path(__file__).parent) not in sys.path:  # pytest's default import mode adds it
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _buffer_writer import make_frame  # noqa: E402

from conftest import MetatomicLike, ModelLike  # noqa: E402

WRITER = pathlib.Path(__file__).with_name("_buffer_writer.py")
REPO = pathlib.Path(ase_petft.__file__).resolve().parents[1]


def writer_env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def spc(atoms, **results):
    atoms = atoms.copy()
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def cu_frame(seed=0, size=1):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(size)
    atoms.rattle(0.05, seed=seed)
    return label(atoms, EMT(), properties=("energy", "forces", "stress"))


def assert_same_frame(got, expected):
    """Bit-identical structure and results."""
    assert got.numbers.tolist() == expected.numbers.tolist()
    for a, b in ((got.positions, expected.positions), (got.cell.array, expected.cell.array)):
        assert a.dtype == np.float64 and np.array_equal(a, b)
    assert got.pbc.tolist() == expected.pbc.tolist()
    want = expected.calc.results
    have = got.calc.results
    assert sorted(have) == sorted(k for k in want if k in ("energy", "forces", "stress"))
    for key in have:
        assert np.asarray(have[key]).dtype == np.float64
        assert np.array_equal(have[key], want[key]), key


def assert_same_metadata(got, metadata):
    for key, value in metadata.items():
        if isinstance(value, np.ndarray):
            assert got.info[key].dtype == value.dtype and np.array_equal(got.info[key], value)
        else:
            assert got.info[key] == value, key


@pytest.fixture
def path(tmp_path):
    return tmp_path / "labels.h5"


# -- round trips ---------------------------------------------------------------------------


def test_round_trip_mixed_sizes_pbc_and_variants_is_bit_identical(path):
    frames = [make_frame(f"rt-{k}") for k in range(40)]
    assert len({len(a) for a, _, _ in frames}) > 5 and {v for _, v, _ in frames} == {"energy", "energy/pbe0"}
    assert {bool(a.pbc.all()) for a, _, _ in frames} == {True, False}
    extra = {"holdout": True, "generation": 3, "note": "ünïcode", "nested": {"a": [1, 2.5, None]},
             "ints": np.arange(4, dtype=np.int32), "matrix": np.random.default_rng(1).normal(size=(2, 3))}
    with LabelBuffer(path, "w-") as buffer:
        for k, (atoms, variant, metadata) in enumerate(frames):
            assert buffer.append(atoms, variant=variant, **metadata, **(extra if k == 5 else {})) == k
        assert len(buffer) == 40
        assert_same_frame(buffer[5], frames[5][0])
    with LabelBuffer(path, "r") as buffer:
        assert len(buffer) == 40 and buffer.variants == ("energy", "energy/pbe0")
        for k, got in enumerate(buffer):
            atoms, variant, metadata = frames[k]
            assert_same_frame(got, atoms)
            assert_same_metadata(got, metadata)
            assert got.info["variant"] == variant and got.info["buffer_index"] == k
            assert got.info["ase_petft_version"] == ase_petft.__version__
            assert got.info["appended_at"].endswith("+00:00")
        assert_same_metadata(buffer[5], extra)
        assert [a.info["frame_id"] for a in buffer[-3:]] == ["rt-37", "rt-38", "rt-39"]
        assert [a.info["frame_id"] for a in buffer[10:2:-4]] == ["rt-10", "rt-6"]
        pbe0 = [k for k, (_, v, _) in enumerate(frames) if v == "energy/pbe0"]
        assert buffer.indices("energy/pbe0") == pbe0
        assert [a.info["buffer_index"] for a in buffer.frames("energy/pbe0")] == pbe0
        assert list(buffer.frames("energy/none")) == []
        with pytest.raises(VariantError, match="invalid energy variant 'pbe0'"):
            list(buffer.frames("pbe0"))  # for "energy/pbe0": would silently match nothing
        with pytest.raises(IndexError, match="40 labels"):
            buffer[40]
        with pytest.raises(TypeError):
            buffer["0"]


def test_provenance_of_label_and_of_a_live_calculator(path):
    labelled = cu_frame(seed=1)
    live = bulk("Cu", cubic=True)
    live.rattle(0.02, seed=3)
    live.calc = EMT()
    live.get_forces()
    with LabelBuffer(path) as buffer:
        buffer.append(labelled, variant="energy/emt", step=7)
        buffer.append(live, variant="energy/emt")
        got, got_live = buffer[0], buffer[1]
    assert got.info["reference"] == "emt" and got.info["reference_class"] == "ase.calculators.emt.EMT"
    assert got.info["wall_time_s"] == labelled.info["wall_time_s"]
    assert got.info["labelled_at"] == labelled.info["labelled_at"]
    assert isinstance(got.info["reference_parameters"], dict) and got.info["step"] == 7
    assert got_live.info["reference"] == "emt" and got_live.info["wall_time_s"] is None
    assert_same_frame(got_live, live)


def test_extend_commits_all_frames_or_none(path):
    good = [cu_frame(seed=s) for s in range(3)]
    bad = spc(good[1], energy=float("nan"), forces=good[1].calc.results["forces"])
    with LabelBuffer(path) as buffer:
        assert buffer.extend(good, variant="energy", generation=0) == range(0, 3)
        with pytest.raises(LabelBufferError, match=r"frame 1 of 3 \(Cu4, 4 atoms\): energy contains NaN"):
            buffer.extend([good[0], bad, good[2]], variant="energy")
        assert len(buffer) == 3
        assert buffer.extend(good, variant="energy") == range(3, 6)
        assert [a.info["generation"] for a in buffer[:3]] == [0, 0, 0]


def test_require_forces_false_and_allowed_elements_are_stored(path):
    no_forces = spc(molecule("H2O"), energy=-14.2)
    with LabelBuffer(path, "w-", require_forces=False, allowed_elements=["O", 1]) as buffer:
        buffer.append(no_forces, variant="energy")
        assert buffer.allowed_elements == ("H", "O") and not buffer.require_forces
    with LabelBuffer(path, "r") as buffer:
        assert buffer.allowed_elements == ("H", "O") and not buffer.require_forces
        assert set(buffer[0].calc.results) == {"energy"}
    with pytest.raises(LabelBufferError, match="created with require_forces=False"):
        LabelBuffer(path, "a", require_forces=True)
    with pytest.raises(LabelBufferError, match=r"allowed_elements=\['H', 'O'\]"):
        LabelBuffer(path, "a", allowed_elements=["Cu"])
    with pytest.raises(LabelBufferError, match="not a chemical element"):
        LabelBuffer(path, "a", allowed_elements=["Xx"])


def test_failures_are_recorded_apart_from_labels(path):
    fe = bulk("Fe", cubic=True)
    [error] = label_many([fe], EMT())
    with LabelBuffer(path) as buffer:
        buffer.append(cu_frame(), variant="energy")
        assert buffer.record_failure(error.atoms, error=error, variant="energy/emt",
                                     reference=EMT(), step=12) == 0
        buffer.record_failure(fe, error="SCF not converged after 100 cycles")
        assert len(buffer) == 1
        first, second = buffer.failures()
    assert "NotImplementedError: No EMT-potential for Fe" in first.info["error"]
    assert first.info["error_type"] == "LabellingError" and first.info["reference"] == "emt"
    assert first.info["step"] == 12 and first.info["variant"] == "energy/emt" and first.calc is None
    assert np.array_equal(first.positions, fe.positions)
    assert second.info["error"] == "SCF not converged after 100 cycles" and "variant" not in second.info


def test_context_manager_and_idempotent_close(path):
    buffer = LabelBuffer(path)
    with buffer:
        buffer.append(cu_frame(), variant="energy")
    assert buffer.closed
    buffer.close()
    buffer.close()
    with pytest.raises(LabelBufferError, match="closed"):
        len(buffer)
    with pytest.raises(LabelBufferError, match="closed"):
        buffer.append(cu_frame(), variant="energy")
    assert "closed" in repr(buffer)


def test_an_h5py_group_given_by_the_caller_is_never_closed(path):
    with h5py.File(path, "w") as f:
        with LabelBuffer(f.create_group("run1"), "a") as buffer:
            buffer.append(cu_frame(), variant="energy", step=1)
        assert f.id.valid
        with LabelBuffer(f["run1"], "r") as buffer:
            assert buffer[0].info["step"] == 1
        assert f.id.valid
        f.create_group("junk").attrs["x"] = 1
        with pytest.raises(LabelBufferError, match="not empty and not a label buffer"):
            LabelBuffer(f["junk"], "a")
        with pytest.raises(LabelBufferError, match="already holds a label buffer"):
            LabelBuffer(f["run1"], "w-")


# -- refused inputs: error type, message, buffer unchanged --------------------------------------




def _stale():
    atoms = cu_frame()
    atoms.positions[0, 0] += 0.1
    return atoms


def _model_results(cls):
    atoms = bulk("Cu", cubic=True)
    atoms.calc = cls()
    atoms.calc.atoms = atoms.copy()
    atoms.calc.results = {"energy": 1.0, "forces": np.zeros((4, 3))}
    return atoms


_GOOD = cu_frame(seed=9)
_F = _GOOD.calc.results["forces"]
_S = _GOOD.calc.results["stress"]

BAD_INPUTS = {
    "nan energy": (lambda: spc(_GOOD, energy=np.nan, forces=_F), {}, "energy contains NaN"),
    "inf forces": (lambda: spc(_GOOD, energy=1.0, forces=np.where(_F > 0, np.inf, _F)), {},
                   "forces contains NaN or infinite"),
    "nan stress": (lambda: spc(_GOOD, energy=1.0, forces=_F, stress=_S * np.nan), {}, "stress contains NaN"),
    "forces shape": (lambda: spc(_GOOD, energy=1.0, forces=_F[:3]), {}, r"forces has shape \(3, 3\), expected \(4, 3\)"),
    "stress shape": (lambda: spc(_GOOD, energy=1.0, forces=_F, stress=_S[:5]), {}, r"stress has shape \(5,\)"),
    "energy shape": (lambda: spc(_GOOD, energy=np.ones(2), forces=_F), {}, r"energy has shape \(2,\)"),
    "missing forces": (lambda: spc(_GOOD, energy=1.0), {}, "forces are missing and this buffer requires them"),
    "no calculator": (lambda: bulk("Cu", cubic=True), {}, r"no reference results \(atoms.calc is None\)"),
    "no energy": (lambda: spc(_GOOD, forces=_F), {}, "no reference energy"),
    "stale results": (_stale, {}, "results are stale: positions changed"),
    "model prediction": (lambda: _model_results(ModelLike), {}, "come from an ML model"),
    "metatomic prediction": (lambda: _model_results(MetatomicLike), {}, "come from an ML model"),
    "bad variant": (lambda: _GOOD, {"variant": "pbe0"}, "invalid variant"),
    "variant type": (lambda: _GOOD, {"variant": 5}, "invalid variant"),
    "long variant": (lambda: _GOOD, {"variant": "energy/" + "x" * 60}, "longer than 64 bytes"),
    "element not allowed": (lambda: label(bulk("Ni", cubic=True), EMT()), {}, r"elements \['Ni'\] are outside"),
    "reserved metadata": (lambda: _GOOD, {"energy": 1.0}, "metadata key 'energy' is reserved"),
    "metadata type": (lambda: _GOOD, {"model": object()}, "metadata 'model' has type object"),
    "nan positions": (lambda: spc(Atoms("Cu", positions=[[np.nan, 0, 0]]), energy=1.0, forces=np.zeros((1, 3))),
                      {}, "positions contain NaN"),
    "empty structure": (lambda: Atoms(), {}, "has no atoms"),
    "not atoms": (lambda: "Cu", {}, "expected an ase.Atoms, got str"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_refused_and_the_buffer_is_unchanged(path, case):
    make, kwargs, message = BAD_INPUTS[case]
    kwargs = {"variant": "energy", **kwargs}
    with LabelBuffer(path, allowed_elements=["Cu"]) as buffer:
        buffer.append(_GOOD, variant="energy", step=0)
        before = path.stat().st_size
        with pytest.raises(LabelBufferError, match=message) as info:
            buffer.append(make(), **kwargs)
        assert "nothing was written" in str(info.value)
        assert "the structure" in str(info.value)
        assert len(buffer) == 1 and buffer.variants == ("energy",)
        assert path.stat().st_size == before
        assert buffer.append(_GOOD, variant="energy", step=1) == 1
    with LabelBuffer(path, "r") as buffer:
        assert [a.info["step"] for a in buffer] == [0, 1]
        assert_same_frame(buffer[1], _GOOD)


def test_read_only_buffer_refuses_writes(path):
    with LabelBuffer(path) as buffer:
        buffer.append(_GOOD, variant="energy")
    with LabelBuffer(path, "r") as buffer:
        for write in (lambda: buffer.append(_GOOD, variant="energy"),
                      lambda: buffer.extend([_GOOD], variant="energy"),
                      lambda: buffer.record_failure(_GOOD, error="x"),
                      lambda: buffer.import_file(path, variant="energy")):
            with pytest.raises(LabelBufferError, match="open read-only"):
                write()
        assert len(buffer) == 1


def test_modes(path):
    with pytest.raises(LabelBufferError, match="no overwrite mode"):
        LabelBuffer(path, "w")
    with pytest.raises(LabelBufferError, match="does not exist"):
        LabelBuffer(path, "r")
    with LabelBuffer(path, "w-") as buffer:
        buffer.append(_GOOD, variant="energy")
    content = path.read_bytes()
    with pytest.raises(LabelBufferError, match="already exists"):
        LabelBuffer(path, "w-")
    assert path.read_bytes() == content
    with LabelBuffer(path, "a") as buffer:
        assert len(buffer) == 1
    with pytest.raises(LabelBufferError, match="non-empty str or path.*got None"):
        LabelBuffer(None)  # e.g. os.environ.get("BUFFER") unset
    if pathlib.Path("/proc").is_dir() and os.statvfs("/proc").f_blocks == 0:
        with pytest.raises(LabelBufferError, match="pseudo file system"):
            LabelBuffer("/proc/labels.h5", "a")


def test_one_writer_at_a_time(path):
    with LabelBuffer(path) as first:
        first.append(_GOOD, variant="energy")
        with pytest.raises(LabelBufferError, match="already open for writing"):
            LabelBuffer(path, "a")
        with LabelBuffer(path, "r") as reader:
            assert len(reader) == 1
        first.append(_GOOD, variant="energy")
    with LabelBuffer(path, "a") as second:
        assert len(second) == 2


def test_a_writer_dropped_without_close_releases_the_file(path):
    buffer = LabelBuffer(path)
    buffer.append(_GOOD, variant="energy")
    del buffer
    gc.collect()
    with LabelBuffer(path, "a") as again:
        assert len(again) == 1


def test_files_that_are_not_buffers_are_refused_untouched(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    for file, message in ((plain, "not an ase_petft label buffer"), (text, "not a readable HDF5 file")):
        content = file.read_bytes()
        for mode in ("r", "a"):
            with pytest.raises(LabelBufferError, match=message):
                LabelBuffer(file, mode)
        assert file.read_bytes() == content


def test_newer_schema_is_refused(path):
    with LabelBuffer(path):
        pass
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["schema_version"] = 99
    content = path.read_bytes()
    for mode in ("r", "a"):
        with pytest.raises(LabelBufferError, match="schema version 99, newer .* Upgrade ase_petft"):
            LabelBuffer(path, mode)
    assert path.read_bytes() == content


def test_damaged_frames_are_detected(path):
    with LabelBuffer(path) as buffer:
        buffer.extend([cu_frame(seed=s) for s in range(4)], variant="energy")
    with h5py.File(path, "r+") as f:  # flip one position of frame 1
        rows = f["labels/atoms"][4:5]
        rows["position"][0, 0] += 1e-12
        f["labels/atoms"][4:5] = rows
    with LabelBuffer(path, "r") as buffer:
        assert_same_frame(buffer[0], cu_frame(seed=0))
        with pytest.raises(LabelBufferError, match="frame 1 .* damaged"):
            buffer[1]
    lock = buffer_file.WriterLock(path)
    try:
        with pytest.raises(LabelBufferError, match=r"frames \[1\] .* damaged"):
            buffer_file.rebuild(path, lock)
    finally:
        lock.release()


def test_recovery_drops_only_a_torn_last_append(path):
    with LabelBuffer(path) as buffer:
        buffer.extend([cu_frame(seed=s) for s in range(3)], variant="energy")
    with h5py.File(path, "r+") as f:  # as if a power loss tore the last frame's atoms
        f["labels/atoms"][8:12] = np.zeros(4, dtype=buffer_table.ATOM_DTYPE)
    lock = buffer_file.rebuild(path, buffer_file.WriterLock(path))
    lock.release()
    with LabelBuffer(path, "a") as buffer:
        assert len(buffer) == 2
        assert_same_frame(buffer[1], cu_frame(seed=1))


# -- durability ------------------------------------------------------------------------------


def _run_writer(path, tag, count=None):
    args = [sys.executable, str(WRITER), str(path), tag] + ([str(count)] if count else [])
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=writer_env(), cwd=path.parent)


def _check_buffer(path, reported):
    """Every reported frame is there, and every frame in the file is complete and exact."""
    with LabelBuffer(path, "r") as buffer:
        assert len(buffer) >= len(reported)
        for index, got in enumerate(buffer):
            frame_id = got.info["frame_id"]
            assert reported.get(index, frame_id) == frame_id
            atoms, variant, metadata = make_frame(frame_id)
            assert_same_frame(got, atoms)
            assert_same_metadata(got, metadata)
            assert got.info["variant"] == variant
        return len(buffer)


def test_sigkill_at_random_moments_never_loses_a_returned_append(path):
    """24 kills in a row on one file: even cycles die while opening/recovering or in their
    first appends, odd cycles in the middle of appending."""
    rng = np.random.default_rng(2024)
    reported, kills_mid_append = {}, 0
    for cycle in range(24):
        proc = _run_writer(path, f"c{cycle}")
        assert proc.stdout.readline().strip() == "heavy-modules -"  # no torch in the writer
        lines = []
        if cycle % 2:
            lines.append(proc.stdout.readline())  # wait for its first append
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            time.sleep(rng.uniform(0.0, 0.08))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err
        lines += out.splitlines()
        kills_mid_append += len(lines) > 1
        for line in lines:
            index, frame_id = line.split()
            assert int(index) not in reported, "an index was handed out twice"
            reported[int(index)] = frame_id
        if path.exists():
            _check_buffer(path, reported)
    assert kills_mid_append >= 10 and len(reported) > 100
    with LabelBuffer(path, "a") as buffer:  # the writer side recovers too
        assert len(buffer) >= len(reported)
    leftovers = {p.name for p in path.parent.iterdir()} - {path.name, f".{path.name}.lock"}
    assert not leftovers, f"temporary files left behind: {leftovers}"


def test_a_reader_follows_a_concurrent_writer(path):
    proc = _run_writer(path, "live", count=300)
    try:
        assert proc.stdout.readline().strip() == "heavy-modules -"
        first = proc.stdout.readline()  # the file exists and holds one frame
        assert first.startswith("0 ")
        seen, sizes = 0, set()
        with LabelBuffer(path, "r") as reader:
            deadline = time.monotonic() + 60
            while seen < 300 and time.monotonic() < deadline:
                n = len(reader)
                sizes.add(n)
                for got in reader[seen:n]:
                    atoms, _, metadata = make_frame(got.info["frame_id"])
                    assert got.info["frame_id"] == f"live-{seen}"
                    assert_same_frame(got, atoms)
                    seen += 1
                time.sleep(0.01)
        assert seen == 300
        assert len(sizes) > 3, "the reader never saw the buffer grow"
    finally:
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


def test_a_reader_whose_frame_metadata_lags_the_commit_count_reads_the_new_frames(path):
    """The window CI hit once: a reader knew of a committed frame whose row it had not
    refreshed yet (it opened ``frames`` before a writer's append and ``committed``
    after it). Reproduced deterministically by refreshing only ``committed``."""
    proc = _run_writer(path, "first", count=1)
    assert proc.communicate(timeout=60)[0].splitlines()[-1] == "0 first-0"
    with LabelBuffer(path, "r") as reader:
        assert len(reader) == 1
        proc = _run_writer(path, "late", count=2)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        table = reader._labels
        table.committed.refresh()
        table.n = table.committed.shape[0]  # frames/atoms/text still hold the old extent
        assert table.frames.shape[0] == 1 and table.n == 3
        got = reader[1:3]
    assert [a.info["frame_id"] for a in got] == ["late-0", "late-1"]
    for atoms in got:
        assert_same_frame(atoms, make_frame(atoms.info["frame_id"])[0])


# -- export and import -----------------------------------------------------------------------


def test_to_extxyz_writes_metatrain_keys(path, tmp_path):
    import ase.io

    frames = [cu_frame(seed=s) for s in range(3)]
    with LabelBuffer(path) as buffer:
        buffer.extend(frames, variant="energy/emt")
        buffer.append(spc(molecule("H2O"), energy=-3.0, forces=np.zeros((3, 3))), variant="energy/pbe0")
        with pytest.raises(LabelBufferError, match="several variants"):
            buffer.to_extxyz(tmp_path / "all.xyz")
        with pytest.raises(LabelBufferError, match="no labels of variant 'energy/x'"):
            buffer.to_extxyz(tmp_path / "x.xyz", variant="energy/x")
        assert buffer.to_extxyz(tmp_path / "emt.xyz", variant="energy/emt") == 3
    header = (tmp_path / "emt.xyz").read_text().splitlines()[1]
    assert "energy=" in header and "stress=" in header and ":forces:R:3" in header
    for got, want in zip(ase.io.read(tmp_path / "emt.xyz", ":"), frames):
        assert got.info["variant"] == "energy/emt"
        for key in ("energy", "forces", "stress"):
            np.testing.assert_allclose(got.calc.results[key], want.calc.results[key], atol=1e-8)


def test_import_extxyz_traj_and_db(path, tmp_path):
    import ase.io

    frames = [cu_frame(seed=s) for s in range(3)]
    for frame in frames:
        frame.info["config_type"] = "rattled"
    for name in ("a.xyz", "a.traj", "a.db"):
        ase.io.write(tmp_path / name, frames)
    custom = [frame.copy() for frame in frames]
    for frame, source in zip(custom, frames):
        frame.info["REF_energy"] = source.calc.results["energy"]
        frame.arrays["REF_forces"] = source.calc.results["forces"]
    ase.io.write(tmp_path / "custom.xyz", custom, write_results=False)
    with LabelBuffer(path) as buffer:
        assert buffer.import_file(tmp_path / "a.traj", variant="energy/emt", run=1) == range(0, 3)
        buffer.import_file(tmp_path / "a.xyz", variant="energy/emt")
        assert len(buffer.import_file(tmp_path / "a.db", variant="energy/emt")) == 0  # as .traj
        buffer.import_file(tmp_path / "a.db", variant="energy/emt", skip_duplicates=False)
        buffer.import_file(tmp_path / "custom.xyz", variant="energy/emt", energy_key="REF_energy",
                           forces_key="REF_forces", skip_duplicates=False)  # == a.xyz
        assert len(buffer) == 12
        both = [frame.copy() for frame in custom]  # with the file's own results as well
        for frame, source in zip(both, frames):
            frame.calc = source.calc
        ase.io.write(tmp_path / "both.xyz", both)
        with pytest.raises(LabelBufferError, match=r"no info key 'REF_enrgy' for the energy"):
            buffer.import_file(tmp_path / "both.xyz", variant="energy/ref",
                               energy_key="REF_enrgy", forces_key="REF_forces")  # a typo
        assert len(buffer) == 12 and "energy/ref" not in buffer.variants
        assert len(buffer.import_file(tmp_path / "a.xyz", variant="energy/emt")) == 0
        assert len(buffer.import_file(tmp_path / "a.xyz", variant="energy/other")) == 3
        assert len(buffer.indices("energy/emt")) == 12
        for k, got in enumerate(buffer.frames("energy/emt")):
            want = frames[k % 3].calc.results
            assert got.info["source_index"] == k % 3
            np.testing.assert_allclose(got.calc.results["forces"], want["forces"], atol=1e-8)
            np.testing.assert_allclose(got.calc.results["energy"], want["energy"], atol=1e-10)
        assert_same_frame(buffer[0], frames[0])  # .traj is exact
        assert buffer[0].info["run"] == 1 and buffer[0].info["config_type"] == "rattled"
        assert buffer[3].info["source"] == str(tmp_path / "a.xyz")
        ase.io.write(tmp_path / "bare.xyz", [bulk("Cu", cubic=True)])
        with pytest.raises(LabelBufferError, match="frame 0 of .*bare.xyz.*no reference results"):
            buffer.import_file(tmp_path / "bare.xyz", variant="energy/emt")
        with pytest.raises(LabelBufferError, match="cannot read"):
            buffer.import_file(tmp_path / "missing.xyz", variant="energy/emt")
        assert len(buffer) == 15


def test_mtt_train_trains_on_an_exported_buffer(tmp_path):
    pytest.importorskip("metatrain")
    rng = np.random.default_rng(0)
    cells = []
    for _ in range(8):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
        atoms.symbols = rng.choice(["Cu", "Ni"], size=len(atoms))
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        cells.append(atoms)
    labelled = label_many(cells, EMT(), properties=("energy", "forces", "stress"))
    with LabelBuffer(tmp_path / "labels.h5", "w-") as buffer:
        buffer.extend(labelled, variant="energy/emt")
        buffer.to_extxyz(tmp_path / "train.xyz", variant="energy/emt")
    widths = dict.fromkeys(("d_pet", "d_head", "d_node", "d_feedforward", "num_heads",
                            "num_attention_layers", "num_gnn_layers"), 1)
    options = {
        "seed": 0,
        "architecture": {"name": "pet", "model": {"cutoff": 4.0, **widths},
                         "training": {"num_epochs": 1, "batch_size": 2, "num_workers": 0}},
        "training_set": {
            "systems": {"read_from": "train.xyz", "length_unit": "angstrom"},
            "targets": {"energy": {"key": "energy", "unit": "eV", "description": "EMT energy",
                                   "forces": {"key": "forces"}, "stress": {"key": "stress"}}},
        },
        "validation_set": 0.25,
        "test_set": 0.0,
    }
    (tmp_path / "options.yaml").write_text(json.dumps(options, indent=2))  # JSON is YAML
    mtt = shutil.which("mtt") or str(pathlib.Path(sys.executable).with_name("mtt"))
    proc = subprocess.run([mtt, "train", "options.yaml"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=600, env=writer_env())
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert (tmp_path / "model.ckpt").is_file()
    assert "Forces found" in log and "Stress found" in log


def test_buffer_in_a_new_folder_is_created(tmp_path):
    from ase_petft import LabelBuffer

    with LabelBuffer(tmp_path / "run1" / "deep" / "labels.h5", mode="a") as buffer:
        assert len(buffer) == 0
    assert (tmp_path / "run1" / "deep" / "labels.h5").is_file()
