"""Exceptions raised by ase_petft: one tree that separates bad input from failed work.

Every error a user can trigger is a :class:`PetftError`; its message says what was
wrong, what was expected and how to fix it. The tree follows ASE's own split between
``CalculatorSetupError`` (the set-up is wrong) and ``CalculationFailed`` (the work
failed)::

    PetftError
    ├── InputError (ValueError)               bad input: fix it and run again   CLI exit 2
    │   ├── ConfigError                       a setting, argument or option
    │   ├── CheckpointError (CalculatorSetupError)   missing/unreadable/not a PET
    │   ├── VariantError (CalculatorSetupError)      bad or unknown variant name
    │   ├── UnsupportedSystemError            atoms the model cannot handle
    │   ├── LabelBufferError                  invalid/damaged buffer, refused label
    │   ├── TrainingDataError (FineTuneError) labels a run cannot train on
    │   └── UsageError                        command-line usage
    └── WorkFailedError (RuntimeError)        the work failed: inputs were fine CLI exit 1
        ├── FineTuneError                     training diverged or crashed
        ├── LabellingError (CalculationFailed)  a reference calculation failed
        └── ModelSwapError (CalculatorSetupError)  new weights could not be swapped in

``TrainingDataError`` is both an input error and a :class:`FineTuneError`, so code that
catches every fine-tuning problem with ``except FineTuneError`` keeps working.
This module imports nothing of ase_petft.
"""

from ase.calculators.calculator import CalculationFailed, CalculatorSetupError

__all__ = [
    "PetftError",
    "InputError",
    "ConfigError",
    "CheckpointError",
    "VariantError",
    "UnsupportedSystemError",
    "LabelBufferError",
    "TrainingDataError",
    "UsageError",
    "WorkFailedError",
    "FineTuneError",
    "LabellingError",
    "ModelSwapError",
    "exit_code",
]


class PetftError(Exception):
    """Base class of every error raised on purpose by ase_petft."""


# ---------------------------------------------------------------------- bad input
class InputError(PetftError, ValueError):
    """The input is wrong (a setting, file, name or structure): fix it and retry."""


class ConfigError(InputError):
    """A setting, constructor argument or option is invalid or has no effect."""


class CheckpointError(InputError, CalculatorSetupError):
    """A checkpoint file is missing, unreadable, or not a PET checkpoint."""


class VariantError(InputError, CalculatorSetupError):
    """An energy variant name is invalid or absent from the model."""


class UnsupportedSystemError(InputError):
    """The atoms cannot be handled by the model (unknown elements, stress without cell...)."""


class LabelBufferError(InputError):
    """A label buffer file or a label is invalid or damaged; nothing was written."""


class UsageError(InputError):
    """A command-line usage error (bad arguments, missing files)."""


# ---------------------------------------------------------------------- failed work
class WorkFailedError(PetftError, RuntimeError):
    """The inputs were valid but the work failed (diverged, crashed, timed out)."""


class FineTuneError(WorkFailedError):
    """A fine-tuning run failed; the input checkpoint is untouched."""


class TrainingDataError(InputError, FineTuneError):
    """The labels given to a fine-tuning run cannot be trained on (too few, unknown
    elements, wrong variant, unlabelled); nothing was trained."""


class ModelSwapError(WorkFailedError, CalculatorSetupError):
    """New weights do not fit the running calculator; the old model is kept."""


class LabellingError(WorkFailedError, CalculationFailed):
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


EXIT_OK, EXIT_FAILED, EXIT_INPUT = 0, 1, 2


def exit_code(exc: BaseException) -> int:
    """The command-line exit status of an error: 2 for bad input, 1 for failed work."""
    return EXIT_INPUT if isinstance(exc, InputError) else EXIT_FAILED
