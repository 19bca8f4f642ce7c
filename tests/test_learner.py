"""OnTheFlyLearner in real ASE runs: EMT references, tiny PETs trained by `mtt train`."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from ase import units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin
from ase.md.verlet import VelocityVerlet
from ase.optimize import BFGS

from ase_petft import (ConfigError, FineTunableCalculator, FineTuneConfig, LabelBuffer,
                       LabellingError, PetftError)
from ase_petft.learner import (OnTheFlyLearner, RattleConfig, StepContext, always, every,
                               max_gap, min_gap, never, uncertainty_above)
from ase_petft.learner.gate import GateConfig
from ase_petft.learner.watchdog import SimulationUnstableError, WatchdogConfig

from ase_petft._provenance import content_key

from conftest import emt_frames, perturbed_checkpoint

HERE = pathlib.Path(__file__).parent
# float32 models: two evaluations of the same weights (a compiled graph specialised by
# many MD steps vs a fresh one, eager vs TorchScript) differ by rounding, seen up to
# 5e-6 eV on 8-atom cells and 3.6e-5 eV on these 32-atom ones (two fresh calculators
# on the same checkpoint differed by 2e-5); a wrong generation differs by meV
F32_EV_PER_ATOM = 2e-6


def _langevin(atoms, seed=0):
    return Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02,
                    rng=np.random.default_rng(seed), fixcm=False)


def _ctx(step, since=0, n=0, sigma=None, calls=None):
    def uncertainty():
        if calls is not None:
            calls.append(step)
        return sigma
    return StepContext(step=step, steps_since_label=since, n_labels=n, _uncertainty=uncertainty)


def test_policies_compose_and_evaluate_uncertainty_lazily():
    assert [s for s in range(1, 13) if every(4)(_ctx(s))] == [4, 8, 12]
    assert max_gap(3)(_ctx(1, since=3)) and not max_gap(3)(_ctx(1, since=2))
    calls = []
    policy = every(2) | uncertainty_above(0.05)
    assert policy(_ctx(2, sigma=0.0, calls=calls)) and calls == []  # short-circuit
    assert not policy(_ctx(3, sigma=0.01, calls=calls)) and calls == [3]
    assert policy(_ctx(5, sigma=0.2))
    assert uncertainty_above(0.05)(_ctx(1, sigma=None))  # nothing fitted yet: label
    assert (always() & never())(_ctx(1)) is False
    with pytest.raises(ConfigError, match="positive integer"):
        every(0)
    with pytest.raises(ConfigError, match="combine with other policies"):
        every(2) | 3
    with pytest.raises(ConfigError, match="for 50 meV/atom pass 0.05"):
        uncertainty_above(50)  # meV meant: σ is in eV/atom


@pytest.fixture
def run(emt_checkpoint, tmp_path):
    """A fresh calculator (new variant), buffer and CuNi atoms."""
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    atoms = emt_frames(1, seed=5)[0]
    atoms.calc = calc
    buffer = LabelBuffer(tmp_path / "labels.h5", mode="w-")
    yield calc, atoms, buffer, tmp_path / "learner"
    buffer.close()


def _accepting_learner(calc, buffer, workdir, *, background):
    """Labels every 2nd step, refits every 4 labels, accepts every refit (swaps are
    under test, not the gate): the tiny test PET would otherwise keep its head (LOSO)
    and its refits fail the do-no-harm bound. No rattled labels: one label per labelled
    step keeps the counts below simple."""
    return OnTheFlyLearner(calc, EMT(), buffer, select=every(2), refit_every=4,
                           rattle=RattleConfig(every=0),
                           background=background, workdir=workdir, holdout_fraction=0.25,
                           tolerance=10.0, config=FineTuneConfig(keep_parent_unless_better=False),
                           gate=GateConfig(probe_steps=0, harm_factor=1e9))


def test_md_with_inline_refits_swaps_in_the_same_calculator(run):
    calc, atoms, buffer, workdir = run
    learner = _accepting_learner(calc, buffer, workdir, background=False)
    dyn = _langevin(atoms)
    dyn.attach(learner, interval=1)
    dyn.run(24)
    learner.close()
    events = [row["event"] for row in learner.history]
    assert events.count("label") == len(buffer) >= 10
    assert events.count("swap") >= 2 and calc.generation >= 2
    assert atoms.calc is calc
    # a refit built on a swapped-in generation only after its review on the labels
    # collected while it ran (this permissive gate's tolerance keeps every one)
    reviews = [r for r in learner.history if r["event"] == "review"]
    sources = [json.loads(p.read_text())["source_generation"]
               for p in sorted(workdir.glob("gen-*/decision.json"))]
    assert {r["reviewed"] for r in reviews} == {g for g in sources if g > 0}
    assert all(r["passed"] and r["n_review_labels"] >= 3 for r in reviews)
    # results after a swap come from the swapped weights
    fresh = atoms.copy()
    fresh.calc = FineTunableCalculator(calc.checkpoint_path, variant="energy/emt",
                                       inherit_from=None)
    assert atoms.get_potential_energy() == pytest.approx(
        fresh.get_potential_energy(), rel=1e-6, abs=F32_EV_PER_ATOM * len(atoms))
    # rollback returns to the previous accepted generation, predictions included
    accepted = [r["generation"] for r in learner.history if r["event"] == "swap"]
    target = learner.rollback()
    assert target == accepted[-2] and calc.generation == target
    probe = emt_frames(1, seed=31)[0]
    probe.calc = FineTunableCalculator(workdir / f"gen-{target:04d}" / "model.ckpt",
                                       variant="energy/emt", inherit_from=None)
    expected = probe.get_potential_energy()
    probe.calc = calc
    assert probe.get_potential_energy() == pytest.approx(expected, rel=1e-6,
                                                         abs=F32_EV_PER_ATOM * len(probe))
    holdout = [a.info["holdout"] for a in buffer.frames("energy/emt")]
    assert holdout[0] and sum(holdout) == int(np.ceil(len(holdout) * 0.25 - 1e-9))
    meta = buffer[0].info
    assert meta["step"] == 2 and meta["generation"] == 0 and "predicted_energy" in meta
    assert meta["holdout"] is True  # the first label judges refits and calibrates σ


def test_in_process_refits_read_no_checkpoint_and_swap_what_they_wrote(run, monkeypatch):
    """A background refit on a thread trains a copy of the live model, judges it (anchor,
    stability probe) and swaps the trained module: no checkpoint is read, and the live
    weights afterwards equal the accepted generation's checkpoint bit for bit."""
    calc, atoms, buffer, workdir = run
    check_in_memory_refits(calc, atoms, buffer, workdir, monkeypatch)


