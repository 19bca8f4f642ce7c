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
from ._state import differentiable_attention, model_device, preserved_logger_class

logger = logging.getLogger(__name__)

__all__ = ["heads_rows", "apply_heads_update", "last_layer_parameters", "energy_features",
           "backbone_fingerprint", "last_layer_vector"]


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


def last_layer_vector(model, variant: str) -> np.ndarray:
    """The last-layer parameters of ``variant`` as one float64 vector (heads_rows' order)."""
    return np.concatenate([p.detach().double().cpu().numpy().reshape(-1)
                           for _, p in last_layer_parameters(model, variant)])


def backbone_fingerprint(model, variant: str, *, additive: bool = True) -> str:
    """Hash of every tensor of the model except ``variant``'s last layers: heads rows
    (the Jacobians) computed under one fingerprint stay exact under any last-layer
    weights, since the energy is linear in them. ``additive=False`` also leaves out the
    additive models (composition offsets, ZBL): they add terms independent of the last
    layers, so the rows' derivatives do not change with them (their residuals do)."""
    import hashlib

    skip = {name for name, _ in last_layer_parameters(model, variant)}
    digest = hashlib.sha1()
    for name, tensor in sorted(model.state_dict().items()):
        if name in skip or (not additive and name.startswith("additive_models.")):
            continue
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


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
    device = model_device(model)
    with preserved_logger_class(), differentiable_attention(device):
        system = systems_to_torch(label.atoms, dtype=dtype)
        system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
        system, strain = _prepare_system(system.to(device=device), True, True, False)
        with _SavedBytes() as saved:
            out = model([system], {variant: ModelOutput(unit="eV", sample_kind="system")})
        energy = out[variant].block().values.sum()
        inputs = [system.positions] + ([strain] if use_stress else [])
        g, e0, jac = _jacobian(energy, params, inputs, forces=use_forces or use_stress,
                               mode=getattr(config, "jacobian", "auto"),
                               graph_bytes=saved.bytes)
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
        j_f = -jac[0].reshape(len(g), -1).T  # (3n, P)
        f0 = -e0[0].detach().double().cpu().numpy().reshape(-1)
        add(j_f, label.forces.reshape(-1) - f0, config.forces_weight / (3 * n), "forces")
    if use_stress:
        # metatrain's loss sees the strain gradient (stress × volume) per atom, so the
        # stress rows are in those units too; in eV/Å³ they would weigh ~V²/n² less
        volume = abs(label.atoms.cell.volume)
        # symmetric parts: PET is not exactly rotation-invariant, so ∂E/∂ε is not exactly
        # symmetric, while stress labels (and the calculator's stress) are
        j_s = jac[1].reshape(len(g), 3, 3) / n
        j_s = (j_s + j_s.transpose(0, 2, 1)) / 2
        s0 = e0[1].detach().double().cpu().numpy() / n
        s0 = (s0 + s0.T) / 2
        voigt = ([0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1])
        add(j_s[:, voigt[0], voigt[1]].T, label.stress * volume / n - s0[voigt[0], voigt[1]],
            config.stress_weight / 6, "stress")
    return (np.concatenate(blocks), np.concatenate(targets), np.concatenate(weights),
            np.concatenate(kinds))


# memory for the batched passes of one Jacobian chunk (bytes); the graph of one pass is
# measured (saved tensors of the forward), so the chunk adapts to model and structure
JACOBIAN_MEMORY_BYTES = 512 * 2**20


