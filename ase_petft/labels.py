"""Plain label records: what fine-tuning and the metatrain adapter read from ``ase.Atoms``.

This module sits below both ``finetune/`` and ``_metatrain/`` (each uses it, it uses
neither).

Labels come from ``atoms.calc.results`` (a ``SinglePointCalculator`` as written by
``label()``/``LabelBuffer``, or any calculator holding results) or, failing that,
from ``atoms.info["energy"]``/``["stress"]`` and ``atoms.arrays["forces"]`` (extxyz
files). The caller's atoms are copied, never modified.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional

import numpy as np

from .errors import TrainingDataError
from .metrics import results_of

__all__ = ["Label", "to_label", "labels_from_frames", "reference_dicts", "check_elements",
           "same_structure", "stale_fields"]

STATE_FIELDS = ("positions", "numbers", "cell", "pbc")


@dataclasses.dataclass(frozen=True, eq=False)
class Label:
    """One labelled structure (eV, eV/Å, eV/Å³ Voigt stress)."""

    atoms: object  # ase.Atoms (a private copy, without calculator)
    energy: float
    forces: Optional[np.ndarray]
    stress: Optional[np.ndarray]

    @property
    def n_atoms(self) -> int:
        return len(self.atoms)

    @property
    def periodic(self) -> bool:
        return bool(np.all(self.atoms.pbc)) and abs(self.atoms.cell.volume) > 1e-12


def _stress_voigt(value) -> np.ndarray:
    stress = np.asarray(value, dtype=float)
    if stress.shape == (3, 3):
        stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if stress.shape != (6,):
        raise ValueError(f"stress must be Voigt (6,) or (3, 3), got shape {stress.shape}")
    return stress


def same_structure(a, b) -> bool:
    """Whether ``a`` and ``b`` are exactly the same structure (numbers, positions, cell,
    pbc)."""
    try:
        return (len(a) == len(b) and np.array_equal(a.numbers, b.numbers)
                and np.array_equal(a.positions, b.positions)
                and np.array_equal(a.cell.array, b.cell.array) and np.array_equal(a.pbc, b.pbc))
    except Exception:
        return False


def stale_fields(calc, atoms) -> List[str]:
    """What changed in ``atoms`` since ``calc`` computed its results (positions,
    numbers, cell, pbc; empty when nothing did, or nothing that changes the labels:
    atoms wrapped into a periodic cell, a molecule moved as a whole or given another
    cell). Raises what ``calc.check_state`` raises."""
    if same_structure(calc.atoms, atoms):
        return []
    changed = [c for c in calc.check_state(atoms) if c in STATE_FIELDS]
    if changed and _same_physics(calc.atoms, atoms):
        return []
    return changed


def _same_physics(old, new, tol: float = 1e-6) -> bool:
    """Whether ``new`` is ``old`` up to what moves no label: for a cell periodic in
    all directions, atoms shifted by lattice vectors (``wrap()``) and a common shift;
    without any periodic direction, a common shift (``center()``), whatever the cell."""
    if (len(old) != len(new) or not np.array_equal(old.numbers, new.numbers)
            or not np.array_equal(old.pbc, new.pbc)):
        return False
    shift = new.positions - old.positions
    if new.pbc.all():
        cell = np.asarray(new.cell)
        if not np.allclose(np.asarray(old.cell), cell, rtol=0, atol=tol):
            return False
        fractional = np.linalg.solve(cell.T, shift.T).T
        shift = (fractional - np.round(fractional)) @ cell
        shift -= shift.mean(axis=0)  # a common shift: modulo the lattice, atom by atom
        reduced = np.linalg.solve(cell.T, shift.T).T
        shift = (reduced - np.round(reduced)) @ cell
    elif not new.pbc.any():
        shift = shift - shift.mean(axis=0)
    else:
        return False  # slabs and wires: not worth the cases
    return bool(np.abs(shift).max() <= tol)


def _check_reference(atoms, index: int) -> None:
    """Refuse results on ``atoms.calc`` that cannot be a reference label of ``atoms``:
    an ML model's predictions, or results computed for another structure."""
    from ._provenance import is_model_calculator

    calc = getattr(atoms, "calc", None)
    if calc is None or not getattr(calc, "results", None):
        return
    fix = "label it with the reference first, e.g. ase_petft.label(atoms, reference)"
    if is_model_calculator(calc):
        raise TrainingDataError(
            f"frame {index}'s results come from an ML model ({type(calc).__name__}), not "
            f"from a reference calculation: model predictions must never become labels; {fix}")
    if getattr(calc, "atoms", None) is None:
        return
    try:
        stale = stale_fields(calc, atoms)
    except Exception as exc:
        raise TrainingDataError(f"frame {index}: cannot check that its results belong to its "
                                f"structure ({type(exc).__name__}: {exc}); {fix}") from exc
    if stale:
        raise TrainingDataError(
            f"frame {index}'s results are stale: its {', '.join(stale)} changed after they "
            f"were computed (or several frames share one calculator, which holds only the "
            f"last one's results), so they are not its labels; label each frame with the "
            f"reference, or attach its own results once the structure is final: "
            f"frame.calc = SinglePointCalculator(frame, energy=..., forces=...)")


