"""Provenance of reference labels, shared by :mod:`.labelling` and :mod:`.buffer`.

A labelled structure carries its provenance in ``atoms.info`` under the keys below;
:func:`ase_petft.label` writes them and :class:`ase_petft.LabelBuffer` stores them
(and restores them, with the buffer's own keys, on every frame it returns).

=========================  ===============================================================
key                        value
=========================  ===============================================================
``reference``              name of the reference calculator (``calc.name``, e.g. ``"emt"``)
``reference_class``        its class, ``"module.QualName"``
``reference_parameters``   its parameters: ``todict()`` made JSON-safe (dict)
``wall_time_s``            wall time of the reference calculation, seconds
``labelled_at``            when the label was computed, ISO 8601 UTC
``variant``                energy variant of the label (buffer only)
``appended_at``            when the label entered the buffer, ISO 8601 UTC (buffer only)
``ase_petft_version``      ase_petft version that appended it (buffer only)
``buffer_index``           index of the frame in its buffer (buffer only, not stored)
=========================  ===============================================================

Nothing here imports torch or metatrain.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import pathlib
from typing import Any

import numpy as np

__all__ = [
    "PROVENANCE_KEYS",
    "BUFFER_KEYS",
    "FAILURE_KEYS",
    "RESERVED_INFO_KEYS",
    "describe_calculator",
    "is_model_calculator",
    "level_of_theory",
    "content_key",
    "json_safe",
    "utc_now",
]

REFERENCE = "reference"
REFERENCE_CLASS = "reference_class"
REFERENCE_PARAMETERS = "reference_parameters"
WALL_TIME = "wall_time_s"
LABELLED_AT = "labelled_at"
PROVENANCE_KEYS = (REFERENCE, REFERENCE_CLASS, REFERENCE_PARAMETERS, WALL_TIME, LABELLED_AT)

VARIANT = "variant"
APPENDED_AT = "appended_at"
VERSION = "ase_petft_version"
INDEX = "buffer_index"
BUFFER_KEYS = (VARIANT, APPENDED_AT, VERSION, INDEX)

ERROR = "error"
ERROR_TYPE = "error_type"
RECORDED_AT = "recorded_at"
FAILURE_KEYS = (ERROR, ERROR_TYPE, RECORDED_AT)

# keys that metadata may not use: ours, and the result keys of extxyz files
RESERVED_INFO_KEYS = frozenset(
    PROVENANCE_KEYS + BUFFER_KEYS + FAILURE_KEYS
    + ("energy", "free_energy", "forces", "stress", "virial")
)

_MAX_DEPTH = 20
_MAX_REPR = 200


def utc_now() -> str:
    """The current time as an ISO 8601 UTC string (microseconds)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat()


def is_model_calculator(calc: object) -> bool:
    """True when ``calc`` predicts with an ML model (ase_petft or metatomic).

    Detected without importing torch: ase_petft's model calculators set the class
    attribute ``_ase_petft_model_prediction = True``; metatomic's live in modules
    whose name starts with ``"metatomic"``.
    """
    cls = type(calc)
    if getattr(cls, "_ase_petft_model_prediction", False) is True:
        return True
    return any(str(getattr(k, "__module__", "")).startswith("metatomic") for k in cls.__mro__)


def describe_calculator(calc: object) -> dict:
    """``{"name", "class", "parameters"}`` of a calculator; never raises.

    ``parameters`` is ``calc.default_parameters`` updated with ``calc.todict()`` (or
    ``calc.parameters``), made JSON-safe by :func:`json_safe`: ASE's ``todict()`` leaves
    out parameters at their default, so without the defaults a GFN2-xTB label (tblite's
    default method) could not be told from a GFN1-xTB one. When ``todict()`` raises, the
    error is recorded instead.
    """
    cls = type(calc)
    name = getattr(calc, "name", None)
    if not isinstance(name, str) or not name:
        name = cls.__name__
    try:
        if callable(getattr(calc, "todict", None)):
            params = calc.todict()
        else:
            params = getattr(calc, "parameters", None) or {}
        defaults = getattr(calc, "default_parameters", None)
        if isinstance(defaults, dict) and isinstance(params, dict):
            params = {**defaults, **params}
        parameters = json_safe(params)
    except Exception as exc:  # a broken todict() must not lose the label
        parameters = {"__error__": f"todict() raised {type(exc).__name__}: {exc}"}
    if not isinstance(parameters, dict):
        parameters = {"value": parameters}
    return {"name": name, "class": f"{cls.__module__}.{cls.__qualname__}", "parameters": parameters}


LEVEL_KEYS = ("method", "xc", "functional", "level", "model")


def level_of_theory(parameters: Any) -> str | None:
    """The method a reference's recorded parameters name (``method``, ``xc``...), if any."""
    if isinstance(parameters, dict):
        for key in LEVEL_KEYS:
            value = parameters.get(key)
            if isinstance(value, str) and value:
                return value
    return None


def json_safe(obj: Any, _depth: int = 0) -> Any:
    """A JSON-serialisable copy of ``obj``, lossy but never raising and never pickling.

    numpy scalars and arrays become Python numbers and (nested) lists, paths become
    strings, dict keys become strings, and anything else becomes a short ``repr``.
    """
    if _depth > _MAX_DEPTH:
        return "<too deeply nested>"
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)) and not isinstance(obj, np.bool_):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "biuf":
            return obj.tolist()
        return [json_safe(x, _depth + 1) for x in obj.ravel().tolist()]
    if isinstance(obj, dict):
        return {str(k): json_safe(v, _depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        items = sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj
        return [json_safe(x, _depth + 1) for x in items]
    if isinstance(obj, pathlib.PurePath):
        return str(obj)
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def finite_or_none(value: Any) -> float | None:
    """``float(value)`` when it is a finite number, else None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def dumps(document: dict) -> bytes:
    """Compact UTF-8 JSON (NaN/Infinity allowed: Python's json reads them back)."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def content_key(numbers, positions, cell, pbc, *values) -> str:
    """Identity of a structure, and of whatever ``values`` are given with it (energies,
    forces, variant names; None counts as a value): a SHA-1 of the exact numbers. The
    one key for "the same structure" (the learner), "the same label" (buffer imports)
    and "the same fitted label" (reused heads rows)."""
    digest = hashlib.sha1()
    parts = [np.asarray(numbers, dtype=np.int64), np.asarray(positions, dtype=np.float64),
             np.asarray(cell, dtype=np.float64), np.asarray(pbc, dtype=np.uint8)]
    for value in values:
        if value is None:
            parts.append(b"-")
        elif isinstance(value, str):
            parts.append(value.encode())
        else:
            parts.append(np.asarray(value, dtype=np.float64))
    for part in parts:
        digest.update(part if isinstance(part, bytes) else np.ascontiguousarray(part).tobytes())
        digest.update(b"|")
    return digest.hexdigest()
