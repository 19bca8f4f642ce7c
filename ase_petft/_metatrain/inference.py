"""Inference and hot swap: export for metatomic, in-place weight copies; fresh models."""

from __future__ import annotations

import copy
import logging
import os
import pathlib
import threading
from typing import Any, Dict, List, Optional, Sequence

import torch

from ..errors import ModelSwapError, WorkFailedError
from .checkpoints import output_file
from .heads import atomic_types, energy_target_info, energy_variants
from ._state import pet_class, preserved_logger_class
from .training import default_pet_hypers

logger = logging.getLogger(__name__)

# TorchScript's compiler is not thread-safe: two calculators built at once in threads
# of one process (a campaign's walkers) failed with "Can't redefine method: forward"
_SCRIPT_LOCK = threading.RLock()


def prepare_for_inference(model, *, dtype: torch.dtype, device: torch.device,
                          script: bool = False):
    """Export ``model`` (same module, eval mode) as a metatomic AtomisticModel.

    With ``script=True`` the export is compiled by TorchScript (what ``mtt export``
    saves): ~1.5x less per-call overhead on small systems. The compiled copy shares
    ``model``'s parameters and buffers, so in-place weight copies reach it, but it holds
    its own copies of the composition and scale ``TensorMap`` objects: rebuild it when
    :func:`swap_weights` reports that those changed.
    """
    model.to(device=device, dtype=dtype)
    with _SCRIPT_LOCK, preserved_logger_class():
        exported = model.export()
        return torch.jit.script(exported) if script else exported


def check_swap_compatible(live, new, *, variant: str) -> List[str]:
    """Raise ModelSwapError unless ``new`` fits ``live``; return variants ``new`` lacks."""
    if type(new).__name__ != type(live).__name__:
        raise ModelSwapError(
            f"cannot swap a {type(new).__name__} into a running {type(live).__name__}"
        )
    if dict(new.hypers) != dict(live.hypers):
        diff = sorted(k for k in set(new.hypers) | set(live.hypers)
                      if new.hypers.get(k) != live.hypers.get(k))
        raise ModelSwapError(
            f"the new checkpoint has a different architecture (hypers differ in {diff});"
            " hot swap needs the same PET architecture — build a new calculator instead"
        )
    if atomic_types(new) != atomic_types(live):
        raise ModelSwapError(
            f"the new checkpoint knows elements {atomic_types(new)}, the running model "
            f"{atomic_types(live)}; hot swap needs the same atomic types"
        )
    if variant not in energy_variants(new):
        raise ModelSwapError(
            f"the new checkpoint has no {variant!r} head (it has "
            f"{energy_variants(new)}); the running calculator predicts {variant!r}"
        )
    return [v for v in energy_variants(live) if v not in energy_variants(new)]


def swap_weights(live, new) -> bool:
    """Copy every tensor of ``new`` into the matching tensor of ``live``, in place.

    Returns whether the composition or scale maps changed (a TorchScript copy of
    ``live`` then holds stale ones and must be rebuilt; its parameters are shared)."""
    target = live.state_dict(keep_vars=True)
    source = new.state_dict()
    maps_changed = any(
        name in source and (source[name].shape != tensor.shape
                            or not torch.equal(source[name].to(tensor.device), tensor))
        for name, tensor in target.items()
        if name.startswith(("additive_models.", "scaler."))
    )
    with torch.no_grad():
        for name, tensor in target.items():
            if name not in source:
                continue  # a head the new checkpoint dropped: now stale, see caller
            value = source[name]
            if value.shape != tensor.shape:
                _replace_buffer(live, name, value.to(tensor.device))
            else:
                tensor.copy_(value)
    live.additive_models[0].sync_tensor_maps()
    live.scaler.sync_tensor_maps()
    return maps_changed


def _replace_buffer(model, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr not in dict(module.named_buffers(recurse=False)):
        raise ModelSwapError(f"parameter {name!r} changed shape; cannot hot-swap it")
    module.register_buffer(attr, value.clone())


def new_pet_model(
    *,
    atomic_types: Sequence[int],
    variants: Dict[str, str],
    model_hypers: Optional[Dict[str, Any]] = None,
    seed: int = 0,
):
    """A freshly initialised PET predicting the given ``{variant: description}``."""
    from metatrain.utils.data import DatasetInfo

    hypers = default_pet_hypers()["model"]
    hypers.update(model_hypers or {})
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=sorted(int(z) for z in atomic_types),
        targets={v: energy_target_info(d) for v, d in variants.items()},
    )
    PET = pet_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with preserved_logger_class():
            return PET(hypers, info)


# ----------------------------------------------------------------------------------
# export (the one function that writes a metatomic .pt: always verified)
# ----------------------------------------------------------------------------------


def export_model(model, path: os.PathLike | str, *, variant: str, dtype=None) -> pathlib.Path:
    """Write ``model`` as a metatomic ``.pt`` and verify it before it appears at ``path``.

    The saved file is loaded back with ``metatomic_ase`` and must give the same energy
    of ``variant`` as the module itself on a probe structure (one atom of every type).
    Export puts the module in eval mode and freezes its parameters (metatrain's
    ``export()`` wraps the same module): never train ``model`` afterwards.
    """
    from .predict import predict

    path = output_file(path, what="an exported model", example="model.pt")
    if dtype is not None:
        model.to(dtype=dtype)
    probe = _probe(atomic_types(model))
    expected = predict(model, [probe], variant, forces=False, stress=False)[0]["energy"]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with _SCRIPT_LOCK:  # saving and loading the export compile TorchScript
            with preserved_logger_class():
                exported = model.export()
                exported.save(str(tmp))
            _verify(tmp, variant, probe, expected)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _probe(types):
    from ase import Atoms

    return Atoms(numbers=list(types), positions=[[1.6 * i, 0.1 * i, 0.0] for i in range(len(types))])


def _verify(path: pathlib.Path, variant: str, probe, expected: float) -> None:
    import numpy as np
    from metatomic_ase import MetatomicCalculator

    suffix = None if variant == "energy" else variant.split("/", 1)[1]
    calc = MetatomicCalculator(str(path), variants={"energy": suffix}, device="cpu",
                               uncertainty_threshold=None, do_gradients_with_energy=False)
    atoms = probe.copy()
    atoms.calc = calc
    energy = float(atoms.get_potential_energy())
    if not np.isfinite(energy) or abs(energy - expected) > 1e-4 * max(1.0, abs(expected)):
        raise WorkFailedError(
            f"the exported model {str(path)!r} gives E = {energy!r} eV for {variant!r} on a "
            f"probe structure where the model gives {expected!r} eV; export failed"
        )
