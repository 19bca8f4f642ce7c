"""Closed-form heads-only refit, metatrain side: Jacobian rows of PET's last layers.

PET's energy is *exactly* linear in the weights and biases θ of its last layers
(``node_last_layers`` / ``edge_last_layers`` of one variant): E(θ) = E(θ₀) + J_E·δ,
and so are forces and stress (F = -∂E/∂r, σ = ∂E/∂ε / V). With the backbone and the
head MLPs frozen, fitting energies, forces and stress is therefore a linear least
squares problem in δ = θ - θ₀. The Jacobians come from one forward pass, one
``create_graph`` backward to θ and a batched (vmapped) backward per structure. The
statistics and the model selection (which λ, which noise levels, or no update at
all) are plain numpy, in :mod:`ase_petft.finetune.solver`.

Composition and scale are not touched here (see DESIGN.md §5). PET is not
rotation-invariant by construction; ``config.rotations`` randomly rotated copies of
every structure can be added (metatrain's SGD rotates every batch; here copies cost
as much as the structures and did not help, see ``FineTuneConfig.rotations``).
"""

from __future__ import annotations

import logging
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import FineTuneError
from ..labels import Label
from ._state import preserved_logger_class

logger = logging.getLogger(__name__)

__all__ = ["heads_rows", "apply_heads_update", "last_layer_parameters", "energy_features"]


def last_layer_parameters(model, variant: str) -> List[Tuple[str, torch.nn.Parameter]]:
    prefixes = (f"backend.node_last_layers.{variant}.", f"backend.edge_last_layers.{variant}.")
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]
    if not params:
        raise FineTuneError(f"the model has no last layers for {variant!r}")
    return params


def heads_rows(model, variant: str, labels: Sequence[Label], *, config) -> List[tuple]:
    """Per structure ``(A, y, w, kind)``: the derivatives of the predictions (energy per
    atom, forces, stress) with respect to the last-layer parameters of ``variant``, the
    residuals label − prediction, each row's loss weight (metatrain's normalisation:
    energies per atom, forces averaged over 3N components, stress over 6) and the row
    kind. Physical units; the model is not changed."""
    params = [p for _, p in last_layer_parameters(model, variant)]
    rng = np.random.default_rng(config.seed)
    out = []
    with _frozen_except(model, params):
        for label in _augmented(labels, config.rotations, rng):
            out.append(_rows(model, variant, label, params, config))
    return out


def apply_heads_update(model, variant: str, delta: np.ndarray) -> None:
    """Add ``delta`` (ordered like :func:`heads_rows`' columns) to the last layers."""
    offset = 0
    with torch.no_grad():
        for _, p in last_layer_parameters(model, variant):
            n = p.numel()
            p += torch.as_tensor(delta[offset:offset + n], dtype=p.dtype,
                                 device=p.device).reshape(p.shape)
            offset += n


class _frozen_except:
    """Only ``keep`` requires grad inside the block; eval mode; restored after."""

    def __init__(self, model, keep):
        self.model, self.keep = model, {id(p) for p in keep}

    def __enter__(self):
        self.flags = [(p, p.requires_grad) for p in self.model.parameters()]
        self.training = self.model.training
        for p, _ in self.flags:
            p.requires_grad_(id(p) in self.keep)
        self.model.eval()

    def __exit__(self, *exc):
        for p, flag in self.flags:
            p.requires_grad_(flag)
        self.model.train(self.training)


def _augmented(labels: Sequence[Label], rotations: int, rng) -> List[Label]:
    from scipy.spatial.transform import Rotation

    out = list(labels)
    for _ in range(rotations):
        for label in labels:
            R = Rotation.random(random_state=int(rng.integers(2**31))).as_matrix()
            atoms = label.atoms.copy()
            atoms.positions = atoms.positions @ R.T
            atoms.cell = atoms.cell.array @ R.T
            forces = None if label.forces is None else label.forces @ R.T
            stress = None if label.stress is None else _rotate_voigt(label.stress, R)
            out.append(Label(atoms=atoms, energy=label.energy, forces=forces, stress=stress))
    return out


