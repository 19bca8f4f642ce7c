"""Validation of labels and conversion between ``ase.Atoms`` and buffer records.

Every check runs before anything is written; a refused frame raises
:class:`~ase_petft.errors.LabelBufferError` naming the field and the frame.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping, Optional

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import full_3x3_to_voigt_6_stress

from .. import _provenance as prov
from ..errors import LabelBufferError, VariantError
from ..labels import stale_fields
from ..variants import validate_variant
from .table import ATOM_DTYPE, FRAME_DTYPE, VARIANT_BYTES

__all__ = ["Record", "label_record", "failure_record", "encode_metadata", "decode_metadata",
           "build_atoms", "pack_records", "row_to_atoms", "check_variant"]

MAX_DOCUMENT_BYTES = 1 << 20


@dataclasses.dataclass
class Record:
    """One validated frame, ready to be written."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    energy: float
    forces: Optional[np.ndarray]
    stress: Optional[np.ndarray]
    variant: str
    document: bytes


def record_key(numbers, positions, cell, pbc, energy, variant: str) -> str:
    """Exact identity of a label: the same structure with the same energy and variant."""
    return prov.content_key(numbers, positions, cell, pbc, energy, str(variant))


class _Frame:
    """Names a frame in error messages; the formula is only computed for a message."""

    def __init__(self, atoms: object, where: str):
        self.atoms, self.where = atoms, where

    def __str__(self) -> str:
        if not isinstance(self.atoms, Atoms):
            return self.where
        try:
            return f"{self.where} ({self.atoms.get_chemical_formula()}, {len(self.atoms)} atoms)"
        except Exception:
            return self.where


def _fail(what: str, frame: object, fix: str) -> LabelBufferError:
    return LabelBufferError(f"{frame}: {what}; nothing was written. {fix}")


def check_variant(variant: object, frame: object) -> str:
    try:
        validate_variant(variant)
    except VariantError as exc:
        raise _fail(f"invalid variant: {exc}", frame, "Pass variant='energy' or 'energy/<name>'.") from exc
    if len(variant.encode()) > VARIANT_BYTES:
        raise _fail(f"variant {variant!r} is longer than {VARIANT_BYTES} bytes", frame,
                    "Use a shorter name for the level of theory.")
    return variant


def _structure(atoms: object, frame: object, allowed: Optional[frozenset]) -> tuple:
    if not isinstance(atoms, Atoms):
        raise _fail(f"expected an ase.Atoms, got {type(atoms).__name__}", frame,
                    "Pass ase.Atoms objects.")
    if len(atoms) == 0:
        raise _fail("the structure has no atoms", frame, "Remove empty structures.")
    numbers = np.array(atoms.numbers, dtype=np.int64)
    if numbers.min() < 1 or numbers.max() > 118:
        raise _fail(f"atomic numbers must be 1..118, got {sorted(set(numbers.tolist()))}", frame,
                    "Remove dummy atoms (X, Z=0).")
    positions = np.array(atoms.positions, dtype=np.float64)
    cell = np.array(atoms.cell.array, dtype=np.float64)
    for name, value in (("positions", positions), ("cell", cell)):
        if not np.all(np.isfinite(value)):
            raise _fail(f"{name} contain NaN or infinite values", frame, "Fix the structure.")
    if allowed is not None:
        extra = sorted(set(atoms.get_chemical_symbols()) - _symbols(allowed))
        if extra:
            raise _fail(f"elements {extra} are outside this buffer's allowed elements "
                        f"{sorted(_symbols(allowed))}", frame,
                        "Label only structures of the declared elements, or use another buffer.")
    return numbers, positions, cell, np.array(atoms.pbc, dtype=bool)


def _symbols(numbers: frozenset) -> set:
    from ase.data import chemical_symbols
    return {chemical_symbols[z] for z in numbers}


def _reference_results(atoms: Atoms, frame: object) -> Mapping[str, Any]:
    calc = atoms.calc
    fix = "Compute reference labels with ase_petft.label(atoms, reference) first."
    if calc is None:
        raise _fail("the structure has no reference results (atoms.calc is None)", frame, fix)
    if prov.is_model_calculator(calc):
        raise _fail(f"its results come from an ML model ({type(calc).__name__}), not from a "
                    "reference calculation; model predictions must never become labels", frame, fix)
    results = getattr(calc, "results", None)
    if not isinstance(results, Mapping) or "energy" not in results:
        have = sorted(results) if isinstance(results, Mapping) else []
        raise _fail(f"no reference energy in atoms.calc.results (found {have})", frame, fix)
    calc_atoms = getattr(calc, "atoms", None)
    if calc_atoms is None:
        raise _fail("atoms.calc does not record which structure its results belong to "
                    "(atoms.calc.atoms is None)", frame, fix)
    try:
        stale = stale_fields(calc, atoms)
    except Exception as exc:
        raise _fail(f"cannot check that atoms.calc's results belong to this structure "
                    f"({type(exc).__name__}: {exc})", frame, fix) from exc
    if stale:
        raise _fail(f"the results are stale: {', '.join(stale)} changed after the calculation",
                    frame, fix)
    return results


