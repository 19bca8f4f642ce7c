"""The validation gate: a refit job and the decision whether its model replaces the
running one.

The refit job (:func:`run_refit`) is a plain function of plain inputs, so it can run
inline, in a thread or on any executor. Its decision is written to the generation's
``decision.json`` (see :mod:`ase_petft.learner.workdir`).
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import time
from typing import Any, Dict, List, Optional, Tuple

from .. import _metatrain
from ..errors import ConfigError
from ..labels import labels_from_frames, reference_dicts
from ..metrics import ENERGY_MAE, ENERGY_MAE_OFFSET_REMOVED, error_metrics, score
from ..validation import non_negative_int, positive_float
from . import workdir as wd

logger = logging.getLogger(__name__)

__all__ = ["RefitSpec", "RefitOutcome", "run_refit", "evaluate_generation"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class GateConfig:
    """What a refit must pass before it is swapped in (besides the held-out labels).

    :param probe_steps: NVE steps of the stability probe, run with the candidate from
        the simulation's current structure and momenta (0 disables it).
    :param probe_timestep_fs: its timestep.
    :param probe_max_drift_eV_per_atom: largest change of the total energy per atom
        along the probe (an NVE trajectory conserves it; a hole in the potential
        energy surface does not).
    :param probe_max_force_eV_per_A: largest force component along the probe.
    :param keep_rejected_checkpoints: keep a rejected candidate's ``model.ckpt`` (for
        diagnosis: what would it have done?). ``False`` deletes it once the decision is
        written (``decision.json``, ``metrics.json`` and the heads rows stay): a
        week-long run of a foundation-size model refused hundreds of times would
        otherwise keep hundreds of full checkpoints.
    :param harm_factor: do-no-harm bound: on rattled copies (σ 0.05 Å) of the first
        labelled structures, the candidate's forces may move away from the starting
        model's by at most ``harm_factor`` × as much as they moved on the labelled
        structures themselves. A refit that learns a new level moves forces alike on
        and next to its data; one with holes in the potential energy surface moves them
        far more next to the data than on it.
    """

    probe_steps: int = 200
    probe_timestep_fs: float = 0.5
    probe_max_drift_eV_per_atom: float = 0.05
    probe_max_force_eV_per_A: float = 30.0
    harm_factor: float = 2.0
    keep_rejected_checkpoints: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.keep_rejected_checkpoints, bool):
            raise ConfigError("keep_rejected_checkpoints must be True or False, got "
                              f"{self.keep_rejected_checkpoints!r}")
        non_negative_int("probe_steps", self.probe_steps)
        for name in ("probe_timestep_fs", "probe_max_drift_eV_per_atom",
                     "probe_max_force_eV_per_A", "harm_factor"):
            positive_float(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class HarmSet:
    """Labelled structures and rattled copies of them, with the starting model's forces
    on both (eV/Å)."""

    labelled: list
    labelled_forces: list
    frames: list
    forces: list


@dataclasses.dataclass(frozen=True)
class RefitSpec:
    """Everything a refit needs, as plain data (picklable for process executors)."""

    source_checkpoint: pathlib.Path
    source_generation: int
    train: list
    holdout: list
    variant: str
    config: Any
    output_dir: pathlib.Path
    generation: int
    tolerance: float
    n_labels_total: int
    device: str = "cpu"  # where the refit runs: the calculator's device
    # in-process refits (inline or on a thread): the running generation's weights in
    # memory (a copy; trained on and judged against without reading its checkpoint),
    # and the candidate is handed back as a module for the swap. None / False for
    # process executors, which get paths and send back a decision.
    source_model: Any = None
    return_model: bool = True
    anchor: tuple = ()  # labels held out before the first refit: a fixed yardstick
    harm: Optional[HarmSet] = None
    probe_atoms: Any = None  # the simulation's structure (with momenta) at refit time
    gate: GateConfig = GateConfig()


@dataclasses.dataclass
class RefitOutcome:
    generation: int
    accepted: bool
    reason: str
    decision: Dict[str, Any]
    checkpoint_path: Optional[pathlib.Path] = None
    model: Any = None


def evaluate_generation(model_or_checkpoint, frames: list, variant: str,
                        ) -> Tuple[Dict[str, float], List[Dict[str, Any]]]:
    """Errors (:mod:`ase_petft.metrics`) and predictions of a model (or a checkpoint)
    on labelled ``frames``: the one way "error of generation N" is computed, by the
    gate and by the report."""
    model = model_or_checkpoint
    if isinstance(model, (str, pathlib.Path)):
        model = _metatrain.load_model(model)
    labels = labels_from_frames(frames)
    forces = all(label.forces is not None for label in labels)
    stress = all(label.stress is not None and label.periodic for label in labels)
    predicted = _metatrain.predict(model, [label.atoms for label in labels], variant,
                                   forces=forces, stress=stress)
    reference = reference_dicts(labels, forces=forces, stress=stress)
    return error_metrics(predicted, reference, [label.n_atoms for label in labels]), predicted


def run_refit(spec: RefitSpec) -> RefitOutcome:
    """Fine-tune, judge the candidate (held-out labels, anchor set, do-no-harm,
    stability probe), write the decision."""
    from ..finetune import finetune_with_model

    start = time.perf_counter()
    result, model = finetune_with_model(
        spec.source_checkpoint, spec.train, variant=spec.variant, config=spec.config,
        output_dir=spec.output_dir, generation=spec.generation,
        validation=_selection_frames(spec),  # one hold-out: no second split inside the run
        reuse_rows_from=[spec.output_dir.parent / f"gen-{spec.generation - 1:04d}"],
        device=spec.device, source_model=spec.source_model,
        export=False)  # only a generation that is swapped in gets its model.pt (below)
    decision: Dict[str, Any] = {
        "generation": spec.generation, "source_generation": spec.source_generation,
        "n_train": len(spec.train), "n_holdout": len(spec.holdout),
        "n_labels_total": spec.n_labels_total, "fit_wall_time_s": result.wall_time_s,
        "fit_metrics": dict(result.metrics),
    }
    running = _Running(spec)
    checks = _judge(spec, model, result.checkpoint_path, decision, running)
    failed = [f"{name}: {text}" for name, (ok, text) in checks.items() if not ok]
    _metatrain.thaw(model)  # the probe's export froze it: back to its checkpoint's state
    swapped = None if failed else model
    weights = _fallback_composition(spec, model, result.metrics, checks, decision, running) \
        if failed else None
    if weights is not None:
        swapped, checks["offset_only"] = _offset_fallback(spec, weights, result.checkpoint_path,
                                                          decision, running)
        decision["fallback"] = "offset_only" if swapped is not None else None
    accepted = swapped is not None
    if accepted:
        decision["model_path"] = str(_export_accepted(spec, swapped))
    reason = "; ".join(text for _, text in checks.values()) if not failed else "; ".join(
        failed + ([f"offset_only: {checks['offset_only'][1]}"] if accepted else []))
    decision.update(accepted=bool(accepted), reason=reason,
                    checks={name: {"passed": ok, "detail": text}
                            for name, (ok, text) in checks.items()},
                    wall_time_s=time.perf_counter() - start, finished_at=time.time())
    wd.write_json(spec.output_dir / wd.DECISION, decision)
    if not accepted:
        logger.info("refit %d rejected: %s", spec.generation, reason)
    if not spec.gate.keep_rejected_checkpoints:  # the refused candidate's weights
        (result.checkpoint_path.with_name(REFUSED) if accepted
         else result.checkpoint_path).unlink(missing_ok=True)
    # the swap copies the module's tensors: they are its checkpoint's, bit for bit
    return RefitOutcome(generation=spec.generation, accepted=bool(accepted), reason=reason,
                        decision=decision, checkpoint_path=result.checkpoint_path,
                        model=swapped if spec.return_model else None)


# the refused candidate's checkpoint when its energy offset alone was swapped in
REFUSED = "refused.ckpt"


STALE_OFFSET_FACTOR = 2.0  # raw held-out energy error over its offset-removed part


def _fallback_composition(spec: RefitSpec, candidate, fit: Dict[str, Any],
                          checks: Dict[str, Tuple[bool, str]], decision: Dict[str, Any],
                          running: "_Running"):
    """The per-element energies of the offset-only fall-back for a refused candidate,
    or None when there is none to try:

    - the refit fitted a new variant's offset between levels (its first refit): the
      candidate's (when its head was kept, ``changed`` judged that offset already);
    - the running model's offset has gone stale (its held-out raw energy error is more
      than ``STALE_OFFSET_FACTOR`` × the error left once a constant per-atom offset is
      removed, on at least 2 held-out structures): the running model's plus a
      correction fitted on the training labels.
      A new variant's offset comes from its first 2–3 labels; when later refits are
      refused, nothing else moves it (water box: 99–184 meV/atom raw vs 12 without the
      offset; acetamide: 41–79 vs 2–5)."""
    if fit.get("composition_correction_eV"):
        if "changed" in checks:
            return None
        return _metatrain.composition_weights(candidate, spec.variant)
    if sum(not a.info.get("rattled") for a in spec.holdout) < 2 or not spec.train:
        return None  # one structure (and its rattled copy): no spread to tell it from
    old = _running_holdout_errors(spec, decision, running)
    raw, rest = old.get(ENERGY_MAE), old.get(ENERGY_MAE_OFFSET_REMOVED)
    if raw is None or rest is None or not raw > STALE_OFFSET_FACTOR * max(rest, 0.5):
        return None  # 0.5 meV/atom: below that an offset is noise whatever the ratio
    from ..finetune.run import composition_correction

    correction = composition_correction(running.model, spec.variant,
                                        labels_from_frames(spec.train))
    weights = _metatrain.composition_weights(running.model, spec.variant)
    return {z: weights[z] + c for z, c in correction.items()}


class _Running:
    """The running generation's model: the in-process copy, or read from its checkpoint
    (process executors) at most once per refit, whichever check needs it first."""

    def __init__(self, spec: RefitSpec) -> None:
        self._spec, self._model = spec, spec.source_model

    @property
    def model(self):
        if self._model is None:
            self._model = _metatrain.load_model(self._spec.source_checkpoint)
        return self._model


def _running_holdout_errors(spec: RefitSpec, decision: Dict[str, Any],
                            running: _Running) -> Dict[str, float]:
    """The running model's errors on the held-out labels: the gate's own evaluation when
    it got that far, else one now (recorded in the decision)."""
    holdout = decision.setdefault("holdout", {})
    if holdout.get("old") is None:
        holdout["old"], _ = evaluate_generation(running.model, list(spec.holdout),
                                                spec.variant)
    return holdout["old"]


def _offset_fallback(spec: RefitSpec, weights, checkpoint: pathlib.Path,
                     decision: Dict[str, Any], running: _Running):
    """The fall-back toward the running model for a refused candidate: its weights with
    only the per-element energies ``weights`` (see :func:`_fallback_composition`).
    Forces are unchanged, so nothing but the energies is judged: swapped in when the
    held-out energy MAE falls. Otherwise a run whose every candidate is refused ends
    predicting the parent level's energies under the new variant's name (eV/atom off
    for GFN1 → GFN2, hundreds for xTB → DFT). Returns ``(model or None, (passed, what
    was measured))``; on success ``checkpoint`` holds the fall-back and the candidate
    moves to ``refused.ckpt``."""
    import os

    if not spec.holdout:
        return None, (False, "no held-out labels to judge the energy offset alone on")
    fallback = _metatrain.copy_model(running.model)
    _metatrain.set_composition_weights(fallback, spec.variant, weights)
    old = _running_holdout_errors(spec, decision, running)
    new, _ = evaluate_generation(fallback, list(spec.holdout), spec.variant)
    text = (f"the running model with the refit's per-element energy offset: held-out "
            f"energy MAE {new[ENERGY_MAE]:.4g} vs current {old[ENERGY_MAE]:.4g} meV/atom "
            f"({len(spec.holdout)} labels; forces unchanged)")
    if not new[ENERGY_MAE] < old[ENERGY_MAE]:
        return None, (False, text)
    os.replace(checkpoint, checkpoint.with_name(REFUSED))
    _metatrain.save_checkpoint(fallback, checkpoint)
    # the errors of what runs now (reports read "new"); the refused weights' are kept apart
    decision["refused_new"] = decision.get("new")
    decision.update(old=old, new=new)
    return fallback, (True, text)


def _export_accepted(spec: RefitSpec, model) -> pathlib.Path:
    """Write the verified metatomic export of an accepted candidate (``model.pt``, for
    LAMMPS / i-PI / ``MetatomicCalculator``). Rejected candidates never get one: the
    export and its verification cost ~0.8 s on one CPU thread, more than the rest of a
    small refit, and only the checkpoint is needed to judge, swap or resume."""
    from ..finetune.generation import METRICS_NAME, MODEL_NAME, read_json, write_json

    path = _metatrain.export_model(model, spec.output_dir / MODEL_NAME, variant=spec.variant)
    _metatrain.thaw(model)
    metrics = read_json(spec.output_dir / METRICS_NAME)
    if metrics is not None:
        write_json(spec.output_dir / METRICS_NAME, {**metrics, "model_path": str(path)})
    return path


def _selection_frames(spec: RefitSpec) -> list:
    """The held-out labels the refit may select with (an SGD refit keeps its best epoch
    on them): every held-out label, except that SGD refits leave out the anchor set
    while other held-out labels exist, so that the anchor check judges a candidate on
    labels nothing was selected on. (The linear solver selects by leave-one-group-out
    on its training labels; the held-out ones only report.)"""
    holdout = list(spec.holdout)
    if spec.config.effective_solver != "sgd" or not spec.anchor:
        return holdout
    from .._provenance import content_key

    def key(atoms) -> str:
        return content_key(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc)

    anchor = {key(a) for a in spec.anchor}
    rest = [a for a in holdout if key(a) not in anchor]
    return rest or holdout


def _judge(spec: RefitSpec, model, checkpoint, decision,
           running: _Running) -> Dict[str, Tuple[bool, str]]:
    """Every check of the gate: ``{name: (passed, what was measured)}``; stops at the
    first failure (later checks cost time and cannot undo it)."""
    checks: Dict[str, Tuple[bool, str]] = {}
    fit = decision.get("fit_metrics", {})
    solver = fit.get("linear_solver") or {}
    if solver.get("selected") == "parent":
        checks["changed"] = _offset_only(fit, solver)
        if not checks["changed"][0]:
            return checks
    for name, frames in (("holdout", spec.holdout), ("anchor", spec.anchor)):
        if not frames:
            continue
        if name == "holdout" and _fit_evaluated(fit, len(frames)):
            # finetune() evaluated the source and the trained model on exactly these
            # labels (its validation set), the same way: reuse, do not predict twice
            old, new = fit["before"], fit["after"]
        else:
            old, _ = evaluate_generation(running.model, list(frames), spec.variant)
            new, _ = evaluate_generation(model, list(frames), spec.variant)
        decision.update({name: {"old": old, "new": new}})
        if name == "holdout":
            decision.update(old=old, new=new)
        ok = score(new) <= (1.0 + spec.tolerance) * score(old) * (1.0 + 1e-9)  # float noise
        checks[name] = (ok, f"{name} score {score(new):.4g} vs current {score(old):.4g} "
                            f"({len(frames)} labels, tolerance {spec.tolerance:.0%})")
        if not ok:
            return checks
    if not checks:
        checks["holdout"] = (True, "no held-out labels yet: accepted without a gate")
    if spec.harm is not None:
        checks["no_harm"] = _no_harm(spec, model, decision)
        if not checks["no_harm"][0]:
            return checks
    if spec.probe_atoms is not None and spec.gate.probe_steps > 0:
        checks["stability"] = _stability_probe(spec, model, checkpoint)
    return checks


def _offset_only(fit: Dict[str, Any], solver: Dict[str, Any]) -> Tuple[bool, str]:
    """The linear solver kept the current head. A candidate is left only if the refit
    fitted the per-element energy offset of a new variant (its first refit): forces are
    unchanged, energies move to the new level. Without that swap a run whose every heads
    refit is refused would end predicting the *parent* level's energies under the new
    variant's name (eV/atom off for GFN1 → GFN2, thousands of eV for xTB → DFT). It is
    swapped in when the held-out energy error does not rise (and the other checks pass)."""
    kept = f"the linear solver kept the current head ({solver.get('reason', '')})"
    if not fit.get("composition_correction_eV"):
        return False, f"nothing to swap: {kept}"
    before, after = fit.get("before") or {}, fit.get("after") or {}
    old, new = before.get(ENERGY_MAE), after.get(ENERGY_MAE)
    if old is None or new is None:
        return False, f"{kept}; the energy offset could not be judged (no held-out energies)"
    ok = new <= old * (1.0 + 1e-9)
    return ok, (f"{kept}; per-element energy offset fitted: held-out energy MAE {new:.4g} vs "
                f"current {old:.4g} meV/atom")


def _fit_evaluated(fit: Dict[str, Any], n_frames: int) -> bool:
    """Whether finetune's before/after metrics are those of the held-out labels (its
    validation set was them, and the variant existed in the source: "before" is the
    running generation)."""
    before, after = fit.get("before") or {}, fit.get("after") or {}
    return (fit.get("split") == "validation" and before.get("n_frames") == n_frames
            and after.get("n_frames") == n_frames and not fit.get("created_variant"))


def _no_harm(spec: RefitSpec, model, decision: Dict[str, Any]) -> Tuple[bool, str]:
    import numpy as np

    harm = spec.harm

    def moved(frames, forces) -> float:
        predicted = _metatrain.predict(model, frames, spec.variant, forces=True, stress=False)
        return float(np.mean(np.concatenate([np.abs(p["forces"] - f).ravel()
                                             for p, f in zip(predicted, forces)])))

    on_data = moved(harm.labelled, harm.labelled_forces)
    off_data = moved(harm.frames, harm.forces)
    bound = spec.gate.harm_factor * max(on_data, 0.02)
    decision["no_harm"] = {"moved_off_data_meV_per_A": 1e3 * off_data,
                           "moved_on_data_meV_per_A": 1e3 * on_data,
                           "bound_meV_per_A": 1e3 * bound}
    return off_data <= bound, (
        f"forces moved {1e3 * off_data:.1f} meV/Å from the starting model on "
        f"{len(harm.frames)} rattled copies and {1e3 * on_data:.1f} on the labelled "
        f"structures (bound {spec.gate.harm_factor:g}× that)")


def _stability_probe(spec: RefitSpec, model, checkpoint) -> Tuple[bool, str]:
    """Short NVE MD with the candidate (``model``, written as ``checkpoint``) from the
    current structure."""
    import numpy as np
    from ase import units
    from ase.md.verlet import VelocityVerlet

    from ..calculator import FineTunableCalculator
    from .watchdog import count_fragments

    gate = spec.gate
    atoms = spec.probe_atoms.copy()
    atoms.calc = FineTunableCalculator._running(model, checkpoint=checkpoint,
                                                variant=spec.variant, device=spec.device)
    n = len(atoms)
    fragments = None if atoms.pbc.any() else count_fragments(atoms, 1.6)
    dyn = VelocityVerlet(atoms, gate.probe_timestep_fs * units.fs)
    e0 = atoms.get_total_energy()
    for step in range(gate.probe_steps):
        dyn.run(1)
        forces = atoms.get_forces()
        drift = abs(atoms.get_total_energy() - e0) / n
        problem = None
        if not np.all(np.isfinite(forces)) or np.abs(forces).max() > gate.probe_max_force_eV_per_A:
            problem = f"force {np.abs(forces).max():.1f} eV/Å"
        elif drift > gate.probe_max_drift_eV_per_atom:
            problem = f"total energy drifted {drift:.3f} eV/atom"
        elif fragments is not None and count_fragments(atoms, 1.6) > fragments:
            problem = "the structure fell apart"
        if problem:
            return False, (f"stability probe failed after {step + 1} of {gate.probe_steps} "
                           f"NVE steps: {problem}")
    return True, (f"stability probe: {gate.probe_steps} NVE steps of "
                  f"{gate.probe_timestep_fs:g} fs, drift {drift:.4f} eV/atom")