def test_the_first_refit_is_probed_on_the_simulations_structure(run):
    """Attached with dyn.attach (the learner knows no atoms, only the calculator's), the
    do-no-harm forces on rattled label copies went through the calculator right before
    the stability probe took the calculator's structure: the probe got a copy without
    momenta and silently did not run. Now it runs, from the simulation's structure."""
    calc, atoms, buffer, workdir = run
    learner = OnTheFlyLearner(
        calc, EMT(), buffer, select=every(2), refit_every=4, background=False,
        workdir=workdir, holdout_fraction=0.25, tolerance=10.0, rattle=RattleConfig(every=0),
        config=FineTuneConfig(keep_parent_unless_better=False),
        gate=GateConfig(probe_steps=5, probe_max_drift_eV_per_atom=10.0, harm_factor=1e9))
    dyn = _langevin(atoms)
    dyn.attach(learner, interval=1)
    dyn.run(10)
    learner.close()
    decision = json.loads((workdir / "gen-0001" / "decision.json").read_text())
    assert "stability" in decision["checks"]
    assert calc.atoms is not None and np.array_equal(calc.atoms.positions, atoms.positions)


def test_an_abandoned_refit_that_finishes_later_is_never_swapped_in(run, emt_checkpoint,
                                                                   monkeypatch):
    """A thread cannot be stopped: after close(abandon=True) (an exception inside
    ``with learner:``) the refit runs on and writes an accepted decision. A learner
    started later on the same work directory, in the same process, must not resume it."""
    import threading

    from ase_petft.learner import gate

    calc, atoms, buffer, workdir = run
    release, real_refit = threading.Event(), gate.run_refit
    monkeypatch.setattr(gate, "run_refit", lambda spec: release.wait(60) and real_refit(spec))
    learner = _accepting_learner(calc, buffer, workdir, background=True)
    dyn = _langevin(atoms)
    learner.attach(dyn)
    while not learner.refit_in_progress:
        dyn.run(1)
    learner.close(abandon=True)  # the refit has not even started training
    release.set()
    decision = workdir / "gen-0001" / "decision.json"
    deadline = time.time() + 120
    while not decision.is_file() and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(decision.read_text())["accepted"]  # it did finish, accepted
    again = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    with OnTheFlyLearner(again, EMT(), buffer, workdir=workdir, background=False) as resumed:
        assert again.generation == 0
        with pytest.raises(ConfigError, match="these can: \\[0\\]"):
            resumed.rollback(1)


def check_in_memory_refits(calc, atoms, buffer, workdir, monkeypatch):
    """(Also run on cuda by test_cuda.py.)"""
    from ase_petft import _metatrain

    real_load, read = _metatrain.load_model, []

    def spy(path, *args, **kwargs):
        read.append(pathlib.Path(path).name)
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(_metatrain, "load_model", spy)
    learner = OnTheFlyLearner(
        calc, EMT(), buffer, select=every(2), refit_every=3, background=True,
        workdir=workdir, holdout_fraction=0.25, tolerance=10.0,
        config=FineTuneConfig(keep_parent_unless_better=False),
        gate=GateConfig(probe_steps=5, probe_max_drift_eV_per_atom=10.0, harm_factor=1e9))
    dyn = _langevin(atoms)
    learner.attach(dyn, interval=1)
    dyn.run(16)  # 8 labels: a refit after 3, more when it is done
    learner.wait()
    learner.flush()  # the labels left over: one more refit, from the swapped generation
    learner.close()
    monkeypatch.undo()
    assert read == []
    swaps = [r["generation"] for r in learner.history if r["event"] == "swap"]
    assert len(swaps) >= 2 and calc.generation == swaps[-1]
    decision = json.loads((workdir / f"gen-{swaps[-1]:04d}" / "decision.json").read_text())
    assert decision["checks"]["stability"]["passed"]
    assert "anchor" in decision["checks"]  # judged against the running model in memory
    harm = decision["no_harm"]  # the do-no-harm numbers, as numbers
    assert 0 < harm["moved_off_data_meV_per_A"] <= harm["bound_meV_per_A"]
    assert f"{harm['moved_off_data_meV_per_A']:.1f} meV/Å" in decision["checks"]["no_harm"]["detail"]
    written = real_load(workdir / f"gen-{swaps[-1]:04d}" / "model.ckpt").state_dict()
    live = calc.model.state_dict()
    assert written.keys() == live.keys()
    for name, tensor in written.items():
        assert torch.equal(tensor, live[name].cpu()), name
    # accepted generations carry the verified metatomic export, read here by metatomic
    # itself; rejected ones none (the export is skipped for them)
    from metatomic_ase import MetatomicCalculator

    decided = [json.loads(p.read_text()) for p in sorted(workdir.glob("gen-*/decision.json"))]
    for entry in decided:
        exported = workdir / f"gen-{entry['generation']:04d}" / "model.pt"
        assert exported.is_file() == entry["accepted"], entry["generation"]
    suffix = None if calc.variant == "energy" else calc.variant.split("/", 1)[1]
    probe = atoms.copy()
    probe.calc = MetatomicCalculator(str(workdir / f"gen-{swaps[-1]:04d}" / "model.pt"),
                                     variants={"energy": suffix}, device="cpu",
                                     uncertainty_threshold=None)
    assert probe.get_potential_energy() == pytest.approx(
        calc.get_potential_energy(atoms), abs=F32_EV_PER_ATOM * len(atoms))


def test_flush_refits_on_the_labels_left_over(run):
    """Labels that arrived after the last refit (fewer than refit_every) are trained on
    by flush() at the end of a run, and nothing happens when none are left."""
    calc, atoms, buffer, workdir = run
    learner = _accepting_learner(calc, buffer, workdir, background=True)
    dyn = _langevin(atoms)
    learner.attach(dyn, interval=1)
    dyn.run(12)  # 6 labels: one refit (at 4), 2 left over
    learner.wait()
    starts = [r for r in learner.history if r["event"] == "refit_start"]
    assert len(starts) == 1 and len(buffer) == 6
    learner.flush()
    starts = [r for r in learner.history if r["event"] == "refit_start"]
    assert len(starts) == 2
    assert starts[-1]["n_train"] + starts[-1]["n_holdout"] == len(buffer)
    decided = [r for r in learner.history if r["event"] in ("swap", "refit_rejected")]
    assert len(decided) == 2 and not learner.refit_in_progress
    learner.flush()  # nothing new: no refit
    assert len([r for r in learner.history if r["event"] == "refit_start"]) == 2
    learner.close()