def _rotate_voigt(stress, R):
    from ase.stress import full_3x3_to_voigt_6_stress, voigt_6_to_full_3x3_stress

    return full_3x3_to_voigt_6_stress(R @ voigt_6_to_full_3x3_stress(stress) @ R.T)


def _rows(model, variant: str, label: Label, params, config):
    """Weighted Jacobian rows and residual targets of one structure."""
    from metatomic.torch import ModelOutput, systems_to_torch
    from metatrain.utils.evaluate_model import _prepare_system
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    dtype = params[0].dtype
    use_forces = label.forces is not None and config.forces_weight > 0
    use_stress = label.stress is not None and label.periodic and config.stress_weight > 0
    with preserved_logger_class():
        system = systems_to_torch(label.atoms, dtype=dtype)
        system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        system, strain = _prepare_system(system, True, True, False)
        out = model([system], {variant: ModelOutput(unit="eV",
                                                    sample_kind="system")})
    energy = out[variant].block().values.sum()
    grads = torch.autograd.grad(energy, params, create_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    inputs = [system.positions] + ([strain] if use_stress else [])
    e0 = torch.autograd.grad(energy, inputs, retain_graph=True)
    jac = torch.autograd.grad(g, inputs, grad_outputs=torch.eye(len(g), dtype=g.dtype, device=g.device),
                              is_grads_batched=True, retain_graph=False)
    n = label.n_atoms
    blocks, targets, weights, kinds = [], [], [], []

    def add(rows, values, weight, kind):
        blocks.append(rows)
        targets.append(values)
        weights.append(np.full(len(values), weight))
        kinds.append(np.full(len(values), kind))

    add(g.detach().double().cpu().numpy()[None, :] / n,
        np.array([(label.energy - float(energy.detach())) / n]), config.energy_weight, "energy")
    if use_forces:
        j_f = -jac[0].detach().double().cpu().numpy().reshape(len(g), -1).T  # (3n, P)
        f0 = -e0[0].detach().double().cpu().numpy().reshape(-1)
        add(j_f, label.forces.reshape(-1) - f0, config.forces_weight / (3 * n), "forces")
    if use_stress:
        # metatrain's loss sees the strain gradient (stress × volume) per atom, so the
        # stress rows are in those units too; in eV/Å³ they would weigh ~V²/n² less
        volume = abs(label.atoms.cell.volume)
        j_s = jac[1].detach().double().cpu().numpy().reshape(len(g), 3, 3) / n
        s0 = e0[1].detach().double().cpu().numpy() / n
        voigt = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])
        add(j_s[:, voigt[0], voigt[1]].T, label.stress * volume / n - s0[voigt[0], voigt[1]],
            config.stress_weight / 6, "stress")
    return (np.concatenate(blocks), np.concatenate(targets), np.concatenate(weights),
            np.concatenate(kinds))


def energy_features(model, variant: str, atoms_list: Sequence) -> np.ndarray:
    """``(n, P)``: the gradient of each structure's energy with respect to the last-layer
    parameters of ``variant`` — the features the energy is linear in (one forward and
    one backward pass per structure; the model is not changed)."""
    from metatomic.torch import ModelOutput, systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    params = [p for _, p in last_layer_parameters(model, variant)]
    dtype = params[0].dtype
    rows = []
    with _frozen_except(model, params):
        for atoms in atoms_list:
            with preserved_logger_class():
                system = systems_to_torch(atoms, dtype=dtype)
                system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
                out = model([system], {variant: ModelOutput(unit="eV", sample_kind="system")})
            grads = torch.autograd.grad(out[variant].block().values.sum(), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).detach().double().cpu().numpy())
    return np.array(rows)
