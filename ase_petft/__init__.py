"""ase_petft: on-the-fly fine-tuning of PET potentials inside ASE simulations.

Only load checkpoints you trust: metatrain checkpoints are Python pickles.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from .errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    FineTuneError,
    InputError,
    LabelBufferError,
    LabellingError,
    ModelSwapError,
    PetftError,
    TrainingDataError,
    UnsupportedSystemError,
    UsageError,
    VariantError,
    WorkFailedError,
)

# Heavy modules (torch, metatrain) are imported on first use of their names.
_LAZY = {
    "FineTunableCalculator": "calculator",
    "demo_checkpoint": "data",
    "LabelBuffer": "buffer",
    "recover_buffer": "buffer",
    "label": "labelling",
    "label_many": "labelling",
    "finetune": "finetune",
    "FineTuneConfig": "config",
    "FineTuneResult": "config",
    "OnTheFlyLearner": "learner",
    "Campaign": "learner",
    "Walker": "learner",
    "every": "learner",
    "max_gap": "learner",
    "min_gap": "learner",
    "uncertainty_above": "learner",
}

__all__ = [
    "__version__",
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
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ase_petft' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
