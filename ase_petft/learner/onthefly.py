"""OnTheFlyLearner: label what the model does not know, refit, hot-swap, keep running.

Attach it to any ASE dynamics or optimiser::

    learner = OnTheFlyLearner(calc, reference=dft, buffer=buffer,
                              select=uncertainty_above(0.02) | max_gap(200),
                              refit_every=10, workdir="run1")
    dyn.attach(learner, interval=1)
    dyn.run(20_000)
    learner.close()          # waits for a refit in flight

At each call the learner decides (``select``) whether the current structure gets a
reference label; labels go to the buffer with provenance (step, generation, the model's
prediction and uncertainty at that moment); every ``refit_every`` new labels a refit of
the calculator's variant starts — in a background thread by default, or on any
``concurrent.futures.Executor`` — and its weights are swapped in *between two steps*
(at the next call) if they beat the current model on held-out labels. A label is marked
held-out (``holdout`` in its metadata) for a ``holdout_fraction`` of the labels; those
are never trained on and judge every refit.

Running the same script again resumes: labels come from the buffer (a structure already
labelled is never sent to the reference again), the calculator gets the latest accepted
generation, and generation and step numbers continue. The MD state itself is the
script's to save (an ``ase.io.Trajectory`` attached to the dynamics; read its last
frame on restart, see the README). One learner at a time uses a work directory (a lock
file ``.learner.lock`` in it).

Ctrl-C (or any exception) inside ``with learner:`` does not wait for a refit in flight:
it is abandoned (its generation folder stays unfinished and is ignored on restart).
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import pathlib
import tempfile
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .._locks import ExclusiveLock
from ..errors import ConfigError, LabellingError
from ..labels import check_elements
from . import _support as support
from . import gate, review
from . import workdir as wd
from .gate import GateConfig, HarmSet
from .rattle import RattleConfig, rattled_copy
from .selection import Policy, StepContext, every
from .watchdog import SimulationUnstableError, Watchdog, WatchdogConfig

logger = logging.getLogger(__name__)

__all__ = ["OnTheFlyLearner"]

JUMP_WARNING_EV_PER_ATOM = 0.005  # a swap that moves the energy more than this is a WARNING


class OnTheFlyLearner:
    """ASE observer that labels, refits and hot-swaps during a simulation.

    :param calc: the running :class:`~ase_petft.FineTunableCalculator`.
    :param reference: ASE calculator giving the labels (DFT, xTB, ...).
    :param buffer: a writable :class:`~ase_petft.LabelBuffer`.
    :param select: selection policy (default ``every(10)``).
    :param refit_every: new labels that trigger a refit.
    :param config: :class:`~ase_petft.FineTuneConfig` of the refits.
    :param background: refit off the simulation's critical path (a thread, or
        ``executor``); ``False`` refits inline (reproducible runs).
    :param holdout_fraction: share of labels kept for the validation gate.
    :param max_labels: budget of labels of this variant in the buffer.
    :param workdir: where generations, decisions and history go (default: a new
        temporary directory; pass a path to be able to restart).
    :param atoms: the simulated atoms (default: the calculator's last structure).
    :param executor: a ``concurrent.futures.Executor`` for refits.
    :param tolerance: accept a refit whose held-out error is at most this fraction
        worse than the current model's (default 0: must not be worse).
    :param properties: what the reference computes. Default: energy and forces, and
        the stress of cells periodic in all directions when the reference implements
        it (variable-cell runs need stress labels). A tuple is used as given (its
        ``"stress"`` only for periodic cells).
    :param refit_threads: torch threads of a background refit (1 keeps the MD fast on
        small machines; see DESIGN.md, thread trap). While such a refit runs in this
        process's thread pool, the simulation's thread uses the remaining cores
        (``torch.set_num_threads``, restored when the refit lands).
    :param dynamics: the ASE dynamics/optimiser this learner observes (as ASE's
        ``MDLogger`` takes it): labels and events record its ``nsteps``. Without it,
        steps count observer calls (wrong with ``dyn.attach(learner, interval=k > 1)``).
        :meth:`attach` sets it and attaches in one call.
    :param watchdog: a :class:`~ase_petft.learner.watchdog.WatchdogConfig`: when the
        simulation counts as unphysical and what happens then (default: roll back to
        the last generation that ran healthily and restore the last healthy structure;
        no reference call is ever made on an unphysical structure).
    :param reference_timeout: seconds after which a reference call is abandoned and
        recorded as a failure (default None: wait as long as it takes); see
        :func:`ase_petft.label`.
    :param gate: a :class:`~ase_petft.learner.gate.GateConfig`: the stability probe and
        the do-no-harm bound every refit must pass besides the held-out labels and the
        anchor set (the labels held out before the first refit, a yardstick that does
        not drift with the trajectory).
    :param rattle: a :class:`~ase_petft.learner.rattle.RattleConfig`: after every 4th
        label the simulation asks for (default), one more label of a copy rattled by
        0.05 Å, so that refits and the gate also see structures next to the trajectory
        (``RattleConfig(every=0)`` turns this off).
    """

    def __init__(self, calc, reference, buffer, *, select: Optional[Policy] = None,
                 refit_every: int = 10, config=None, background: bool = True,
                 holdout_fraction: float = 0.2, max_labels: Optional[int] = None,
                 workdir=None, atoms=None, executor=None, tolerance: float = 0.0,
                 properties=None, refit_threads: Optional[int] = 1,
                 dynamics=None, watchdog: Optional[WatchdogConfig] = None,
                 gate: Optional[GateConfig] = None,
                 reference_timeout: Optional[float] = None,
                 rattle: Optional[RattleConfig] = None) -> None:
        from ..config import FineTuneConfig

        support.validate(calc, reference, buffer, select, refit_every, holdout_fraction,
                  max_labels, tolerance)
        support.validate_more(config, properties, refit_threads, reference_timeout)
        self.reference_timeout = reference_timeout
        watchdog = WatchdogConfig() if watchdog is None else watchdog
        if not isinstance(watchdog, WatchdogConfig):
            raise ConfigError(f"watchdog must be a WatchdogConfig, got {type(watchdog).__name__}")
        self.watchdog = Watchdog(watchdog)
        self.gate = GateConfig() if gate is None else gate
        if not isinstance(self.gate, GateConfig):
            raise ConfigError(f"gate must be a GateConfig, got {type(self.gate).__name__}")
        self.rattle = RattleConfig() if rattle is None else rattle
        if not isinstance(self.rattle, RattleConfig):
            raise ConfigError(f"rattle must be a RattleConfig, got {type(self.rattle).__name__}; "
                              "RattleConfig(every=0) turns rattled labels off")
        self._harm = None
        self.calc, self.reference, self.buffer = calc, reference, buffer
        self.select = select if select is not None else every(10)
        # the uncertainty is refitted after every label only for a policy that asks for
        # it (``uncertainty_above``): its force Jacobian per label is wasted otherwise
        self._needs_uncertainty = self.select.expensive
        self.refit_every, self.background = int(refit_every), bool(background)
        self.config = config if config is not None else FineTuneConfig()
        self.holdout_fraction, self.max_labels = float(holdout_fraction), max_labels
        self.tolerance = float(tolerance)
        self.properties = (support.default_properties(reference) if properties is None
                           else tuple(properties))
        self.refit_threads = refit_threads
        self.workdir = pathlib.Path(workdir) if workdir else pathlib.Path(
            tempfile.mkdtemp(prefix="petft-learner-"))
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the work directory {str(self.workdir)!r}: "
                              f"{exc}") from exc
        self._lock = ExclusiveLock(self.workdir / "learner", busy=support.workdir_busy,
                                   unusable=support.workdir_unusable)
        self._atoms, self._executor = support.unfiltered(atoms), executor
        self._own_executor = None
        self._future: Optional[concurrent.futures.Future] = None
        self._step, self._calls, self._since_label = 0, 0, 0
        self._dynamics = dynamics
        self._probe_override = None
        self._review_wait = None  # (generation, labels) when a review last lacked labels
        self._reference_worked = False  # a reference call of this run returned a label
        self._refit_source = (None, None)  # (generation, weights) the refit in flight started from
        self._replaced = (None, None)  # (generation, weights) the running generation replaced
        self.history: List[Dict[str, Any]] = []
        self.reference_calls = 0
        self._step_offset = 0
        try:
            self._resume()
        except BaseException:
            self._lock.release()
            raise
        self._event("start", policy=repr(self.select), max_labels=self.max_labels,
                    refit_every=self.refit_every, method=self.config.method)

    # ------------------------------------------------------------------ state
    @property
    def variant(self) -> str:
        return self.calc.variant

    @property
    def refit_in_progress(self) -> bool:
        return self._future is not None and not self._future.done()

    def _frames(self) -> list:
        """This variant's labels, in memory (read from the buffer once, on resume)."""
        return list(self._labels)

    def _check_buffer_elements(self) -> None:
        """Labels of this variant already in the buffer are trained on: one with an
        element the model lacks would fail every refit, far from its cause."""
        for i, atoms in enumerate(self._labels):
            check_elements(atoms, self.calc.atomic_types, error=ConfigError,
                           what=f"label {i} of {self.variant!r} in buffer {self.buffer.path}",
                           fix="label this simulation into another buffer (or another "
                               "variant name), or use a checkpoint that covers its elements")

    def _resume(self) -> None:
        wd.clean(self.workdir)
        self._labels = list(self.buffer.frames(variant=self.variant))
        self._check_buffer_elements()
        frames = self._frames()
        self._known = {support.structure_key(a) for a in frames}
        self._n_labels = len(frames)
        self._n_holdout = sum(bool(a.info.get("holdout")) for a in frames)
        self._simulation_labels = sum(not a.info.get("rattled") for a in frames)
        done = wd.decisions(self.workdir)
        self._labels_at_refit = max((d["n_labels_total"] for d in done), default=0)
        first = min((d["n_labels_total"] for d in done), default=None)
        self._anchor = None if first is None else tuple(
            a for a in frames[:first] if a.info.get("holdout"))
        self._attempt = wd.last_number(self.workdir)
        self._step_offset = max((int(r.get("step") or 0) for r in wd.read_history(self.workdir)),
                                default=0)
        self._step = self._step_offset
        self._restore_generation(done)
        self._refit_uncertainty(frames)

    def _restore_generation(self, done) -> None:
        current = wd.read_json(self.workdir / wd.CURRENT)
        retracted = review.retracted(self.workdir)
        accepted = [d["generation"] for d in done
                    if d.get("accepted") and d["generation"] not in retracted]
        target = current["generation"] if current and current.get("rollback") else None
        if target is None and accepted:
            target = max(accepted)
        if target:
            path = wd.gen_dir(self.workdir, target) / "model.ckpt"
            self.calc.swap_model(path, generation=target)
            self._event("resume", generation=target, n_labels=self._n_labels)
            logger.info("resumed from generation %d with %d labels", target, self._n_labels)
        elif not (wd.gen_dir(self.workdir, 0) / "model.ckpt").is_file():
            self.calc.save_checkpoint(wd.gen_dir(self.workdir, 0) / "model.ckpt")

    def _current_checkpoint(self) -> pathlib.Path:
        generation = self.calc.generation
        path = wd.gen_dir(self.workdir, generation) / "model.ckpt"
        if not path.is_file():  # swapped from elsewhere: snapshot the live weights
            self.calc.save_checkpoint(path)
        return path

    # ------------------------------------------------------------------ observer
    def __call__(self) -> None:
        self._collect_refit()
        self._calls += 1
        self._step = self._md_step()
        atoms = self._current_atoms()
        if not self._healthy(atoms):
            return
        ctx = StepContext(step=self._calls, steps_since_label=self._since_label + 1,
                          n_labels=self._n_labels,
                          _uncertainty=lambda: self._uncertainty(atoms))
        budget_left = self.max_labels is None or self._n_labels < self.max_labels
        if budget_left and self.select(ctx):
            self._label(atoms, ctx)
        else:
            self._since_label += 1
        self._maybe_refit()

    def attach(self, dynamics, interval: int = 1) -> "OnTheFlyLearner":
        """``dynamics.attach(self, interval)``, recording ``dynamics.nsteps`` as steps."""
        self._dynamics = dynamics
        dynamics.attach(self, interval=interval)
        return self

    def _healthy(self, atoms) -> bool:
        results = dict(self.calc.results) if self.calc.atoms is not None else {}
        reason = self.watchdog.check(atoms, results, dynamics=self._dynamics)
        if reason is None:
            self.watchdog.healthy(atoms, step=self._step, generation=self.calc.generation)
            return True
        self._unphysical(reason)
        return False

    def _unphysical(self, reason: str) -> None:
        """Roll back model and structure (or stop): no reference call on debris."""
        config = self.watchdog.config
        self._event("unphysical", reason=reason)
        logger.warning("step %d: the simulation is unphysical: %s", self._step, reason)
        if config.on_unphysical == "stop" or self.watchdog.rollbacks_in_a_row >= config.max_rollbacks:
            raise SimulationUnstableError(
                f"the simulation went unphysical at step {self._step}: {reason}"
                + ("" if config.on_unphysical == "stop" else
                   f" (after {self.watchdog.rollbacks_in_a_row} rollbacks in a row)")
                + f". Labels and generations are kept in {str(self.workdir)!r}; restart "
                "from the last good structure with a smaller timestep or a safer config")
        good = self.watchdog.generation_to_restore(self.calc.generation)
        if self.calc.generation != good:
            self.rollback(good)
        live = self._live_atoms()
        if live is None:
            logger.warning("no atoms to restore (attach the learner with "
                           "learner.attach(dyn) or pass atoms=); only the model was rolled back")
            return
        snap = self.watchdog.restore(live, seed=self._step)
        self.calc.reset()
        self._since_label = 0
        self._event("restored", from_step=snap.step, generation=self.calc.generation)

    def _live_atoms(self):
        if self._atoms is not None:
            return self._atoms
        return support.unfiltered(getattr(self._dynamics, "atoms", None))

    def _md_step(self) -> int:
        """Steps of this run, after those of the runs this work directory resumes."""
        nsteps = getattr(self._dynamics, "nsteps", None)
        return self._step_offset + (int(nsteps) if nsteps is not None else self._calls)

    def _current_atoms(self):
        atoms = self._atoms if self._atoms is not None else self.calc.atoms
        if atoms is None:
            raise ConfigError(
                "the learner found no structure: attach it to dynamics that use this "
                "calculator, or pass atoms= to OnTheFlyLearner"
            )
        return atoms.copy()

    def _uncertainty(self, atoms) -> Optional[float]:
        if not self.calc.uncertainty_fitted:
            return None
        return float(self.calc.get_energy_uncertainty(atoms))

    # ------------------------------------------------------------------ labelling
    def _label(self, atoms, ctx: StepContext) -> None:
        self._since_label = 0
        if self.knows(atoms):
            self._event("label_reused", uncertainty=support.maybe(ctx))
            return
        labelled, wall = self._call_reference(atoms)
        if labelled is None:
            return
        predicted = self.calc.results.get("energy") if self.calc.atoms is not None else None
        holdout = self.record_label(labelled, step=self._step,
                                    generation=self.calc.generation,
                                    predicted_energy=predicted,
                                    uncertainty=support.maybe(ctx), wall_time_s=wall,
                                    asked=atoms)
        if self.rattle_due():
            self._label_rattled(atoms, holdout=holdout)

    def rattle_due(self) -> bool:
        """Count one label the simulation asked for; whether a rattled copy of it is
        due (:class:`~ase_petft.learner.rattle.RattleConfig`)."""
        self._simulation_labels += 1
        return self.rattle.due(self._simulation_labels)

    def _label_rattled(self, atoms, *, holdout: bool) -> None:
        """Label a rattled copy of the structure just labelled (:mod:`.rattle`). It is
        held out exactly when its parent is: a pair split between training and the
        gate's labels would let the gate see a near-copy of what was trained on."""
        if self.max_labels is not None and self._n_labels >= self.max_labels:
            return
        copy = rattled_copy(atoms, self.rattle.sigma_A, seed=[self._step, self._n_labels])
        labelled, wall = self._call_reference(copy, rattled=True)
        if labelled is not None:
            self.record_label(labelled, step=self._step, generation=self.calc.generation,
                              wall_time_s=wall, holdout=holdout, rattled=True,
                              rattled_from=support.structure_key(atoms))

    def _call_reference(self, atoms, **metadata):
        """One reference call: ``(labelled copy, seconds)``, or ``(None, seconds)`` with
        the failure recorded and counted by the watchdog."""
        from ..labelling import label

        start = time.perf_counter()
        self.reference_calls += 1
        try:
            labelled = label(atoms, self.reference, properties=self.properties_for(atoms),
                             timeout=self.reference_timeout)
        except LabellingError as exc:
            self.record_failure(atoms, exc, step=self._step, **metadata)
            self.watchdog.failures_in_a_row += 1
            self._stop_if_reference_never_worked(exc)
            return None, time.perf_counter() - start
        self.watchdog.failures_in_a_row = 0
        self._reference_worked = True
        return labelled, time.perf_counter() - start

    def _stop_if_reference_never_worked(self, exc: LabellingError) -> None:
        """Failures from the run's first reference call on blame the reference (a
        misconfigured DFT setup), not the structure: rolling back the simulation cannot
        help, so stop at once and say what failed."""
        limit = self.watchdog.config.max_consecutive_failures
        if self._reference_worked or self.watchdog.failures_in_a_row < limit:
            return
        self._event("stop", reason="the reference never worked")
        raise LabellingError(
            f"the reference calculator failed on all {self.watchdog.failures_in_a_row} calls "
            f"of this run, from the first on: it is probably misconfigured, not the "
            f"simulation unphysical. Last error: {exc}. Try it alone on the starting "
            f"structure (ase_petft.label(atoms, reference)); the failed structures are "
            f"recorded in the buffer (buffer.failures()) and {str(self.workdir)!r} is kept",
            atoms=exc.atoms) from exc

    # ----------------------------------------------- labels computed elsewhere (Campaign)
    def knows(self, atoms) -> bool:
        """Whether this exact structure is labelled already (never label it twice)."""
        return support.structure_key(atoms) in self._known

    @property
    def n_labels(self) -> int:
        """Labels of this variant (the buffer's, and those added since)."""
        return self._n_labels

    def record_label(self, labelled, *, step: int, generation: int,
                     predicted_energy: Optional[float] = None,
                     uncertainty: Optional[float] = None,
                     wall_time_s: Optional[float] = None, asked=None,
                     holdout: Optional[bool] = None, **metadata) -> bool:
        """Append a reference label to the buffer (held out or not, as the hold-out
        fraction asks, or as ``holdout`` says) and to the labels the next refit trains
        on. ``asked``: the structure as the simulation had it (default: ``labelled``),
        what :meth:`knows` recognises afterwards. ``metadata`` (e.g. ``walker=``) goes to
        the buffer and to the history event. Returns whether it was held out."""
        holdout = self._next_is_holdout() if holdout is None else bool(holdout)
        index = self.buffer.append(labelled, variant=self.variant, step=step,
                                   generation=generation, holdout=holdout,
                                   predicted_energy=predicted_energy,
                                   uncertainty=uncertainty, **metadata)
        self._labels.append(self.buffer[index])  # one frame back, as every reader sees it
        self._known.add(support.structure_key(labelled if asked is None else asked))
        self._n_labels += 1
        self._n_holdout += int(holdout)
        self._event("label", holdout=holdout, uncertainty=uncertainty,
                    wall_time_s=wall_time_s, step=step, **metadata)
        self._refit_uncertainty()
        return holdout

    def record_failure(self, atoms, error: LabellingError, *, step: int, **metadata) -> None:
        """Record a failed reference call (buffer and history); the run goes on."""
        self.buffer.record_failure(error.atoms if error.atoms is not None else atoms,
                                   error=error, variant=self.variant, step=step, **metadata)
        self._event("label_failed", error=str(error)[:300], step=step, **metadata)
        logger.warning("reference failed at step %d (recorded): %s", step, error)

    def poll(self, *, probe_atoms=None) -> None:
        """Apply a finished refit and start the next one when it is due (what a step
        of the observer does besides labelling). ``probe_atoms``: the structure (with
        momenta) a refit's stability probe starts from."""
        self._collect_refit()
        if probe_atoms is not None:
            self._probe_override = probe_atoms
        self._maybe_refit()

    def event(self, event: str, **fields) -> None:
        """Add a row to the history (``history.jsonl``)."""
        self._event(event, **fields)

    def properties_for(self, atoms) -> tuple:
        """What the reference computes for ``atoms`` (no stress without a cell)."""
        if atoms.pbc.all():
            return self.properties
        return tuple(p for p in self.properties if p != "stress")

    def _next_is_holdout(self) -> bool:
        # the first label is held out: the gate and the uncertainty's calibration
        # need one, and training-frame residuals would calibrate nothing
        wanted = math.ceil((self._n_labels + 1) * self.holdout_fraction - 1e-9)
        return wanted > self._n_holdout

    def _split(self):
        frames = self._frames()
        train = [a for a in frames if not a.info.get("holdout")]
        holdout = [a for a in frames if a.info.get("holdout")]
        return train, holdout

    def _refit_uncertainty(self, frames=None) -> None:
        if not self._needs_uncertainty:
            return
        frames = self._frames() if frames is None else frames
        train = [a for a in frames if not a.info.get("holdout")]
        holdout = [a for a in frames if a.info.get("holdout")]
        if len(train) < 2:
            return
        if not holdout:  # LLPR calibrated on its own training frames is meaningless
            return
        try:
            self.calc.fit_uncertainty(train, holdout)
        except Exception as exc:  # uncertainty is advisory: never stop the run for it
            logger.warning("could not fit the uncertainty: %s", exc)

    # ------------------------------------------------------------------ refits
    def _maybe_refit(self, *, force: bool = False) -> None:
        if self._future is not None:
            return
        new_labels = self._n_labels - self._labels_at_refit
        if new_labels < (1 if force else self.refit_every):
            return
        train, holdout = self._split()
        if len(train) < max(2, self.config.min_frames):
            return
        if not self._review_running(final=force):
            return  # the running generation's review first: it waits for its labels
        self._attempt += 1
        in_process = self._executor is None or isinstance(
            self._executor, concurrent.futures.ThreadPoolExecutor)
        probe_atoms = self._probe_atoms()  # the simulation's structure, taken first
        spec = gate.RefitSpec(
            source_checkpoint=self._current_checkpoint(),
            source_generation=self.calc.generation, train=train, holdout=holdout,
            variant=self.variant, config=self.config,
            output_dir=wd.gen_dir(self.workdir, self._attempt),
            generation=self._attempt, tolerance=self.tolerance,
            n_labels_total=self._n_labels,
            source_model=self.calc.model_copy() if in_process else None,
            return_model=in_process,
            anchor=self._anchor_set(holdout), harm=self._harm_set(train),
            probe_atoms=probe_atoms, gate=self.gate, device=self.calc.device,
        )
        self._labels_at_refit = self._n_labels
        # the running generation's weights, kept in memory while this refit runs and,
        # if its candidate is swapped in, until that one's review: the review and a
        # retraction then read no checkpoint on the simulation's thread
        self._refit_source = (spec.source_generation, spec.source_model)
        self._event("refit_start", generation=self._attempt, n_train=len(train),
                    n_holdout=len(holdout))
        if not self.background:
            self._finish(support.safe_refit(spec, None))
            return
        self._share_cores()
        self._future = self._pool().submit(support.safe_refit, spec, self.refit_threads)

    def _review_running(self, *, final: bool = False) -> bool:
        """Before a refit starts from the running generation: compare it with the one
        it replaced on the labels collected while it ran (:mod:`.review`), and roll back
        to that one if it is worse there. Returns False while those labels are too few:
        the refit waits for them (building on a generation no independent label has
        judged is how one wrong early decision steered whole runs), unless no more
        labels can come (``final``, the label budget spent)."""
        generation = self.calc.generation
        spent = self.max_labels is not None and self._n_labels >= self.max_labels
        if self._review_wait == (generation, self._n_labels) and not (final or spent):
            return False  # nothing new since the last look (called every step meanwhile)
        decision = review.needs_review(self.workdir, generation)
        if decision is None:
            return True
        frames = review.labelled_under(self._frames(), generation)
        if not review.enough(frames):
            self._review_wait = (generation, self._n_labels)
            return final or spent
        replaced_generation, replaced = self._replaced
        if replaced_generation != int(decision["source_generation"]):
            replaced = None  # not in memory (a resumed run, a process executor): read it
        self._replaced = (None, None)  # reviewed once: no longer needed
        record = review.review(self.workdir, generation, decision, frames,
                               model=self.calc.model, variant=self.variant,
                               tolerance=self.tolerance, replaced_model=replaced)
        self._event("review", reviewed=generation, passed=record["passed"],
                    n_review_labels=record["n_labels"], old=record["old"], new=record["new"],
                    wall_time_s=record["wall_time_s"])
        if not record["passed"]:
            logger.warning("generation %d retracted: %s", generation, record["detail"])
            if generation in self.watchdog.good_generations:
                self.watchdog.good_generations.remove(generation)
            self._swap_back(record["source_generation"], model=replaced)
        return True

    def _anchor_set(self, holdout) -> tuple:
        if self._anchor is None:  # fixed at the first refit, never moves afterwards
            self._anchor = tuple(holdout)
        return self._anchor

    def _harm_set(self, train) -> Optional[HarmSet]:
        """The first labelled structures and rattled copies of them, with the forces of
        the model this run started from (computed once, between two steps)."""
        if self._harm is not None or not train:
            return self._harm
        rng = np.random.default_rng(0)
        labelled, rattled = [], []
        for frame in train[:4]:
            base = frame.copy()
            base.calc = None
            labelled.append(base)
            for _ in range(2):
                copy = base.copy()
                copy.positions += rng.normal(0.0, 0.05, copy.positions.shape)
                rattled.append(copy)
        self._harm = HarmSet(labelled=labelled, labelled_forces=self._forces(labelled),
                             frames=rattled, forces=self._forces(rattled))
        return self._harm

    def _forces(self, frames) -> list:
        """The running model's forces on ``frames``, the way the gate evaluates a
        candidate on them, and without passing them through the calculator: its cached
        structure stays the simulation's (the stability probe and the swap's energy
        jump start from it)."""
        from .. import _metatrain

        with self.calc._model_lock():
            predicted = _metatrain.predict(self.calc.model, frames, self.variant,
                                           forces=True, stress=False)
        return [p["forces"] for p in predicted]

    def _probe_atoms(self):
        live = self._probe_override if self._probe_override is not None else self._live_atoms()
        if live is None:
            live = self.calc.atoms
        if live is None or not live.has("momenta"):
            return None
        probe = live.copy()
        probe.calc = None
        return probe

    def _share_cores(self) -> None:
        """While a refit runs in a thread of this process, the simulation's thread uses
        the cores the refit leaves (thread trap, DESIGN.md §5: two OpenMP teams on the
        same cores made MD 2.1× slower during full refits; sharing them: 1.27×)."""
        if self._executor is not None or self.refit_threads is None:
            return
        import os

        import torch

        self._md_threads = torch.get_num_threads()
        torch.set_num_threads(max(1, min(self._md_threads,
                                         (os.cpu_count() or 1) - self.refit_threads)))

    def _restore_cores(self) -> None:
        if getattr(self, "_md_threads", None) is not None:
            import torch

            torch.set_num_threads(self._md_threads)
            self._md_threads = None

    def _pool(self) -> concurrent.futures.Executor:
        if self._executor is not None:
            return self._executor
        if self._own_executor is None:
            self._own_executor = support.DaemonExecutor()
        return self._own_executor

    def _collect_refit(self) -> None:
        if self._future is None or not self._future.done():
            return
        future, self._future = self._future, None
        self._restore_cores()
        try:
            outcome = future.result()
        except Exception as exc:  # the executor failed (a lost dask worker, ...)
            outcome = exc
        self._finish(outcome)

    def _finish(self, outcome) -> None:
        source, self._refit_source = self._refit_source, (None, None)
        if isinstance(outcome, Exception):
            self._event("refit_failed", error=f"{type(outcome).__name__}: {outcome}"[:300])
            logger.warning("refit failed, keeping generation %d: %s",
                           self.calc.generation, outcome)
            return
        decision = outcome.decision
        row = dict(generation=outcome.generation, reason=outcome.reason,
                   old=decision.get("old"), new=decision.get("new"),
                   fit_wall_time_s=decision.get("fit_wall_time_s"),
                   refit_wall_time_s=decision.get("wall_time_s"))
        if not outcome.accepted:
            self._event("refit_rejected", **row)
            logger.info("refit %d rejected: %s", outcome.generation, outcome.reason)
            return
        jump = self._swap(outcome)
        self._replaced = source if source[1] is not None else (None, None)
        self.watchdog.model_changed()
        self._event("swap", energy_jump_eV=jump, **row)
        self._report_jump(outcome.generation, outcome.reason, jump)
        self._refit_uncertainty()

    def _report_jump(self, generation: int, reason: str, jump: Optional[float]) -> None:
        """A swap changes the potential energy of the current structure: by the level-
        of-theory offset on the first swap of a new variant (~45 eV for GFN1 -> GFN2 on
        glycine). NVE users must know: the total energy is conserved within a
        generation, not across swaps."""
        atoms = self._live_atoms() if self._live_atoms() is not None else self.calc.atoms
        n = len(atoms) if atoms is not None else 1
        if jump is not None and abs(jump) / n > JUMP_WARNING_EV_PER_ATOM:
            logger.warning(
                "swapped in generation %d (%s): the potential energy of the current "
                "structure jumped by %.4g eV (%.1f meV/atom). The total energy is "
                "conserved within a generation, not across swaps (a new variant's first "
                "swap carries the offset between levels of theory)", generation, reason,
                jump, 1000 * jump / n)
        else:
            logger.info("swapped in generation %d (%s); energy jump %.4g eV", generation,
                        reason, jump if jump is not None else 0.0)

    def _swap(self, outcome, *, rollback: bool = False) -> Optional[float]:
        atoms = self._atoms if self._atoms is not None else self.calc.atoms
        before = self.calc.results.get("energy") if atoms is not None else None
        self.calc.swap_model(outcome.checkpoint_path, model=outcome.model,
                             generation=outcome.generation)
        wd.write_json(self.workdir / wd.CURRENT,
                        {"generation": outcome.generation, "rollback": rollback})
        if atoms is None or before is None:
            return None
        probe = atoms.copy()  # computing it now also fills the cache for the next step
        after = self.calc.get_potential_energy(probe)
        return float(after - before)

    def rollback(self, generation: Optional[int] = None) -> int:
        """Swap an earlier accepted generation (default: the one before the current)."""
        retracted = review.retracted(self.workdir)
        accepted = sorted({0} | {d["generation"] for d in wd.decisions(self.workdir)
                                 if d.get("accepted") and d["generation"] not in retracted})
        if generation is None:
            earlier = [g for g in accepted if g < self.calc.generation]
            if not earlier:
                raise ConfigError(f"no generation before {self.calc.generation} to roll back to")
            generation = earlier[-1]
        if generation not in accepted:
            raise ConfigError(f"generation {generation} cannot run again: it was never accepted "
                              f"or its review retracted it; these can: {accepted}")
        return self._swap_back(generation)

    def _swap_back(self, generation: int, *, model=None) -> int:
        """Swap accepted ``generation`` in again (its weights ``model`` when in memory,
        else read from its checkpoint)."""
        path = wd.gen_dir(self.workdir, generation) / "model.ckpt"
        outcome = gate.RefitOutcome(generation=generation, accepted=True, reason="rollback",
                                    decision={}, checkpoint_path=path, model=model)
        jump = self._swap(outcome, rollback=True)
        self.watchdog.model_changed()
        self._event("rollback", generation=generation, energy_jump_eV=jump)
        return generation

    def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for a refit in flight and apply its result (between steps: call it
        from the simulation's thread, e.g. at the end of a run)."""
        if self._future is not None:
            concurrent.futures.wait([self._future], timeout=timeout)
            self._collect_refit()

    def flush(self, timeout: Optional[float] = None) -> None:
        """The end-of-run refit: wait for a refit in flight, then refit once more on
        every label that arrived since the last refit started (fewer than
        ``refit_every`` are enough), judged by the same gate, and wait for it. Call it
        from the simulation's thread after the last step, so that no paid-for label
        is left untrained."""
        self.wait(timeout)
        self._maybe_refit(force=True)
        self.wait(timeout)

    def close(self, *, abandon: bool = False) -> None:
        """Finish a refit in flight (or, with ``abandon=True``, leave it: it is never
        swapped in) and release the work directory."""
        if self._lock.fd < 0:
            return  # closed already
        self._event("close", observer_calls=self._calls)
        if abandon and self.refit_in_progress:
            folder = wd.gen_dir(self.workdir, self._attempt)
            folder.mkdir(parents=True, exist_ok=True)
            wd.write_json(folder / wd.ABANDONED, {"generation": self._attempt})
            self._event("refit_abandoned", generation=self._attempt)
            logger.warning("abandoned refit %d in flight (its folder is left unfinished)",
                           self._attempt)
            self._future = None
            self._restore_cores()
        else:
            self.wait()
            if review.needs_review(self.workdir, self.calc.generation) is not None:
                logger.info("generation %d runs now; it passed the gate but no labels came "
                            "after it, so its review is still to come (a resumed run does "
                            "it on its first labels)", self.calc.generation)
        self._own_executor = None
        self._replaced = self._refit_source = (None, None)  # model copies: free them
        self._lock.release()

    def __enter__(self) -> "OnTheFlyLearner":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(abandon=exc_type is not None)  # Ctrl-C must not wait for a refit

    def _event(self, event: str, **fields) -> None:
        row = {"step": self._step, "event": event, "generation": self.calc.generation,
               "n_labels": self._n_labels, "time": time.time(), **fields}
        self.history.append(row)
        wd.append_history(self.workdir, row)

