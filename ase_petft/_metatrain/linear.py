"""Closed-form heads-only refit: Bayesian ridge regression of PET's last layers.

PET's energy is *exactly* linear in the weights and biases θ of its last layers
(``node_last_layers`` / ``edge_last_layers`` of one variant): E(θ) = E(θ₀) + J_E·δ,
and so are forces and stress (F = -∂E/∂r, σ = ∂E/∂ε / V). With the backbone and the
head MLPs frozen, fitting energies, forces and stress is therefore a linear least
squares problem in δ = θ - θ₀. The Jacobians come from one forward pass, one
``create_graph`` backward to θ and a batched (vmapped) backward per structure; the
ridge strength (toward the current weights θ₀, i.e. the inherited head) is chosen
by evidence maximisation (MacKay) unless ``FineTuneConfig.ridge`` fixes it.

Composition and scale are not touched here (see DESIGN.md §5). PET is not
rotation-invariant by construction; ``config.rotations`` randomly rotated copies of
every structure can be added (metatrain's SGD rotates every batch; here copies cost
as much as the structures and did not help, see ``FineTuneConfig.rotations``).
"""

from __future__ import annotations

import logging
import warnings
from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..errors import FineTuneError
from . import preserved_global_state
from .labels import Label

logger = logging.getLogger(__name__)

__all__ = ["refit_heads", "last_layer_parameters"]


def last_layer_parameters(model, variant: str) -> List[Tuple[str, torch.nn.Parameter]]:
    prefixes = (f"backend.node_last_layers.{variant}.", f"backend.edge_last_layers.{variant}.")
    params = [(n, p) for n, p in model.named_parameters() if n.startswith(prefixes)]
    if not params:
        raise FineTuneError(f"the model has no last layers for {variant!r}")
    return params


def refit_heads(model, variant: str, labels: Sequence[Label], *, config) -> dict:
    """Refit the last layers of ``variant`` in place; returns solver diagnostics."""
    params = last_layer_parameters(model, variant)
    rng = np.random.default_rng(config.seed)
    frames = _augmented(labels, config.rotations, rng)
    rows, targets = [], []
    with _frozen_except(model, [p for _, p in params]):
        for label in frames:
            a, y = _rows(model, variant, label, [p for _, p in params], config)
            rows.append(a)
            targets.append(y)
    A, y = np.concatenate(rows), np.concatenate(targets)
    delta, info = _solve(A, y, config.ridge)
    offset = 0
    with torch.no_grad():
        for _, p in params:
            n = p.numel()
            p += torch.as_tensor(delta[offset:offset + n], dtype=p.dtype).reshape(p.shape)
            offset += n
    info.update(n_parameters=int(A.shape[1]), n_rows=int(A.shape[0]), n_structures=len(frames))
    logger.info("linear heads refit of %r (closed form instead of metatrain's SGD, "
                "%d rotated copies per structure): %d parameters, %d rows, ridge %.3g, "
                "effective parameters %.1f", variant, config.rotations, info["n_parameters"],
                info["n_rows"], info["ridge"], info["gamma"])
    return info


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
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
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
    jac = torch.autograd.grad(g, inputs, grad_outputs=torch.eye(len(g), dtype=g.dtype),
                              is_grads_batched=True, retain_graph=False)
    n = label.n_atoms
    blocks, targets = [], []
    w_e = np.sqrt(config.energy_weight)
    blocks.append(w_e * g.detach().double().numpy()[None, :] / n)
    targets.append(w_e * np.array([(label.energy - float(energy.detach())) / n]))
    if use_forces:
        w = np.sqrt(config.forces_weight / (3 * n))
        j_f = -jac[0].detach().double().numpy().reshape(len(g), -1).T  # (3n, P)
        f0 = -e0[0].detach().double().numpy().reshape(-1)
        blocks.append(w * j_f)
        targets.append(w * (label.forces.reshape(-1) - f0))
    if use_stress:
        # metatrain's loss sees the strain gradient (stress × volume) per atom, so the
        # stress rows are in those units too; in eV/Å³ they would weigh ~V²/n² less
        volume = abs(label.atoms.cell.volume)
        w = np.sqrt(config.stress_weight / 6)
        j_s = jac[1].detach().double().numpy().reshape(len(g), 3, 3) / n
        s0 = e0[1].detach().double().numpy() / n
        voigt = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])
        blocks.append(w * j_s[:, voigt[0], voigt[1]].T)
        targets.append(w * (label.stress * volume / n - s0[voigt[0], voigt[1]]))
    return np.concatenate(blocks), np.concatenate(targets)


def _solve(A: np.ndarray, y: np.ndarray, ridge):
    """Ridge solution toward 0; λ by evidence maximisation unless ``ridge`` given."""
    AtA, Aty = A.T @ A, A.T @ y
    eig, V = np.linalg.eigh(AtA)
    eig = np.clip(eig, 0.0, None)
    b = V.T @ Aty
    if ridge is not None:
        lam = ridge * max(float(np.mean(eig)), 1e-30)
        m = V @ (b / (eig + lam))
        gamma = float(np.sum(eig / (eig + lam)))
        return m, {"ridge": lam, "gamma": gamma}
    return _evidence_grid(A, y, eig, V, b)


def _evidence_grid(A, y, eig, V, b):
    """λ = α/β maximising the log evidence on a log grid (β at its optimum for each λ).

    A grid, not MacKay's fixed-point iteration: the iteration can run away to
    α → ∞ (no update at all) on informative data, which a grid cannot."""
    n, p = len(y), len(eig)
    scale = max(float(np.mean(eig)), 1e-30)
    best = None
    for lam in scale * np.logspace(-10, 4, 57):
        m = V @ (b / (eig + lam))
        residual = float(np.sum((y - A @ m) ** 2))
        beta = n / max(residual + lam * float(m @ m), 1e-300)
        alpha = lam * beta
        log_evidence = (0.5 * p * np.log(alpha) + 0.5 * n * np.log(beta)
                        - 0.5 * beta * residual - 0.5 * alpha * float(m @ m)
                        - 0.5 * float(np.sum(np.log(beta * eig + alpha))))
        if best is None or log_evidence > best[0]:
            best = (log_evidence, lam, m)
    _, lam, m = best
    gamma = float(np.sum(eig / (eig + lam)))
    return m, {"ridge": lam, "gamma": gamma}
