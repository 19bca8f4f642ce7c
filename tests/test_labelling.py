"""label() and label_many(): copies, provenance, failures, executors."""

from __future__ import annotations

import multiprocessing
import pickle
import threading
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pytest
from ase import Atoms
from ase.build import bulk, fcc111, molecule
from ase.calculators.calculator import Calculator
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator

from ase_petft.errors import ConfigError, LabellingError, PetftError
from ase_petft.labelling import label, label_many

from conftest import MetatomicLike, ModelLike


def cu(seed=0):
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True)
    atoms.rattle(0.05, seed=seed)
    return atoms


def fe():
    return bulk("Fe", cubic=True)  # EMT has no potential for Fe: a reference that raises


class Failing(Calculator):
    implemented_properties = ["energy", "forces"]
    name = "scf-code"

    def __init__(self, result=None, **kwargs):
        super().__init__(**kwargs)
        self.result = result

    def calculate(self, atoms=None, properties=("energy",), system_changes=()):
        super().calculate(atoms, properties, system_changes)
        if self.result is None:
            raise RuntimeError("SCF not converged after 100 cycles")
        self.results = dict(self.result)


class Unpicklable(EMT):
    """An EMT that cannot be deep-copied (holds a lock), like calculators with live handles."""

    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()




def test_label_returns_a_labelled_copy_with_provenance():
    atoms = cu()
    atoms.info["step"] = 4
    reference = EMT()
    labelled = label(atoms, reference, properties=("energy", "forces", "stress"))
    assert labelled is not atoms and isinstance(labelled.calc, SinglePointCalculator)
    expected = cu()
    expected.calc = EMT()
    assert labelled.get_potential_energy() == expected.get_potential_energy()
    assert np.array_equal(labelled.get_forces(), expected.get_forces())
    assert np.array_equal(labelled.get_stress(), expected.get_stress())
    assert np.array_equal(labelled.positions, atoms.positions)
    info = labelled.info
    assert info["step"] == 4 and info["reference"] == "emt"
    assert info["reference_class"] == "ase.calculators.emt.EMT"
    assert isinstance(info["reference_parameters"], dict)
    assert info["wall_time_s"] > 0 and info["labelled_at"].endswith("+00:00")


@pytest.mark.parametrize("copy_reference", [True, False])
def test_caller_atoms_and_reference_are_not_modified(copy_reference):
    reference = EMT()
    other = bulk("Ni", cubic=True)
    other.calc = reference
    energy_before = other.get_potential_energy()  # the reference holds state for `other`
    atoms = cu()
    sentinel = SinglePointCalculator(atoms, energy=123.0)
    atoms.calc = sentinel
    atoms.info["step"] = 1
    positions, state_atoms, results = atoms.positions.copy(), reference.atoms, dict(reference.results)
    label(atoms, reference, copy_reference=copy_reference)
    assert atoms.calc is sentinel and atoms.info == {"step": 1}
    assert np.array_equal(atoms.positions, positions)
    assert reference.atoms is state_atoms and reference.results.keys() == results.keys()
    assert all(np.array_equal(reference.results[k], v) for k, v in results.items())
    assert other.get_potential_energy() == energy_before and not reference.check_state(other)


def test_a_reference_that_cannot_be_copied_is_restored():
    reference = Unpicklable()
    labelled = label(cu(), reference)
    assert reference.atoms is None and reference.results == {}
    assert labelled.info["reference"] == "unpicklable"


def test_stress_is_requested_only_for_fully_periodic_cells():
    properties = ("energy", "forces", "stress")
    assert "stress" in label(cu(), EMT(), properties=properties).calc.results
    slab = fcc111("Cu", size=(2, 2, 2), vacuum=5.0)
    assert set(label(slab, EMT(), properties=properties).calc.results) == {"energy", "forces"}
    assert set(label(molecule("H2O"), EMT(), properties=properties).calc.results) == {"energy", "forces"}
    assert set(label(cu(), EMT()).calc.results) == {"energy", "forces"}


def test_a_failing_reference_gives_a_labelling_error_with_the_structure():
    atoms = cu()
    with pytest.raises(LabellingError) as info:
        label(atoms, Failing())
    error = info.value
    assert isinstance(error, PetftError)
    assert "scf-code failed on Cu4 (4 atoms)" in str(error) and "SCF not converged" in str(error)
    assert isinstance(error.__cause__, RuntimeError)
    assert error.atoms is not atoms and np.array_equal(error.atoms.positions, atoms.positions)
    assert atoms.calc is None
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == str(error) and np.array_equal(again.atoms.positions, atoms.positions)


