"""Reference labels from any ASE calculator: :func:`label` and :func:`label_many`.

:func:`label` returns a labelled *copy* of a structure: the results sit on a
``SinglePointCalculator`` and the provenance in ``atoms.info`` under ``reference``,
``reference_class``, ``reference_parameters``, ``wall_time_s`` and ``labelled_at``
(see :mod:`ase_petft._provenance`), which :class:`ase_petft.LabelBuffer` stores.

:func:`label_many` runs :func:`label` on any ``concurrent.futures.Executor`` (a
process pool, ``dask.distributed.Client.get_executor()``, Parsl, ...) or inline.
Both are plain functions of picklable arguments, so they run anywhere.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Executor
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from ase import Atoms
from ase.calculators.calculator import all_changes, all_properties
from ase.calculators.singlepoint import SinglePointCalculator

from . import _provenance as prov
from .errors import ConfigError, LabellingError

__all__ = ["label", "label_many"]

logger = logging.getLogger(__name__)

_DEFAULT_PROPERTIES = ("energy", "forces")
# keys that belong to a previous life of the structure in a buffer
_STALE_INFO_KEYS = (prov.VARIANT, prov.INDEX, prov.APPENDED_AT, prov.VERSION)


def label(atoms: Atoms, reference, *, properties: Sequence[str] = _DEFAULT_PROPERTIES,
          copy_reference: bool = True, timeout: Optional[float] = None) -> Atoms:
    """Compute reference ``properties`` for a copy of ``atoms``; returns the labelled copy.

    ``"stress"`` is computed only for cells periodic in all three directions.

    The caller's ``atoms`` are never modified. With ``copy_reference=True`` (default)
    the calculation runs on ``copy.deepcopy(reference)``, so the caller's calculator
    is not touched at all. If it cannot be deep-copied (or with
    ``copy_reference=False``, to reuse its warm state such as an SCF guess), the
    calculation runs on ``reference`` itself and its ``atoms`` and ``results`` are
    restored afterwards; its internal caches and files may then have changed.

    With ``timeout`` (seconds), a calculation that has not returned by then is
    abandoned and reported as a :class:`LabellingError`: it goes on in a background
    thread (Python cannot stop it; an external program it started keeps running until
    it ends), on the deep copy of the reference, so the caller's calculator is free.
    Without a copy (``copy_reference=False`` or not copyable) a timeout is refused.

    :raises LabellingError: when the reference raises, times out, or returns missing
        or non-finite results; ``error.atoms`` is a copy of the structure and the
        original exception is chained.
    """
    _check_inputs(atoms, reference)
    if timeout is not None and not float(timeout) > 0:
        raise ConfigError(f"timeout must be None or a positive number of seconds, got {timeout!r}")
    request = _requested(atoms, properties)
    calc, restore = _calculator(reference, copy_reference)
    if timeout is not None and calc is reference:
        raise ConfigError(
            f"a timeout needs a copy of the reference, and {_name(reference)} cannot be "
            "deep-copied (or copy_reference=False): an abandoned call would keep using it. "
            "Drop the timeout or make the calculator copyable.")
    work = atoms.copy()
    work.calc = None
    try:
        start = time.perf_counter()
        try:
            results = _compute(calc, work, request, timeout)
        finally:
            wall_time = time.perf_counter() - start
            restore()
        _check_results(results, request, len(atoms))
    except Exception as exc:
        raise LabellingError(
            f"reference calculator {_name(reference)} failed on {_describe(atoms)}: "
            f"{type(exc).__name__}: {exc}", atoms=atoms.copy()) from exc
    return _labelled_copy(atoms, results, request, calc, wall_time)


def label_many(frames: Iterable[Atoms], reference, *, executor: Executor | None = None,
               properties: Sequence[str] = _DEFAULT_PROPERTIES,
               copy_reference: bool = True, timeout: Optional[float] = None) -> list:
    """Label many structures, inline (``executor=None``) or on a ``concurrent.futures.Executor``.

    Returns one entry per input frame, in input order: the labelled ``ase.Atoms``, or
    the :class:`~ase_petft.errors.LabellingError` of a frame that failed (it carries the
    structure as ``.atoms``); failures never stop the batch. Keep the good ones with
    ``[r for r in results if not isinstance(r, LabellingError)]``. On an executor the
    reference is pickled to the workers, so each worker labels with its own copy.
    """
    frames = list(frames)
    for i, atoms in enumerate(frames):
        if not isinstance(atoms, Atoms):
            raise ConfigError(f"frame {i} is a {type(atoms).__name__}, expected ase.Atoms")
    _check_inputs(frames[0] if frames else Atoms(), reference)
    _requested(Atoms(), properties)  # validate the names once, before submitting anything
    kwargs = {"properties": tuple(properties), "copy_reference": copy_reference,
              "timeout": timeout}
    if executor is None:
        return [_label_or_error(atoms, reference, kwargs) for atoms in frames]
    futures = []
    try:
        futures = [executor.submit(label, atoms, reference, **kwargs) for atoms in frames]
        return [_outcome(i, atoms, future) for i, (atoms, future) in enumerate(zip(frames, futures))]
    except BaseException:
        for future in futures:
            future.cancel()
        raise


def _label_or_error(atoms: Atoms, reference, kwargs: dict) -> Union[Atoms, LabellingError]:
    try:
        return label(atoms, reference, **kwargs)
    except LabellingError as exc:
        logger.warning("%s", exc)
        return exc


def _outcome(i: int, atoms: Atoms, future) -> Union[Atoms, LabellingError]:
    try:
        return future.result()
    except LabellingError as exc:
        logger.warning("%s", exc)
        return exc
    except Exception as exc:  # the executor failed (dead worker, unpicklable reference...)
        error = LabellingError(f"labelling frame {i} ({_describe(atoms)}) failed on the "
                               f"executor: {type(exc).__name__}: {exc}", atoms=atoms.copy())
        error.__cause__ = exc
        logger.warning("%s", error)
        return error


# -- helpers ---------------------------------------------------------------------------------


def _check_inputs(atoms: Atoms, reference) -> None:
    if not isinstance(atoms, Atoms):
        raise ConfigError(f"atoms must be an ase.Atoms, got {type(atoms).__name__}; for "
                          "several structures use label_many(frames, reference)")
    if isinstance(reference, type):
        raise ConfigError(f"reference must be an ASE calculator instance, got the class "
                          f"{reference.__name__}; pass {reference.__name__}(...)")
    if reference is None or not (hasattr(reference, "calculate") or hasattr(reference, "get_property")):
        raise ConfigError(f"reference must be an ASE calculator (e.g. EMT(), a DFT "
                          f"calculator), got {type(reference).__name__}")
    if prov.is_model_calculator(reference):
        raise LabellingError(
            f"reference {type(reference).__name__} is an ML model calculator: its predictions "
            "must never become labels. Pass a reference method (DFT, xTB, EMT...).",
            atoms=atoms.copy())


def _requested(atoms: Atoms, properties: Sequence[str]) -> list:
    if isinstance(properties, str):
        raise ConfigError(f"properties must be a sequence of names like ('energy', 'forces'), "
                        f"got the string {properties!r}")
    unknown = [p for p in properties if p not in all_properties]
    if unknown or "energy" not in properties:
        raise ConfigError(f"properties {list(properties)} must include 'energy' and only ASE "
                         f"property names (unknown: {unknown}); e.g. ('energy', 'forces', 'stress')")
    periodic = bool(np.all(atoms.pbc))
    return [p for p in dict.fromkeys(properties) if p != "stress" or periodic]


def _calculator(reference, copy_reference: bool) -> tuple:
    """(calculator to use, function restoring the caller's calculator state)."""
    if copy_reference:
        try:
            return copy.deepcopy(reference), lambda: None
        except Exception as exc:
            logger.info("cannot deep-copy %s (%s); labelling with it and restoring its "
                        "atoms and results afterwards", _name(reference), exc)
    saved_atoms = getattr(reference, "atoms", None)
    saved_results = dict(getattr(reference, "results", {}) or {})

    def restore() -> None:
        if hasattr(reference, "results"):
            reference.atoms = saved_atoms
            reference.results = saved_results

    return reference, restore


def _compute(calc, atoms: Atoms, request: list, timeout: Optional[float] = None) -> dict:
    if timeout is None:
        return _compute_now(calc, atoms, request)
    outcome: dict = {}

    def work() -> None:
        try:
            outcome["results"] = _compute_now(calc, atoms, request)
        except BaseException as exc:  # handed to the caller below
            outcome["error"] = exc

    thread = threading.Thread(target=work, name="petft-reference", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TimeoutError(f"no result after {timeout:g} s (timeout); the call was abandoned")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["results"]


def _compute_now(calc, atoms: Atoms, request: list) -> dict:
    if hasattr(calc, "calculate") and hasattr(calc, "results"):
        calc.calculate(atoms, list(request), list(all_changes))
        return {k: calc.results[k] for k in request if k in calc.results}
    return {k: calc.get_property(k, atoms) for k in request}


def _check_results(results: dict, request: list, n_atoms: int) -> None:
    missing = [p for p in request if p not in results]
    if missing:
        raise RuntimeError(f"the reference returned no {missing}")
    expected = {"energy": (), "free_energy": (), "forces": (n_atoms, 3), "stress": (6,)}
    for key, value in results.items():
        array = np.asarray(value, dtype=float)
        if key == "stress" and array.shape == (3, 3):
            continue
        if key in expected and array.shape != expected[key]:
            raise RuntimeError(f"the reference returned {key} of shape {array.shape}, "
                               f"expected {expected[key]}")
        if not np.all(np.isfinite(array)):
            raise RuntimeError(f"the reference returned non-finite {key}")


def _labelled_copy(atoms: Atoms, results: dict, request: list, calc, wall_time: float) -> Atoms:
    labelled = atoms.copy()
    for key in _STALE_INFO_KEYS:
        labelled.info.pop(key, None)
    kept = {k: copy.deepcopy(results[k]) for k in request}
    labelled.calc = SinglePointCalculator(labelled, **kept)
    description = prov.describe_calculator(calc)
    labelled.info.update({
        prov.REFERENCE: description["name"],
        prov.REFERENCE_CLASS: description["class"],
        prov.REFERENCE_PARAMETERS: description["parameters"],
        prov.WALL_TIME: wall_time,
        prov.LABELLED_AT: prov.utc_now(),
    })
    return labelled


def _name(calc) -> str:
    name = getattr(calc, "name", None)
    return name if isinstance(name, str) and name else type(calc).__name__


def _describe(atoms: Atoms) -> str:
    return f"{atoms.get_chemical_formula()} ({len(atoms)} atoms)"