def test_background_refit_lets_md_go_on(run):
    calc, atoms, buffer, workdir = run
    learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(1), refit_every=6,
                              background=True, workdir=workdir, max_labels=8)
    during = []  # for every MD step: was a refit running while the step was taken?
    threads = []  # torch threads of the simulation's thread at each step
    before = torch.get_num_threads()
    dyn = _langevin(atoms)
    dyn.attach(lambda: threads.append(torch.get_num_threads()), interval=1)
    learner.attach(dyn, interval=1)
    dyn.attach(lambda: during.append(learner.refit_in_progress), interval=1)
    dyn.run(12)
    deadline = time.time() + 120
    while learner.refit_in_progress and time.time() < deadline:
        dyn.run(1)  # the observer above records the real state of the refit
    learner.close()
    assert sum(during) >= 2  # MD steps were taken while the refit was running
    assert torch.get_num_threads() == before  # the simulation got its threads back
    if (os.cpu_count() or 1) <= before:  # cores shared with the refit while it ran
        assert min(threads) < before
    assert len(buffer) == 8  # the budget
    assert any(row["event"] in ("swap", "refit_rejected") for row in learner.history)


def _absurd_refits(calc, atoms, buffer, workdir, gate=None):
    """5 MD steps, each labelled, and one full refit with a learning rate that wrecks
    the model (the gate must refuse it). Returns the learner."""
    atoms.calc = calc
    bad = FineTuneConfig(method="full", learning_rate=5.0, num_epochs=3, seed=0,
                         divergence_factor=1e12)
    learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(1), refit_every=5,
                              background=False, workdir=workdir, holdout_fraction=0.4,
                              config=bad, gate=gate)
    dyn = _langevin(atoms)
    dyn.attach(learner, interval=1)
    dyn.run(5)
    return learner


def test_absurd_refit_is_rejected_and_predictions_stay(run, emt_checkpoint):
    """On an existing head (no new level, so no energy offset to fall back to; one
    held-out structure and its rattled copy, too few to call its offset stale), a refit
    that wrecks the model is refused and nothing changes."""
    _, atoms, buffer, workdir = run
    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    probe = emt_frames(1, seed=77)[0]
    probe.calc = calc
    before = probe.get_potential_energy()
    learner = _absurd_refits(calc, atoms, buffer, workdir)
    events = [row["event"] for row in learner.history]
    assert "refit_rejected" in events or "refit_failed" in events, events
    assert calc.generation == 0
    assert not list(workdir.glob("gen-*/model.pt"))  # nothing swapped in: no export
    probe.positions[0, 0] += 1e-9
    assert probe.get_potential_energy() == pytest.approx(before, rel=1e-7)


def test_rejected_checkpoints_are_deleted_when_asked_and_the_record_stays(run, emt_checkpoint):
    """GateConfig(keep_rejected_checkpoints=False): a refused candidate's model.ckpt goes
    once its decision is written; decision, metrics and config stay. The starting
    generation and the calculator are untouched (an existing head: no offset fall-back)."""
    _, atoms, buffer, workdir = run
    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    learner = _absurd_refits(calc, atoms, buffer, workdir,
                             gate=GateConfig(keep_rejected_checkpoints=False))
    rejected = [row["generation"] for row in learner.history
                if row["event"] == "refit_rejected"]
    assert rejected, [row["event"] for row in learner.history]
    for generation in rejected:
        folder = workdir / f"gen-{generation:04d}"
        assert not (folder / "model.ckpt").exists() and not (folder / "model.pt").exists()
        for name in ("decision.json", "metrics.json", "config.json"):
            assert (folder / name).is_file(), name
        assert not json.loads((folder / "decision.json").read_text())["accepted"]
    assert (workdir / "gen-0000" / "model.ckpt").is_file() and calc.generation == 0
    with pytest.raises(ConfigError, match="keep_rejected_checkpoints"):
        GateConfig(keep_rejected_checkpoints="no")


class FlakyEMT(EMT):
    """Fails on every third call, like an SCF that does not converge."""

    calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        FlakyEMT.calls += 1
        if FlakyEMT.calls % 3 == 0:
            raise RuntimeError("SCF not converged")
        super().calculate(atoms, properties, system_changes or [])


def _mean_force_error(checkpoint, frames) -> float:
    """Force MAE (eV/Å) of a checkpoint's ``energy`` head against the frames' EMT forces."""
    calc = FineTunableCalculator(checkpoint, variant="energy")
    errors = []
    for frame in frames:
        probe = frame.copy()
        probe.calc = calc
        errors.append(np.abs(probe.get_forces() - frame.get_forces()).ravel())
    return float(np.mean(np.concatenate(errors)))


