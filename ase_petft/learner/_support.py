"""The learner's plain helpers: argument checks, the refit thread, structure keys.

Split out of :mod:`.onthefly` (which keeps the learner's state machine); nothing here
holds state.
"""

from __future__ import annotations

import concurrent.futures
import logging
import pathlib
import threading
from typing import Optional

from .._provenance import content_key
from ..errors import ConfigError
from . import gate
from .selection import Policy, StepContext

logger = logging.getLogger(__name__)


class DaemonExecutor(concurrent.futures.Executor):
    """One daemon thread per refit: an interrupted program exits without waiting for
    it (a ThreadPoolExecutor's workers are joined at interpreter exit)."""

    def submit(self, fn, /, *args, **kwargs):
        future = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        threading.Thread(target=run, name="petft-refit", daemon=True).start()
        return future


def workdir_busy(target: pathlib.Path) -> ConfigError:
    return ConfigError(f"the work directory {str(target.parent)!r} is in use by another "
                       "learner (its lock file .learner.lock is held); one learner writes a "
                       "work directory at a time. Close the other one (learner.close(), or "
                       "use `with OnTheFlyLearner(...) as learner:`), stop the other run, or "
                       "use another workdir.")


def workdir_unusable(target: pathlib.Path, exc: OSError) -> ConfigError:
    return ConfigError(f"cannot lock the work directory {str(target.parent)!r} ({exc}); it "
                       "must be writable.")


def maybe(ctx: StepContext) -> Optional[float]:
    return ctx.uncertainty if ctx.uncertainty_evaluated else None


def structure_key(atoms) -> str:
    return content_key(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc)


def safe_refit(spec, threads: Optional[int]):
    """Run a refit; return its exception instead of raising (the run goes on)."""
    try:
        if threads is not None:
            import torch

            torch.set_num_threads(threads)  # this worker thread's OpenMP team only
        return gate.run_refit(spec)
    except Exception as exc:
        logger.debug("refit failed", exc_info=True)
        return exc


def validate_more(config, properties, refit_threads, reference_timeout) -> None:
    from ..config import FineTuneConfig

    if config is not None and not isinstance(config, FineTuneConfig):
        raise ConfigError(f"config must be a FineTuneConfig, got {type(config).__name__}; "
                          "build one with FineTuneConfig(**settings)")
    allowed = ("energy", "forces", "stress")
    if properties is None:  # the default: see OnTheFlyLearner.properties_for
        return _validate_rest(refit_threads, reference_timeout)
    props = tuple(properties) if isinstance(properties, (list, tuple)) else None
    if not props or any(p not in allowed for p in props) or "energy" not in props:
        raise ConfigError(f"properties must be a tuple of {allowed} that includes 'energy' "
                          f"(the model is fitted to energies), got {properties!r}")
    _validate_rest(refit_threads, reference_timeout)


def _validate_rest(refit_threads, reference_timeout) -> None:
    if refit_threads is not None and (isinstance(refit_threads, bool)
                                      or not isinstance(refit_threads, int) or refit_threads < 1):
        raise ConfigError(f"refit_threads must be None or a positive integer, got "
                          f"{refit_threads!r}")
    if reference_timeout is not None and (isinstance(reference_timeout, bool) or not isinstance(
            reference_timeout, (int, float)) or not reference_timeout > 0):
        raise ConfigError(f"reference_timeout must be None or a positive number of seconds, "
                          f"got {reference_timeout!r}")


def validate(calc, reference, buffer, select, refit_every, holdout_fraction,
              max_labels, tolerance) -> None:
    from ..calculator import FineTunableCalculator

    if not isinstance(calc, FineTunableCalculator):
        raise ConfigError(f"calc must be a FineTunableCalculator, got {type(calc).__name__}")
    if not hasattr(reference, "calculate") or isinstance(reference, FineTunableCalculator):
        raise ConfigError("reference must be an ASE calculator giving reference labels "
                         f"(DFT, xTB, ...), got {type(reference).__name__}")
    if not hasattr(buffer, "append") or getattr(buffer, "mode", "a") == "r":
        raise ConfigError("buffer must be a LabelBuffer opened for writing (mode 'a' or 'w-')")
    if select is not None and not isinstance(select, Policy):
        raise ConfigError(f"select must be a selection policy such as every(10), got {select!r}")
    if isinstance(refit_every, bool) or not isinstance(refit_every, int) or refit_every < 1:
        raise ConfigError(f"refit_every must be a positive integer, got {refit_every!r}")
    if not 0.0 <= float(holdout_fraction) <= 0.5:
        raise ConfigError(f"holdout_fraction must be in [0, 0.5], got {holdout_fraction!r}")
    if max_labels is not None and (not isinstance(max_labels, int) or max_labels < 1):
        raise ConfigError(f"max_labels must be None or a positive integer, got {max_labels!r}")
    if not float(tolerance) >= 0.0:
        raise ConfigError(f"tolerance must be >= 0, got {tolerance!r}")


def unfiltered(atoms):
    """The Atoms under ASE filters (``FrechetCellFilter``, ``FixSymmetry`` wrappers...):
    an optimiser's ``atoms`` may be one, and only the Atoms can be restored."""
    from ase import Atoms

    for _ in range(8):  # filters of filters
        if atoms is None or isinstance(atoms, Atoms):
            return atoms
        atoms = getattr(atoms, "atoms", None)
    return atoms


def default_properties(reference) -> tuple:
    """Energy and forces, and stress when the reference implements it (used for cells
    periodic in all directions only, see :meth:`OnTheFlyLearner.properties_for`)."""
    implemented = getattr(reference, "implemented_properties", None) or ()
    return ("energy", "forces") + (("stress",) if "stress" in implemented else ())