def _jacobian(energy, params, inputs, *, forces: bool, mode: str = "auto",
              graph_bytes: int = 0):
    """``(g, e0, jac)``: g = ∂E/∂θ (P,), e0 = [∂E/∂x for x in inputs], and
    jac = [∂²E/∂θ∂x as a float64 numpy array (P, *x.shape) for x in inputs].

    The mixed derivative is computed the cheaper exact way: ``"features"`` runs one
    reverse pass per last-layer parameter (backward of g to the inputs), ``"forces"``
    one per independent input component (backward of ∂E/∂x, built with
    ``create_graph``, to θ: 3N − 3 positions, the last atom's follow by translation
    invariance, and the 9 strain components);
    ``"auto"`` takes the one with fewer passes. Passes run batched
    (``is_grads_batched``) in chunks sized to ``JACOBIAN_MEMORY_BYTES``.
    """
    n_params = sum(p.numel() for p in params)
    if mode == "auto":
        passes = sum(len(_independent(k, x)) for k, x in enumerate(inputs))
        mode = "forces" if passes < n_params else "features"
    if not forces:
        g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(energy, params)])
        return g.detach(), [], []
    if mode == "features":
        grads = torch.autograd.grad(energy, params, create_graph=True)
        g = torch.cat([x.reshape(-1) for x in grads])
        e0 = torch.autograd.grad(energy, inputs, retain_graph=True)
        blocks = _batched(g, inputs, len(g), graph_bytes)
        jac = [np.concatenate([b[k] for b in blocks]) for k in range(len(inputs))]
        return g.detach(), e0, jac
    e0 = torch.autograd.grad(energy, inputs, create_graph=True)
    grads = torch.autograd.grad(energy, params, retain_graph=True)
    g = torch.cat([x.reshape(-1) for x in grads])
    # passes only for the components that are independent: the last atom's rows follow
    # from translation invariance (PET sees positions only through differences, so the
    # position derivatives of any feature sum to zero over the atoms); the strain's 9
    # components all get a pass (the stress rows use its symmetric part)
    picks = [_independent(k, x) for k, x in enumerate(inputs)]
    flat = torch.cat([d.reshape(-1)[pick] for d, pick in zip(e0, picks)])
    rows = np.concatenate([b[0] for b in _batched(flat, params, len(flat), graph_bytes,
                                                  concat=True)])
    jac, start = [], 0
    for k, (x, pick) in enumerate(zip(inputs, picks)):  # (n_rows, P) -> (P, *x.shape)
        full = np.full((n_params, x.numel()), np.nan)
        full[:, pick.cpu().numpy()] = rows[start:start + len(pick)].T
        start += len(pick)
        if k == 0 and len(pick) < x.numel():
            full[:, -3:] = -full[:, :-3].reshape(n_params, -1, 3).sum(axis=1)
        jac.append(full.reshape(n_params, *x.shape))
    return g.detach(), [x.detach() for x in e0], jac


def _independent(k: int, x) -> "torch.Tensor":
    """Flat indices of input ``k`` (0: positions (N, 3), 1: strain (3, 3)) whose mixed
    derivatives need a pass."""
    if k == 0 and x.shape[0] > 1:
        return torch.arange(x.numel() - 3)
    return torch.arange(x.numel())


def _batched(outputs, wrt, n_rows: int, graph_bytes: int, *,
             concat: bool = False) -> List[list]:
    """Rows of the Jacobian of the 1-D tensor ``outputs`` with respect to ``wrt``, in
    chunks of batched backward passes; each chunk is a list of float64 arrays (one per
    tensor of ``wrt``, or one ``(rows, sum of sizes)`` array with ``concat``)."""
    chunk = _chunk_size(graph_bytes, n_rows)
    blocks = []
    for start in range(0, n_rows, chunk):
        stop = min(n_rows, start + chunk)
        eye = torch.zeros(stop - start, n_rows, dtype=outputs.dtype, device=outputs.device)
        eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
        parts = torch.autograd.grad(outputs, wrt, grad_outputs=eye, is_grads_batched=True,
                                    retain_graph=stop < n_rows, allow_unused=True)
        parts = [torch.zeros((stop - start, *w.shape), dtype=outputs.dtype,
                             device=outputs.device) if d is None else d
                 for d, w in zip(parts, wrt)]
        arrays = [d.detach().double().cpu().numpy() for d in parts]
        if concat:
            arrays = [np.concatenate([a.reshape(stop - start, -1) for a in arrays], axis=1)]
        blocks.append(arrays)
    return blocks


def _chunk_size(graph_bytes: int, n_rows: int) -> int:
    """Rows per batched pass: one pass through the double-backward graph holds about
    three times the forward's saved tensors."""
    if graph_bytes <= 0:
        return n_rows
    return int(max(1, min(n_rows, JACOBIAN_MEMORY_BYTES // (3 * graph_bytes))))


class _SavedBytes:
    """Counts the bytes autograd saves for backward inside the block (the forward)."""

    def __init__(self):
        self.bytes = 0

    def _pack(self, tensor):
        self.bytes += tensor.numel() * tensor.element_size()
        return tensor

    def __enter__(self):
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def energy_features(model, variant: str, atoms_list: Sequence) -> np.ndarray:
    """``(n, P)``: the gradient of each structure's energy with respect to the last-layer
    parameters of ``variant`` — the features the energy is linear in (one forward and
    one backward pass per structure; the model is not changed)."""
    from metatomic.torch import ModelOutput, systems_to_torch
    from metatrain.utils.neighbor_lists import get_system_with_neighbor_lists

    params = [p for _, p in last_layer_parameters(model, variant)]
    dtype, device = params[0].dtype, params[0].device
    rows = []
    with _frozen_except(model, params):
        for atoms in atoms_list:
            with preserved_logger_class():
                system = systems_to_torch(atoms, dtype=dtype)
                system = get_system_with_neighbor_lists(system, model.requested_neighbor_lists())
                system = system.to(device=device)
                out = model([system], {variant: ModelOutput(unit="eV", sample_kind="system")})
            grads = torch.autograd.grad(out[variant].block().values.sum(), params)
            rows.append(torch.cat([g.reshape(-1) for g in grads]).detach().double().cpu().numpy())
    return np.array(rows)
