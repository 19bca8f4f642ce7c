"""The one adapter to metatrain internals (checkpoints, PET models, export).

Everything that depends on metatrain's private layout lives here, behind a few plain
functions, so that a metatrain upgrade touches one module. metatrain is imported
lazily and with the process-wide logging/warning state restored afterwards: importing
``metatrain.pet`` replaces the logger class of the whole process and training adds
warning filters, which a library must not do to its host.

Only load checkpoints you trust: they are Python pickles (``torch.load`` with
``weights_only=False`` is required by metatrain's checkpoint format).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pathlib
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch

from ..errors import CheckpointError, ModelSwapError, VariantError
from ..variants import BASE

logger = logging.getLogger(__name__)

ARCHITECTURE = "pet"
ENERGY_UNIT = "eV"

# parameter/buffer name fragments that hold one variant's head, composition and scale
_HEAD_MODULES = ("node_heads", "edge_heads", "node_last_layers", "edge_last_layers")
_ADDITIVE_BUFFERS = (
    "_composition_buffer",
    "_scaler_buffer",
    "_per_target_scaler_buffer",
    "_per_property_scaler_buffer",
)


@contextlib.contextmanager
def preserved_global_state() -> Iterator[None]:
    """Restore the logger class and warning filters that metatrain changes."""
    logger_class = logging.getLoggerClass()
    filters = list(warnings.filters)
    try:
        yield
    finally:
        logging.setLoggerClass(logger_class)
        warnings.filters[:] = filters
        warnings._filters_mutated()  # type: ignore[attr-defined]


def _pet_class():
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # omegaconf/torch.jit deprecation noise
        from metatrain.pet import PET
    return PET


# ----------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------


def read_checkpoint(path: os.PathLike | str) -> Dict[str, Any]:
    """Load a metatrain checkpoint dict (a trusted pickle) and check it is a PET."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint file {str(path)!r} does not exist; pass the path of a "
            "metatrain PET checkpoint (.ckpt) written by 'mtt train' or ase_petft"
        )
    _pet_class()  # registers metatomic/metatensor TorchScript classes the pickle uses
    try:
        with preserved_global_state(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
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
    _pet_class()
    from metatrain.utils.io import model_from_checkpoint as _mtt_load

    from .training import routed_logs

    try:
        with preserved_global_state(), warnings.catch_warnings(), routed_logs():
            warnings.simplefilter("ignore")
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
    return model


def load_model(path: os.PathLike | str):
    """Read a checkpoint file and build its PET model (best weights)."""
    return model_from_checkpoint(read_checkpoint(path), source=repr(str(path)))


def checkpoint_dict(model) -> Dict[str, Any]:
    """A metatrain checkpoint dict of ``model`` (readable by ``mtt export/eval``)."""
    with preserved_global_state():
        ckpt = model.get_checkpoint()
    ckpt["best_epoch"] = ckpt.get("best_epoch") or 0
    ckpt["epoch"] = ckpt.get("epoch") or 0
    return ckpt


def save_checkpoint(model, path: os.PathLike | str) -> pathlib.Path:
    """Write ``model`` as a metatrain checkpoint, atomically (tmp file + rename)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(checkpoint_dict(model), tmp)
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------------
# variants
# ----------------------------------------------------------------------------------


def energy_variants(model) -> List[str]:
    """Every energy variant (``energy``, ``energy/<name>``) the model predicts."""
    names = model.dataset_info.targets.keys()
    return sorted(n for n in names if n == BASE or n.startswith(BASE + "/"))


def atomic_types(model) -> List[int]:
    return [int(z) for z in model.atomic_types]


def energy_target_info(description: str):
    """metatrain TargetInfo of an energy with forces and stress gradients."""
    from metatrain.utils.data.target_info import get_energy_target_info

    return get_energy_target_info(
        BASE,
        {"unit": ENERGY_UNIT, "description": description},
        add_position_gradients=True,
        add_strain_gradients=True,
    )


def variant_description(model, variant: str) -> str:
    return model.dataset_info.targets[variant].description


def add_variant(model, variant: str, *, inherit_from: str, description: str) -> None:
    """Add a head for ``variant`` that predicts exactly what ``inherit_from`` predicts.

    Heads, last layers, composition weights and scales are copied from the parent, so
    the new variant starts equal to it (metatrain's own restart would give it a zero
    composition and a unit scale until trained).
    """
    if inherit_from not in energy_variants(model):
        raise VariantError(
            f"cannot create {variant!r} from {inherit_from!r}: the model has no "
            f"{inherit_from!r} head; available variants: {energy_variants(model)}"
        )
    from metatrain.utils.data import DatasetInfo

    info = DatasetInfo(
        length_unit=model.dataset_info.length_unit,
        atomic_types=atomic_types(model),
        targets={variant: energy_target_info(description)},
    )
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.restart(info)
    model._stale_finetune_targets = []  # restart only: nothing is being trained
    copy_variant_weights(model, source=inherit_from, dest=variant)
    logger.info("created variant %r as a copy of %r", variant, inherit_from)


def copy_variant_weights(model, *, source: str, dest: str) -> None:
    """Copy heads, last layers, composition and scales of ``source`` into ``dest``."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for module in _HEAD_MODULES:
            prefix_src = f"backend.{module}.{source}."
            prefix_dst = f"backend.{module}.{dest}."
            for name, value in params.items():
                if name.startswith(prefix_src):
                    rest = name[len(prefix_src) :].replace(f"{source}_", f"{dest}_", 1)
                    params[prefix_dst + rest].copy_(value)
        for owner in (model.additive_models[0], model.scaler):
            buffers = dict(owner.named_buffers(recurse=False))
            for suffix in _ADDITIVE_BUFFERS:
                if source + suffix in buffers:
                    owner.register_buffer(dest + suffix, buffers[source + suffix].clone())
    model.additive_models[0].sync_tensor_maps()
    model.scaler.sync_tensor_maps()


# ----------------------------------------------------------------------------------
# inference and hot swap
# ----------------------------------------------------------------------------------


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
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


# ----------------------------------------------------------------------------------
# building fresh models (tests, demo training)
# ----------------------------------------------------------------------------------


def default_pet_hypers() -> Dict[str, Any]:
    from metatrain.utils.architectures import get_default_hypers

    with preserved_global_state():
        return copy.deepcopy(get_default_hypers(ARCHITECTURE))


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
    PET = _pet_class()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with preserved_global_state():
            return PET(hypers, info)
