"""metatrain checkpoints: read (trusted pickles), build the PET, write atomically.

Only load checkpoints you trust: they are Python pickles (``torch.load`` with
``weights_only=False`` is required by metatrain's checkpoint format).
"""

from __future__ import annotations

import copy
import logging
import os
import pathlib
from typing import Any, Dict

import torch

from ..errors import CheckpointError
from ._state import ARCHITECTURE, pet_class, preserved_logger_class

logger = logging.getLogger(__name__)


def read_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """Load a metatrain checkpoint dict (a trusted pickle) and check it is a PET."""
    path = checkpoint_path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.ckpt"))[:5]
        raise CheckpointError(
            f"{str(path)!r} is a directory, not a checkpoint file; pass the checkpoint "
            "file itself" + (f", e.g. one of {inside} in it" if inside else
                             " (a generation folder holds model.ckpt)"))
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not exist; pass the path of a "
            "metatrain PET checkpoint (.ckpt) written by 'mtt train' or ase_petft"
        )
    pet_class()  # registers metatomic/metatensor TorchScript classes the pickle uses
    try:
        with preserved_logger_class():
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for corrupt files
        raise CheckpointError(
            f"could not read checkpoint {str(path)!r}: {type(exc).__name__}: {exc}. "
            "Expected a metatrain checkpoint (.ckpt) as written by 'mtt train'; an "
            "exported metatomic model (.pt) cannot be fine-tuned"
        ) from exc
    if isinstance(ckpt, torch.jit.ScriptModule) or not isinstance(ckpt, dict):
        raise CheckpointError(
            f"{str(path)!r} is an exported metatomic model (.pt), not a metatrain "
            "checkpoint; fine-tuning needs the .ckpt it was exported from"
        )
    if "architecture_name" not in ckpt:
        raise CheckpointError(
            f"{str(path)!r} is not a metatrain checkpoint (no 'architecture_name'); "
            "expected a PET .ckpt written by 'mtt train' or ase_petft"
        )
    if ckpt["architecture_name"] != ARCHITECTURE:
        raise CheckpointError(
            f"{str(path)!r} holds a {ckpt['architecture_name']!r} model; ase_petft "
            f"fine-tunes PET models only (architecture_name {ARCHITECTURE!r})"
        )
    return ckpt


def model_from_checkpoint(ckpt: Dict[str, Any], *, source: str = "checkpoint"):
    """A PET model with the *best* weights of ``ckpt`` (upgraded if it is old)."""
    pet_class()
    from metatrain.utils.io import model_from_checkpoint as _mtt_load

    from .training import routed_logs

    try:
        with preserved_logger_class(), routed_logs():
            model = _mtt_load(copy.copy(ckpt), context="finetune")
    except Exception as exc:
        raise CheckpointError(
            f"metatrain could not build a PET model from {source}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    from .training import merge_lora

    if merge_lora(model):  # e.g. an `mtt train` LoRA run: W + (alpha/rank) B A
        model.finetune_config = {}
        logger.info("merged the LoRA adapters of %s into plain PET weights", source)
    _check_units(model, source)
    return model


def _check_units(model, source: str) -> None:
    """Labels, refits and the uncertainty work in eV and Å, and evaluate the raw module
    (which does no unit conversion): a checkpoint in other units would be refitted
    against labels off by the conversion factor."""
    info = model.dataset_info
    length = str(info.length_unit or "").strip().lower()
    wrong = [] if length in ("", "angstrom", "a", "å") else [f"length unit {info.length_unit!r}"]
    for name, target in info.targets.items():
        unit = str(getattr(target, "unit", "") or "").strip()
        if getattr(target, "quantity", "energy") == "energy" and unit not in ("", "eV", "ev"):
            wrong.append(f"{name!r} in {unit!r}")
    if wrong:
        raise CheckpointError(
            f"{source} predicts in other units than eV and Å ({', '.join(wrong)}); "
            "ase_petft fine-tunes and labels in eV and Å only: train the model with "
            "energies in eV and lengths in angstrom")


def load_model(path: os.PathLike | str):
    """Read a checkpoint file and build its PET model (best weights)."""
    return model_from_checkpoint(read_checkpoint(path), source=repr(str(path)))


def copy_model(model, *, device=None):
    """A trainable deep copy of a PET module (e.g. a calculator's live model, which
    export left in eval mode with ``requires_grad=False``), on ``device``."""
    import copy

    clone = thaw(copy.deepcopy(model))
    return clone if device is None else clone.to(device)


def thaw(model):
    """Give every parameter ``requires_grad=True`` again, as in a module read from its
    checkpoint (export and frozen-backbone training turn it off). Returns ``model``.

    Not only for training: PyTorch takes other CPU kernels for frozen weights, so a frozen
    module predicts a few float32 roundings (~1e-6 eV) away from its own checkpoint."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def checkpoint_dict(model) -> Dict[str, Any]:
    """A metatrain checkpoint dict of ``model`` (readable by ``mtt export/eval``)."""
    with preserved_logger_class():
        ckpt = model.get_checkpoint()
    ckpt["best_epoch"] = ckpt.get("best_epoch") or 0
    ckpt["epoch"] = ckpt.get("epoch") or 0
    return ckpt


def checkpoint_path(path) -> pathlib.Path:
    """``path`` as a Path; CheckpointError for what cannot name a file (None, "")."""
    if not isinstance(path, (str, os.PathLike)) or not str(os.fspath(path)).strip():
        raise CheckpointError(f"a checkpoint path must be a non-empty str or path, got "
                              f"{path!r}; pass the path of a metatrain checkpoint (.ckpt)")
    return pathlib.Path(path)


def output_file(path, *, what: str = "a checkpoint", example: str = "model.ckpt"
                ) -> pathlib.Path:
    """``path`` as a file to be written, its folder created; CheckpointError (bad input)
    when it names a directory or its folder cannot be created."""
    path = checkpoint_path(path)
    if path.is_dir() or not path.name or path.name in (".", ".."):
        raise CheckpointError(f"cannot write {what} to {str(path)!r}: it names a "
                              f"directory; give a file name, e.g. .../{example}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} to {str(path)!r}: its folder "
                              f"cannot be created ({type(exc).__name__}: {exc}); choose "
                              "another path") from exc
    return path


def save_checkpoint(model, path: os.PathLike | str) -> pathlib.Path:
    """Write ``model`` as a metatrain checkpoint, atomically (tmp file + rename)."""
    path = output_file(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(model), tmp)
    os.replace(tmp, path)
    return path