def _array(results: Mapping, key: str, shape: tuple, frame: object) -> np.ndarray:
    try:
        value = np.array(results[key], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _fail(f"{key} is not numeric: {exc}", frame, "Check the reference calculator.") from exc
    if key == "stress" and value.shape == (3, 3):
        value = full_3x3_to_voigt_6_stress(value)
    if value.shape != shape:
        raise _fail(f"{key} has shape {value.shape}, expected {shape}", frame,
                    "Check the reference calculator's output.")
    if not np.all(np.isfinite(value)):
        raise _fail(f"{key} contains NaN or infinite values", frame,
                    "The reference calculation failed; record it with record_failure().")
    return value


def label_record(atoms: Atoms, *, variant: str, metadata: Mapping, where: str,
                 allowed: Optional[frozenset], require_forces: bool, version: str) -> Record:
    """Validate a labelled structure and turn it into a :class:`Record`."""
    frame = _Frame(atoms, where)
    variant = check_variant(variant, frame)
    numbers, positions, cell, pbc = _structure(atoms, frame, allowed)
    results = _reference_results(atoms, frame)
    energy = float(_array(results, "energy", (), frame))
    forces = _array(results, "forces", (len(atoms), 3), frame) if "forces" in results else None
    if forces is None and require_forces:
        raise _fail("forces are missing and this buffer requires them", frame,
                    "Label with properties=('energy', 'forces'), or create the buffer with "
                    "require_forces=False.")
    stress = _array(results, "stress", (6,), frame) if "stress" in results else None
    if stress is not None and not abs(atoms.cell.volume) > 0:
        raise _fail("stress is given but the cell has zero volume", frame,
                    "Drop the stress of non-periodic structures.")
    document = {
        "reference": _provenance_reference(atoms),
        prov.WALL_TIME: prov.finite_or_none(atoms.info.get(prov.WALL_TIME)),
        prov.LABELLED_AT: _str_or_none(atoms.info.get(prov.LABELLED_AT)),
        prov.APPENDED_AT: prov.utc_now(),
        prov.VERSION: version,
        "metadata": encode_metadata(metadata, frame),
    }
    return Record(numbers, positions, cell, pbc, energy, forces, stress, variant,
                  _dump(document, frame))


def failure_record(atoms: Atoms, *, error: object, variant: Optional[str], reference: object,
                   metadata: Mapping, where: str, version: str) -> Record:
    """Validate a structure whose reference calculation failed; no results needed."""
    frame = _Frame(atoms, where)
    if variant is not None:
        variant = check_variant(variant, frame)
    numbers, positions, cell, pbc = _structure(atoms, frame, None)
    if isinstance(error, BaseException):
        message, error_type = _error_chain(error), type(error).__name__
    elif isinstance(error, str) and error:
        message, error_type = error, ""
    else:
        raise _fail(f"error must be an exception or a non-empty message, got {error!r}", frame,
                    "Pass error=exc.")
    document = {
        "reference": None if reference is None else prov.describe_calculator(reference),
        prov.ERROR: message,
        prov.ERROR_TYPE: error_type,
        prov.RECORDED_AT: prov.utc_now(),
        prov.VERSION: version,
        "metadata": encode_metadata(metadata, frame),
    }
    return Record(numbers, positions, cell, pbc, math.nan, None, None, variant or "",
                  _dump(document, frame))


def _error_chain(error: BaseException) -> str:
    parts, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        parts.append(f"{type(error).__name__}: {error}")
        error = error.__cause__ or error.__context__
    return " <- ".join(parts)


def _provenance_reference(atoms: Atoms) -> Optional[dict]:
    info = atoms.info
    if isinstance(info.get(prov.REFERENCE), str):
        params = info.get(prov.REFERENCE_PARAMETERS)
        return {"name": info[prov.REFERENCE],
                "class": _str_or_none(info.get(prov.REFERENCE_CLASS)),
                "parameters": prov.json_safe(params) if isinstance(params, Mapping) else {}}
    if isinstance(atoms.calc, SinglePointCalculator):
        return None  # results copied from elsewhere: the reference is unknown
    return prov.describe_calculator(atoms.calc)


def _str_or_none(value: object) -> Optional[str]:
    return value if isinstance(value, str) else None


def _dump(document: dict, frame: object) -> bytes:
    data = prov.dumps(document)
    if len(data) > MAX_DOCUMENT_BYTES:
        raise _fail(f"metadata and provenance take {len(data)} bytes, more than "
                    f"{MAX_DOCUMENT_BYTES}", frame, "Store large arrays elsewhere.")
    return data


# -- metadata: strict JSON with numpy arrays --------------------------------------------

_ARRAY = "__ndarray__"


def encode_metadata(metadata: Mapping, frame: object) -> dict:
    """Strictly JSON-encode free metadata; refuses reserved keys and unknown types."""
    out = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise _fail(f"metadata key {key!r} is not a string", frame, "Use string keys.")
        if key in prov.RESERVED_INFO_KEYS:
            raise _fail(f"metadata key {key!r} is reserved", frame,
                        f"Rename it; reserved keys are {sorted(prov.RESERVED_INFO_KEYS)}.")
        out[key] = _encode(value, f"metadata {key!r}", frame)
    return out


def _encode(value: Any, what: str, frame: object, depth: int = 0) -> Any:
    if depth > 20:
        raise _fail(f"{what} is nested too deeply", frame, "Flatten it.")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return {_ARRAY: value.ravel().tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, (list, tuple)):
        return [_encode(v, what, frame, depth + 1) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        if _ARRAY in value:
            raise _fail(f"{what} uses the reserved key {_ARRAY!r}", frame, "Rename it.")
        return {k: _encode(v, what, frame, depth + 1) for k, v in value.items()}
    raise _fail(f"{what} has type {type(value).__name__}, which cannot be stored", frame,
                "Use numbers, strings, bools, None, lists, dicts with string keys, or numeric "
                "numpy arrays.")


def decode_metadata(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_metadata(v) for v in value]
    if isinstance(value, dict):
        if _ARRAY in value:
            data = np.array(value[_ARRAY], dtype=np.dtype(value["dtype"]))
            return data.reshape(value["shape"])
        return {k: decode_metadata(v) for k, v in value.items()}
    return value


# -- reading --------------------------------------------------------------------------------


def build_atoms(*, numbers, positions, cell, pbc, energy, forces, stress, variant: str,
                document: bytes, index: int) -> Atoms:
    """An ``ase.Atoms`` with its results on a SinglePointCalculator and info restored."""
    atoms = Atoms(numbers=numbers, positions=positions, cell=cell, pbc=pbc)
    doc = json.loads(document.decode("utf-8")) if document else {}
    info = {}
    reference = doc.get("reference")
    if isinstance(reference, dict):
        info[prov.REFERENCE] = reference.get("name")
        info[prov.REFERENCE_CLASS] = reference.get("class")
        info[prov.REFERENCE_PARAMETERS] = reference.get("parameters")
    for key in (prov.WALL_TIME, prov.LABELLED_AT, prov.APPENDED_AT, prov.VERSION,
                prov.ERROR, prov.ERROR_TYPE, prov.RECORDED_AT):
        if key in doc:
            info[key] = doc[key]
    if variant:
        info[prov.VARIANT] = variant
    info[prov.INDEX] = index
    info.update(decode_metadata(doc.get("metadata", {})))
    atoms.info = info
    results = {}
    if not math.isnan(energy):
        results["energy"] = energy
    if forces is not None:
        results["forces"] = forces
    if stress is not None:
        results["stress"] = stress
    if results:
        atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def pack_records(records: list) -> tuple:
    """(frame rows, atom rows, text) of validated records; offsets relative to the batch."""
    rows = np.zeros(len(records), dtype=FRAME_DTYPE)
    sizes = [len(r.numbers) for r in records]
    atoms = np.zeros(sum(sizes), dtype=ATOM_DTYPE)
    atom_start = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64) if records else []
    text_start = 0
    for row, rec, a0, k in zip(rows, records, atom_start, sizes):
        part = atoms[a0:a0 + k]
        part["position"], part["number"] = rec.positions, rec.numbers
        part["force"] = np.nan if rec.forces is None else rec.forces
        row["atom_start"], row["n_atoms"] = a0, k
        row["text_start"], row["text_length"] = text_start, len(rec.document)
        text_start += len(rec.document)
        row["energy"], row["cell"], row["pbc"] = rec.energy, rec.cell, rec.pbc
        row["stress"] = np.nan if rec.stress is None else rec.stress
        row["has_forces"], row["has_stress"] = rec.forces is not None, rec.stress is not None
        row["variant"] = rec.variant.encode()
    return rows, atoms, b"".join(r.document for r in records)


def row_to_atoms(row, atom_rows, text, a0: int, t0: int, index: int) -> Atoms:
    a = int(row["atom_start"]) - a0
    block = atom_rows[a:a + int(row["n_atoms"])]
    t = int(row["text_start"]) - t0
    return build_atoms(
        numbers=block["number"].astype(np.int64), positions=np.array(block["position"]),
        cell=np.array(row["cell"]), pbc=row["pbc"].astype(bool), energy=float(row["energy"]),
        forces=np.array(block["force"]) if row["has_forces"] else None,
        stress=np.array(row["stress"]) if row["has_stress"] else None,
        variant=row["variant"].decode(), document=text[t:t + int(row["text_length"])],
        index=index)
