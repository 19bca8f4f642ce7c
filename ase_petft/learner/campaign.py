"""Many walkers, one learner: parallel simulations that share labels and generations.

::

    campaign = Campaign(checkpoint, variant="energy/gfn2", reference=xtb, buffer=buffer,
                        workdir="run1", select=uncertainty_above(0.01) | max_gap(100),
                        refit_every=10, max_labels=200)
    result = campaign.run([
        Walker(name=f"T{t}", atoms=start, steps=5000,
               dynamics=functools.partial(Langevin, timestep=0.5 * units.fs,
                                          temperature_K=t, friction=0.02))
        for t in (300, 400, 500, 600)])          # client=dask_client: on a cluster

The coordinator (this process) owns the buffer (the only writer), the label budget,
the refits and the validation gate: it is an :class:`~ase_petft.OnTheFlyLearner` on a
calculator of its own, fed with labels computed elsewhere. Each walker runs its own
calculator and dynamics (:mod:`.walker`), in a thread here or as a task on a dask
worker, and posts label requests without waiting for them. The coordinator

- labels each requested structure once across all walkers (a structure already
  labelled, or being labelled, is never sent again), on ``label_executor`` (threads
  here; the dask client's workers with ``client=``), and appends the labels as they
  complete, each with the walker that asked (``walker`` in the buffer);
- refits every ``refit_every`` labels (in a thread of this process, or on
  ``refit_executor``, e.g. ``client.get_executor(resources={"GPU": 1})``), judges the
  candidate with the gate, and publishes accepted generations: every walker swaps them
  in between two of its steps; a rejected one reaches none;
- keeps each walker's last snapshot (``workdir/walkers/NAME.json``: sent every
  ``snapshot_every`` steps of that walker, written at most once a second).

Restart: running the same script again resumes every walker from its last snapshot
(its start structure if it never sent one), keeps every label, and the calculator
starts from the last accepted generation; no labelled structure is sent to the
reference again.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import ConfigError, LabellingError, PetftError
from . import workdir as wd
from ._support import DaemonExecutor, structure_key
from .channels import DaskChannel, LocalChannel, decode_atoms
from .onthefly import OnTheFlyLearner
from .rattle import rattled_copy
from .selection import Policy, every, never
from .walker import Walker, run_walker
from .watchdog import WatchdogConfig

logger = logging.getLogger(__name__)

__all__ = ["Campaign", "CampaignResult", "Walker"]


@dataclasses.dataclass(frozen=True)
class CampaignResult:
    """What a campaign run did.

    :ivar walkers: per walker: ``steps`` (last step), ``generation`` (at the end),
        ``swaps`` (``[step, generation]`` pairs: the steps after ``step`` ran with
        ``generation``; the first pair is where the walker started), ``label_requests``,
        ``unphysical``, ``stopped``, ``error`` (None unless the walker failed).
    :ivar generation: the coordinator's generation at the end.
    :ivar reference_calls: reference calls made by this run (resumed runs count anew).
    :ivar labels: labels of the variant in the buffer.
    :ivar failed_labels: reference calls of this run that failed.
    """

    walkers: Dict[str, Dict[str, Any]]
    generation: int
    reference_calls: int
    labels: int
    failed_labels: int
    wall_time_s: float

    @property
    def generation_per_walker(self) -> Dict[str, int]:
        return {name: w.get("generation") for name, w in self.walkers.items()}


def label_job(atoms, reference, properties, timeout):
    """One reference call (a plain function: it runs on any executor)."""
    from ..labelling import label

    return label(atoms, reference, properties=properties, timeout=timeout)


class Campaign:
    """Coordinator of several walkers that share one buffer, one learner and one model.

    :param checkpoint: the PET checkpoint the walkers start from.
    :param variant: the energy variant to predict and refit (created from
        ``inherit_from`` if the checkpoint lacks it).
    :param reference: ASE calculator of the labels (pickled to executors' workers).
    :param buffer: a writable :class:`~ase_petft.LabelBuffer` (this process is its only
        writer).
    :param workdir: the campaign's work directory (generations, history, walker
        snapshots, uncertainties). With dask workers on other machines it must be on a
        filesystem they share.
    :param select: the walkers' selection policy (a :class:`Walker` may have its own).
        Per-walker policies (``every``, ``max_gap``, ``min_gap``) count that walker's
        steps; ``max_labels`` is global.
    :param refit_every, config, holdout_fraction, max_labels, tolerance, properties,
        gate, reference_timeout, rattle: as for :class:`~ase_petft.OnTheFlyLearner`
        (the coordinator asks for the rattled copies, on the label executor).
    :param watchdog: the walkers' :class:`WatchdogConfig` (a walker may have its own).
    :param label_executor: a ``concurrent.futures.Executor`` for reference calls
        (default: one thread per walker here, or the client's workers).
    :param refit_executor: where refits run (default: a thread of this process).
    :param inherit_from, device, dtype: the calculators' settings (every walker's
        calculator uses ``device`` too: on dask, a device of its worker).
    :param refit_threads: torch threads of a background refit in this process.
    """

    def __init__(self, checkpoint, *, variant: str = "energy", reference, buffer, workdir,
                 select: Optional[Policy] = None, refit_every: int = 10, config=None,
                 holdout_fraction: float = 0.2, max_labels: Optional[int] = None,
                 tolerance: float = 0.0, properties=None, gate=None,
                 watchdog: Optional[WatchdogConfig] = None,
                 reference_timeout: Optional[float] = None, label_executor=None,
                 refit_executor=None, inherit_from: Optional[str] = "energy",
                 device: Optional[str] = None, dtype: Any = None,
                 refit_threads: Optional[int] = 1, rattle=None) -> None:
        from ..calculator import FineTunableCalculator

        if workdir is None:
            raise ConfigError("a campaign needs a workdir (its walkers read generations and "
                              "save their state there, and a restart resumes from it)")
        for name, executor in (("label_executor", label_executor),
                               ("refit_executor", refit_executor)):
            if executor is not None and not callable(getattr(executor, "submit", None)):
                raise ConfigError(f"{name} must be a concurrent.futures.Executor (e.g. "
                                  f"client.get_executor()), got {type(executor).__name__}")
        if watchdog is not None and not isinstance(watchdog, WatchdogConfig):
            raise ConfigError(f"watchdog must be a WatchdogConfig, got {type(watchdog).__name__}")
        self.select = select if select is not None else every(10)
        if not isinstance(self.select, Policy):
            raise ConfigError(f"select must be a selection policy such as every(10), got {select!r}")
        self.watchdog = watchdog or WatchdogConfig()
        self.calc = FineTunableCalculator(checkpoint, variant=variant,
                                          inherit_from=inherit_from, device=device,
                                          dtype=dtype)
        self._calc_options = {"variant": self.calc.variant, "device": device,
                              "dtype": dtype}
        self.learner = OnTheFlyLearner(
            self.calc, reference, buffer, select=never(), refit_every=refit_every,
            config=config, background=True, holdout_fraction=holdout_fraction,
            max_labels=max_labels, workdir=workdir, executor=refit_executor,
            tolerance=tolerance, properties=properties, refit_threads=refit_threads,
            gate=gate, reference_timeout=reference_timeout, rattle=rattle)
        # the walkers' policy, not the coordinator's never(), says whether σ is needed
        self.learner._needs_uncertainty = self.select.expensive
        self.workdir = self.learner.workdir
        self.reference, self.max_labels = reference, max_labels
        self._label_executor = label_executor
        self._pending: Dict[str, tuple] = {}  # structure key -> (request, future)
        self._answered: Dict[str, int] = {}  # walker -> its requests answered
        self._failures: Dict[str, int] = {}  # walker -> reference failures in a row
        self._never_worked: Optional[Dict[str, int]] = {}
        self._walker_names: frozenset = frozenset()
        self._restores: Dict[str, int] = {}  # walker -> restores the coordinator saw
        self._latest: Dict[str, Any] = {}  # walker -> its last snapshot message
        self._unsaved: set = set()  # walkers whose last snapshot is not on disk yet
        self._saved_at = 0.0
        self._uncertainty_version = 0
        self._published: Optional[tuple] = None
        self.reference_calls = 0
        self.failed_labels = 0

    @property
    def variant(self) -> str:
        return self.calc.variant

    # ------------------------------------------------------------------ run
    def run(self, walkers: Sequence[Walker], *, client=None, stop_when_budget_spent: bool = False,
            timeout_s: Optional[float] = None) -> CampaignResult:
        """Run every walker to its last step; return when all are done.

        :param client: a ``dask.distributed.Client``: walkers run as tasks on its
            workers, reference calls too (unless ``label_executor`` was given).
        :param stop_when_budget_spent: stop the walkers once ``max_labels`` labels are
            in and the last refit is judged (for campaigns whose goal is the model).
        :param timeout_s: stop the walkers after this many seconds; reference calls
            still running then get at most a minute more (then they are abandoned and
            recorded as failed).
        """
        walkers = _check_walkers(walkers)
        _check_run(self, client, stop_when_budget_spent, timeout_s)
        self._reset_run()
        self._walker_names = frozenset(w.name for w in walkers)
        start = time.perf_counter()
        channel = DaskChannel(client=client) if client is not None else LocalChannel()
        labels, own_labels = self._label_pool(client, len(walkers))
        self._rattle_pool = labels
        self._publish(channel, force=True)
        futures = {w.name: self._launch(w, channel, client, len(walkers)) for w in walkers}
        summaries: Dict[str, Dict[str, Any]] = {}
        try:
            self._loop(channel, labels, futures, summaries, stop_when_budget_spent,
                       None if timeout_s is None else start + timeout_s)
            self._rattle_pool = None  # no new rattled copies once the walkers are done
            for message in channel.receive(timeout=0.0):
                self._handle(message, labels, accept_requests=False)
            self._save_snapshots(every_s=0.0)
            deadline = None if timeout_s is None else max(start + timeout_s, time.perf_counter()) + 60
            self._drain_labels(deadline)
            self.learner.wait(None if deadline is None else max(0.0, deadline - time.perf_counter()))
            self._publish(channel, stop=True)
        except BaseException:
            try:  # walkers must not go on stepping without a coordinator
                self._save_snapshots(every_s=0.0)
                self._publish(channel, stop=True)
            except Exception:  # the scheduler may be gone: walkers then stop on their own
                logger.debug("could not tell the walkers to stop", exc_info=True)
            raise
        finally:
            if own_labels is not None:
                own_labels.shutdown(wait=False, cancel_futures=True)
            channel.close()
        return CampaignResult(walkers=summaries, generation=self.calc.generation,
                              reference_calls=self.reference_calls,
                              labels=self.learner.n_labels, failed_labels=self.failed_labels,
                              wall_time_s=time.perf_counter() - start)

    def _loop(self, channel, labels, futures, summaries, stop_when_budget_spent: bool,
              deadline: Optional[float]) -> None:
        """The coordinator's loop: requests in, labels and refits out, until every
        walker is done."""
        stopping = False
        while len(summaries) < len(futures):
            for message in channel.receive(timeout=0.05):
                self._handle(message, labels)
            self._collect_labels()
            self._save_snapshots()
            self.learner.poll(probe_atoms=self._probe_atoms())
            self._collect_walkers(futures, summaries)
            due = (stop_when_budget_spent and self._budget_spent() and not self._pending
                   and not self.learner.refit_in_progress)
            timed_out = deadline is not None and time.perf_counter() > deadline
            if (due or timed_out) and not stopping:
                stopping = True
                self.learner.event("stop_walkers",
                                   reason="timeout" if timed_out else "budget spent")
            self._publish(channel, stop=stopping)

    def _reset_run(self) -> None:
        """Per-run state: counts of this run, nothing in flight (a second run() on the
        same campaign starts clean; labels and generations carry over)."""
        self._pending, self._answered, self._failures, self._restores = {}, {}, {}, {}
        self._never_worked: Optional[Dict[str, int]] = {}  # walker -> failures, until a label
        self._latest, self._unsaved, self._saved_at = {}, set(), 0.0
        self.reference_calls = self.failed_labels = 0
        self._rattle_pool = None

    def _label_pool(self, client, n_walkers: int):
        """(executor for reference calls, the one this run owns and shuts down)."""
        if self._label_executor is not None:
            return self._label_executor, None
        if client is not None:
            return client.get_executor(pure=False), None
        workers = n_walkers
        if not _copyable(self.reference):
            # label() would then call this very object from several threads at once
            logger.warning("the reference calculator cannot be deep-copied: reference "
                           "calls run one at a time")
            workers = 1
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers,
                                                     thread_name_prefix="petft-label")
        return pool, pool

    def close(self) -> None:
        """Finish a refit in flight and release the work directory."""
        self.learner.close()

    def __enter__(self) -> "Campaign":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.learner.close(abandon=exc_type is not None)

    # ------------------------------------------------------------------ walkers
    def _launch(self, walker: Walker, channel, client, n_walkers: int):
        saved = wd.read_json(wd.walker_state_path(self.workdir, walker.name)) or {}
        if saved and list(saved["atoms"]["numbers"]) != walker.atoms.numbers.tolist():
            raise ConfigError(
                f"walker {walker.name!r}: its saved state in {str(self.workdir)!r} holds "
                f"another structure ({len(saved['atoms']['numbers'])} atoms) than the "
                f"walker's atoms ({len(walker.atoms)}); give a new walker a new name, or "
                f"delete {str(wd.walker_state_path(self.workdir, walker.name))!r} to start "
                "it afresh")
        generation = self.calc.generation
        start = {"workdir": str(self.workdir), "checkpoint": str(wd.checkpoint_of(
                     self.workdir, generation)), "generation": generation,
                 "calculator": self._calc_options, "select": self.select,
                 "watchdog": self.watchdog, "step": saved.get("step", 0),
                 "steps_since_label": saved.get("steps_since_label", 0),
                 "atoms": saved.get("atoms"),
                 # threads here share the cores (torch's thread count is per thread)
                 "torch_threads": None if client is not None else max(
                     1, (os.cpu_count() or 1) // n_walkers)}
        self.learner.event("walker_launch", walker=walker.name, from_step=start["step"],
                           resumed=bool(saved), step=start["step"])
        if client is not None:
            return client.submit(run_walker, walker, channel, start, pure=False,
                                 key=f"petft-walker-{walker.name}-{channel.name[-12:]}")
        return DaemonExecutor().submit(run_walker, walker, channel, start)

    def _collect_walkers(self, futures, summaries) -> None:
        for name, future in futures.items():
            if name in summaries or not future.done():
                continue
            try:
                summaries[name] = dict(future.result(), error=None)
            except Exception as exc:
                summaries[name] = {"walker": name, "error": f"{type(exc).__name__}: {exc}"}
                logger.warning("walker %s failed: %s", name, exc)

    def _probe_atoms(self):
        """The newest walker snapshot with momenta: where a stability probe starts."""
        return next((decode_atoms(m["atoms"]) for m in reversed(list(self._latest.values()))
                     if m["atoms"].get("momenta") is not None), None)

    def _save_snapshots(self, *, every_s: float = 1.0) -> None:
        """Write each walker's newest snapshot (``workdir/walkers/NAME.json``, durably),
        at most once per ``every_s`` seconds: a restart loses at most that much of a
        walker's run, and the loop does not fsync for every message."""
        now = time.perf_counter()
        if not self._unsaved or now - self._saved_at < every_s:
            return
        for name in sorted(self._unsaved):
            path = wd.walker_state_path(self.workdir, name)
            path.parent.mkdir(exist_ok=True)
            wd.write_json(path, self._latest[name])
        self._unsaved.clear()
        self._saved_at = now

    # ------------------------------------------------------------------ messages
    def _handle(self, message: Dict[str, Any], labels, accept_requests: bool = True) -> None:
        kind, name = message.get("type"), message.get("walker")
        if kind == "snapshot":  # kept here; written by _save_snapshots, off the hot path
            self._latest.pop(name, None)
            self._latest[name] = message
            self._unsaved.add(name)
        elif kind == "event":
            fields = {k: v for k, v in message.items() if k not in ("type", "event")}
            if message["event"] == "restored":
                self._failures[name] = 0
                self._restores[name] = int(message.get("restores", 0))
            self.learner.event(message["event"], **fields)
        elif kind == "label":
            if accept_requests:
                self._request(message, labels)
            else:
                self._answer(name)

    def _request(self, message: Dict[str, Any], labels) -> None:
        name = message["walker"]
        atoms = decode_atoms({**message["atoms"], "momenta": None})
        key = structure_key(atoms)
        if self.learner.knows(atoms) or key in self._pending:
            self._answer(name)
            self.learner.event("label_reused", walker=name, step=message["step"])
            return
        if self._budget_spent():
            self._answer(name)
            return
        self.reference_calls += 1
        future = labels.submit(label_job, atoms, self.reference,
                               self.learner.properties_for(atoms),
                               self.learner.reference_timeout)
        self._pending[key] = (message, atoms, future, time.perf_counter())

    def _answer(self, name: str) -> None:
        self._answered[name] = self._answered.get(name, 0) + 1

    def _collect_labels(self) -> None:
        for key in [k for k, entry in self._pending.items() if entry[2].done()]:
            message, atoms, future, t0 = self._pending.pop(key)
            self._record(message, atoms, future, time.perf_counter() - t0)

    def _drain_labels(self, deadline: Optional[float]) -> None:
        """Wait for the reference calls still running (until ``deadline``: later ones
        are cancelled and recorded as failed)."""
        for key in list(self._pending):
            message, atoms, future, t0 = self._pending.pop(key)
            if deadline is not None:
                left = max(0.0, deadline - time.perf_counter())
                if isinstance(future, concurrent.futures.Future):
                    concurrent.futures.wait([future], timeout=left)
                else:  # a dask future
                    _wait_quietly(future, left)
                if not future.done():
                    future.cancel()
            self._record(message, atoms, future, time.perf_counter() - t0)

    def _record(self, message, atoms, future, wall_time_s: float) -> None:
        name = message["walker"]
        if message.get("rattled"):  # the coordinator's own request: no walker waits
            labelled = self._result(message, atoms, future, walker_failure=False)
            if labelled is not None:
                self._never_worked = None
                self.learner.record_label(labelled, step=message["step"],
                                          generation=message["generation"],
                                          wall_time_s=wall_time_s, walker=name,
                                          holdout=message["holdout"], rattled=True,
                                          rattled_from=message["rattled_from"])
                self._save_uncertainty()
            return
        self._answer(name)
        labelled = self._result(message, atoms, future, walker_failure=True)
        if labelled is None:
            self._stop_if_reference_never_worked(name)
            return
        self._never_worked = None
        self._failures[name] = 0
        holdout = self.learner.record_label(labelled, step=message["step"],
                                            generation=message["generation"],
                                            predicted_energy=message.get("predicted_energy"),
                                            uncertainty=message.get("uncertainty"),
                                            wall_time_s=wall_time_s, asked=atoms, walker=name)
        self._save_uncertainty()
        if self.learner.rattle_due():
            self._request_rattled(message, atoms, holdout)

    def _stop_if_reference_never_worked(self, name: str) -> None:
        """Every walker's requests failed, from the run's first call on: the reference is
        broken (a misconfigured DFT setup), not the walkers' structures. Rolling each
        walker back cannot help: stop the run and say so."""
        if self._never_worked is None:
            return
        self._never_worked[name] = self._never_worked.get(name, 0) + 1
        limit = self.learner.watchdog.config.max_consecutive_failures
        if set(self._never_worked) < self._walker_names or min(self._never_worked.values()) < limit:
            return
        self.learner.event("stop", reason="the reference never worked")
        last = self._last_failure()
        raise LabellingError(
            f"the reference calculator failed on all {self.failed_labels} calls of this "
            f"campaign, for every walker, from the first on: it is probably misconfigured, "
            f"not the walkers' structures unphysical. Last error: {last}. Try it alone on a "
            f"starting structure (ase_petft.label(atoms, reference)); the failed structures "
            f"are recorded in the buffer (buffer.failures()) and {str(self.workdir)!r} is kept")

    def _last_failure(self) -> str:
        rows = [r for r in self.learner.history if r.get("event") == "label_failed"]
        return rows[-1].get("error", "?") if rows else "?"

    def _result(self, message, atoms, future, *, walker_failure: bool):
        """The labelled structure of a finished reference call, or None with the failure
        recorded (counted against the walker when it asked for that structure)."""
        name = message["walker"]
        extra = {} if walker_failure else {"rattled": True}
        try:
            return future.result()
        except LabellingError as error:  # the structure failed: it counts for the walker
            self.failed_labels += 1
            if walker_failure:
                self._failures[name] = self._failures.get(name, 0) + 1
            self.learner.record_failure(atoms, error, step=message["step"], walker=name,
                                        **extra)
        except PetftError:
            raise  # a configuration problem (e.g. label()'s timeout needs a copyable reference)
        except BaseException as exc:  # the executor failed (lost worker, cancelled, ...)
            self.failed_labels += 1
            error = LabellingError(f"the reference call did not run to its end on the "
                                   f"executor: {type(exc).__name__}: {exc}", atoms=atoms)
            self.learner.record_failure(atoms, error, step=message["step"], walker=name,
                                        **extra)
        return None

    def _request_rattled(self, message, atoms, holdout: bool) -> None:
        """Ask for a rattled copy of a structure a walker had labelled (:mod:`.rattle`),
        held out exactly when that structure is."""
        if self._rattle_pool is None or self._budget_spent():
            return
        shaken = rattled_copy(atoms, self.learner.rattle.sigma_A,
                              seed=[message["step"], self.learner.n_labels])
        self.reference_calls += 1
        future = self._rattle_pool.submit(label_job, shaken, self.reference,
                                          self.learner.properties_for(shaken),
                                          self.learner.reference_timeout)
        request = {**message, "rattled": True, "holdout": bool(holdout),
                   "rattled_from": structure_key(atoms)}
        self._pending[structure_key(shaken)] = (request, shaken, future, time.perf_counter())

    # ------------------------------------------------------------------ state
    def _budget_spent(self) -> bool:
        return (self.max_labels is not None
                and self.learner.n_labels + len(self._pending) >= self.max_labels)

    def _save_uncertainty(self) -> None:
        state = self.calc.uncertainty_state()
        if state is None:
            return
        path = wd.uncertainty_path(self.workdir, int(state["generation"]))
        path.parent.mkdir(exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, inverse=state["inverse"], scale2=state["scale2"],
                 generation=state["generation"])
        tmp.replace(path)
        self._uncertainty_version += 1

    def _publish(self, channel, *, stop: bool = False, force: bool = False) -> None:
        generation = self.calc.generation
        if generation != (self._published or (None,))[0]:
            self._save_uncertainty()  # the learner refitted it for the new weights
        state = {"generation": generation,
                 "checkpoint": str(wd.checkpoint_of(self.workdir, generation)),
                 "uncertainty_version": self._uncertainty_version,
                 "n_labels": self.learner.n_labels, "budget_left": not self._budget_spent(),
                 "answered": dict(self._answered), "failures": dict(self._failures),
                 "restores": dict(self._restores),
                 "stop": bool(stop)}
        signature = (generation, repr(sorted(state.items())))
        if force or signature != self._published:
            channel.publish(state)
            self._published = signature


