"""Energy uncertainty of a FineTunableCalculator's variant, from metatrain's LLPR.

LLPR (last-layer prediction rigidity) needs the last-layer features of the labelled
structures (covariance) and a few held-out labels (calibration). The estimate refers to
the weights it was fitted on: after a hot swap it is refitted automatically, on the
same frames, the next time it is asked for.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from .errors import PetftError

logger = logging.getLogger(__name__)

__all__ = ["EnergyUncertainty"]


class EnergyUncertainty:
    """σ of the energy per atom (eV/atom) predicted by ``calc``'s current weights."""

    def __init__(self, calc) -> None:
        self._calc = calc
        self._llpr = None
        self._train = None
        self._calibration = None
        self._generation: Optional[int] = None

    @property
    def fitted(self) -> bool:
        return self._train is not None

    def fit(self, frames: Sequence, calibration: Optional[Sequence] = None) -> None:
        """Fit on labelled ``frames`` of the calculator's variant; calibrate on
        ``calibration`` (held-out labels; default: ``frames`` themselves, which makes
        σ optimistic)."""
        from ._metatrain.labels import labels_from_frames

        train = labels_from_frames(frames)
        if calibration is None:
            logger.info("calibrating the uncertainty on its own training frames")
            calibration = frames
        self._train = train
        self._calibration = labels_from_frames(calibration)
        self._refit()

    def _refit(self) -> None:
        from ._metatrain import llpr

        calc = self._calc
        with calc._lock:
            if self._llpr is None:
                self._llpr = llpr.wrap(calc.model, calc.variant)
            llpr.fit(self._llpr, calc.variant, self._train, self._calibration)
            self._generation = calc.generation
        logger.info("LLPR uncertainty fitted on %d frames (generation %d)",
                    len(self._train), self._generation)

    def per_atom(self, atoms_list: Sequence) -> list:
        """σ(E)/N in eV/atom for each structure."""
        from ._metatrain import llpr

        if not self.fitted:
            raise PetftError(
                "the energy uncertainty is not fitted yet: call "
                "calc.fit_uncertainty(labelled_frames) with a few labelled structures "
                "of this variant (the OnTheFlyLearner does it after its first labels)"
            )
        calc = self._calc
        with calc._lock:
            if self._generation != calc.generation:
                self._refit()
            sigmas = llpr.energy_uncertainty(self._llpr, calc.variant, atoms_list)
        return [s / len(a) for s, a in zip(sigmas, atoms_list)]
