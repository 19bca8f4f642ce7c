"""FineTunableCalculator against independent oracles: metatomic's calculator on a model
exported by metatrain's own CLI, finite differences, and the parent head."""

from __future__ import annotations

import gzip
import json
import logging
import pathlib
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.io import Trajectory, read
from ase.md.langevin import Langevin
from ase.md import velocitydistribution
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS, FIRE

from ase_petft import (
    ConfigError,
    CheckpointError,
    FineTunableCalculator,
    ModelSwapError,
    UnsupportedSystemError,
    VariantError,
)
from ase_petft import _metatrain
from ase_petft.calculator import StressUnavailableError

from conftest import emt_frames, perturbed_checkpoint, without_known_noise

# ASE >= 3.28 renamed MaxwellBoltzmannDistribution's rng form
thermalize = getattr(velocitydistribution, "thermalize_momenta", None) or (
    velocitydistribution.MaxwellBoltzmannDistribution
)


def mtt_export(checkpoint: pathlib.Path, out: pathlib.Path) -> pathlib.Path:
    proc = subprocess.run(
        [sys.executable, "-m", "metatrain", "export", str(checkpoint), "-o", str(out)],
        cwd=out.parent, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def exported_emt(emt_checkpoint, tmp_path_factory):
    return mtt_export(emt_checkpoint, tmp_path_factory.mktemp("export") / "model.pt")


def _props(atoms, calc):
    atoms = atoms.copy()
    atoms.calc = calc
    return atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()


def test_matches_metatomic_calculator_on_mtt_exported_model(emt_checkpoint, exported_emt):
    from metatomic_ase import MetatomicCalculator

    calc = FineTunableCalculator(emt_checkpoint)
    reference = MetatomicCalculator(str(exported_emt))
    for atoms in emt_frames(2, seed=7, size=2) + emt_frames(1, seed=8, size=3):
        e, f, s = _props(atoms, calc)
        e_ref, f_ref, s_ref = _props(atoms, reference)
        assert e == pytest.approx(e_ref, rel=1e-6, abs=1e-6)
        np.testing.assert_allclose(f, f_ref, atol=1e-5)
        np.testing.assert_allclose(s, s_ref, atol=1e-6)


def test_properties_and_metadata(emt_checkpoint, cuni_atoms):
    calc = FineTunableCalculator(emt_checkpoint)
    atoms = cuni_atoms.copy()
    atoms.calc = calc
    energies = atoms.get_potential_energies()
    assert energies.shape == (len(atoms),)
    assert energies.sum() == pytest.approx(atoms.get_potential_energy(), rel=1e-5)
    assert atoms.get_potential_energy(force_consistent=True) == atoms.get_potential_energy()
    assert calc.variant == "energy" and calc.variants == ["energy"]
    assert calc.generation == 0
    assert calc.checkpoint_path == pathlib.Path(emt_checkpoint).resolve()
    assert calc.dtype == "float32"
    json.dumps(calc.todict())


@pytest.fixture(scope="module")
def calc64(emt_checkpoint):
    return FineTunableCalculator(emt_checkpoint, dtype="float64")


def test_forces_are_finite_difference_of_energy(calc64, cuni_atoms):
    atoms = cuni_atoms.copy()
    atoms.calc = calc64
    forces = atoms.get_forces()
    h = 1e-4
    rng = np.random.default_rng(0)
    for index in rng.choice(len(atoms), size=4, replace=False):
        for axis in range(3):
            shifted = []
            for sign in (1, -1):
                probe = atoms.copy()
                probe.positions[index, axis] += sign * h
                probe.calc = calc64
                shifted.append(probe.get_potential_energy())
            fd = -(shifted[0] - shifted[1]) / (2 * h)
            assert forces[index, axis] == pytest.approx(fd, abs=1e-6)


def test_stress_is_finite_difference_of_energy(calc64, cuni_atoms):
    atoms = cuni_atoms.copy()
    atoms.calc = calc64
    stress = atoms.get_stress(voigt=False)
    h = 1e-5
    for i, j in [(0, 0), (1, 1), (2, 2), (0, 1), (1, 2), (0, 2)]:
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[i, j] += sign * h / 2
            strain[j, i] += sign * h / 2
            probe = atoms.copy()
            probe.set_cell(atoms.cell @ strain, scale_atoms=True)
            probe.calc = calc64
            energies.append(probe.get_potential_energy())
        fd = (energies[0] - energies[1]) / (2 * h) / atoms.get_volume()
        assert stress[i, j] == pytest.approx(fd, abs=1e-7)


def test_new_variant_starts_equal_to_parent(emt_checkpoint, cuni_atoms):
    parent = FineTunableCalculator(emt_checkpoint)
    child = FineTunableCalculator(emt_checkpoint, variant="energy/gfn2")
    assert child.variants == ["energy", "energy/gfn2"]
    for atoms in (cuni_atoms, emt_frames(1, seed=99, size=3)[0]):
        a, b = atoms.copy(), atoms.copy()
        a.calc, b.calc = parent, child
        # the composition baseline is large and element-specific: a zero one would show
        assert abs(a.get_potential_energy()) > 1e-3
        np.testing.assert_array_equal(a.get_potential_energies(), b.get_potential_energies())
        np.testing.assert_array_equal(a.get_forces(), b.get_forces())
        np.testing.assert_array_equal(a.get_stress(), b.get_stress())


def test_new_variant_checkpoint_is_accepted_by_mtt_and_metatomic(
    emt_checkpoint, cuni_atoms, tmp_path
):
    from metatomic_ase import MetatomicCalculator

    calc = FineTunableCalculator(emt_checkpoint, variant="energy/pbe0")
    saved = calc.save_checkpoint(tmp_path / "gen0.ckpt")
    exported = mtt_export(saved, tmp_path / "gen0.pt")
    reference = MetatomicCalculator(str(exported), variants={"energy": "pbe0"})
    e, f, s = _props(cuni_atoms, calc)
    e_ref, f_ref, s_ref = _props(cuni_atoms, reference)
    assert e == pytest.approx(e_ref, rel=1e-6)
    np.testing.assert_allclose(f, f_ref, atol=1e-5)
    np.testing.assert_allclose(s, s_ref, atol=1e-6)
    reloaded = FineTunableCalculator(saved, variant="energy/pbe0", inherit_from=None)
    assert _props(cuni_atoms, reloaded)[0] == pytest.approx(e, rel=1e-7)


def test_missing_variant_without_inherit_is_a_clear_error(emt_checkpoint):
    with pytest.raises(VariantError, match=r"energy/pbe.*\['energy'\].*did you mean 'energy'"):
        FineTunableCalculator(emt_checkpoint, variant="energy/pbe", inherit_from=None)
    with pytest.raises(VariantError, match="invalid energy variant 'forces/pbe'"):
        FineTunableCalculator(emt_checkpoint, variant="forces/pbe")
    with pytest.raises(VariantError, match=r"unknown variant 'energy/x'.*inherit_from"):
        FineTunableCalculator(emt_checkpoint, variant="energy/y", inherit_from="energy/x")


def test_variant_one_typo_away_warns(emt_checkpoint, tmp_path, caplog):
    base = FineTunableCalculator(emt_checkpoint, variant="energy/pbe0")
    path = base.save_checkpoint(tmp_path / "two_heads.ckpt")
    with caplog.at_level(logging.WARNING, logger="ase_petft"):
        calc = FineTunableCalculator(path, variant="energy/pbe1")
    assert "one typo away" in caplog.text and "energy/pbe0" in caplog.text
    assert calc.variants == ["energy", "energy/pbe0", "energy/pbe1"]


def test_bad_checkpoints_give_checkpoint_errors(tmp_path, exported_emt, emt_checkpoint):
    import torch

    with pytest.raises(CheckpointError, match="does not exist"):
        FineTunableCalculator(tmp_path / "nope.ckpt")
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointError, match="could not read checkpoint"):
        FineTunableCalculator(corrupt)
    other = tmp_path / "soap.ckpt"
    torch.save({"architecture_name": "soap_bpnn", "model_ckpt_version": 1}, other)
    with pytest.raises(CheckpointError, match="'soap_bpnn' model.*PET models only"):
        FineTunableCalculator(other)
    with pytest.raises(CheckpointError, match="exported metatomic model"):
        FineTunableCalculator(exported_emt)
    with pytest.raises(ConfigError, match="unsupported dtype"):
        FineTunableCalculator(emt_checkpoint, dtype="float16")
    ckpt = torch.load(emt_checkpoint, weights_only=False)
    info = ckpt["model_data"]["dataset_info"]
    from metatrain.utils.data.target_info import get_energy_target_info

    info.targets["energy"] = get_energy_target_info(
        "energy", {"unit": "kcal/mol", "description": info.targets["energy"].description})
    torch.save(ckpt, tmp_path / "kcal.ckpt")
    with pytest.raises(CheckpointError, match=r"'energy' in 'kcal/mol'.*eV and Å only"):
        FineTunableCalculator(tmp_path / "kcal.ckpt")
    with pytest.raises(CheckpointError, match="non-empty str or path, got None"):
        FineTunableCalculator(None)  # e.g. os.environ.get("CKPT") unset
    (tmp_path / "gen-0001").mkdir()
    (tmp_path / "gen-0001" / "model.ckpt").write_bytes(emt_checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match=r"is a directory.*\['model.ckpt'\]"):
        FineTunableCalculator(tmp_path / "gen-0001")
    calc = FineTunableCalculator(emt_checkpoint)
    with pytest.raises(ModelSwapError, match="is a directory"):
        calc.swap_model(tmp_path / "gen-0001")
    with pytest.raises(CheckpointError, match="names a directory"):
        calc.save_checkpoint(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(CheckpointError, match="its folder cannot be created"):
        calc.save_checkpoint(tmp_path / "file.txt" / "model.ckpt")
    assert calc.generation == 0


def test_atoms_flown_thousands_of_angstrom_apart_are_refused():
    """An exploded molecule (no cell) spanning 2500 Å in a plane killed the whole
    process (SIGFPE in the neighbour list): now a clear error, and the calculator
    still works on a sane structure afterwards."""
    from ase import Atoms
    from ase.build import molecule

    from ase_petft import demo_checkpoint

    calc = FineTunableCalculator(demo_checkpoint())
    flown = Atoms("H3", positions=[[0, 0, 0], [2500, 0, 0], [0, 2500, 0]])
    flown.calc = calc
    with pytest.raises(UnsupportedSystemError, match=r"span 2500 Å without a periodic cell"):
        flown.get_potential_energy()
    water = molecule("H2O")
    water.calc = calc
    assert np.isfinite(water.get_forces()).all()


def test_unknown_elements_and_stress_without_cell(emt_checkpoint):
    calc = FineTunableCalculator(emt_checkpoint)
    gold = emt_frames(1, seed=3, elements=("Cu", "Au"))[0]
    gold.calc = calc
    with pytest.raises(UnsupportedSystemError, match=r"element\(s\) \['Au'\].*\['Ni', 'Cu'\]"):
        gold.get_potential_energy()
    cluster = emt_frames(1, seed=4)[0][:13]
    cluster.pbc = False
    cluster.calc = calc
    assert np.isfinite(cluster.get_forces()).all()
    with pytest.raises(StressUnavailableError, match="periodic in all directions"):
        cluster.get_stress()


def test_swap_model_in_place_drops_cache_and_counts(emt_checkpoint, cuni_atoms, tmp_path):
    calc = FineTunableCalculator(emt_checkpoint)
    atoms = cuni_atoms.copy()
    atoms.calc = calc
    before = atoms.get_potential_energy()
    new = perturbed_checkpoint(emt_checkpoint, tmp_path / "gen1.ckpt", seed=1)
    assert calc.swap_model(new) == 1
    assert atoms.calc is calc and calc.generation == 1 and calc.checkpoint_path == new
    after = atoms.get_potential_energy()  # same positions: a stale cache would return `before`
    fresh = cuni_atoms.copy()
    fresh.calc = FineTunableCalculator(new)
    assert after != before
    assert after == pytest.approx(fresh.get_potential_energy(), rel=1e-7)
    np.testing.assert_allclose(atoms.get_forces(), fresh.get_forces(), atol=1e-6)


def test_swap_reaches_the_compiled_model_with_and_without_new_composition(
        emt_checkpoint, cuni_atoms, tmp_path):
    """Weights-only swaps are copied in place (the TorchScript copy shares them, no
    rebuild); a new composition baseline, which the compiled copy holds on its own,
    rebuilds it. Both must predict what a fresh calculator on the checkpoint does."""
    import torch

    calc = FineTunableCalculator(emt_checkpoint)
    atoms = cuni_atoms.copy()
    atoms.calc = calc
    compiled = calc._inner
    weights_only = perturbed_checkpoint(emt_checkpoint, tmp_path / "w.ckpt", seed=3)
    model = _metatrain.load_model(emt_checkpoint)
    composition = model.additive_models[0]
    with torch.no_grad():
        for block in composition.model.weights["energy"].blocks():
            block.values.add_(0.25)  # +0.25 eV per atom of every element
    composition.energy_composition_buffer = _serialised(composition.model.weights["energy"])
    shifted = _metatrain.save_checkpoint(model, tmp_path / "c.ckpt")
    for path, rebuilt in ((weights_only, False), (shifted, True), (emt_checkpoint, True)):
        calc.swap_model(path)
        assert (calc._inner is not compiled) == rebuilt, path.name
        compiled = calc._inner
        fresh = cuni_atoms.copy()
        fresh.calc = FineTunableCalculator(path)
        assert atoms.get_potential_energy() == pytest.approx(fresh.get_potential_energy(),
                                                             rel=1e-7, abs=1e-6)
        np.testing.assert_allclose(atoms.get_forces(), fresh.get_forces(), atol=1e-6)
    shift = fresh.get_potential_energy()
    fresh.calc = FineTunableCalculator(shifted)
    assert fresh.get_potential_energy() - shift == pytest.approx(0.25 * len(fresh), abs=1e-4)


def _serialised(tensor_map):
    import metatensor.torch as mts

    return mts.save_buffer(tensor_map)


def test_swap_with_incompatible_checkpoint_keeps_old_model(emt_checkpoint, cuni_atoms, tmp_path):
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/pbe0")
    atoms = cuni_atoms.copy()
    atoms.calc = calc
    before = atoms.get_potential_energy()
    wider = _metatrain.new_pet_model(
        atomic_types=[28, 29], variants={"energy": "x"}, model_hypers={"d_pet": 16}
    )
    other_types = _metatrain.new_pet_model(
        atomic_types=[28, 29, 79], variants={"energy": "x"},
        model_hypers=dict(_metatrain.load_model(emt_checkpoint).hypers),
    )
    cases = {
        "different architecture": _metatrain.save_checkpoint(wider, tmp_path / "w.ckpt"),
        "same atomic types": _metatrain.save_checkpoint(other_types, tmp_path / "t.ckpt"),
        "no 'energy/pbe0' head": emt_checkpoint,  # lacks the running variant
        "does not exist": tmp_path / "missing.ckpt",
    }
    for message, path in cases.items():
        with pytest.raises(ModelSwapError, match=message):
            calc.swap_model(path)
        assert calc.generation == 0
        atoms.positions[0, 0] += 1e-3  # force a recomputation
        atoms.positions[0, 0] -= 1e-3
        assert atoms.get_potential_energy() == pytest.approx(before, rel=1e-7)


def test_trajectory_and_md_across_a_swap(emt_checkpoint, cuni_atoms, tmp_path):
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/pbe0")
    gen1 = calc.save_checkpoint(tmp_path / "base.ckpt")
    gen1 = perturbed_checkpoint(gen1, tmp_path / "gen1.ckpt", seed=2, only="energy/pbe0")
    atoms = cuni_atoms.copy()
    atoms.calc = calc
    thermalize(atoms, temperature_K=300, rng=np.random.default_rng(0))
    dyn = Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02,
                   rng=np.random.default_rng(1), fixcm=False)
    traj = Trajectory(tmp_path / "md.traj", "w", atoms)
    dyn.attach(traj.write, interval=1)
    dyn.run(3)
    calc.swap_model(gen1)
    dyn.run(3)
    traj.close()
    frames = read(tmp_path / "md.traj", ":")
    assert len(frames) >= 7 and atoms.calc is calc
    last = frames[-1].copy()
    last.calc = FineTunableCalculator(gen1, variant="energy/pbe0", inherit_from=None)
    assert frames[-1].get_potential_energy() == pytest.approx(last.get_potential_energy(), rel=1e-6)
    from ase.io import write

    write(tmp_path / "last.xyz", atoms)  # extxyz writes calculator results too


