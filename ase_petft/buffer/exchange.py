"""Moving labels in and out of a buffer through files ASE reads and writes.

``ase.io`` is imported inside the functions: it costs ~0.4 s, which writer processes
that only append should not pay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Optional

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.stress import voigt_6_to_full_3x3_stress

from .. import _provenance as prov
from ..errors import LabelBufferError
from .records import check_variant, encode_metadata, label_record

__all__ = ["read_records", "read_labelled", "write_extxyz"]

logger = logging.getLogger(__name__)


def read_records(path, *, variant: str, index, format: Optional[str],
                 energy_key: Optional[str], forces_key: Optional[str],
                 stress_key: Optional[str], metadata: dict, allowed, require_forces: bool,
                 version: str) -> list:
    """Validated records of every labelled structure in ``path`` (``import_file``):
    their JSON-able ``info`` plus ``metadata``, ``source`` and ``source_index``."""
    check_variant(variant, f"importing {str(path)!r}")
    frames = read_labelled(path, index=index, format=format, energy_key=energy_key,
                           forces_key=forces_key, stress_key=stress_key)
    return [label_record(atoms, variant=variant,
                         metadata={**info, **metadata, "source": str(path), "source_index": i},
                         where=f"frame {i} of {str(path)!r}", allowed=allowed,
                         require_forces=require_forces, version=version)
            for i, (atoms, info) in enumerate(frames)]


def read_labelled(path, *, index, format: Optional[str], energy_key: Optional[str],
                  forces_key: Optional[str], stress_key: Optional[str]) -> list:
    """``[(atoms with results, metadata from its info)]`` read with ``ase.io.read``."""
    import ase.io

    try:
        frames = ase.io.read(path, index=index, format=format)
    except Exception as exc:
        raise LabelBufferError(f"cannot read labelled structures from {str(path)!r}: "
                               f"{type(exc).__name__}: {exc}") from exc
    frames = [frames] if isinstance(frames, Atoms) else list(frames)
    if not frames:
        raise LabelBufferError(f"{str(path)!r} holds no structures at index {index!r}.")
    out = []
    for i, atoms in enumerate(frames):
        atoms = _with_results_from_keys(atoms, energy_key, forces_key, stress_key, i, path)
        out.append((atoms, _json_info(atoms.info)))
    return out


def _with_results_from_keys(atoms: Atoms, energy_key, forces_key, stress_key, index: int,
                            path) -> Atoms:
    if not (energy_key or forces_key or stress_key):
        return atoms
    results = dict(atoms.calc.results) if atoms.calc is not None else {}
    atoms = atoms.copy()
    for name, key, source, where in (("energy", energy_key, atoms.info, "info"),
                                     ("forces", forces_key, atoms.arrays, "arrays"),
                                     ("stress", stress_key, atoms.info, "info")):
        if key is None:
            continue
        if key in source:
            results[name] = source.pop(key)
        elif not (key == name and name in results):  # ASE's reader moved it there
            raise LabelBufferError(
                f"frame {index} of {str(path)!r} has no {where} key {key!r} for the "
                f"{name}; it has {sorted(set(source) | set(results))}. Check the key's "
                "spelling: the file's own results are not used in its place")
    atoms.calc = SinglePointCalculator(atoms, **results)
    return atoms


def _json_info(info: dict) -> dict:
    kept = {}
    for key, value in info.items():
        if key in prov.RESERVED_INFO_KEYS:
            continue
        try:
            encode_metadata({key: value}, "")
        except LabelBufferError:
            logger.debug("import: info[%r] cannot be stored as metadata; skipped", key)
            continue
        kept[key] = value
    return kept


def write_extxyz(path, frames: list) -> int:
    """Write labelled frames (read from a buffer) with metatrain's keys; returns the count.

    Forces (stress) are written only when every frame has them: metatrain's reader
    takes a gradient for all frames or for none.
    """
    import ase.io

    have = {key: [key in a.calc.results for a in frames] for key in ("forces", "stress")}
    for key, flags in have.items():
        if any(flags) and not all(flags):
            logger.warning("to_extxyz: only %d of %d frames have %s; writing no %s",
                           sum(flags), len(flags), key, key)
    out = [_extxyz_atoms(a, all(have["forces"]), all(have["stress"])) for a in frames]
    path = pathlib.Path(os.fspath(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        ase.io.write(tmp, out, format="extxyz", write_results=False)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return len(out)


def _extxyz_atoms(atoms: Atoms, with_forces: bool, with_stress: bool) -> Atoms:
    out = Atoms(numbers=atoms.numbers, positions=atoms.positions, cell=atoms.cell, pbc=atoms.pbc)
    results = atoms.calc.results
    out.info = {"energy": results["energy"], prov.VARIANT: atoms.info[prov.VARIANT],
                prov.INDEX: atoms.info[prov.INDEX]}
    if with_forces:
        out.arrays["forces"] = np.array(results["forces"])
    if with_stress:
        out.info["stress"] = voigt_6_to_full_3x3_stress(results["stress"])
    return out
