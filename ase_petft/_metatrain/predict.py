"""Predictions of one energy variant of a PET module, without a calculator.

Used for validation metrics and tests; the exported model / FineTunableCalculator
give the same numbers (same metatrain forward, same autograd path).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..errors import FineTuneError
from ._state import differentiable_attention, model_device, preserved_logger_class

__all__ = ["predict"]


def predict(model, atoms_list: Sequence, variant: str, *, forces: bool = True,
            stress: bool = True, batch_size: int = 8) -> List[Dict[str, np.ndarray]]:
    """Predictions of ``variant`` (eV, eV/Å, eV/Å³ Voigt) without a calculator.

    ``model`` is a PET module (not exported); it is evaluated in eval mode and put
    back into the mode it was in. Stress is given for periodic cells only.
    """
    from metatomic.torch import systems_to_torch
    from metatrain.utils.evaluate_model import evaluate_model
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    info = _prediction_info(model, variant, forces, stress)
    dtype, device = next(model.parameters()).dtype, model_device(model)
    was_training = model.training
    model.eval()
    out: List[Dict[str, np.ndarray]] = []
    try:
        with preserved_logger_class(), differentiable_attention(device):
            for start in range(0, len(atoms_list), batch_size):
                chunk = list(atoms_list[start:start + batch_size])
                systems = [get_system_with_neighbor_lists(s, model.requested_neighbor_lists())
                           .to(device=device) for s in systems_to_torch(chunk, dtype=dtype)]
                result = evaluate_model(model, systems, {variant: info}, is_training=False)
                out.extend(_unpack(result[variant].block(), chunk, forces, stress))
    finally:
        model.train(was_training)
    return out


def _prediction_info(model, variant: str, forces: bool, stress: bool):
    if variant not in model.dataset_info.targets:
        raise FineTuneError(
            f"the model has no {variant!r} head; it has "
            f"{sorted(model.dataset_info.targets)}"
        )
    return with_gradients(model.dataset_info.targets[variant], forces, stress)


def with_gradients(info, forces: bool, stress: bool):
    from metatrain.utils.data.target_info import get_energy_target_info

    return get_energy_target_info(
        "energy", {"unit": info.unit, "description": info.description},
        add_position_gradients=forces, add_strain_gradients=stress,
    )


def _unpack(block, chunk, forces: bool, stress: bool) -> List[Dict[str, np.ndarray]]:
    energies = block.values.detach().double().reshape(-1).cpu().numpy()
    out = [{"energy": float(e)} for e in energies]
    if forces:
        grad = block.gradient("positions")
        values = grad.values.detach().double().reshape(-1, 3).cpu().numpy()
        system_of = grad.samples.column("sample").cpu().numpy()
        for i in range(len(chunk)):
            out[i]["forces"] = -values[system_of == i]
    if stress:
        grad = block.gradient("strain").values.detach().double().reshape(-1, 3, 3).cpu().numpy()
        for i, atoms in enumerate(chunk):
            if np.all(atoms.pbc) and atoms.cell.volume > 0:
                # the symmetric part, as the calculator's stress (metatomic's Voigt)
                full = (grad[i] + grad[i].T) / 2 / atoms.cell.volume
                out[i]["stress"] = full[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]
    return out
