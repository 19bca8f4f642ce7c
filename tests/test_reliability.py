"""Reliability of the learner and the labelling: locks, timeouts, validation, Ctrl-C."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from ase.calculators.emt import EMT

from ase_petft import ConfigError, FineTunableCalculator, FineTuneConfig, LabelBuffer
from ase_petft.labelling import label
from ase_petft.errors import LabellingError
from ase_petft.learner import OnTheFlyLearner, RattleConfig, every

from conftest import emt_frames

HERE = pathlib.Path(__file__).parent


class SlowEMT(EMT):
    """EMT that hangs for ``delay`` seconds (a stuck SCF)."""

    def __init__(self, delay):
        super().__init__()
        self.delay = delay

    def calculate(self, *args, **kwargs):
        time.sleep(self.delay)
        super().calculate(*args, **kwargs)


@pytest.fixture
def parts(emt_checkpoint, tmp_path):
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    atoms = emt_frames(1, seed=5)[0]
    atoms.calc = calc
    atoms.get_potential_energy()
    with LabelBuffer(tmp_path / "labels.h5", mode="w-") as buffer:
        yield calc, atoms, buffer, tmp_path / "learner"


def test_two_learners_cannot_share_a_work_directory(parts):
    calc, atoms, buffer, workdir = parts
    first = OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, background=False)
    with pytest.raises(ConfigError, match="in use by another learner"):
        OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, background=False)
    first.close()
    with OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, background=False):
        pass  # free again once the first one closed


def test_a_hanging_reference_times_out_and_is_recorded(parts):
    calc, atoms, buffer, workdir = parts
    with OnTheFlyLearner(calc, SlowEMT(30.0), buffer, workdir=workdir, select=every(1),
                         background=False, reference_timeout=0.5) as learner:
        start = time.perf_counter()
        learner()
        took = time.perf_counter() - start
    assert took < 5.0, f"the step waited {took:.1f} s for a hanging reference"
    assert len(buffer) == 0
    (failure,) = buffer.failures()
    assert "timeout" in failure.info["error"]
    assert [row["event"] for row in learner.history].count("label_failed") == 1
    quick = label(atoms, SlowEMT(0.0), timeout=5.0)  # a call within its time is a label
    direct = atoms.copy()
    direct.calc = EMT()
    assert np.array_equal(quick.get_forces(), direct.get_forces())
    with pytest.raises(LabellingError, match="timeout"):
        label(atoms, SlowEMT(10.0), timeout=0.2)
    with pytest.raises(ConfigError, match="timeout"):
        label(atoms, EMT(), timeout=0)


@pytest.mark.parametrize("kwargs, named", [
    ({"config": {"method": "heads"}}, "config must be a FineTuneConfig"),
    ({"properties": ("forces",)}, "properties must"),
    ({"properties": ("energy", "dipole")}, "properties must"),
    ({"refit_threads": 0}, "refit_threads"),
    ({"reference_timeout": -1}, "reference_timeout"),
])
def test_learner_settings_are_validated_at_construction(parts, kwargs, named):
    calc, atoms, buffer, workdir = parts
    with pytest.raises(ConfigError, match=named):
        OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, **kwargs)
    with OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir):  # nothing was left locked
        pass


def _still_running(proc, seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return False
    except subprocess.TimeoutExpired:
        return True


def test_ctrl_c_during_a_background_refit_stops_promptly(emt_checkpoint, tmp_path):
    cmd = [sys.executable, str(HERE / "_learner_run.py"), str(emt_checkpoint), str(tmp_path),
           "400", "2", "interrupt"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    import queue
    import threading

    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env) as proc:
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x.strip()) for x in proc.stdout],
                         daemon=True).start()
        try:  # never wait forever on a child that does not say it is refitting
            while lines.get(timeout=120) != "REFIT_RUNNING":
                pass
        except queue.Empty:
            proc.kill()
            pytest.fail(f"no refit started within 120 s: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
        sent = time.perf_counter()
        proc.send_signal(signal.SIGINT)
        try:
            # Python drops a KeyboardInterrupt raised inside a weakref callback or a
            # __del__ ("Exception ignored in ..."; seen once in CI-like runs under load,
            # torch's garbage runs such callbacks on the main thread): as a user would,
            # press Ctrl-C again if the first one left no trace (no abandoned refit in
            # the history after 5 s)
            history = tmp_path / "learner" / "history.jsonl"
            if _still_running(proc, 5.0) and "refit_abandoned" not in history.read_text():
                proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # where is it stuck? (faulthandler, all threads)
            time.sleep(2.0)
            proc.kill()
            pytest.fail("the learner did not stop within 60 s of SIGINT; its threads:\n"
                        + proc.stderr.read()[-6000:])
        stopped = time.perf_counter() - sent
        stderr = proc.stderr.read()
    assert stopped < 10.0, f"took {stopped:.1f} s to stop after Ctrl-C"
    assert "KeyboardInterrupt" in stderr
    with LabelBuffer(tmp_path / "labels.h5", mode="a") as buffer:  # consistent, unlocked
        n = len(buffer)
        assert n >= 2
        calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
        with OnTheFlyLearner(calc, EMT(), buffer, workdir=tmp_path / "learner",
                             background=False):
            pass
    assert calc.generation == 0  # the abandoned refit was never swapped in
    rows = (tmp_path / "learner" / "history.jsonl").read_text()
    assert "refit_abandoned" in rows


def test_structures_pet_cannot_handle_are_refused_before_the_model_runs(emt_checkpoint, caplog):
    import logging

    from ase import Atoms
    from ase.build import bulk

    from ase_petft import UnsupportedSystemError
    from ase_petft.systems import MAX_NEIGHBOURS

    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    cases = {
        "no atoms": Atoms(),
        "non-finite positions": Atoms("Cu2", positions=[[0, 0, 0], [np.nan, 0, 0]]),
        "singular along the periodic": Atoms("Cu", cell=[[2, 0, 0], [4, 0, 0], [0, 0, 2]],
                                             pbc=True),
        "neighbours per atom": Atoms("Cu", cell=[0.5, 0.5, 0.5], pbc=True),  # was 24 GB
    }
    for message, atoms in cases.items():
        atoms.calc = calc
        with pytest.raises(UnsupportedSystemError, match=message):
            atoms.get_potential_energy()
    # between the estimate's bounds the count is exact (ASE's neighbour list)
    from ase.neighborlist import neighbor_list

    cutoff = calc._structure_check.cutoff
    sphere = 4 / 3 * np.pi * cutoff ** 3
    dense = bulk("Cu", "fcc", a=(4 * sphere / (3 * MAX_NEIGHBOURS)) ** (1 / 3), cubic=True)
    count = np.bincount(neighbor_list("i", dense, cutoff)).max()
    assert MAX_NEIGHBOURS < count < 10 * MAX_NEIGHBOURS
    dense.calc = calc
    with pytest.raises(UnsupportedSystemError, match=f"{count} neighbours"):
        dense.get_potential_energy()
    caplog.set_level(logging.WARNING, logger="ase_petft.systems")
    twins = Atoms("Cu2", positions=[[0, 0, 0], [0.02, 0, 0]])
    twins.calc = calc
    twins.get_potential_energy()
    far = bulk("Cu", "fcc", a=3.6).repeat(2)
    far.positions += 2e4
    far.calc = calc
    far.get_potential_energy()
    text = caplog.text
    assert "duplicated atoms" in text and "from the origin" in text
    ok = emt_frames(1, seed=3)[0]  # a normal cell: no error, no warning
    ok.calc = calc
    caplog.clear()
    ok.get_potential_energy()
    assert caplog.text == ""


class ShiftedEMT(EMT):
    """EMT plus a constant 1 eV per atom: another 'level of theory' with an offset."""

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["energy"] += len(self.atoms)
        self.results["free_energy"] = self.results["energy"]


def test_the_first_swap_of_a_new_variant_warns_about_the_energy_jump(parts, caplog):
    import logging

    from ase_petft.learner.gate import GateConfig

    calc, atoms, buffer, workdir = parts
    caplog.set_level(logging.INFO, logger="ase_petft.learner.onthefly")
    with OnTheFlyLearner(calc, ShiftedEMT(), buffer, workdir=workdir, select=every(1),
                         refit_every=4, background=False, tolerance=10.0,
                         config=FineTuneConfig(keep_parent_unless_better=False),
                         gate=GateConfig(probe_steps=0, harm_factor=1e9)) as learner:
        for _ in range(6):
            atoms.rattle(0.02, seed=len(learner.history))
            atoms.get_potential_energy()
            learner()
    swaps = [row for row in learner.history if row["event"] == "swap"]
    assert swaps, [row["event"] for row in learner.history]
    jump = swaps[0]["energy_jump_eV"]
    assert abs(jump) > 0.5 * len(atoms)  # the 1 eV/atom offset of the new level
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "jumped" in r.message]
    assert warnings and f"{jump:.4g} eV" in warnings[0].getMessage()


def _steps(learner, atoms, n: int) -> list:
    """``n`` steps of a small random walk, each labelled by ``learner``; the generations
    swapped in."""
    for _ in range(n):
        atoms.rattle(0.02, seed=len(learner.history))
        atoms.get_potential_energy()
        learner()
    return [row["generation"] for row in learner.history if row["event"] == "swap"]


def _probe_at_the_new_level(calc):
    """A structure on ``calc``, its starting forces and its ShiftedEMT energy (the new
    level the learner is to reach)."""
    probe = emt_frames(1, seed=91)[0]
    probe.calc = calc
    start_forces = probe.get_forces().copy()
    reference = probe.copy()
    reference.calc = ShiftedEMT()
    return probe, start_forces, reference.get_potential_energy()


def test_the_new_levels_energy_offset_is_swapped_in_when_every_heads_refit_is_refused(parts):
    """The tiny test PET's heads solver finds nothing to gain (leave-one-out) and keeps
    the head. The new variant must still end up at the new level's energies: the
    per-element offset its first refit fitted is judged and swapped in alone, forces
    untouched. (Before, the gate discarded it as "nothing to swap" and the variant kept
    predicting the parent level's energies, 1 eV/atom off here.)"""
    import json

    calc, atoms, buffer, workdir = parts
    probe, start_forces, target = _probe_at_the_new_level(calc)
    assert abs(probe.get_potential_energy() - target) > 0.5 * len(probe)  # parent level
    with OnTheFlyLearner(calc, ShiftedEMT(), buffer, workdir=workdir, select=every(1),
                         refit_every=4, background=False) as learner:
        for _ in range(6):
            atoms.rattle(0.02, seed=len(learner.history))
            atoms.get_potential_energy()
            learner()
    swaps = [row["generation"] for row in learner.history if row["event"] == "swap"]
    assert swaps, [(row["event"], row.get("reason")) for row in learner.history]
    decision = json.loads((workdir / f"gen-{swaps[0]:04d}" / "decision.json").read_text())
    assert decision["fit_metrics"]["linear_solver"]["selected"] == "parent"
    assert decision["checks"]["changed"]["passed"], decision["checks"]
    assert "offset" in decision["checks"]["changed"]["detail"]
    offset_only = FineTunableCalculator(workdir / f"gen-{swaps[0]:04d}" / "model.ckpt",
                                        variant="energy/emt")
    probe.calc = offset_only
    assert abs(probe.get_potential_energy() - target) < 0.05 * len(probe)
    np.testing.assert_allclose(probe.get_forces(), start_forces, atol=1e-5)


@pytest.mark.parametrize("keep", [True, False])
def test_a_refused_candidate_still_brings_the_new_levels_energy_offset(parts, keep):
    """A full refit that the gate refuses (a learning rate that wrecks the backbone)
    also fitted the new variant's per-element offset. The fall-back swaps in the running
    model with that offset alone: energies at the new level, forces untouched, the
    refused weights kept aside (refused.ckpt) for diagnosis."""
    import json

    from ase_petft import _metatrain
    from ase_petft.learner.gate import GateConfig

    calc, atoms, buffer, workdir = parts
    probe, start_forces, target = _probe_at_the_new_level(calc)
    bad = FineTuneConfig(method="full", learning_rate=5.0, num_epochs=3, seed=0,
                         divergence_factor=1e12)
    with OnTheFlyLearner(calc, ShiftedEMT(), buffer, workdir=workdir, select=every(1),
                         refit_every=5, background=False, holdout_fraction=0.4,
                         config=bad, gate=GateConfig(keep_rejected_checkpoints=keep)) as learner:
        swaps = _steps(learner, atoms, 5)
    assert swaps == [1], [(row["event"], row.get("reason")) for row in learner.history]
    folder = workdir / "gen-0001"
    decision = json.loads((folder / "decision.json").read_text())
    assert decision["accepted"] and decision["fallback"] == "offset_only"
    assert not decision["checks"]["holdout"]["passed"]  # the candidate itself was refused
    assert decision["checks"]["offset_only"]["passed"]
    assert (folder / "refused.ckpt").exists() == keep
    if keep:
        refused = _metatrain.load_model(folder / "refused.ckpt")
        assert not np.allclose(_metatrain.last_layer_vector(refused, calc.variant),
                               _metatrain.last_layer_vector(calc.model, calc.variant))
    probe.positions[0, 0] += 1e-9  # a new calculation: the live calculator
    assert abs(probe.get_potential_energy() - target) < 0.05 * len(probe)
    np.testing.assert_allclose(probe.get_forces(), start_forces, atol=1e-5)
    exported = folder / "model.pt"  # and the swapped generation's export agrees
    assert exported.is_file()
    # what the decision (and the report) give as the generation's errors are those of
    # the weights that run, not of the refused candidate: oracle, a fresh calculator on
    # the swapped checkpoint against the held-out labels
    from ase_petft.metrics import calculator_errors
    from ase_petft.report import generation_table, load_run

    held = [a for a in buffer.frames(calc.variant) if a.info.get("holdout")]
    held = held[:decision["n_holdout"]]  # those there were when the refit started
    running = FineTunableCalculator(folder / "model.ckpt", variant=calc.variant)
    oracle = calculator_errors(held, running)
    for key in ("forces_mae_meV_per_A", "energy_mae_meV_per_atom"):
        assert decision["new"][key] == pytest.approx(oracle[key], rel=1e-3, abs=1e-3)
    assert decision["refused_new"]["forces_mae_meV_per_A"] != pytest.approx(
        oracle["forces_mae_meV_per_A"], rel=1e-3)
    [row] = [r for r in generation_table(load_run(workdir)) if r["generation"] == 1]
    assert row["new_forces_mae_meV_per_A"] == pytest.approx(
        oracle["forces_mae_meV_per_A"], rel=1e-3)


def test_a_stale_energy_offset_is_refitted_when_the_candidate_is_refused(emt_checkpoint,
                                                                         tmp_path):
    """An existing head (no new variant, so no first-refit offset) whose labels sit at a
    constant 1 eV/atom above it: the held-out energy error is almost all offset. The
    refit's candidate is refused (a learning rate that wrecks it); the fall-back is the
    running model with its per-element offset refitted on the training labels, swapped
    in because the held-out energy error falls — energies at the labels' level, forces
    untouched."""
    import json

    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    probe, start_forces, target = _probe_at_the_new_level(calc)
    atoms = emt_frames(1, seed=5)[0]
    atoms.calc = calc
    bad = FineTuneConfig(method="full", learning_rate=5.0, num_epochs=3, seed=0,
                         divergence_factor=1e12)
    with LabelBuffer(tmp_path / "labels.h5", mode="w-") as buffer, OnTheFlyLearner(
            calc, ShiftedEMT(), buffer, workdir=tmp_path / "learner", select=every(1),
            refit_every=5, background=False, holdout_fraction=0.4, config=bad,
            rattle=RattleConfig(every=0)) as learner:  # 2 independent held-out structures
        swaps = _steps(learner, atoms, 5)
    assert swaps == [1], [(row["event"], row.get("reason")) for row in learner.history]
    folder = tmp_path / "learner" / "gen-0001"
    decision = json.loads((folder / "decision.json").read_text())
    assert decision["fallback"] == "offset_only"
    assert decision["fit_metrics"]["composition_correction_eV"] is None  # not a first refit
    assert not decision["checks"]["holdout"]["passed"]
    probe.positions[0, 0] += 1e-9  # a new calculation: the live calculator
    assert abs(probe.get_potential_energy() - target) < 0.05 * len(probe)
    np.testing.assert_allclose(probe.get_forces(), start_forces, atol=1e-5)


def test_swap_of_a_checkpoint_with_an_extra_head_says_so(emt_checkpoint, tmp_path, caplog):
    import logging

    from ase_petft.finetune import finetune

    extra = finetune(emt_checkpoint, emt_frames(4, seed=2), variant="energy/extra",
                     output_dir=tmp_path / "gen")
    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    assert "energy/extra" not in calc.variants
    caplog.set_level(logging.WARNING, logger="ase_petft.calculator")
    calc.swap_model(extra.checkpoint_path)
    assert "energy/extra" in caplog.text and "not swapped in" in caplog.text
    assert "energy/extra" not in calc.variants and calc.generation == 1


def test_sgd_refits_select_their_epoch_without_the_anchor_labels(parts):
    """A full refit keeps its best epoch on held-out labels: once there are held-out
    labels besides the anchor set, it selects on those only, and the anchor check
    judges it on labels nothing was selected on; the held-out check still sees all."""
    import json

    from ase_petft.learner import RattleConfig
    from ase_petft.learner.gate import GateConfig

    calc, atoms, buffer, workdir = parts
    with OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, select=every(1),
                         refit_every=3, background=False, tolerance=10.0,
                         holdout_fraction=0.34, rattle=RattleConfig(every=0),
                         config=FineTuneConfig(method="full", num_epochs=2, seed=0),
                         gate=GateConfig(probe_steps=0, harm_factor=1e9)) as learner:
        for i in range(12):
            atoms.rattle(0.03, seed=200 + i)
            atoms.get_potential_energy()
            learner()
    decisions = [json.loads(path.read_text())
                 for path in sorted(workdir.glob("gen-*/decision.json"))]
    assert len(decisions) >= 3
    n_anchor = decisions[0]["n_holdout"]  # the anchor: the held-out labels of refit 1
    assert decisions[0]["fit_metrics"]["after"]["n_frames"] == n_anchor  # nothing else yet
    for decision in decisions[1:]:
        assert decision["n_holdout"] > n_anchor
        assert decision["fit_metrics"]["after"]["n_frames"] == decision["n_holdout"] - n_anchor
        assert decision["holdout"]["old"]["n_frames"] == decision["n_holdout"]
        assert decision["anchor"]["old"]["n_frames"] == n_anchor