def _check_walkers(walkers) -> List[Walker]:
    walkers = list(walkers)
    if not walkers or not all(isinstance(w, Walker) for w in walkers):
        raise ConfigError("run() takes a non-empty list of Walker(name=..., atoms=..., "
                          "steps=..., dynamics=...)")
    names = [w.name for w in walkers]
    if len({n.casefold() for n in names}) != len(names):  # they name files
        raise ConfigError(f"walker names must be unique (ignoring case), got {names}")
    return walkers


def _check_run(campaign: "Campaign", client, stop_when_budget_spent, timeout_s) -> None:
    if client is not None and not (hasattr(client, "submit") and hasattr(client, "get_executor")):
        raise ConfigError(f"client must be a dask.distributed.Client, got {type(client).__name__}")
    if stop_when_budget_spent and campaign.max_labels is None:
        raise ConfigError("stop_when_budget_spent=True needs a budget: pass max_labels= to "
                          "Campaign")
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(
            timeout_s, (int, float)) or not timeout_s > 0):
        raise ConfigError(f"timeout_s must be None or a positive number of seconds, got "
                          f"{timeout_s!r}")


def _copyable(reference) -> bool:
    try:
        copy.deepcopy(reference)
    except Exception:
        return False
    return True


def _wait_quietly(future, timeout: float) -> None:
    try:
        future.result(timeout=timeout)
    except Exception:  # its outcome is read (and recorded) by the caller
        pass