def to_label(atoms, index: int) -> Label:
    """A :class:`Label` from one labelled ``ase.Atoms`` (TrainingDataError if unlabelled,
    if its results come from an ML model or belong to another structure)."""
    _check_reference(atoms, index)
    results = results_of(atoms)
    if results.get("energy") is None:
        raise TrainingDataError(
            f"frame {index} has no energy label (no calculator results and no "
            "atoms.info['energy']); label it first, e.g. with ase_petft.label(atoms, "
            "reference)"
        )
    try:
        energy = float(results["energy"])
        forces = results.get("forces")
        forces = None if forces is None else np.array(forces, dtype=float).reshape(-1, 3)
        if forces is not None and len(forces) != len(atoms):
            raise ValueError(f"{len(forces)} forces for {len(atoms)} atoms")
        stress = results.get("stress")
        stress = None if stress is None else _stress_voigt(stress)
    except (TypeError, ValueError) as exc:
        raise TrainingDataError(f"frame {index} has malformed labels: {exc}") from exc
    values = [energy] + ([] if forces is None else list(forces.ravel()))
    if not np.all(np.isfinite(values)) or (stress is not None and not np.all(np.isfinite(stress))):
        raise TrainingDataError(f"frame {index} has non-finite labels (NaN or inf); drop it")
    copy = atoms.copy()
    copy.calc = None
    return Label(atoms=copy, energy=energy, forces=forces, stress=stress)


def labels_from_frames(frames: Iterable) -> List[Label]:
    """Labels of a sequence of labelled ``ase.Atoms``."""
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise TrainingDataError(
            f"frames must be a sequence of labelled ase.Atoms or a LabelBuffer, got "
            f"{type(frames).__name__}"
        )
    return [to_label(atoms, i) for i, atoms in enumerate(frames)]


def check_elements(atoms, known: Iterable[int], *, what: str, fix: str,
                   error: type = TrainingDataError) -> None:
    """THE element check: raise ``error`` if ``atoms`` hold elements outside ``known``."""
    from ase.data import chemical_symbols

    known = set(int(z) for z in known)
    unknown = sorted(set(int(z) for z in atoms.numbers) - known)
    if unknown:
        raise error(
            f"{what} contains element(s) {[chemical_symbols[z] for z in unknown]} the model "
            f"does not know (it knows {[chemical_symbols[z] for z in sorted(known)]}); {fix}"
        )


def reference_dicts(labels: Iterable[Label], *, forces: bool = True,
                    stress: bool = True) -> List[Dict[str, Any]]:
    """Reference values of ``labels`` as :func:`ase_petft.metrics.error_metrics` takes
    them (forces/stress only where the label has them; stress for periodic cells)."""
    rows = []
    for label in labels:
        row: Dict[str, Any] = {"energy": label.energy}
        if forces and label.forces is not None:
            row["forces"] = label.forces
        if stress and label.stress is not None and label.periodic:
            row["stress"] = label.stress
        rows.append(row)
    return rows
