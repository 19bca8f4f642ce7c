"""A watchdog on the simulation: notice when it has gone unphysical, and say why.

Checked at every observer call, on what the step already computed (no extra model
or reference calls):

- temperature far above the thermostat's target (``max(3 T, T + 1000 K)``; the target
  read every step from ASE's thermostats — Langevin, Andersen, Bussi, Berendsen NVT/NPT,
  Nose-Hoover chains, NPT, LangevinBAOAB —, else the first observed temperature);
- forces beyond any sane range (``max_force_eV_per_A``);
- a jump of the potential energy per atom between two steps of the same model
  (a swap resets the reference: a new variant's first swap shifts the energy);
- a molecule that falls apart: for non-periodic systems the bond graph (covalent radii
  × ``bond_factor``) must not gain fragments;
- reference calls that keep failing (``max_consecutive_failures``): the structure is
  probably no longer chemistry the reference can handle.

The learner reacts (rollback of model and structure, or a stop); the watchdog only
judges and keeps the last healthy snapshot.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import List, Optional

import numpy as np

from ..errors import WorkFailedError
from ..validation import (choice, non_negative_float, optional_positive_float,
                          positive_float, positive_int)

__all__ = ["WatchdogConfig", "Watchdog", "Snapshot", "SimulationUnstableError"]

ACTIONS = ("rollback", "stop")


class SimulationUnstableError(WorkFailedError):
    """The simulation went unphysical and the watchdog was told to stop (or could not
    recover by rolling back)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class WatchdogConfig:
    """When a simulation counts as unphysical, and what the learner then does.

    :param on_unphysical: ``"rollback"`` (default): swap back the last generation that
        ran healthily and restore the last healthy structure (positions and momenta);
        ``"stop"``: raise :class:`SimulationUnstableError` (ends ``dyn.run``).
    :param max_temperature_K: absolute limit; default ``max(3 T, T + 1000 K)`` of the
        target temperature.
    :param max_force_eV_per_A: largest force component magnitude that is still sane.
    :param max_energy_jump_eV_per_atom: largest change of the potential energy per atom
        between two consecutive checked steps of the same model.
    :param bond_factor: two atoms are bonded within ``bond_factor`` × the sum of their
        covalent radii; ``0`` disables the fragmentation check.
    :param max_consecutive_failures: reference failures in a row that count as
        unphysical (no further reference calls are made on that structure).
    :param snapshot_every: healthy steps between two snapshots of the structure.
    :param max_rollbacks: rollbacks without ``snapshot_every`` healthy steps in between
        before the learner gives up and stops.
    """

    on_unphysical: str = "rollback"
    max_temperature_K: Optional[float] = None
    max_force_eV_per_A: float = 30.0
    max_energy_jump_eV_per_atom: float = 1.0
    bond_factor: float = 1.6
    max_consecutive_failures: int = 3
    snapshot_every: int = 10
    max_rollbacks: int = 3

    def __post_init__(self) -> None:
        choice("on_unphysical", self.on_unphysical, ACTIONS)
        for name in ("max_force_eV_per_A", "max_energy_jump_eV_per_atom"):
            positive_float(name, getattr(self, name))
        optional_positive_float("max_temperature_K", self.max_temperature_K)
        non_negative_float("bond_factor", self.bond_factor)
        for name in ("max_consecutive_failures", "snapshot_every", "max_rollbacks"):
            positive_int(name, getattr(self, name))


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A healthy state: structure, momenta and the generation that produced it."""

    step: int
    positions: np.ndarray
    momenta: Optional[np.ndarray]
    cell: np.ndarray
    generation: int


class Watchdog:
    """Judges each step; keeps the last healthy snapshot."""

    def __init__(self, config: WatchdogConfig) -> None:
        self.config = config
        self.snapshots = collections.deque(maxlen=config.max_rollbacks + 2)
        self.good_generations: List[int] = [0]  # chronological; each ran healthily a while
        self._target_K: Optional[float] = None
        self._energy: Optional[float] = None
        self._fragments: Optional[int] = None
        self._healthy_steps = 0
        self._probation = 0
        self.failures_in_a_row = 0
        self.rollbacks_in_a_row = 0

    # ------------------------------------------------------------------ judging
    def check(self, atoms, results: dict, *, dynamics=None) -> Optional[str]:
        """The reason ``atoms`` (with the step's calculator ``results``) is unphysical,
        or None."""
        for reason in (self._temperature(atoms, dynamics), self._forces(results),
                       self._energy_jump(atoms, results), self._fragmentation(atoms),
                       self._reference_failures()):
            if reason:
                return reason
        return None

    def _temperature(self, atoms, dynamics) -> Optional[str]:
        if not atoms.has("momenta"):
            return None
        temperature = float(atoms.get_temperature())
        target = _target_temperature(dynamics)  # every step: thermostats may ramp it
        if target:
            self._target_K = target
        elif self._target_K is None:  # no thermostat: the first observed temperature
            self._target_K = temperature
        limit = self.config.max_temperature_K or max(3.0 * self._target_K,
                                                     self._target_K + 1000.0)
        if temperature > limit:
            return (f"temperature {temperature:.0f} K is above the limit {limit:.0f} K "
                    f"(target {self._target_K:.0f} K)")
        return None

    def _forces(self, results: dict) -> Optional[str]:
        forces = results.get("forces")
        if forces is None:
            return None
        forces = np.asarray(forces)
        if not np.all(np.isfinite(forces)):
            return "non-finite forces"
        largest = float(np.abs(forces).max()) if forces.size else 0.0
        if largest > self.config.max_force_eV_per_A:
            return (f"a force component of {largest:.1f} eV/Å exceeds "
                    f"{self.config.max_force_eV_per_A:g} eV/Å")
        return None

    def _energy_jump(self, atoms, results: dict) -> Optional[str]:
        energy = results.get("energy")
        if energy is None or len(atoms) == 0:
            return None
        if not np.isfinite(energy):
            return "non-finite energy"
        per_atom = float(energy) / len(atoms)
        previous, self._energy = self._energy, per_atom
        if previous is not None and abs(per_atom - previous) > self.config.max_energy_jump_eV_per_atom:
            return (f"the potential energy jumped by {per_atom - previous:+.3f} eV/atom in "
                    "one step")
        return None

    def _fragmentation(self, atoms) -> Optional[str]:
        if self.config.bond_factor == 0 or atoms.pbc.any() or len(atoms) < 2:
            return None
        count = count_fragments(atoms, self.config.bond_factor)
        if self._fragments is None:
            self._fragments = count
        if count > self._fragments:
            return (f"the structure fell apart into {count} fragments (it started with "
                    f"{self._fragments})")
        return None

    def _reference_failures(self) -> Optional[str]:
        if self.failures_in_a_row >= self.config.max_consecutive_failures:
            return (f"{self.failures_in_a_row} reference calls in a row failed; the "
                    "structure is probably no longer one the reference can handle")
        return None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def snapshot(self) -> Optional[Snapshot]:
        return self.snapshots[-1] if self.snapshots else None

    def healthy(self, atoms, *, step: int, generation: int) -> None:
        """Record a healthy step; snapshot every ``snapshot_every`` of them."""
        self._healthy_steps += 1
        if self._healthy_steps < self._probation:
            return  # just restored: the structure must prove itself before it is kept
        if self._healthy_steps % self.config.snapshot_every == 0 or not self.snapshots:
            self.snapshots.append(Snapshot(
                step=step, positions=atoms.get_positions().copy(),
                momenta=atoms.get_momenta().copy() if atoms.has("momenta") else None,
                cell=np.array(atoms.cell), generation=generation))
            if self._healthy_steps >= self.config.snapshot_every:
                if generation not in self.good_generations:
                    self.good_generations.append(generation)  # ran healthily a while
                if self._healthy_steps >= 2 * self.config.snapshot_every:
                    self.rollbacks_in_a_row = 0

    def generation_to_restore(self, current: int) -> int:
        """The generation to run after an unphysical event under ``current``: the last
        good one before it (``current`` itself loses its good standing: it just failed)."""
        if current in self.good_generations and current != 0:
            self.good_generations.remove(current)
        earlier = [g for g in self.good_generations if g < current] or [0]
        return earlier[-1]

    def model_changed(self) -> None:
        """After a swap: the energy reference restarts, and the new model must prove
        itself for ``snapshot_every`` steps before it counts as good."""
        self._energy = None
        self._healthy_steps = 0

    def restore(self, atoms, *, seed: int = 0) -> Snapshot:
        """Put a healthy structure back into ``atoms`` (in place): the last snapshot, an
        older one after each further rollback in a row (the last one may already have
        been on its way out), with momenta drawn afresh at the target temperature (the
        stored ones carry the heat of what went wrong)."""
        if not self.snapshots:
            raise SimulationUnstableError("the simulation was unphysical from its first "
                                          "step: there is no healthy structure to go back to")
        # the newest snapshot, used up: a further rollback in a row goes one further back
        snap = self.snapshots.pop() if len(self.snapshots) > 1 else self.snapshots[0]
        atoms.set_cell(snap.cell)
        atoms.set_positions(snap.positions)
        if snap.momenta is not None:
            atoms.set_momenta(self._fresh_momenta(atoms, snap, seed))
        self._energy = None
        self.failures_in_a_row = 0
        self.rollbacks_in_a_row += 1
        self._healthy_steps = 0
        self._probation = 2 * self.config.snapshot_every
        return snap

    def _fresh_momenta(self, atoms, snap: Snapshot, seed: int) -> np.ndarray:
        from ase.md.velocitydistribution import (Stationary, ZeroRotation,
                                                 thermalize_momenta)

        if not self._target_K:
            return snap.momenta
        probe = atoms.copy()
        thermalize_momenta(probe, temperature_K=self._target_K,
                           rng=np.random.default_rng(seed + snap.step))
        Stationary(probe)
        if not probe.pbc.any():
            ZeroRotation(probe)
        return probe.get_momenta()


def _target_temperature(dynamics) -> Optional[float]:
    """The thermostat's target temperature in K, read from ASE's dynamics classes (each
    keeps it under its own name and unit), or None without a thermostat."""
    from ase import units

    if dynamics is None:
        return None
    kelvin = getattr(dynamics, "temperature_K", None)  # LangevinBAOAB
    kT = getattr(dynamics, "temp", None)  # Langevin, Andersen, Bussi: kT in eV
    if kT is None:  # Nose-Hoover chains keep it in their thermostat
        kT = getattr(getattr(dynamics, "_thermostat", None), "_kT", None)
    temperature = getattr(dynamics, "temperature", None)
    if kelvin is None and kT is None and temperature is not None:
        if _is_instance(dynamics, "ase.md.nvtberendsen", "NVTBerendsen"):
            kelvin = temperature  # NVT/NPTBerendsen: K
        elif _is_instance(dynamics, "ase.md.melchionna", "MelchionnaNPT"):
            kT = temperature  # NPT (Melchionna): kT in eV
    try:
        if kelvin is not None:
            return float(kelvin)
        return None if kT is None else float(kT) / units.kB
    except (TypeError, ValueError):
        return None


def _is_instance(obj, module: str, name: str) -> bool:
    import importlib

    try:
        return isinstance(obj, getattr(importlib.import_module(module), name))
    except (ImportError, AttributeError):
        return False


def count_fragments(atoms, bond_factor: float) -> int:
    """Connected components of the bond graph (bonds within ``bond_factor`` × the sum
    of covalent radii)."""
    from ase.data import covalent_radii

    positions = atoms.get_positions()
    radii = covalent_radii[atoms.numbers]
    distances = np.linalg.norm(positions[:, None, :] - positions[None, :, :], axis=-1)
    bonded = distances <= bond_factor * (radii[:, None] + radii[None, :])
    seen = np.zeros(len(atoms), dtype=bool)
    fragments = 0
    for start in range(len(atoms)):
        if seen[start]:
            continue
        fragments += 1
        stack = [start]
        seen[start] = True
        while stack:
            i = stack.pop()
            for j in np.nonzero(bonded[i] & ~seen)[0]:
                seen[j] = True
                stack.append(int(j))
    return fragments
