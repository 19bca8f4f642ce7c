"""Incremental closed-form refits: the heads rows of earlier refits, reused exactly.

A heads refit changes only the last layers, and PET's energy is linear in them: the
Jacobian rows A of a label do not depend on the last-layer weights θ, and its residual
follows any change of them exactly, y(θ) = y(θ_ref) − A (θ − θ_ref). So the rows of
every label are written next to the generation (``heads_rows.<variant>.npz``: A as
float32 when the model is float32 — lossless —, y at θ_ref, row weights and kinds, one
key per label), and the next refit computes rows only for labels it has not seen. Rows
are reused only under the same *backbone fingerprint* (every other tensor of the model,
composition and scale included) and the same row weights; a full or LoRA refit changes
the backbone and so starts afresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .._provenance import content_key
from ..labels import Label

logger = logging.getLogger(__name__)

__all__ = ["RowCache", "label_key", "row_setting", "load", "save", "cache_path"]

VERSION = 2  # 2: stress rows from the symmetric part of the strain derivative


def label_key(label: Label) -> str:
    """Identity of a label: its structure and every value it is fitted to."""
    atoms = label.atoms
    return content_key(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc, label.energy,
                       label.forces, label.stress)


def row_setting(config) -> str:
    """The settings that shape the rows (not the solver's choices)."""
    return json.dumps({"energy": config.energy_weight, "forces": config.forces_weight,
                       "stress": config.stress_weight}, sort_keys=True)


@dataclasses.dataclass
class RowCache:
    """Rows of a set of labels at last-layer weights ``theta``."""

    variant: str
    fingerprint: str
    setting: str
    theta: np.ndarray
    rows: Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # key: A, y, w, kind

    def at(self, theta: np.ndarray) -> Dict[str, tuple]:
        """The rows with residuals moved to the weights ``theta`` (exact)."""
        shift = np.asarray(theta, dtype=np.float64) - self.theta
        if not np.any(shift):
            return dict(self.rows)
        return {k: (A, y - A.astype(np.float64) @ shift, w, kind)
                for k, (A, y, w, kind) in self.rows.items()}


def cache_path(folder: pathlib.Path, variant: str) -> pathlib.Path:
    return pathlib.Path(folder) / f"heads_rows.{variant.replace('/', '__')}.npz"


def save(folder: pathlib.Path, cache: RowCache) -> Optional[pathlib.Path]:
    """Write ``cache`` next to a generation (temporary name, then rename)."""
    path = cache_path(folder, cache.variant)
    keys = list(cache.rows)
    if not keys:
        return None
    A = [cache.rows[k][0] for k in keys]
    arrays = {
        "version": np.array(VERSION), "variant": np.array(cache.variant),
        "fingerprint": np.array(cache.fingerprint), "setting": np.array(cache.setting),
        "theta": cache.theta, "keys": np.array(keys),
        "counts": np.array([len(a) for a in A]),
        "A": np.concatenate(A), "y": np.concatenate([cache.rows[k][1] for k in keys]),
        "w": np.concatenate([cache.rows[k][2] for k in keys]),
        "kind": np.concatenate([cache.rows[k][3] for k in keys]).astype("U6"),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    os.replace(tmp, path)
    return path


def load(folders: Sequence[pathlib.Path], *, variant: str, fingerprint: str,
         setting: str) -> List[RowCache]:
    """The caches in ``folders`` that are valid for this backbone, variant and setting."""
    found = []
    for folder in folders:
        path = cache_path(folder, variant)
        if not path.is_file():
            continue
        try:
            with np.load(path, allow_pickle=False) as data:
                if (int(data["version"]) != VERSION or str(data["variant"]) != variant
                        or str(data["fingerprint"]) != fingerprint
                        or str(data["setting"]) != setting):
                    logger.debug("rows in %s are for another backbone or setting", path)
                    continue
                ends = np.cumsum(data["counts"])
                starts = ends - data["counts"]
                A, y, w, kind = data["A"], data["y"], data["w"], data["kind"]
                rows = {str(k): (A[a:b], y[a:b], w[a:b], kind[a:b])
                        for k, a, b in zip(data["keys"], starts, ends)}
                found.append(RowCache(variant, fingerprint, setting,
                                      np.array(data["theta"], dtype=np.float64), rows))
        except (OSError, ValueError, KeyError) as exc:  # a damaged cache is only a miss
            logger.warning("ignoring unreadable heads rows %s: %s", path, exc)
    return found
