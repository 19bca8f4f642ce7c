"""Energy uncertainty of a FineTunableCalculator's variant (σ of the energy per atom).

Two estimators, both on PET's last-layer features φ(x) = ∂E/∂θ (the energy is exactly
linear in the last-layer weights θ, which is what the closed-form heads refit solves):

- ``"posterior"`` (default): the predictive standard deviation of Bayesian linear
  regression on those weights — the posterior of the closed-form heads refit itself,
  with the same rows: one energy-per-atom row, 3N force rows (and 6 stress rows for
  periodic labels) per labelled structure, weighted like the refit's loss, the force
  and stress rows at ``FORCE_ROWS`` (1 %) of that weight.
  σ²(x) = s² φ̂(x)ᵀ (AᵀWA + λI)⁻¹ φ̂(x) with φ̂ = φ/N, λ = ``PRIOR`` × the mean
  eigenvalue of AᵀWA, and s² calibrated (maximum likelihood) on held-out labels, less
  their best per-element energy offset (the offset between two levels of theory, which
  a refit's composition fit removes and which moves no force): σ is in eV/atom and means
  "expected |error| beyond a constant per-element offset" on data like the held-out
  labels. The force rows make the posterior full-rank from a handful of labels (energy
  rows alone span one direction per label), and weighted down they do not make it
  over-confident; measured on four held-out molecules it ranks errors better than the
  energy-only posterior and LLPR (BENCHMARKS.md). A new label costs one Jacobian (its
  force rows), and the rows' normal matrix is kept while the backbone is unchanged
  (PET's energy is linear in the last layers, so a heads refit does not change it); a
  full or LoRA refit recomputes it on all labels.
- ``"llpr"``: metatrain's LLPR (last-layer prediction rigidity), calibrated the same way
  by metatrain.

The estimate refers to the weights it was fitted on: after a hot swap it is refitted
automatically, on the same frames, the next time it is asked for.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import Dict, Optional, Sequence

import numpy as np

from .config import FineTuneConfig
from .errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["EnergyUncertainty", "METHODS"]

METHODS = ("posterior", "llpr")
PRIOR = 1e-6  # λ relative to the mean eigenvalue (the linear refit's LOSO choice on well-determined data)
#: row weights of the posterior: the heads refit's defaults (energy per atom, forces
#: averaged over 3N components, stress over 6)
ROW_CONFIG = FineTuneConfig()
#: weight of the force (and stress) rows relative to the refit's: they inform the
#: directions the energies leave open, but at full weight tens of rows per structure
#: make the last layer look determined by a handful of labels and σ stops telling
#: unfamiliar structures apart (measured, BENCHMARKS.md: ρ and coverage best near 1 %)
FORCE_ROWS = 0.01


class EnergyUncertainty:
    """σ of the energy per atom (eV/atom) predicted by ``calc``'s current weights."""

    def __init__(self, calc, method: str = "posterior") -> None:
        if method not in METHODS:
            raise ConfigError(f"uncertainty method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self._calc = calc
        self._lock = threading.RLock()  # its own: never the calculator's private lock
        self._features: Dict[str, np.ndarray] = {}  # structure key -> φ (this generation)
        self._energies: Dict[str, float] = {}  # structure key -> predicted E (this generation)
        self._posterior = None  # (inverse matrix, calibration factor s²)
        self._gram = None  # (backbone fingerprint, AᵀWA, structure keys it holds)
        self._converted: Dict[int, tuple] = {}  # id(frame) -> (frame, Label) of the last fit
        self._fingerprint = (None, None)  # (generation, backbone fingerprint)
        self._llpr = None
        self._train = None
        self._calibration = None
        self._generation: Optional[int] = None
        self._loaded = False  # a posterior fitted elsewhere (another process), not here

    @property
    def fitted(self) -> bool:
        if self._loaded:  # it can only answer for the weights it was fitted on
            return self._generation == self._calc.generation
        return self._train is not None

    @property
    def wants_features(self) -> bool:
        """Whether the calculator's force pass should also give the last-layer
        gradient (the posterior's φ) of the structure it evaluates: it then costs no
        extra pass when σ of that structure is asked for next."""
        return self.method == "posterior" and (self._loaded or self._train is not None)

    def export_state(self) -> Optional[dict]:
        """The fitted posterior as plain arrays (``inverse``, ``scale2``,
        ``generation``), for a calculator with the same weights elsewhere; None for LLPR
        or before a fit."""
        with self._lock:
            if self.method != "posterior" or self._posterior is None:
                return None
            inverse, scale2 = self._posterior
            return {"inverse": inverse, "scale2": scale2, "generation": self._generation}

    def load_state(self, state: dict) -> None:
        """Use a posterior fitted on another calculator with the same weights (see
        :meth:`export_state`): σ costs one forward and backward pass, no labels needed.
        It answers while the calculator runs that generation."""
        if self.method != "posterior":
            raise ConfigError("only the posterior uncertainty can be loaded; this "
                              f"calculator uses {self.method!r}")
        with self._lock:
            generation = int(state["generation"])
            if generation != self._generation:
                self._features, self._energies = {}, {}
            self._posterior = (np.asarray(state["inverse"], dtype=float),
                               float(state["scale2"]))
            self._generation, self._loaded = generation, True

    def fit(self, frames: Sequence, calibration: Optional[Sequence] = None) -> None:
        """Fit on labelled ``frames`` of the calculator's variant; calibrate on
        ``calibration`` (held-out labels; default: ``frames`` themselves, which makes
        σ optimistic)."""
        frames, calibration = _materialised(frames), _materialised(calibration)
        if calibration is None:
            logger.info("calibrating the uncertainty on its own training frames")
            calibration = frames
        converted: Dict[int, tuple] = {}
        train = self._checked(self._labels(frames, converted), "frames")
        held = self._checked(self._labels(calibration, converted), "calibration")
        with self._lock:  # the state changes only once the new labels are known good
            before = (self._train, self._calibration, self._converted, self._loaded)
            self._train, self._calibration = train, held
            self._converted, self._loaded = converted, False
            try:
                self._refit()
            except BaseException:
                self._train, self._calibration, self._converted, self._loaded = before
                if self.method == "llpr":  # refitted in place: a half-done fit is not
                    self._llpr, self._generation = None, None  # kept, σ refits it
                raise

    def _checked(self, labels: list, what: str) -> list:
        from .errors import TrainingDataError
        from .labels import check_elements

        if not labels:
            raise TrainingDataError(
                f"the uncertainty needs labelled structures of this variant in {what}, got "
                "none; pass at least one (a few, for a useful σ)")
        for i, label in enumerate(labels):
            check_elements(label.atoms, self._calc.atomic_types, what=f"{what}[{i}]",
                           fix="drop it, or use a checkpoint that covers these elements")
        return labels

    def _labels(self, frames, converted: Dict[int, tuple]) -> list:
        """Labels of ``frames``, each frame object converted once (the learner passes
        its growing list of frames after every label: converting all of them each time
        made the per-label cost grow with the labels); a frame changed in place since is
        converted again."""
        from .labels import labels_from_frames, to_label

        if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
            return labels_from_frames(frames)  # raises the usual TrainingDataError
        out = []
        for i, frame in enumerate(frames):
            hit = converted.get(id(frame)) or self._converted.get(id(frame))
            if hit is None or hit[0] is not frame or not _unchanged(hit[1], frame):
                hit = (frame, to_label(frame, i))
            converted[id(frame)] = hit
            out.append(hit[1])
        return out

    def _refit(self) -> None:
        from . import _metatrain

        calc = self._calc
        with self._lock:
            if self.method == "posterior":
                if self._generation != calc.generation:
                    self._features, self._energies = {}, {}  # they belong to one set of weights
                self._fit_posterior()
                self._generation = calc.generation
                return
            with calc._model_lock():
                if self._llpr is None:
                    self._llpr = _metatrain.LLPR(calc.model, calc.variant)
                self._llpr.fit(self._train, self._calibration)
            self._generation = calc.generation
        logger.info("LLPR uncertainty fitted on %d frames (generation %d)",
                    len(self._train), self._generation)

    def per_atom(self, atoms_list: Sequence) -> list:
        """σ(E)/N in eV/atom for each structure."""
        if not self.fitted:
            raise ConfigError(
                "the energy uncertainty is not fitted yet: call "
                "calc.fit_uncertainty(labelled_frames) with a few labelled structures "
                "of this variant (the OnTheFlyLearner does it after its first labels)"
            )
        calc = self._calc
        with self._lock:
            if self._generation != calc.generation:
                if self._loaded:
                    raise ConfigError(
                        f"the loaded uncertainty belongs to generation {self._generation}; "
                        f"the calculator runs generation {calc.generation}: load the "
                        "posterior of this generation")
                self._refit()
            if self.method == "posterior":
                return self._posterior_sigma(atoms_list)
            with calc._model_lock():
                sigmas = self._llpr.energy_sigma(atoms_list)
        return [s / len(a) for s, a in zip(sigmas, atoms_list)]

    # ------------------------------------------------------------------ posterior
    def _phi(self, atoms_list, *, keep: bool = True) -> np.ndarray:
        """Per-atom last-layer features. ``keep``: cache them per structure for this
        generation (the labelled structures, needed at every refit; not the structures
        σ is asked for, one per MD step: the cache would grow for the whole run)."""
        from . import _metatrain

        calc = self._calc
        keys = [_key(a) for a in atoms_list]
        found = {k: self._features[k] for k in keys if k in self._features}
        missing = []
        for k, a in zip(keys, atoms_list):
            if k in found:
                continue
            row = calc._last_features(a)  # the force pass of this structure gave it
            if row is None:
                missing.append((k, a))
            else:
                found[k] = row / len(a)
        if missing:
            with calc._model_lock():
                phi = _metatrain.energy_features(calc.model, calc.variant,
                                                 [a for _, a in missing])
            for (k, a), row in zip(missing, phi):
                found[k] = row / len(a)
        if keep:
            self._features.update(found)
        return np.array([found[k] for k in keys])

    def _fit_posterior(self) -> None:
        gram = self._normal_matrix()
        lam = PRIOR * max(float(np.trace(gram)) / len(gram), 1e-30)
        inverse = np.linalg.inv(gram + lam * np.eye(len(gram)))
        atoms = [label.atoms for label in self._calibration]
        raw = self._raw_variance(self._phi(atoms), inverse)
        predicted = self._calc_energies(atoms)
        residual = np.array([(p - label.energy) / label.n_atoms
                             for p, label in zip(predicted, self._calibration)])
        residual, dof = _without_level_offset(residual, atoms)
        scale2 = float(np.sum(residual ** 2 / np.maximum(raw, 1e-300)) / dof)
        self._posterior = (inverse, scale2)

    def _normal_matrix(self) -> np.ndarray:
        """AᵀWA of the training labels' heads rows, extended by the labels it lacks;
        rebuilt when the backbone changed or a label it holds is gone."""
        from . import _metatrain

        fingerprint = self._backbone_fingerprint()
        unique = {}
        for label in self._train:
            unique.setdefault(_row_key(label), label)
        held = self._gram
        if held is None or held[0] != fingerprint or not held[2] <= unique.keys():
            held = (fingerprint, None, frozenset())
        _, gram, keys = held
        new = [(k, label) for k, label in unique.items() if k not in keys]
        if new:
            calc = self._calc
            with calc._model_lock():
                rows = _metatrain.heads_rows(calc.model, calc.variant,
                                             [lab for _, lab in new], config=ROW_CONFIG)
            for A, _, w, kind in rows:
                w = w * np.where(kind == "energy", 1.0, FORCE_ROWS)
                part = (A * w[:, None]).T @ A
                gram = part if gram is None else gram + part
            keys = keys | {k for k, _ in new}
        self._gram = (fingerprint, gram, keys)
        return gram

    def _backbone_fingerprint(self) -> str:
        from . import _metatrain

        calc = self._calc
        generation, fingerprint = self._fingerprint
        if generation != calc.generation or fingerprint is None:
            fingerprint = _metatrain.backbone_fingerprint(calc.model, calc.variant,
                                                           additive=False)
            self._fingerprint = (calc.generation, fingerprint)
        return fingerprint

    @staticmethod
    def _raw_variance(phi: np.ndarray, inverse: np.ndarray) -> np.ndarray:
        return np.einsum("ij,jk,ik->i", phi, inverse, phi)

    def _calc_energies(self, atoms_list):
        """Predicted energies, cached per structure: a new label costs one prediction,
        not one per held-out label."""
        from . import _metatrain

        calc = self._calc
        keys = [_key(a) for a in atoms_list]
        missing = [(k, a) for k, a in zip(keys, atoms_list) if k not in self._energies]
        if missing:
            with calc._model_lock():
                predicted = _metatrain.predict(calc.model, [a for _, a in missing],
                                               calc.variant, forces=False, stress=False)
            for (k, _), p in zip(missing, predicted):
                self._energies[k] = p["energy"]
        return [self._energies[k] for k in keys]

    def _posterior_sigma(self, atoms_list) -> list:
        inverse, scale2 = self._posterior
        raw = self._raw_variance(self._phi(list(atoms_list), keep=False), inverse)
        return [float(np.sqrt(scale2 * v)) for v in raw]


def _without_level_offset(residual: np.ndarray, atoms_list) -> tuple:
    """Per-atom residuals less their best per-element offset, and the degrees of freedom
    left. A head for a new level of theory starts ~eV/atom away from its labels (the
    offset between the levels), which its first refit's composition fit removes and
    which moves neither forces nor dynamics: σ calibrated on it would flag every
    structure alike. With no more labels than elements to fit, nothing is removed."""
    types = sorted({int(z) for atoms in atoms_list for z in atoms.numbers})
    fractions = np.array([[np.mean(atoms.numbers == z) for z in types] for atoms in atoms_list])
    rank = np.linalg.matrix_rank(fractions)
    if len(residual) <= rank:
        return residual, len(residual)
    offset, *_ = np.linalg.lstsq(fractions, residual, rcond=None)
    return residual - fractions @ offset, len(residual) - rank


def _materialised(frames):
    """A one-shot iterator (a generator) as a list: the frames are read more than once."""
    if frames is not None and hasattr(frames, "__next__"):
        return list(frames)
    return frames


def _unchanged(label, frame) -> bool:
    """Whether ``label`` still describes ``frame`` (structure and energy label)."""
    from .labels import results_of

    atoms = label.atoms
    return (len(atoms) == len(frame) and np.array_equal(atoms.numbers, frame.numbers)
            and np.array_equal(atoms.positions, frame.positions)
            and np.array_equal(atoms.cell.array, frame.cell.array)
            and results_of(frame).get("energy") == label.energy)


def _row_key(label) -> str:
    """A structure and which rows it has (AᵀWA does not depend on the label values)."""
    return f"{_key(label.atoms)}:{label.forces is not None}:{label.stress is not None}"


def _key(atoms) -> str:
    digest = hashlib.sha1()
    for array in (atoms.numbers, atoms.positions, np.asarray(atoms.cell), atoms.pbc):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