def test_a_generation_worse_on_the_labels_it_met_is_retracted(run, emt_checkpoint, caplog,
                                                              monkeypatch):
    """Without held-out labels, probe or do-no-harm bound the gate lets a wrecking full
    refit through. The labels collected while it runs (trained on by neither it nor the
    generation it replaced) show it worse: before the next refit it is retracted, the
    learner rolls back, the next refit starts from the generation it replaced, and the
    retracted one is never run again (not by rollback(), not on resume). In one process
    no checkpoint is read back for any of it (refits, gate, review, rollback)."""
    from ase_petft import _metatrain

    _, _, buffer, workdir = run
    calc = FineTunableCalculator(emt_checkpoint, variant="energy")
    reads = []
    real_load = _metatrain.load_model
    monkeypatch.setattr(_metatrain, "load_model",
                        lambda path, *a, **kw: reads.append(path) or real_load(path, *a, **kw))
    bad = FineTuneConfig(method="full", learning_rate=5.0, num_epochs=3, seed=0,
                         divergence_factor=1e12)
    learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(1), refit_every=4,
                              background=False, workdir=workdir, holdout_fraction=0.0,
                              config=bad, rattle=RattleConfig(every=0),
                              gate=GateConfig(probe_steps=0, harm_factor=1e9))
    frames = emt_frames(9, seed=31)
    for step, frame in enumerate(frames[:4]):
        learner.record_label(frame, step=step, generation=calc.generation)
    learner.poll()
    assert calc.generation == 1  # the wrecking refit, let through
    # two labels asked before the swap, two under generation 1: a refit is due, but
    # generation 1 has too few labels of its own to be judged, so the refit waits
    for step, frame in enumerate(frames[4:8], start=4):
        learner.record_label(frame, step=step, generation=0 if step < 6 else 1)
    learner.poll()
    assert [r for r in learner.history if r["event"] == "refit_start"][-1]["generation"] == 1
    learner.record_label(frames[8], step=8, generation=1)
    learner.poll()  # review of generation 1, rollback, refit 2 from generation 0
    with caplog.at_level("INFO", logger="ase_petft.learner.onthefly"):
        learner.close()
    assert reads == []  # weights stayed in memory from load to close
    assert "generation 2 runs now" in caplog.text  # unreviewed: nothing labelled after it
    review = json.loads((workdir / "gen-0001" / "review.json").read_text())
    assert review["passed"] is False and review["n_labels"] == 3
    # oracle: the two checkpoints against EMT on the labels generation 1 met
    worse = _mean_force_error(workdir / "gen-0001" / "model.ckpt", frames[6:])
    before = _mean_force_error(workdir / "gen-0000" / "model.ckpt", frames[6:])
    assert worse > 2 * before
    assert review["new"]["forces_mae_meV_per_A"] == pytest.approx(1e3 * worse, rel=1e-3)
    assert review["old"]["forces_mae_meV_per_A"] == pytest.approx(1e3 * before, rel=1e-3)
    events = [(row["event"], row.get("generation")) for row in learner.history]
    assert events.index(("rollback", 0)) < events.index(("refit_start", 2))
    second = json.loads((workdir / "gen-0002" / "decision.json").read_text())
    assert second["source_generation"] == 0
    with pytest.raises(ConfigError, match="retracted"):
        learner.rollback(1)
    again = FineTunableCalculator(emt_checkpoint, variant="energy")
    with OnTheFlyLearner(again, EMT(), buffer, workdir=workdir, background=False) as resumed:
        assert again.generation == 2
        assert resumed.rollback() == 0  # the one before generation 2 that may run
    from ase_petft.report import generation_table, load_run

    rows = {r["generation"]: r for r in generation_table(load_run(workdir))}
    assert rows[1]["accepted"] and rows[1]["review"] == "retracted"
    assert rows[2]["review"] is None  # nothing labelled under it


def test_failing_reference_is_recorded_and_run_goes_on(run):
    calc, atoms, buffer, workdir = run
    learner = OnTheFlyLearner(calc, FlakyEMT(), buffer, select=every(1), refit_every=100,
                              background=False, workdir=workdir, rattle=RattleConfig(every=0))
    dyn = _langevin(atoms)
    dyn.attach(learner, interval=1)
    dyn.run(8)
    failures = buffer.failures()
    assert len(failures) >= 2
    assert "SCF not converged" in str(failures[0].info)
    assert len(buffer) + len(failures) == 9  # every step was either labelled or recorded


def test_rattled_copies_are_labelled_next_to_the_trajectory(run):
    """Every 2nd labelled step also labels a rattled copy: EMT's own labels of positions
    displaced by about sigma from the step's structure, held out with their parent,
    within the label budget."""
    calc, atoms, buffer, workdir = run
    steps = []
    reference = RecordingEMT()
    learner = OnTheFlyLearner(calc, reference, buffer, select=every(1), refit_every=1000,
                              background=False, workdir=workdir, max_labels=8,
                              holdout_fraction=0.25, rattle=RattleConfig(every=2, sigma_A=0.1))
    dyn = _langevin(atoms)
    dyn.attach(lambda: steps.append(atoms.positions.copy()), interval=1)
    learner.attach(dyn)
    dyn.run(10)
    frames = list(buffer.frames("energy/emt"))
    rattled = [i for i, a in enumerate(frames) if a.info.get("rattled")]
    # labels of steps 0, 1, 2, 3, 4: copies after the 1st, 3rd and 5th; budget 8
    assert len(frames) == 8 == len(reference.seen) and rattled == [1, 4, 7]
    for i in rattled:
        step = frames[i].info["step"]
        assert np.allclose(frames[i - 1].positions, steps[step])  # the step's structure ...
        shift = frames[i].positions - steps[step]
        assert 0.05 < shift.std() < 0.2 and abs(shift.mean()) < 0.05  # ... rattled by sigma
        oracle = frames[i].copy()
        oracle.calc = EMT()
        assert frames[i].get_potential_energy() == pytest.approx(oracle.get_potential_energy())
        assert np.allclose(frames[i].get_forces(), oracle.get_forces())
        # held out exactly when the structure it was rattled from is: no near-copy of a
        # training label among the gate's labels
        assert frames[i].info["holdout"] == frames[i - 1].info["holdout"]
        parent = frames[i - 1]  # the solver leaves the pair out together (its group key)
        assert frames[i].info["rattled_from"] == content_key(
            parent.numbers, parent.positions, parent.cell, parent.pbc)
    assert frames[0].info["holdout"] and frames[1].info["holdout"]  # the first pair
    assert sum(bool(a.info.get("holdout")) for a in frames) == 2  # 25 % of 8
    with pytest.raises(ConfigError, match="sigma_A must be"):
        RattleConfig(sigma_A=0.0)
    with pytest.raises(ConfigError, match="rattle must be a RattleConfig"):
        OnTheFlyLearner(calc, EMT(), buffer, rattle=4, workdir=workdir / "other")


@pytest.mark.parametrize("kind", ["verlet", "bfgs"])
def test_works_with_verlet_and_bfgs(run, kind):
    calc, atoms, buffer, workdir = run
    learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(2), refit_every=3,
                              background=False, workdir=workdir)
    dyn = VelocityVerlet(atoms, 1 * units.fs) if kind == "verlet" else BFGS(atoms, logfile=None)
    dyn.attach(learner, interval=1)
    dyn.run(steps=8) if kind == "verlet" else dyn.run(fmax=1e-6, steps=8)
    assert len(buffer) >= 3 and any(r["event"] == "refit_start" for r in learner.history)


