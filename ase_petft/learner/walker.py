"""A campaign's walker: one ASE simulation with its own calculator.

A :class:`Walker` says what to simulate; :func:`run_walker` runs it (in a thread of
the coordinator's process, or as a task on a dask worker). Each step the walker

1. judges its structure (a :class:`~ase_petft.learner.watchdog.Watchdog` of its own:
   an unphysical step restores its last healthy structure and its last good
   generation, and asks for no label);
2. asks its selection policy whether the structure needs a label, and if so *posts* a
   request to the coordinator and keeps stepping (at most one request of a walker is in
   flight: its next one waits until the coordinator answered the last);
3. reads the coordinator's published state and, between two steps, swaps in a newer
   accepted generation and loads the uncertainty of the generation it runs.

Every ``snapshot_every`` steps it posts its structure (positions, momenta, cell) and
step; the coordinator keeps the last one on disk, and a restarted campaign resumes the
walker from it.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import re
import time
import zipfile
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from ..errors import ConfigError
from .channels import decode_atoms, encode_atoms
from .selection import Policy, StepContext
from .watchdog import SimulationUnstableError, Watchdog, WatchdogConfig

logger = logging.getLogger(__name__)

__all__ = ["Walker", "run_walker"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Walker:
    """One simulation of a campaign.

    :param name: unique within the campaign (letters, digits, ``_.-``): it names the
        walker's labels (``walker`` in the buffer), events and saved state.
    :param atoms: the starting structure, with momenta for MD (set them here, e.g.
        ``MaxwellBoltzmannDistribution``, not in ``dynamics``: a resumed walker keeps
        the momenta it had). It is copied; the caller's object is never changed.
    :param steps: total steps of this walker (a resumed walker runs what is left).
    :param dynamics: ``dynamics(atoms) -> ASE dynamics`` built on ``atoms`` (whose
        calculator is set); e.g. ``functools.partial(Langevin, timestep=0.5 * units.fs,
        temperature_K=400, friction=0.02)``. On dask it is pickled to the worker.
    :param select: this walker's selection policy (default: the campaign's).
    :param snapshot_every: steps between two snapshots of the structure sent to the
        coordinator (which writes the newest at most once a second).
    :param watchdog: this walker's :class:`WatchdogConfig` (default: the campaign's).
    """

    name: str
    atoms: Any
    steps: int
    dynamics: Callable[[Any], Any]
    select: Optional[Policy] = None
    snapshot_every: int = 10
    watchdog: Optional[WatchdogConfig] = None

    def __post_init__(self) -> None:
        from ase import Atoms

        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"walker name must be 1-64 letters, digits or '_.-' (it names "
                              f"files), got {self.name!r}")
        if not isinstance(self.atoms, Atoms) or len(self.atoms) == 0:
            raise ConfigError(f"walker {self.name!r}: atoms must be a non-empty ase.Atoms")
        for field in ("steps", "snapshot_every"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"walker {self.name!r}: {field} must be a positive "
                                  f"integer, got {value!r}")
        if not callable(self.dynamics):
            raise ConfigError(f"walker {self.name!r}: dynamics must be a callable "
                              "dynamics(atoms) -> ASE dynamics, e.g. functools.partial("
                              "Langevin, timestep=..., temperature_K=..., friction=...)")
        if self.select is not None and not isinstance(self.select, Policy):
            raise ConfigError(f"walker {self.name!r}: select must be a selection policy")
        if self.watchdog is not None and not isinstance(self.watchdog, WatchdogConfig):
            raise ConfigError(f"walker {self.name!r}: watchdog must be a WatchdogConfig")


def _newest_start(workdir: pathlib.Path, name: str, start: Dict[str, Any]) -> Dict[str, Any]:
    """The launch record, or the walker's newer snapshot on disk (a task that dask runs
    again after a lost worker goes on from where the lost one got, not from launch)."""
    from .workdir import read_json, walker_state_path

    saved = read_json(walker_state_path(workdir, name))
    if saved and int(saved.get("step", 0)) > int(start.get("step", 0)):
        return {**start, "step": saved["step"], "atoms": saved["atoms"],
                "steps_since_label": saved.get("steps_since_label", 0)}
    return start


class _Stop(Exception):
    """The coordinator asked the walkers to stop."""


def run_walker(walker: Walker, channel, start: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``walker`` to its last step (or until the coordinator says stop); return its
    summary. ``start`` is the coordinator's plain-data start record."""
    _leave_worker_pool()
    run = _WalkerRun(walker, channel, start)
    try:
        return run.run()
    except BaseException as exc:
        channel.post({"type": "event", "walker": walker.name, "event": "walker_failed",
                      "step": run.step, "error": f"{type(exc).__name__}: {exc}"[:300]})
        raise


