"""The calculator, refits, uncertainty and learner on a CUDA device, checked against the
same work on CPU (the oracle). Skipped where no GPU exists (CI); run on a GPU machine
with ``python -m pytest tests/test_cuda.py``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer, finetune
from ase_petft import _metatrain
from conftest import emt_frames
from test_learner import _accepting_learner, _langevin, check_in_memory_refits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

NEW = "energy/emt"


def _forces(calc, frames):
    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = calc
        out.append((atoms.get_potential_energy(), atoms.get_forces(), atoms.get_stress()))
    return out


def test_calculator_on_cuda_matches_cpu(emt_checkpoint):
    frames = emt_frames(3, seed=31)
    cpu = _forces(FineTunableCalculator(emt_checkpoint, variant=NEW, device="cpu"), frames)
    gpu_calc = FineTunableCalculator(emt_checkpoint, variant=NEW, device="cuda")
    assert gpu_calc.device.startswith("cuda")
    gpu = _forces(gpu_calc, frames)
    for (e1, f1, s1), (e2, f2, s2) in zip(cpu, gpu):
        assert e2 == pytest.approx(e1, abs=1e-4)
        assert np.abs(f2 - f1).max() < 1e-4
        assert np.abs(s2 - s1).max() < 1e-5


@pytest.mark.parametrize("solver", ["linear", "sgd"])
def test_in_process_refit_on_cuda_matches_cpu(emt_checkpoint, tmp_path, solver):
    """calc.finetune() on a cuda calculator trains on cuda and swaps the weights in place;
    the result equals the same refit on CPU (linear: to float32 rounding; sgd: the same
    seeded run, to the nondeterminism of GPU reductions)."""
    frames = emt_frames(8, seed=32)
    extra = {"num_epochs": 3} if solver == "sgd" else {"keep_parent_unless_better": False}
    config = FineTuneConfig(solver=solver, seed=0, **extra)
    results = {}
    for i, device in enumerate(("cpu", "cuda")):
        calc = FineTunableCalculator(emt_checkpoint, variant=NEW, device=device,
                                     workdir=tmp_path / f"run{i}")
        result = calc.finetune(frames, config)
        assert calc.generation == 1
        params = [p for _, p in _metatrain.last_layer_parameters(calc.model, NEW)]
        assert all(p.device.type == device for p in params)
        results[device] = (result, _forces(calc, emt_frames(2, seed=33)))
    (cpu, cpu_pred), (gpu, gpu_pred) = results["cpu"], results["cuda"]
    tol = 1e-3 if solver == "linear" else 2e-2
    assert gpu.metrics["after"]["forces_mae_meV_per_A"] == pytest.approx(
        cpu.metrics["after"]["forces_mae_meV_per_A"], rel=tol)
    for (e1, f1, _), (e2, f2, _) in zip(cpu_pred, gpu_pred):
        assert e2 == pytest.approx(e1, abs=1e-3 if solver == "linear" else 2e-2)


@pytest.mark.parametrize("method", ["posterior", "llpr"])
def test_uncertainty_on_cuda_matches_cpu(emt_checkpoint, method):
    fit, calib, probe = emt_frames(10, seed=34), emt_frames(4, seed=35), emt_frames(3, seed=36)
    sigmas = {}
    for device in ("cpu", "cuda"):
        calc = FineTunableCalculator(emt_checkpoint, variant=NEW, device=device,
                                     uncertainty=method)
        calc.fit_uncertainty(fit, calib)
        sigmas[device] = np.array([calc.get_energy_uncertainty(a) for a in probe])
        if method != "posterior":
            continue
        for atoms in probe:  # σ from the force pass against σ from its own pass
            moved = atoms.copy()
            moved.positions[0, 0] += 0.02  # a structure σ has not seen yet
            moved.calc = calc
            moved.get_forces()
            assert calc._last_features(moved) is not None
            fused = calc.get_energy_uncertainty(moved)
            calc._features = None  # forget the force pass's gradient: σ's own pass
            assert calc.get_energy_uncertainty(moved) == pytest.approx(fused, rel=1e-3)
    assert np.all(sigmas["cuda"] > 0)
    assert np.allclose(sigmas["cuda"], sigmas["cpu"], rtol=2e-2)


def test_learner_refits_and_swaps_on_cuda(emt_checkpoint, tmp_path):
    calc = FineTunableCalculator(emt_checkpoint, variant=NEW, device="cuda")
    atoms = emt_frames(1, seed=37)[0]
    atoms.calc = calc
    with LabelBuffer(tmp_path / "labels.h5", mode="w-") as buffer:
        learner = _accepting_learner(calc, buffer, tmp_path / "learner", background=False)
        dyn = _langevin(atoms)
        dyn.attach(learner, interval=1)
        dyn.run(16)
        learner.close()
    assert calc.generation >= 1 and calc.device.startswith("cuda")
    # the swapped cuda calculator predicts what its generation's checkpoint predicts on CPU
    ref = FineTunableCalculator(calc.checkpoint_path, variant=NEW, device="cpu")
    (e_gpu, f_gpu, _), (e_cpu, f_cpu, _) = _forces(calc, [atoms]) + _forces(ref, [atoms])
    assert e_gpu == pytest.approx(e_cpu, abs=1e-4)
    assert np.abs(f_gpu - f_cpu).max() < 1e-4


def test_finetune_from_path_on_cuda_writes_a_cpu_loadable_checkpoint(emt_checkpoint, tmp_path):
    frames = emt_frames(6, seed=38)
    result = finetune(emt_checkpoint, frames, variant=NEW, output_dir=tmp_path / "gpu",
                      device="cuda", config=FineTuneConfig(method="full", num_epochs=2, seed=0))
    model = _metatrain.load_model(result.checkpoint_path)
    assert all(p.device.type == "cpu" for p in model.parameters())
    calc = FineTunableCalculator(result.checkpoint_path, variant=NEW, device="cpu")
    atoms = frames[0].copy()
    atoms.calc = calc
    assert np.isfinite(atoms.get_forces()).all()



def test_learner_on_cuda_probes_and_swaps_its_candidate_in_memory(emt_checkpoint, tmp_path,
                                                                  monkeypatch):
    """A background refit of a cuda calculator trains, probes (stability MD on cuda) and
    swaps the candidate module without reading a checkpoint; the live weights then equal
    the accepted generation's checkpoint."""
    calc = FineTunableCalculator(emt_checkpoint, variant=NEW, device="cuda")
    atoms = emt_frames(1, seed=39)[0]
    atoms.calc = calc
    with LabelBuffer(tmp_path / "labels.h5", mode="w-") as buffer:
        check_in_memory_refits(calc, atoms, buffer, tmp_path / "learner", monkeypatch)
    assert calc.device.startswith("cuda")