@pytest.mark.parametrize("method", ["posterior", "llpr"])
def test_uncertainty_is_larger_out_of_distribution(emt_checkpoint, method):
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt", uncertainty=method)
    calc.fit_uncertainty(emt_frames(12, seed=1), emt_frames(6, seed=2))
    inside = [calc.get_energy_uncertainty(a) for a in emt_frames(4, seed=3)]
    outside = [calc.get_energy_uncertainty(a) for a in emt_frames(4, seed=4, rattle=0.35)]
    assert np.median(outside) > 1.5 * np.median(inside)
    with pytest.raises(PetftError, match="not fitted"):
        FineTunableCalculator(emt_checkpoint).get_energy_uncertainty(emt_frames(1, seed=0)[0])
    with pytest.raises(ConfigError, match="uncertainty method"):
        FineTunableCalculator(emt_checkpoint, uncertainty="ensemble")


def test_a_bad_uncertainty_fit_is_refused_and_keeps_the_fitted_one(emt_checkpoint):
    """No labels, or a label with an element the model lacks: a TrainingDataError
    naming it, and σ stays what the last good fit gave (before, the bad labels were
    kept and every later σ failed deep inside metatrain)."""
    from ase_petft.errors import TrainingDataError

    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    gold = emt_frames(1, seed=3, elements=("Cu", "Au"))[0]
    with pytest.raises(TrainingDataError, match="got none"):
        calc.fit_uncertainty([])
    probe = emt_frames(1, seed=9)[0]
    with pytest.raises(ConfigError, match="not fitted yet"):
        calc.get_energy_uncertainty(probe)
    train, held = emt_frames(6, seed=1), emt_frames(3, seed=2)
    calc.fit_uncertainty(train, held)
    sigma = calc.get_energy_uncertainty(probe)
    with pytest.raises(TrainingDataError, match=r"frames\[6\] contains element\(s\) \['Au'\]"):
        calc.fit_uncertainty(train + [gold], held)
    with pytest.raises(TrainingDataError, match=r"calibration\[0\] contains element"):
        calc.fit_uncertainty(train, [gold])
    assert calc.get_energy_uncertainty(probe) == sigma
    calc.fit_uncertainty(iter(train), (a for a in held))  # one-shot iterators are read once
    assert calc.get_energy_uncertainty(probe) == pytest.approx(sigma, rel=1e-12)
    cached = len(calc._uncertainty._features)
    for atoms in emt_frames(5, seed=11):  # σ of new structures, as MD asks it each step
        atoms.calc = calc
        atoms.get_forces()
        calc.get_energy_uncertainty(atoms)
    assert len(calc._uncertainty._features) == cached  # no cache growing with the run


def test_a_buffer_label_the_model_cannot_read_is_refused_at_start(run):
    """A label of the variant with an element the model lacks, already in the buffer,
    would fail every refit far from its cause: the learner refuses to start, naming
    the label and the buffer."""
    calc, _, buffer, workdir = run
    gold = emt_frames(1, seed=3, elements=("Cu", "Au"))[0]
    buffer.append(emt_frames(1, seed=4)[0], variant=calc.variant)
    buffer.append(gold, variant=calc.variant)
    with pytest.raises(ConfigError, match=r"label 1 of 'energy/emt' in buffer .*\['Au'\]"):
        OnTheFlyLearner(calc, EMT(), buffer, workdir=workdir, background=False)
    buffer.append(emt_frames(1, seed=5)[0], variant="energy")  # other variants: not its labels
    assert len(buffer) == 3


def test_posterior_sigma_is_calibrated_on_the_held_out_labels(emt_checkpoint):
    """Maximum-likelihood calibration on the calibration labels less their best
    per-element energy offset (the offset between levels moves no force): there
    Σ (error / σ)² over the degrees of freedom left is 1 — measured independently, from
    the calculator's own predictions and a least-squares offset of its errors."""
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    train, held_out = emt_frames(10, seed=1), emt_frames(6, seed=2)
    calc.fit_uncertainty(train, held_out)
    errors, sigmas, fractions = [], [], []
    for frame in held_out:
        probe = frame.copy()
        probe.calc = calc
        errors.append((probe.get_potential_energy() - frame.get_potential_energy()) / len(frame))
        sigmas.append(calc.get_energy_uncertainty(frame))
        fractions.append([np.mean(frame.numbers == z) for z in (28, 29)])
    fractions, errors = np.array(fractions), np.array(errors)
    offset, *_ = np.linalg.lstsq(fractions, errors, rcond=None)
    shape = errors - fractions @ offset
    assert np.sum((shape / np.array(sigmas)) ** 2) / (len(errors) - 2) == pytest.approx(1.0, rel=1e-3)


def _copies(frames, keys=("energy", "forces", "stress")):
    """Labelled copies of ``frames`` keeping only the results named in ``keys``."""
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for frame in frames:
        atoms = frame.copy()
        atoms.calc = SinglePointCalculator(atoms, **{k: frame.calc.results[k] for k in keys})
        out.append(atoms)
    return out


def test_uncertainty_refit_sees_frames_changed_in_place(emt_checkpoint):
    """Labels are converted once per frame object between fits (the learner passes its
    growing list after every label); a frame relabelled in place must not keep its old
    label: σ equals that of a fresh calculator fitted on copies of the changed frames."""
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    train, held = emt_frames(6, seed=1), emt_frames(3, seed=2)
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    calc.fit_uncertainty(train, held)
    moved = held[0]
    moved.positions += 0.05
    moved.calc = EMT()
    moved.calc = SinglePointCalculator(moved, energy=moved.get_potential_energy(),
                                       forces=moved.get_forces(), stress=moved.get_stress())
    calc.fit_uncertainty(train, held)
    fresh = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    fresh.fit_uncertainty(_copies(train), _copies(held))
    probe = emt_frames(1, seed=9)[0]
    assert calc.get_energy_uncertainty(probe) == pytest.approx(
        fresh.get_energy_uncertainty(probe), rel=1e-9)


