"""Checks of a structure before the model sees it: things PET cannot handle, and traps.

Refused (:class:`UnsupportedSystemError`): no atoms, non-finite positions or cell, a
periodic direction without a cell vector (singular cell), a structure without a cell
spanning more than ``MAX_EXTENT_CUTOFFS`` cutoffs, and more neighbours per atom
than ``MAX_NEIGHBOURS`` within the model's cutoff — PET's attention runs over each
atom's neighbours, so its memory grows with their square: a CH4 in a 0.5 Å periodic
cell (15 000 neighbours per atom) took 24 GB before the kernel killed it. Warned once
per calculator (logged): atoms closer than ``MIN_DISTANCE`` (usually a mistake) and
coordinates far from the origin (float32 models lose precision: a 10⁴ Å shift changed
forces by 5 %).

The neighbour count is estimated from the density (periodic cells) or bounded by the
number of atoms (molecules); only when that bound exceeds the limit is the exact count
computed with ASE's neighbour list. Results are cached per cell, pbc and atom count.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from .errors import UnsupportedSystemError

__all__ = ["StructureCheck", "MAX_NEIGHBOURS"]

logger = logging.getLogger(__name__)

MAX_NEIGHBOURS = 1000  # per atom within the cutoff; dense solids at 6 Å have ~100
MIN_DISTANCE = 0.1  # Å
FAR_FROM_ORIGIN = 1.0e3  # Å; float32 keeps ~7 digits
#: largest span of a structure without a cell, in model cutoffs (900 Å at 4.5 Å): a flat
#: one of 2500 Å crashed the process in the neighbour list (vesin, SIGFPE), 2000 did not
MAX_EXTENT_CUTOFFS = 200


class StructureCheck:
    """Per-calculator checker (remembers what it warned about and the last cell seen)."""

    def __init__(self, cutoff: float, *, float32: bool):
        self.cutoff = float(cutoff)
        self.float32 = bool(float32)
        self._cleared = None  # (n, cell bytes, pbc bytes) whose neighbour count passed
        self._warned = set()

    def __call__(self, atoms) -> None:
        n = len(atoms)
        if n == 0:
            raise UnsupportedSystemError("the structure has no atoms; give at least one atom")
        positions = atoms.positions
        if not np.all(np.isfinite(positions)):
            bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
            raise UnsupportedSystemError(
                f"atoms {bad[:10].tolist()} have non-finite positions (NaN or inf); the "
                "structure is broken upstream (an exploded simulation?)")
        self._check_cell(atoms)
        self._check_extent(atoms)
        key = (n, np.asarray(atoms.cell).tobytes(), atoms.pbc.tobytes())
        if key != self._cleared:  # a new system (not the next MD step)
            self._check_neighbours(atoms)
            self._cleared = key
            self._warn_close_atoms(atoms)
        self._warn_far(atoms)

    def _check_cell(self, atoms) -> None:
        cell = np.asarray(atoms.cell, dtype=float)
        if not np.all(np.isfinite(cell)):
            raise UnsupportedSystemError("the cell has non-finite entries; fix the cell")
        if not atoms.pbc.any():
            return
        periodic = cell[atoms.pbc]
        if np.linalg.matrix_rank(periodic, tol=1e-8) < len(periodic):
            raise UnsupportedSystemError(
                f"the cell is singular along the periodic directions (pbc="
                f"{atoms.pbc.tolist()}, cell={np.round(cell, 6).tolist()}); give a cell "
                "vector for every periodic direction, or set those directions non-periodic")

    def _check_extent(self, atoms) -> None:
        """A structure without a cell spanning thousands of Å is no molecule (atoms flew
        off in an exploded simulation, or the coordinates are not in Å), and a flat one
        that large crashed the whole process in the neighbour list (SIGFPE in vesin)."""
        if atoms.pbc.any():
            return
        extent = float(np.ptp(atoms.positions, axis=0).max())
        limit = MAX_EXTENT_CUTOFFS * self.cutoff
        if extent > limit:
            raise UnsupportedSystemError(
                f"the atoms span {extent:.4g} Å without a periodic cell, more than "
                f"{MAX_EXTENT_CUTOFFS}× the model's cutoff ({limit:g} Å): atoms flew apart "
                "(an exploded simulation?) or the coordinates are not in Å. Check the "
                "structure; for a dilute gas use a periodic cell")

    def _check_neighbours(self, atoms) -> None:
        n = len(atoms)
        sphere = 4.0 / 3.0 * math.pi * self.cutoff ** 3
        if atoms.pbc.all():
            bound = n / abs(np.linalg.det(np.asarray(atoms.cell))) * sphere
        elif not atoms.pbc.any():
            bound = n - 1
        else:
            bound = math.inf
        if bound <= MAX_NEIGHBOURS / 2:
            return
        from ase.neighborlist import neighbor_list

        if atoms.pbc.all() and bound > 50 * MAX_NEIGHBOURS:
            worst = bound  # counting them would itself exhaust memory
        else:
            first = neighbor_list("i", atoms, self.cutoff, self_interaction=False)
            worst = int(np.bincount(first, minlength=n).max()) if len(first) else 0
        if worst > MAX_NEIGHBOURS:
            raise UnsupportedSystemError(
                f"{worst:.0f} neighbours per atom within the model's cutoff of "
                f"{self.cutoff:g} Å (at most {MAX_NEIGHBOURS} are supported: PET's memory "
                "grows with their square). Is the cell far too small (density "
                f"{n / max(abs(atoms.cell.volume), 1e-12):.3g} atoms/Å³)? Check the cell "
                "and its units (Å).")

    def _warn_close_atoms(self, atoms) -> None:
        if len(atoms) < 2 or "close" in self._warned:
            return
        from ase.neighborlist import neighbor_list

        distances = neighbor_list("d", atoms, MIN_DISTANCE, self_interaction=False)
        if len(distances):
            self._warned.add("close")
            logger.warning("atoms %.3g Å apart (less than %g Å): probably duplicated atoms; "
                           "the model's predictions there are meaningless",
                           float(distances.min()), MIN_DISTANCE)

    def _warn_far(self, atoms) -> None:
        if self.float32 and "far" not in self._warned:
            extent = float(np.abs(atoms.positions).max())
            if extent > FAR_FROM_ORIGIN:
                self._warned.add("far")
                logger.warning("atoms are up to %.3g Å from the origin: the float32 model "
                               "loses precision there (a 1e4 Å shift changed forces by 5 %%); "
                               "centre the structure (atoms.center()) or use dtype='float64'",
                               extent)
