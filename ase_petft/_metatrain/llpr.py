"""metatrain's LLPR (last-layer prediction rigidity) on one energy variant.

The LLPR wrapper shares the live PET module (no copy): after a hot swap its covariance
describes the old weights and must be refitted, which :func:`fit` does. Uncertainties
are standard deviations of the *total* energy (eV), calibrated on held-out labels.
"""

from __future__ import annotations

import copy
from typing import List, Sequence

import numpy as np
import torch

from ..errors import PetftError
from ..labels import Label
from ._state import preserved_logger_class
from .heads import atomic_types

__all__ = ["wrap", "fit", "energy_uncertainty", "uncertainty_output"]


def uncertainty_output(variant: str) -> str:
    """metatrain's name of a variant's energy uncertainty output."""
    return "energy_uncertainty" if variant == "energy" else f"mtt::aux::{variant}_uncertainty"


def wrap(model, variant: str):
    """An LLPR model around ``model`` (shared, not copied) for ``variant``."""
    from metatrain.utils.data import DatasetInfo

    with preserved_logger_class():
        from metatrain.llpr.model import LLPRUncertaintyModel
        from metatrain.utils.architectures import get_default_hypers

        hypers = copy.deepcopy(get_default_hypers("llpr")["model"])
        hypers["num_ensemble_members"] = {}
        info = DatasetInfo(
            length_unit=model.dataset_info.length_unit,
            atomic_types=atomic_types(model),
            targets={variant: model.dataset_info.targets[variant]},
        )
        llpr = LLPRUncertaintyModel(hypers, info)
        llpr.set_wrapped_model(model)
    return llpr


def fit(llpr, variant: str, train: Sequence[Label], calibration: Sequence[Label],
        *, batch_size: int = 8) -> None:
    """Covariance of the last-layer features on ``train``, calibrated on ``calibration``."""
    from .training import build_dataset

    if len(train) == 0 or len(calibration) == 0:
        raise PetftError(
            f"LLPR needs labelled frames to fit ({len(train)}) and to calibrate "
            f"({len(calibration)}); label a few structures first"
        )
    from .training import routed_logs

    name = uncertainty_output(variant)
    with preserved_logger_class(), torch.no_grad(), routed_logs():
        getattr(llpr, f"covariance_{name}").zero_()
        llpr.compute_covariance([build_dataset(train, variant, forces=False, stress=False)],
                                min(batch_size, len(train)), False)
        llpr.compute_cholesky_decomposition()
        llpr.calibrate([build_dataset(calibration, variant, forces=False, stress=False)],
                       min(batch_size, len(calibration)), False, "squared_residuals")


def energy_uncertainty(llpr, variant: str, atoms_list: Sequence) -> List[float]:
    """Calibrated σ of each structure's total energy (eV)."""
    from metatomic.torch import ModelOutput, systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    name = uncertainty_output(variant)
    model = llpr.model
    dtype = next(model.parameters()).dtype
    outputs = {name: ModelOutput(sample_kind="system")}
    with preserved_logger_class(), torch.no_grad():
        device = next(model.parameters()).device
        systems = [get_system_with_neighbor_lists(s, model.requested_neighbor_lists())
                   .to(device=device) for s in systems_to_torch(list(atoms_list), dtype=dtype)]
        result = llpr(systems, outputs)
    values = result[name].block().values.detach().double().cpu().numpy().reshape(-1)
    return [float(v) for v in np.asarray(values)]


class LLPR:
    """metatrain's LLPR on one variant of a live PET module (shared, not copied)."""

    def __init__(self, model, variant: str) -> None:
        self.variant = variant
        self._llpr = wrap(model, variant)

    def fit(self, train: Sequence[Label], calibration: Sequence[Label]) -> None:
        fit(self._llpr, self.variant, train, calibration)

    def energy_sigma(self, atoms_list: Sequence) -> List[float]:
        """Calibrated σ of each structure's total energy (eV)."""
        return energy_uncertainty(self._llpr, self.variant, atoms_list)