@pytest.mark.parametrize("result, message", [
    ({"energy": np.nan, "forces": np.zeros((4, 3))}, "non-finite energy"),
    ({"energy": 1.0}, r"returned no \['forces'\]"),
    ({"energy": 1.0, "forces": np.zeros((3, 3))}, r"forces of shape \(3, 3\)"),
])
def test_bad_reference_results_are_labelling_errors(result, message):
    with pytest.raises(LabellingError, match=message):
        label(cu(), Failing(result=result))


@pytest.mark.parametrize("cls", [ModelLike, MetatomicLike])
def test_model_predictions_are_refused_as_references(cls):
    with pytest.raises(LabellingError, match="ML model calculator"):
        label(cu(), cls())
    with pytest.raises(LabellingError, match="ML model calculator"):
        label_many([cu()], cls())


def test_bad_arguments():
    with pytest.raises(ConfigError, match="ase.Atoms"):
        label("Cu", EMT())
    with pytest.raises(ConfigError, match="ASE calculator"):
        label(cu(), None)
    with pytest.raises(ConfigError, match=r"the class EMT; pass EMT\(...\)"):
        label(cu(), EMT)
    with pytest.raises(ConfigError, match="must include 'energy'"):
        label(cu(), EMT(), properties=("forces",))
    with pytest.raises(ConfigError, match=r"unknown: \['force'\]"):
        label_many([cu()], EMT(), properties=("energy", "force"))
    with pytest.raises(ConfigError, match="sequence of names"):
        label(cu(), EMT(), properties="energy")
    with pytest.raises(ConfigError, match="frame 1 is a str"):
        label_many([cu(), "Cu"], EMT())


def _check_batch(results, frames):
    assert len(results) == len(frames)
    for got, atoms in zip(results, frames):
        if atoms.get_chemical_symbols()[0] == "Fe":
            assert isinstance(got, LabellingError) and "No EMT-potential for Fe" in str(got)
            assert np.array_equal(got.atoms.positions, atoms.positions)
        else:
            expected = label(atoms, EMT(), properties=("energy", "forces", "stress"))
            assert isinstance(got, Atoms) and np.array_equal(got.positions, atoms.positions)
            assert got.calc.results.keys() == expected.calc.results.keys()
            for key, value in expected.calc.results.items():
                assert np.array_equal(got.calc.results[key], value)


def _batch():
    return [cu(0), fe(), cu(1), molecule("CO"), cu(2)]


def test_label_many_inline_keeps_order_and_reports_failures_per_frame():
    frames = _batch()
    results = label_many(frames, EMT(), properties=("energy", "forces", "stress"))
    _check_batch(results, frames)
    assert label_many([], EMT()) == []


def test_label_many_on_a_process_pool():
    frames = _batch()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        results = label_many(frames, EMT(), executor=pool, properties=("energy", "forces", "stress"))
    _check_batch(results, frames)


@pytest.mark.parametrize("processes", [False, True], ids=["threads", "processes"])
def test_label_many_on_a_local_dask_cluster(tmp_path, processes):
    distributed = pytest.importorskip("dask.distributed")
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=processes,
                                  protocol="tcp", host="127.0.0.1", dashboard_address=None,
                                  local_directory=str(tmp_path)) as cluster, \
            distributed.Client(cluster) as client:
        frames = _batch()
        results = label_many(frames, EMT(), executor=client.get_executor(),
                             properties=("energy", "forces", "stress"))
    _check_batch(results, frames)


def test_provenance_tells_levels_of_theory_apart_when_one_is_the_default(tmp_path):
    """tblite's todict() omits its default method (GFN2-xTB): the labels must still say it."""
    tblite = pytest.importorskip("tblite.ase")
    from ase.build import molecule

    from ase_petft.buffer import LabelBuffer
    from ase_petft.cli.buffer import buffer_summary

    water = molecule("H2O")
    gfn2 = label(water, tblite.TBLite(verbosity=0))
    gfn1 = label(water, tblite.TBLite(method="GFN1-xTB", verbosity=0))
    assert gfn2.info["reference_parameters"]["method"] == "GFN2-xTB"
    assert gfn1.info["reference_parameters"]["method"] == "GFN1-xTB"
    assert gfn1.get_potential_energy() != gfn2.get_potential_energy()
    with LabelBuffer(tmp_path / "labels.h5") as buffer:
        buffer.append(gfn2, variant="energy/gfn2")
        buffer.append(gfn1, variant="energy/gfn1")
    summary = buffer_summary(tmp_path / "labels.h5")
    assert summary["variants"]["energy/gfn2"]["references"] == {"tblite (GFN2-xTB)": 1}
    assert summary["variants"]["energy/gfn1"]["references"] == {"tblite (GFN1-xTB)": 1}
