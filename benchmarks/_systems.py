"""Structures shared by the benchmark scripts (deterministic, no downloads)."""

from __future__ import annotations

import numpy as np
from ase import Atoms


def random_organic_cell(n_atoms: int, *, seed: int = 0, density: float = 0.09) -> Atoms:
    """A periodic cell of H/C/N/O atoms at liquid-like density, no pair closer than 1 Å."""
    rng = np.random.default_rng(seed)
    length = (n_atoms / density) ** (1 / 3)
    positions = []
    while len(positions) < n_atoms:
        trial = rng.uniform(0, length, size=3)
        if all(_mic_distance(trial, p, length) > 1.0 for p in positions):
            positions.append(trial)
    symbols = rng.choice(["H", "H", "C", "N", "O"], size=n_atoms)
    return Atoms(symbols=list(symbols), positions=positions, cell=[length] * 3, pbc=True)


def _mic_distance(a, b, length):
    d = a - b
    d -= length * np.round(d / length)
    return float(np.linalg.norm(d))