def test_posterior_precision_is_the_heads_refits_normal_matrix(emt_checkpoint, monkeypatch):
    """The posterior is Bayesian regression on the heads refit's own rows (energy per
    atom and forces, the latter weighted by FORCE_ROWS): its precision AᵀWA + λI, along
    random directions v of the last-layer weights, equals what the model's predictions
    say once moved by v — exact, since they are linear in those weights:
    vᵀAᵀWAv = Σ_s (ΔE_s/N_s)² + FORCE_ROWS |ΔF_s|²/(3 N_s). Labels added
    one fit at a time give the same matrix as all at once, and after a heads refit (same
    backbone) only the new label's rows are computed."""
    import copy

    from ase_petft import _metatrain
    from ase_petft.uncertainty import FORCE_ROWS

    train, held = _copies(emt_frames(5, seed=1), ("energy", "forces")), emt_frames(3, seed=2)
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    for n in range(2, len(train) + 1):
        calc.fit_uncertainty(train[:n], held)
    precision = np.linalg.inv(calc.uncertainty_state()["inverse"])
    at_once = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    at_once.fit_uncertainty(train, held)
    np.testing.assert_allclose(np.linalg.inv(at_once.uncertainty_state()["inverse"]),
                               precision, rtol=1e-6, atol=1e-9 * np.abs(precision).max())

    model, variant = calc.model, calc.variant
    before = _metatrain.predict(model, train, variant, stress=False)
    rng = np.random.default_rng(0)
    n_par = len(_metatrain.last_layer_vector(model, variant))
    for _ in range(3):
        v = rng.normal(scale=0.1, size=n_par)
        moved = copy.deepcopy(model)
        _metatrain.apply_heads_update(moved, variant, v)
        after = _metatrain.predict(moved, train, variant, stress=False)
        expected = sum(((a["energy"] - b["energy"]) / len(f)) ** 2
                       + FORCE_ROWS * np.sum((a["forces"] - b["forces"]) ** 2) / (3 * len(f))
                       for a, b, f in zip(after, before, train))
        assert v @ precision @ v == pytest.approx(expected, rel=1e-2)

    calc.finetune(emt_frames(6, seed=5), FineTuneConfig(keep_parent_unless_better=False))
    assert calc.generation == 1
    computed = []
    real_rows = _metatrain.heads_rows
    monkeypatch.setattr(_metatrain, "heads_rows", lambda model, variant, labels, **kw:
                        computed.append(len(labels)) or real_rows(model, variant, labels, **kw))
    calc.fit_uncertainty(train + held[:1], held[1:])
    assert computed == [1]


def test_sigma_of_the_step_just_evaluated_reuses_the_force_pass(emt_checkpoint, monkeypatch):
    """While the posterior is fitted, the force pass's backward also gives the energy's
    gradient with respect to the last-layer weights: σ of that structure needs no pass
    of its own, and equals σ from its own pass (the eager module's autograd, the
    independent oracle) to float32 rounding — for a periodic cell with stress and after
    a hot swap. Any other structure still gets its own pass; the live module's
    parameters never keep requires_grad or a gradient."""
    from ase_petft import _metatrain

    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    assert not calc._uncertainty.wants_features
    calc.fit_uncertainty(emt_frames(8, seed=1), emt_frames(4, seed=2))
    own_passes = []
    real = _metatrain.energy_features
    monkeypatch.setattr(_metatrain, "energy_features", lambda model, variant, atoms_list:
                        own_passes.append(len(atoms_list)) or real(model, variant, atoms_list))
    oracle = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    for generation in (0, 1):
        oracle.load_uncertainty_state(calc.uncertainty_state())
        for atoms in emt_frames(3, seed=7 + generation):
            atoms.calc = calc
            atoms.get_forces()
            atoms.get_stress()
            phi = real(calc.model, calc.variant, [atoms])[0]
            np.testing.assert_allclose(calc._last_features(atoms), phi, rtol=1e-4,
                                       atol=1e-5 * np.abs(phi).max())
            own_passes.clear()
            sigma = calc.get_energy_uncertainty(atoms)
            assert own_passes == []  # served by the force pass
            assert sigma == pytest.approx(oracle.get_energy_uncertainty(atoms), rel=1e-4)
            assert own_passes == [1]  # the oracle evaluated nothing: its own pass
            moved = atoms.copy()
            moved.positions[0, 0] += 0.01
            assert calc._last_features(moved) is None
            calc.get_energy_uncertainty(moved)
            assert own_passes == [1, 1]
            assert not any(p.requires_grad or p.grad is not None
                           for p in calc.model.parameters())
        calc.finetune(emt_frames(6, seed=5), FineTuneConfig(keep_parent_unless_better=False),
                      export=False)
        assert calc._last_features(atoms) is None  # the weights it came from are gone
        calc.get_energy_uncertainty(atoms)  # refits the posterior for generation 1
        oracle.swap_model(calc.checkpoint_path)


def _run_script(checkpoint, workdir, steps, refit_every, *, kill_after=None):
    cmd = [sys.executable, str(HERE / "_learner_run.py"), str(checkpoint), str(workdir),
           str(steps), str(refit_every)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    lines = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          text=True, env=env) as proc:
        for line in proc.stdout:
            lines.append(line.strip())
            if kill_after and kill_after(lines):
                proc.send_signal(signal.SIGKILL)
                break
        proc.wait(timeout=300)
    return lines