def test_gate_reuses_the_refits_own_evaluation_of_the_held_out_labels(parts):
    import json

    from ase_petft.learner import RattleConfig
    from ase_petft.learner.gate import GateConfig, evaluate_generation

    calc, atoms, buffer, workdir = parts
    with OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, select=every(1),
                         refit_every=5, background=False, tolerance=10.0, holdout_fraction=0.3,
                         config=FineTuneConfig(keep_parent_unless_better=False),
                         gate=GateConfig(probe_steps=0, harm_factor=1e9),
                         rattle=RattleConfig(every=0)) as learner:
        for i in range(6):
            atoms.rattle(0.03, seed=100 + i)
            atoms.get_potential_energy()
            learner()
    decision = json.loads((workdir / "gen-0001" / "decision.json").read_text())
    holdout = [a for a in buffer.frames("energy/emt") if a.info["holdout"]]
    assert decision["n_holdout"] == len(holdout) >= 1
    old, _ = evaluate_generation(workdir / "gen-0000" / "model.ckpt", holdout, "energy/emt")
    new, _ = evaluate_generation(workdir / "gen-0001" / "model.ckpt", holdout, "energy/emt")
    for key in ("forces_mae_meV_per_A", "energy_mae_meV_per_atom"):
        assert decision["old"][key] == pytest.approx(old[key], rel=1e-4)
        assert decision["new"][key] == pytest.approx(new[key], rel=1e-4, abs=1e-3)
