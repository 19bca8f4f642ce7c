"""THE error metrics of ase_petft: one implementation used everywhere.

The fine-tuning engine, the learner's validation gate, the report, the demo, the
examples and the benchmarks all measure "error of a model on labelled frames" with
these functions, so the same words always mean the same numbers:

==================================  ============================================
key                                  meaning
==================================  ============================================
``n_frames``                         frames compared
``energy_mae_meV_per_atom``          mean |E_pred - E_ref| / N_atoms
``energy_rmse_meV_per_atom``         root mean square of the same
``energy_offset_meV_per_atom``       mean (E_pred - E_ref) / N_atoms (signed)
``energy_mae_offset_removed_...``    MAE after subtracting that mean: what is left
                                     once a constant per-atom shift between two
                                     levels of theory is taken out
``forces_mae_meV_per_A``             mean |F_pred - F_ref| over Cartesian components
``forces_rmse_meV_per_A``            root mean square of the same
``stress_mae_meV_per_A3``            mean |σ_pred - σ_ref| over Voigt components
==================================  ============================================

Forces (stress) appear only when every frame has them on both sides.
"""

from __future__ import annotations

from typing import Dict, Mapping, Optional, Sequence

import numpy as np

__all__ = ["error_metrics", "errors_against", "calculator_errors", "score"]

ENERGY_MAE = "energy_mae_meV_per_atom"
ENERGY_MAE_OFFSET_REMOVED = "energy_mae_offset_removed_meV_per_atom"
FORCES_MAE = "forces_mae_meV_per_A"


def error_metrics(predicted: Sequence[Mapping], reference: Sequence[Mapping],
                  n_atoms: Sequence[int]) -> Dict[str, float]:
    """Errors of ``predicted`` against ``reference`` (each a list of dicts with
    ``energy`` in eV and optionally ``forces`` (N, 3) eV/Å and ``stress`` Voigt eV/Å³)."""
    if len(predicted) != len(reference) or len(reference) != len(n_atoms):
        raise ValueError(f"{len(predicted)} predictions, {len(reference)} references and "
                         f"{len(n_atoms)} atom counts: they must match")
    if not reference:
        return {"n_frames": 0}
    e = np.array([(float(p["energy"]) - float(r["energy"])) / n
                  for p, r, n in zip(predicted, reference, n_atoms)])
    out = {"n_frames": len(reference),
           ENERGY_MAE: 1e3 * float(np.mean(np.abs(e))),
           "energy_rmse_meV_per_atom": 1e3 * float(np.sqrt(np.mean(e**2))),
           "energy_offset_meV_per_atom": 1e3 * float(np.mean(e)),
           "energy_mae_offset_removed_meV_per_atom": 1e3 * float(np.mean(np.abs(e - e.mean())))}
    f = _component_errors(predicted, reference, "forces")
    if f is not None:
        out[FORCES_MAE] = 1e3 * float(np.mean(np.abs(f)))
        out["forces_rmse_meV_per_A"] = 1e3 * float(np.sqrt(np.mean(f**2)))
    s = _component_errors(predicted, reference, "stress")
    if s is not None:
        out["stress_mae_meV_per_A3"] = 1e3 * float(np.mean(np.abs(s)))
    return out


def _component_errors(predicted, reference, key: str) -> Optional[np.ndarray]:
    pairs = [(p.get(key), r.get(key)) for p, r in zip(predicted, reference)]
    if any(a is None or b is None for a, b in pairs):
        return None
    return np.concatenate([(np.asarray(a, float) - np.asarray(b, float)).ravel()
                           for a, b in pairs])


def results_of(atoms) -> Dict[str, np.ndarray]:
    """The labels stored on labelled ``atoms`` (calculator results, or extxyz info)."""
    calc = getattr(atoms, "calc", None)
    results = dict(getattr(calc, "results", None) or {})
    if "energy" not in results and "energy" in atoms.info:
        results["energy"] = atoms.info["energy"]
    if "forces" not in results and "forces" in atoms.arrays:
        results["forces"] = atoms.arrays["forces"]
    if "stress" not in results and "stress" in atoms.info:
        results["stress"] = atoms.info["stress"]
    return results


def errors_against(frames: Sequence, references: Sequence) -> Dict[str, float]:
    """Errors of the labels on ``frames`` against the labels on ``references``."""
    return error_metrics([results_of(a) for a in frames], [results_of(b) for b in references],
                         [len(a) for a in frames])


def calculator_errors(frames: Sequence, calc, *, forces: bool = True) -> Dict[str, float]:
    """Errors of ``calc`` (any ASE calculator) against labelled ``frames``."""
    predicted = []
    for ref in frames:
        probe = ref.copy()
        probe.calc = calc
        row = {"energy": probe.get_potential_energy()}
        if forces:
            row["forces"] = probe.get_forces()
        predicted.append(row)
    reference = [results_of(a) for a in frames]
    if not forces:
        reference = [{"energy": r["energy"]} for r in reference]
    return error_metrics(predicted, reference, [len(a) for a in frames])


def score(errors: Mapping[str, Optional[float]]) -> float:
    """The one number a refit is judged by: force MAE (meV/Å) where there are forces,
    else energy MAE (meV/atom)."""
    forces = errors.get(FORCES_MAE)
    return float(forces) if forces is not None else float(errors[ENERGY_MAE])
