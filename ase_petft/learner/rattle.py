"""Rattled labels: labelled structures next to the trajectory, not on it.

Every label an MD run asks for lies on its own thermal trajectory. A last-layer refit
fitted to those alone can get better there and worse a few hundredths of an ångström
away (random displacements of 0.05 Å strain stiff bonds further than 400 K does), and
no gate that sees only trajectory labels notices. So, after every ``every``-th label the
simulation asks for, the learner also labels one copy of that structure with every atom
displaced at random (Gaussian, ``sigma_A`` per Cartesian component). A copy is held out
exactly when the structure it was rattled from is, and the heads solver leaves the two
out together (``rattled_from`` in its metadata): no near-copy of a training label judges
a refit. So the fit and the gate both see that region. BENCHMARKS.md has the
measurements that made this the default.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..validation import non_negative_int, positive_float

__all__ = ["RattleConfig", "rattled_copy"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class RattleConfig:
    """When the learner labels a rattled copy of a structure it just labelled.

    :param every: after the 1st, (1 + every)-th, (1 + 2 every)-th, ... label the
        simulation asks for, label one rattled copy too (0: never). The copy counts
        towards ``max_labels``: with a label budget it replaces a trajectory label, without
        one it costs one more reference call per ``every`` labels.
    :param sigma_A: standard deviation of the displacement of each Cartesian coordinate (Å).
    """

    every: int = 4
    sigma_A: float = 0.05

    def __post_init__(self) -> None:
        non_negative_int("every", self.every)
        positive_float("sigma_A", self.sigma_A)

    def due(self, n_simulation_labels: int) -> bool:
        """Whether the label number ``n_simulation_labels`` (1-based, labels the
        simulation asked for) gets a rattled copy."""
        return self.every > 0 and (n_simulation_labels - 1) % self.every == 0


def rattled_copy(atoms, sigma_A: float, seed) -> "object":
    """A copy of ``atoms`` without calculator, each coordinate displaced by a Gaussian
    of standard deviation ``sigma_A`` (reproducible from ``seed``)."""
    copy = atoms.copy()
    copy.calc = None
    rng = np.random.default_rng(seed)
    copy.positions = copy.positions + rng.normal(0.0, sigma_A, copy.positions.shape)
    return copy
