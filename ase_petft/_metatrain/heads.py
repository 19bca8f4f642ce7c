"""Energy variants of a PET: which heads exist, adding one, composition and scale."""

from __future__ import annotations

import logging
from typing import Dict, List, Mapping

import torch

from ..errors import VariantError
from ..variants import BASE
from ._state import preserved_logger_class

logger = logging.getLogger(__name__)

ENERGY_UNIT = "eV"

# parameter/buffer name fragments that hold one variant's head, composition and scale
_HEAD_MODULES = ("node_heads", "edge_heads", "node_last_layers", "edge_last_layers")
_ADDITIVE_BUFFERS = (
    "_composition_buffer",
    "_scaler_buffer",
    "_per_target_scaler_buffer",
    "_per_property_scaler_buffer",
)


def energy_variants(model) -> List[str]:
    """Every energy variant (``energy``, ``energy/<name>``) the model predicts."""
    names = model.dataset_info.targets.keys()
    return sorted(n for n in names if n == BASE or n.startswith(BASE + "/"))


def atomic_types(model) -> List[int]:
    return [int(z) for z in model.atomic_types]


def interaction_cutoff(model) -> float:
    """The largest neighbour-list cutoff the model requests (Å)."""
    return max(float(options.cutoff) for options in model.requested_neighbor_lists())


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
    with preserved_logger_class():
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


def composition_weights(model, variant: str) -> Dict[int, float]:
    """Per-element composition energies (eV) of ``variant``."""
    weights = model.additive_models[0].model.weights[variant]
    values = weights.block().values.detach().reshape(-1).double().cpu().numpy()
    types = [int(z) for z in model.additive_models[0].atomic_types]
    return dict(zip(types, values.tolist()))


def set_composition_weights(model, variant: str, values: Mapping[int, float]) -> None:
    """Overwrite the composition energies of ``variant`` (buffer + TensorMap)."""
    import metatensor.torch as mts

    composition = model.additive_models[0]
    weights = composition.model.weights[variant]
    block = weights.block()
    types = [int(z) for z in composition.atomic_types]
    new = torch.tensor([values[z] for z in types], dtype=block.values.dtype)
    with torch.no_grad():
        block.values.copy_(new.reshape(block.values.shape).to(block.values.device))
    buffer = mts.save_buffer(mts.make_contiguous(weights.to("cpu", torch.float64)))
    composition.register_buffer(variant + "_composition_buffer", buffer)
    composition.sync_tensor_maps()


def scale_weights(model, variant: str) -> torch.Tensor:
    """The scaler's per-target scale tensor of ``variant`` (a copy)."""
    return model.scaler.model.scales[variant].block().values.detach().clone()

