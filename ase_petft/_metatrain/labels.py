"""Plain labelled frames: what a fine-tuning run reads from ``ase.Atoms``.

Labels come from ``atoms.calc.results`` (a ``SinglePointCalculator`` as written by
``label()``/``LabelBuffer``, or any calculator holding results) or, failing that,
from ``atoms.info["energy"]``/``["stress"]`` and ``atoms.arrays["forces"]`` (extxyz
files). The caller's atoms are copied, never modified.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

import numpy as np

from ..errors import FineTuneError
from ..variants import validate_variant

__all__ = ["Label", "labels_from_frames", "group_by_variant"]


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


def _results(atoms) -> Dict[str, object]:
    calc = getattr(atoms, "calc", None)
    results = dict(getattr(calc, "results", {}) or {})
    if "energy" not in results and "energy" in atoms.info:
        results["energy"] = atoms.info["energy"]
    if "forces" not in results and "forces" in atoms.arrays:
        results["forces"] = atoms.arrays["forces"]
    if "stress" not in results and "stress" in atoms.info:
        results["stress"] = atoms.info["stress"]
    return results


def _stress_voigt(value) -> np.ndarray:
    stress = np.asarray(value, dtype=float)
    if stress.shape == (3, 3):
        stress = stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    if stress.shape != (6,):
        raise ValueError(f"stress must be Voigt (6,) or (3, 3), got shape {stress.shape}")
    return stress


def to_label(atoms, index: int) -> Label:
    """A :class:`Label` from one labelled ``ase.Atoms`` (FineTuneError if unlabelled)."""
    results = _results(atoms)
    if results.get("energy") is None:
        raise FineTuneError(
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
        raise FineTuneError(f"frame {index} has malformed labels: {exc}") from exc
    values = [energy] + ([] if forces is None else list(forces.ravel()))
    if not np.all(np.isfinite(values)) or (stress is not None and not np.all(np.isfinite(stress))):
        raise FineTuneError(f"frame {index} has non-finite labels (NaN or inf); drop it")
    copy = atoms.copy()
    copy.calc = None
    return Label(atoms=copy, energy=energy, forces=forces, stress=stress)


def labels_from_frames(frames: Iterable) -> List[Label]:
    """Labels of a sequence of labelled ``ase.Atoms``."""
    if isinstance(frames, (str, bytes)) or not hasattr(frames, "__iter__"):
        raise FineTuneError(
            f"frames must be a sequence of labelled ase.Atoms or a LabelBuffer, got "
            f"{type(frames).__name__}"
        )
    return [to_label(atoms, i) for i, atoms in enumerate(frames)]


def _frames_of(source, variant: Optional[str]):
    """Frames of a list, or of a LabelBuffer-like object (``.frames(variant=...)``)."""
    if hasattr(source, "frames") and callable(source.frames):
        return list(source.frames(variant=variant))
    return list(source)


def group_by_variant(
    frames, *, variant: str, replay=None
) -> Dict[str, List[Label]]:
    """``{variant: labels}`` of the training data of one run.

    ``frames`` are labels of ``variant`` (a list, or a buffer whose
    ``frames(variant=variant)`` is used). ``replay`` is either a mapping
    ``{other_variant: frames or buffer}``, or a sequence/buffer of frames that carry
    ``atoms.info["variant"]`` (frames of ``variant`` itself found there are added
    to its labels).
    """
    groups: Dict[str, List[Label]] = {variant: labels_from_frames(_frames_of(frames, variant))}
    if replay is None:
        return groups
    if isinstance(replay, Mapping):
        items = [(validate_variant(v), _frames_of(f, v)) for v, f in replay.items()]
    else:
        items = _split_by_info(_frames_of(replay, None))
    for name, members in items:
        groups.setdefault(name, []).extend(labels_from_frames(members))
    return groups


def _split_by_info(frames: Sequence) -> List:
    found: Dict[str, list] = {}
    for i, atoms in enumerate(frames):
        name = getattr(atoms, "info", {}).get("variant")
        if name is None:
            raise FineTuneError(
                f"replay frame {i} has no atoms.info['variant']; pass replay as a "
                "mapping {variant: frames} or tag each frame with its variant"
            )
        found.setdefault(validate_variant(name), []).append(atoms)
    return list(found.items())
