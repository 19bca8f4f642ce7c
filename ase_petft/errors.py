"""Exceptions raised by ase_petft.

Every error a user can trigger is a :class:`PetftError`; its message says what was
wrong, what was expected and how to fix it. Errors that concern setting up a
calculator also subclass ASE's :class:`~ase.calculators.calculator.CalculatorSetupError`
so that generic ASE code handling calculator failures keeps working.
"""

from ase.calculators.calculator import CalculatorSetupError

__all__ = [
    "PetftError",
    "CheckpointError",
    "VariantError",
    "ModelSwapError",
    "UnsupportedSystemError",
    "LabelBufferError",
    "LabellingError",
    "FineTuneError",
]


class PetftError(Exception):
    """Base class of every error raised on purpose by ase_petft."""


class CheckpointError(PetftError, CalculatorSetupError):
    """A checkpoint file is missing, unreadable, or not a PET checkpoint."""


class VariantError(PetftError, CalculatorSetupError, ValueError):
    """An energy variant name is invalid or absent from the model."""


class ModelSwapError(PetftError, CalculatorSetupError):
    """New weights do not fit the running calculator; the old model is kept."""


class UnsupportedSystemError(PetftError, ValueError):
    """The atoms cannot be handled by the model (unknown elements, stress without cell...)."""


class LabelBufferError(PetftError):
    """A label buffer file or a label is invalid; nothing was written."""


class LabellingError(PetftError):
    """A reference calculation failed; carries the structure that failed.

    :ivar atoms: a copy of the structure the reference was asked to label.
    """

    def __init__(self, message: str, *, atoms=None):
        super().__init__(message)
        self.atoms = atoms

    def __reduce__(self):  # picklable across process pools
        return (_rebuild_labelling_error, (str(self), self.atoms))


def _rebuild_labelling_error(message, atoms):
    return LabellingError(message, atoms=atoms)


class FineTuneError(PetftError):
    """A fine-tuning run failed; the input checkpoint is untouched."""
