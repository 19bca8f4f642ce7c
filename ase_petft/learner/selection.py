"""Selection policies: which MD steps get a reference label.

A policy is called with a :class:`StepContext` and answers ``True`` (label this
structure) or ``False``. Policies combine with ``|`` (either) and ``&`` (both); the
right-hand side is only evaluated when needed, so ``every(50) | uncertainty_above(0.02)``
computes an uncertainty only on steps that ``every(50)`` does not already select.
They are also re-exported by :mod:`ase_petft.learner`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from ..errors import ConfigError

__all__ = [
    "StepContext", "Policy", "every", "uncertainty_above", "max_gap", "min_gap", "never",
    "always",
]


@dataclasses.dataclass
class StepContext:
    """What a policy may look at for one step.

    :ivar step: observer calls so far (1 at the first call).
    :ivar steps_since_label: steps since the last labelled (or reused) structure.
    :ivar n_labels: labels of this variant in the buffer.
    """

    step: int
    steps_since_label: int
    n_labels: int
    _uncertainty: Callable[[], Optional[float]] = dataclasses.field(repr=False)
    _cached: Optional[float] = dataclasses.field(default=None, repr=False)
    _evaluated: bool = dataclasses.field(default=False, repr=False)

    @property
    def uncertainty(self) -> Optional[float]:
        """σ of the energy per atom (eV/atom); ``None`` while no model is fitted."""
        if not self._evaluated:
            self._cached = self._uncertainty()
            self._evaluated = True
        return self._cached

    @property
    def uncertainty_evaluated(self) -> bool:
        return self._evaluated


class Policy:
    """A named predicate on :class:`StepContext`, combinable with ``|`` and ``&``.

    Policies have no side effects, so a combination evaluates its cheap side first and
    the expensive one (a model evaluation for the uncertainty) only when the cheap one
    does not decide: ``uncertainty_above(0.01) & min_gap(20)`` costs nothing on the 19
    steps after a label, whichever way round it is written.
    """

    def __init__(self, predicate: Callable[[StepContext], bool], name: str, *,
                 expensive: bool = False) -> None:
        self._predicate = predicate
        self.name = name
        self.expensive = expensive

    def __call__(self, ctx: StepContext) -> bool:
        return bool(self._predicate(ctx))

    def _ordered(self, other: "Policy"):
        return (other, self) if self.expensive and not other.expensive else (self, other)

    def __or__(self, other: "Policy") -> "Policy":
        _check_policy(other)
        first, second = self._ordered(other)
        return Policy(lambda ctx: first(ctx) or second(ctx), f"({self.name} | {other.name})",
                      expensive=self.expensive or other.expensive)

    def __and__(self, other: "Policy") -> "Policy":
        _check_policy(other)
        first, second = self._ordered(other)
        return Policy(lambda ctx: first(ctx) and second(ctx), f"({self.name} & {other.name})",
                      expensive=self.expensive or other.expensive)

    def __repr__(self) -> str:
        return self.name


def _check_policy(other) -> None:
    if not isinstance(other, Policy):
        raise ConfigError(
            f"selection policies combine with other policies, got {type(other).__name__}"
        )


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def every(n: int) -> Policy:
    """Label every ``n``-th step (steps n, 2n, ...)."""
    n = _positive_int("every(n)", n)
    return Policy(lambda ctx: ctx.step % n == 0, f"every({n})")


def max_gap(n: int) -> Policy:
    """Label when ``n`` steps have passed without a label."""
    n = _positive_int("max_gap(n)", n)
    return Policy(lambda ctx: ctx.steps_since_label >= n, f"max_gap({n})")


def min_gap(n: int) -> Policy:
    """True when at least ``n`` steps passed since the last label; combine with ``&``
    (``uncertainty_above(0.02) & min_gap(20)``) so that neighbouring, nearly identical
    MD frames are not all sent to the reference."""
    n = _positive_int("min_gap(n)", n)
    return Policy(lambda ctx: ctx.steps_since_label >= n, f"min_gap({n})")


#: thresholds from here on are a unit mistake (meV meant): σ is per atom, offset removed
MAX_THRESHOLD = 1.0  # eV/atom


def uncertainty_above(threshold_eV_per_atom: float) -> Policy:
    """Label when the calibrated energy uncertainty exceeds the threshold (eV/atom).

    While no uncertainty model is fitted yet (too few labels), every step qualifies:
    the first labels are what the uncertainty is fitted on.
    """
    threshold = float(threshold_eV_per_atom)
    if not threshold > 0:
        raise ConfigError(f"uncertainty threshold must be > 0 eV/atom, got {threshold!r}")
    if threshold >= MAX_THRESHOLD:
        raise ConfigError(
            f"uncertainty threshold {threshold:g} eV/atom would never trigger (σ beyond a "
            f"constant offset is meV/atom to tens of meV/atom); it is in eV/atom: for "
            f"{threshold:g} meV/atom pass {threshold / 1000:g}")

    def predicate(ctx: StepContext) -> bool:
        sigma = ctx.uncertainty
        return sigma is None or sigma > threshold

    return Policy(predicate, f"uncertainty_above({threshold:g})", expensive=True)


def never() -> Policy:
    return Policy(lambda ctx: False, "never()")


def always() -> Policy:
    return Policy(lambda ctx: True, "always()")