def test_sigkill_then_rerun_resumes_without_repeating_references(emt_checkpoint, tmp_path):
    calls = tmp_path / "calls.log"

    def after_a_swap(lines):
        return any(line.startswith("STEP") and line.split()[2] != "0" for line in lines) \
            and sum(line.startswith("STEP") for line in lines) >= 22

    first = _run_script(emt_checkpoint, tmp_path, 40, 4, kill_after=after_a_swap)
    assert "DONE" not in first
    with LabelBuffer(tmp_path / "labels.h5", mode="r") as buffer:
        labelled_before = len(buffer)
    calls_before = len(calls.read_text().splitlines())
    assert labelled_before >= 8 and calls_before >= labelled_before
    generation_before = int([ln for ln in first if ln.startswith("STEP")][-1].split()[2])

    second = _run_script(emt_checkpoint, tmp_path, 40, 4)
    assert second[-1] == "DONE"
    assert int(second[0].split()[2]) >= generation_before  # continues from accepted gen
    with LabelBuffer(tmp_path / "labels.h5", mode="r") as buffer:
        frames = list(buffer.frames())
        labelled_after = len(frames)
    calls_after = len(calls.read_text().splitlines())
    new_calls = calls_after - calls_before
    assert labelled_after > labelled_before  # all old labels kept, new ones added
    assert new_calls == labelled_after - labelled_before  # no structure labelled twice
    history = [json.loads(line) for line in
               (tmp_path / "learner" / "history.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in history]
    assert steps == sorted(steps), "step numbers go back after a restart"
    assert max(row["step"] for row in frames_info(frames)) > 40  # the 2nd run counts on


def frames_info(frames):
    return [a.info for a in frames]


class CountingEMT(EMT):
    """Counts calls per tag at class level: label() runs on a deep copy of it."""

    counts: dict = {}

    def __init__(self, tag):
        super().__init__()
        self.tag = tag
        CountingEMT.counts[tag] = 0

    @property
    def count(self):
        return CountingEMT.counts[self.tag]

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        CountingEMT.counts[self.tag] += 1
        super().calculate(atoms, properties, system_changes or [])


def test_replayed_structures_are_taken_from_the_buffer(emt_checkpoint, tmp_path):
    def replay(reference):
        calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
        atoms = emt_frames(1, seed=5)[0]
        atoms.calc = calc
        with LabelBuffer(tmp_path / "labels.h5", mode="a") as buffer:
            learner = OnTheFlyLearner(calc, reference, buffer, select=every(2),
                                      refit_every=1000, background=False,
                                      workdir=tmp_path / "learner")
            dyn = _langevin(atoms, seed=3)
            dyn.attach(learner, interval=1)
            dyn.run(10)
            return len(buffer), learner.history

    first, second = CountingEMT("first"), CountingEMT("second")
    n_first, _ = replay(first)
    n_second, history = replay(second)
    # 5 labelled steps, and rattled copies of the 1st and 5th (RattleConfig(every=4))
    assert first.count >= n_first == 7
    assert second.count == 0 and n_second == n_first
    assert [row["event"] for row in history].count("label_reused") == 5


class RecordingEMT(EMT):
    """EMT that records every structure it is asked to label (in a class attribute:
    ``label()`` works on a copy of the reference, never on the caller's object)."""

    seen: list = []

    def __init__(self, fail: bool = False, works_for: int = 0):
        super().__init__()
        self.fail, self.works_for = fail, works_for  # fail after works_for good calls
        RecordingEMT.seen = []

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        RecordingEMT.seen.append(atoms.get_positions().copy())
        if self.fail and len(RecordingEMT.seen) > self.works_for:
            raise RuntimeError("SCF not converged")
        super().calculate(atoms, properties, system_changes or [])


def test_watchdog_rolls_back_an_exploding_model_with_no_reference_call_on_debris(run):
    calc, atoms, buffer, workdir = run
    reference = RecordingEMT()
    learner = OnTheFlyLearner(calc, reference, buffer, select=every(1), refit_every=1000,
                              background=False, workdir=workdir,
                              watchdog=WatchdogConfig(snapshot_every=4))
    bad = perturbed_checkpoint(calc.save_checkpoint(workdir.parent / "live.ckpt"),
                               workdir.parent / "bad.ckpt", seed=3, scale=30.0,
                               only="last_layers.energy/emt")
    dyn = _langevin(atoms)
    learner.attach(dyn)
    sabotaged = []

    def sabotage():  # a corrupted generation arrives between two steps
        if dyn.nsteps == 10 and not sabotaged:
            sabotaged.append(calc.swap_model(bad))

    dyn.attach(sabotage)
    dyn.run(16)
    events = [row["event"] for row in learner.history]
    assert sabotaged == [1] and "unphysical" in events and "restored" in events
    assert calc.generation == 0  # back on the last generation that ran healthily
    unphysical_steps = {r["step"] for r in learner.history if r["event"] == "unphysical"}
    labelled_steps = {r["step"] for r in learner.history if r["event"] == "label"}
    assert not unphysical_steps & labelled_steps
    # no call on the debris: every call is a label (rattled copies share their step)
    assert len(reference.seen) == events.count("label") == len(buffer)
    # the restored structure is sane under the good model (oracle: EMT agrees roughly)
    probe = atoms.copy()
    probe.calc = EMT()
    assert np.abs(probe.get_forces()).max() < 5.0
    assert np.abs(atoms.get_forces()).max() < 5.0


def test_watchdog_stops_a_run_whose_reference_keeps_failing(run):
    """A reference that worked and then keeps failing: the structure is suspect, so the
    watchdog rolls back, a bounded number of times, then stops."""
    calc, atoms, buffer, workdir = run
    reference = RecordingEMT(fail=True, works_for=3)
    learner = OnTheFlyLearner(calc, reference, buffer, select=every(1), refit_every=1000,
                              background=False, workdir=workdir, rattle=RattleConfig(every=0),
                              watchdog=WatchdogConfig(max_consecutive_failures=2,
                                                      max_rollbacks=2, snapshot_every=5))
    dyn = _langevin(atoms)
    learner.attach(dyn)
    with pytest.raises(SimulationUnstableError, match="reference calls in a row failed"):
        dyn.run(200)
    # bounded: 3 good calls, then (max_rollbacks + 1) rounds of max_consecutive_failures
    assert len(reference.seen) == 3 + 6
    assert len(buffer) == 3 and len(buffer.failures()) == 6


def test_watchdog_restores_the_atoms_under_a_cell_filter(run):
    """An optimiser of a FrechetCellFilter holds the filter as its atoms: a restore
    must put back the Atoms under it (it crashed: the filter has no set_cell), and the
    run ends with the documented error once rollbacks do not help."""
    from ase.filters import FrechetCellFilter

    calc, atoms, buffer, workdir = run
    cell = atoms.cell.copy()
    learner = OnTheFlyLearner(calc, RecordingEMT(fail=True, works_for=3), buffer,
                              select=every(1), refit_every=1000, background=False,
                              workdir=workdir, rattle=RattleConfig(every=0),
                              watchdog=WatchdogConfig(max_consecutive_failures=2,
                                                      snapshot_every=2))
    opt = BFGS(FrechetCellFilter(atoms), logfile=None)
    learner.attach(opt)
    with pytest.raises(SimulationUnstableError, match="reference calls in a row failed"):
        opt.run(fmax=1e-6, steps=60)
    events = [r["event"] for r in learner.history]
    assert events.count("restored") >= 2  # each one put the Atoms back, then went on
    assert not np.allclose(atoms.cell.array, cell)  # the optimiser did move the cell
    learner.close()


def test_a_reference_that_never_worked_stops_the_run_at_once(run):
    """Failing from the run's first call on is a broken reference (a misconfigured DFT
    setup), not an unphysical simulation: no rollbacks that cannot help, a message
    that blames the reference, every failed call recorded."""
    calc, atoms, buffer, workdir = run
    reference = RecordingEMT(fail=True)
    learner = OnTheFlyLearner(calc, reference, buffer, select=every(1), refit_every=1000,
                              background=False, workdir=workdir,
                              watchdog=WatchdogConfig(max_consecutive_failures=2,
                                                      max_rollbacks=2, snapshot_every=5))
    dyn = _langevin(atoms)
    learner.attach(dyn)
    with pytest.raises(LabellingError, match=r"failed on all 2 calls of this run.*"
                                             r"misconfigured.*SCF not converged"):
        dyn.run(200)
    assert len(reference.seen) == 2 and len(buffer.failures()) == 2
    assert not any(r["event"] == "unphysical" for r in learner.history)
    learner.close()


def test_watchdog_stop_mode_and_its_validation(run):
    calc, atoms, buffer, workdir = run
    with pytest.raises(ConfigError, match="on_unphysical"):
        WatchdogConfig(on_unphysical="ignore")
    learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(1000), background=False,
                              workdir=workdir, watchdog=WatchdogConfig(
                                  on_unphysical="stop", max_temperature_K=50.0))
    dyn = _langevin(atoms)  # 300 K thermostat: above the 50 K limit within a few steps
    learner.attach(dyn)
    with pytest.raises(SimulationUnstableError, match="temperature"):
        dyn.run(200)
    assert dyn.nsteps < 200


def test_watchdog_reads_the_target_of_every_ase_thermostat(emt_checkpoint):
    """Each ASE thermostat keeps its target under its own name and unit (kT in eV, or
    K); read once from the first temperature, a 1600 K Berendsen run heating from
    300 K was stopped as 'unphysical' (limit 3 x 278 K), and a Langevin ramp was
    ignored. Oracle: the temperature each was built with, and after set_temperature."""
    from ase.md.andersen import Andersen
    from ase.md.bussi import Bussi
    from ase.md.nose_hoover_chain import NoseHooverChainNVT
    from ase.md.melchionna import MelchionnaNPT
    from ase.md.nptberendsen import NPTBerendsen
    from ase.md.nvtberendsen import NVTBerendsen
    from ase.md.velocitydistribution import thermalize_momenta

    from ase_petft.learner.watchdog import Watchdog, _target_temperature

    atoms = emt_frames(1, seed=5)[0]
    thermalize_momenta(atoms, temperature_K=300, rng=np.random.default_rng(0))
    fs, target = units.fs, 1600.0
    made = {
        "Langevin": lambda: Langevin(atoms, fs, temperature_K=target, friction=0.01),
        "NVTBerendsen": lambda: NVTBerendsen(atoms, fs, temperature_K=target, taut=20 * fs),
        "NPTBerendsen": lambda: NPTBerendsen(atoms, fs, temperature_K=target, taut=20 * fs,
                                             pressure_au=0.0, compressibility_au=1e-6),
        "NoseHooverChainNVT": lambda: NoseHooverChainNVT(atoms, fs, temperature_K=target,
                                                         tdamp=100 * fs),
        "MelchionnaNPT": lambda: MelchionnaNPT(atoms, fs, temperature_K=target,
                                               externalstress=0.0, ttime=25 * fs,
                                               pfactor=None),
        "Andersen": lambda: Andersen(atoms, fs, temperature_K=target, andersen_prob=0.01),
        "Bussi": lambda: Bussi(atoms, fs, temperature_K=target, taut=100 * fs),
    }
    for name, build in made.items():
        assert _target_temperature(build()) == pytest.approx(target, rel=1e-9), name
    assert _target_temperature(VelocityVerlet(atoms, fs)) is None
    ramp = Langevin(atoms, fs, temperature_K=300.0, friction=0.01)
    watchdog = Watchdog(WatchdogConfig())
    atoms.calc = FineTunableCalculator(emt_checkpoint)
    results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
    thermalize_momenta(atoms, temperature_K=2500, rng=np.random.default_rng(1))
    assert "temperature" in watchdog.check(atoms, results, dynamics=ramp)  # > 1300 K
    ramp.set_temperature(temperature_K=2000.0)
    assert watchdog.check(atoms, results, dynamics=ramp) is None  # limit 3 x 2000 K now


def test_fragment_count_oracle():
    from ase.build import molecule

    from ase_petft.learner.watchdog import count_fragments

    water = molecule("H2O")
    assert count_fragments(water, 1.6) == 1
    water.positions[1] += [5.0, 0, 0]  # one H flies off
    assert count_fragments(water, 1.6) == 2


def test_combinations_evaluate_the_uncertainty_only_when_needed():
    calls = []
    for policy in (uncertainty_above(0.05) & max_gap(20), max_gap(20) & uncertainty_above(0.05)):
        assert not policy(_ctx(7, since=3, sigma=1.0, calls=calls))  # gap decides alone
        assert policy(_ctx(8, since=25, sigma=1.0, calls=calls))  # now σ is needed
    assert calls == [8, 8]
    either = uncertainty_above(0.05) | max_gap(20)
    assert either(_ctx(9, since=30, sigma=0.0, calls=calls)) and calls == [8, 8]


def test_the_readmes_thinned_uncertainty_policy_evaluates_sigma_every_fifth_step():
    """README: ``(uncertainty_above(0.01) & min_gap(60) & every(5)) | max_gap(200)``
    asks for σ only on every 5th step once 60 steps passed, and labels when it is high
    or after 200 steps."""
    policy = (uncertainty_above(0.01) & min_gap(60) & every(5)) | max_gap(200)
    calls = []
    fired = [step for step in range(1, 201)
             if policy(_ctx(step, since=step, sigma=0.0, calls=calls))]
    assert calls == list(range(60, 200, 5)) and fired == [200]
    calls.clear()
    assert policy(_ctx(65, since=65, sigma=0.02, calls=calls)) and calls == [65]