def _leave_worker_pool() -> None:
    """On a dask worker, a walker is a long-running task: leave the worker's thread
    pool so label and refit tasks can run beside it (dask's ``secede``)."""
    try:
        from distributed import get_worker, secede
    except ImportError:
        return
    try:
        get_worker()
    except ValueError:
        return  # not on a dask worker
    secede()


class _WalkerRun:
    def __init__(self, walker: Walker, channel, start: Dict[str, Any]) -> None:
        from ..calculator import FineTunableCalculator

        self.walker, self.channel = walker, channel
        self.workdir = pathlib.Path(start["workdir"])
        start = _newest_start(self.workdir, walker.name, start)
        if start.get("torch_threads"):
            import torch

            torch.set_num_threads(int(start["torch_threads"]))  # this thread's team only
        self.select: Policy = walker.select or start["select"]
        self.step0 = int(start.get("step", 0))
        self.step = self.step0
        self.since_label = int(start.get("steps_since_label", 0))
        self.resumed = start.get("atoms") is not None
        self.atoms = walker.atoms.copy()
        if self.resumed:
            saved = decode_atoms(start["atoms"])
            self.atoms.set_cell(saved.cell)
            self.atoms.set_positions(saved.positions)
            if saved.has("momenta"):
                self.atoms.set_momenta(saved.get_momenta())
        self.calc = FineTunableCalculator(start["checkpoint"], generation=start["generation"],
                                          inherit_from=None, **start["calculator"])
        self.atoms.calc = self.calc
        self.dynamics = walker.dynamics(self.atoms)
        self.watchdog = Watchdog(walker.watchdog or start.get("watchdog") or WatchdogConfig())
        # label requests posted; the coordinator publishes how many it answered (a task
        # dask re-runs after a lost worker continues the count of the one before)
        self.requests = int(channel.state().get("answered", {}).get(walker.name, 0))
        self.restores = 0  # the coordinator resets our failure count when it saw each
        self.swaps: List[List[int]] = [[self.step0, self.calc.generation]]
        self.unphysical = 0
        self.failed_generation = -1  # never follow a generation this walker fell apart with
        self.uncertainty_version = None
        self.dynamics.attach(self.observe, interval=1)

    # ------------------------------------------------------------------ run
    def run(self) -> Dict[str, Any]:
        start = time.perf_counter()
        remaining = self.walker.steps - self.step0
        self._post_event("walker_start", from_step=self.step0, remaining=remaining)
        stopped = False
        if remaining > 0:
            try:
                self.dynamics.run(remaining)
            except _Stop:
                stopped = True
        self._snapshot()
        summary = {"walker": self.walker.name, "steps": self.step,
                   "generation": self.calc.generation, "swaps": self.swaps,
                   "label_requests": self.requests, "unphysical": self.unphysical,
                   "stopped": stopped, "wall_time_s": time.perf_counter() - start}
        self._post_event("walker_done", **{k: v for k, v in summary.items() if k != "walker"})
        return summary

    def observe(self) -> None:
        """The dynamics' observer: runs between two steps."""
        self.step = self.step0 + int(self.dynamics.nsteps)
        state = self.channel.state()
        if state.get("stop"):
            self._follow(state)  # end on the campaign's last generation
            raise _Stop()
        self.watchdog.failures_in_a_row = self._failures(state)
        results = dict(self.calc.results) if self.calc.atoms is not None else {}
        reason = self.watchdog.check(self.atoms, results, dynamics=self.dynamics)
        if reason is not None:
            self._unphysical(reason, state)
        else:
            self.watchdog.healthy(self.atoms, step=self.step, generation=self.calc.generation)
            self._maybe_request(state, results)
        if self.step % self.walker.snapshot_every == 0:
            self._snapshot()
        self._follow(state)

    def _failures(self, state: Dict[str, Any]) -> int:
        """Reference failures in a row on our requests, as the coordinator counts them;
        0 until it has seen our last restore (a count from before it is stale)."""
        if int(state.get("restores", {}).get(self.walker.name, 0)) != self.restores:
            return 0
        return int(state.get("failures", {}).get(self.walker.name, 0))

    # ------------------------------------------------------------------ labels
    def _maybe_request(self, state: Dict[str, Any], results: Dict[str, Any]) -> None:
        answered = int(state.get("answered", {}).get(self.walker.name, 0))
        if self.resumed and self.step == self.step0:
            return  # the saved structure: the run before judged it (and may have asked)
        if not state.get("budget_left", True) or self.requests > answered:
            self.since_label += 1  # budget spent, or our last request is still out
            return
        ctx = StepContext(step=self.step, steps_since_label=self.since_label + 1,
                          n_labels=int(state.get("n_labels", 0)), _uncertainty=self._sigma)
        if not self.select(ctx):
            self.since_label += 1
            return
        self.since_label = 0
        self.requests += 1
        energy = results.get("energy")
        self.channel.post({
            "type": "label", "walker": self.walker.name, "step": self.step,
            "atoms": encode_atoms(self.atoms), "generation": self.calc.generation,
            "predicted_energy": None if energy is None else float(energy),
            "uncertainty": ctx.uncertainty if ctx.uncertainty_evaluated else None})

    def _sigma(self) -> Optional[float]:
        if not self.calc.uncertainty_fitted:
            return None
        return float(self.calc.get_energy_uncertainty(self.atoms))

    # ------------------------------------------------------------------ following
    def _follow(self, state: Dict[str, Any]) -> None:
        """Swap in a newer accepted generation, then the uncertainty of the one we run."""
        generation = int(state.get("generation", self.calc.generation))
        if generation > self.calc.generation and generation > self.failed_generation:
            self._swap(generation, state["checkpoint"])
        version = state.get("uncertainty_version")
        if version is not None and version != self.uncertainty_version:
            self._load_uncertainty(version)

    def _swap(self, generation: int, checkpoint: str) -> None:
        self.calc.swap_model(checkpoint, generation=generation)
        self.watchdog.model_changed()
        self.swaps.append([self.step, generation])
        self.uncertainty_version = None  # reload the one of this generation
        self._post_event("walker_swap", to_generation=generation)

    def _load_uncertainty(self, version) -> None:
        from .workdir import uncertainty_path

        path = uncertainty_path(self.workdir, self.calc.generation)
        try:
            with np.load(path) as data:
                state = {k: data[k] for k in ("inverse", "scale2", "generation")}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            # not fitted for this generation yet, or a shared filesystem lagging: the
            # next step tries again (σ is None meanwhile)
            logger.debug("walker %s: no uncertainty for generation %d yet (%s)",
                         self.walker.name, self.calc.generation, exc)
            return
        self.calc.load_uncertainty_state(state)
        self.uncertainty_version = version

    # ------------------------------------------------------------------ watchdog
    def _unphysical(self, reason: str, state: Dict[str, Any]) -> None:
        config = self.watchdog.config
        self.unphysical += 1
        self._post_event("unphysical", reason=reason)
        logger.warning("walker %s, step %d: the simulation is unphysical: %s",
                       self.walker.name, self.step, reason)
        if config.on_unphysical == "stop" or self.watchdog.rollbacks_in_a_row >= config.max_rollbacks:
            raise SimulationUnstableError(
                f"walker {self.walker.name!r} went unphysical at step {self.step}: {reason}")
        current = self.calc.generation
        good = self.watchdog.generation_to_restore(current)
        if good != current:
            from .workdir import checkpoint_of

            self.failed_generation = max(self.failed_generation, current)
            self.calc.swap_model(checkpoint_of(self.workdir, good), generation=good)
            self.watchdog.model_changed()
            self.swaps.append([self.step, good])
            self.uncertainty_version = None
        snap = self.watchdog.restore(self.atoms, seed=self.step)
        self.calc.reset()
        self.since_label = 0
        self.restores += 1
        self._post_event("restored", from_step=snap.step, to_generation=self.calc.generation,
                         restores=self.restores)

    # ------------------------------------------------------------------ messages
    def _snapshot(self) -> None:
        self.channel.post({"type": "snapshot", "walker": self.walker.name, "step": self.step,
                           "steps_since_label": self.since_label,
                           "generation": self.calc.generation,
                           "atoms": encode_atoms(self.atoms)})

    def _post_event(self, event: str, **fields) -> None:
        self.channel.post({"type": "event", "walker": self.walker.name, "event": event,
                           "step": self.step, "generation": self.calc.generation, **fields})