def test_ase_dynamics_and_optimisers(calc64):
    atoms = emt_frames(1, seed=11)[0]
    atoms.calc = calc64
    thermalize(atoms, temperature_K=200, rng=np.random.default_rng(3))
    e0 = atoms.get_total_energy()
    VelocityVerlet(atoms, 0.5 * units.fs).run(20)
    assert abs(atoms.get_total_energy() - e0) / len(atoms) < 2e-3
    for optimizer in (BFGS, FIRE):
        probe = emt_frames(1, seed=12)[0]
        probe.calc = calc64
        start = probe.get_potential_energy()
        optimizer(probe, logfile=None).run(fmax=1e-5, steps=10)
        assert probe.get_potential_energy() < start


def test_old_checkpoint_versions_are_upgraded(tmp_path):
    import metatrain

    folder = pathlib.Path(metatrain.__file__).parent / "pet" / "tests" / "checkpoints"
    archives = sorted(folder.glob("model-v10_*.ckpt.gz"))
    if not archives:
        pytest.skip("metatrain's test checkpoints are not installed")
    path = tmp_path / "old.ckpt"
    with gzip.open(archives[0]) as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    calc = FineTunableCalculator(path)
    atoms = molecule("CH4")
    atoms.calc = calc
    assert np.isfinite(atoms.get_forces()).all()


def test_global_logging_and_warning_state_untouched(emt_checkpoint):
    logger_class = logging.getLoggerClass()
    filters = list(warnings.filters)
    root_handlers = list(logging.getLogger().handlers)
    FineTunableCalculator(emt_checkpoint, variant="energy/new")
    assert logging.getLoggerClass() is logger_class
    # only the documented, targeted filters for known noise, added once
    assert without_known_noise(warnings.filters) == without_known_noise(filters)
    installed = list(warnings.filters)
    FineTunableCalculator(emt_checkpoint, variant="energy/new2")
    assert warnings.filters == installed
    assert logging.getLogger().handlers == root_handlers  # no basicConfig behind our back


def test_import_is_light():
    code = (
        "import sys, ase_petft\n"
        "from ase_petft import PetftError, VariantError\n"
        "heavy = [m for m in ('metatrain', 'metatrain.pet.trainer', 'torch') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"
