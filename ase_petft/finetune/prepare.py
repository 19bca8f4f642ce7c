"""Everything a fine-tuning run checks before it trains: labels, elements, variants.

``prepare_run`` raises :class:`~ase_petft.errors.TrainingDataError` (an input error)
for labels a run cannot train on, before any training starts.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _metatrain
from ..config import FineTuneConfig
from ..errors import CheckpointError, TrainingDataError
from ..labels import Label, check_elements, labels_from_frames
from ..variants import new_variant_description, require_variant
from .data import check_frame_variants, group_by_variant

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Run:
    source: pathlib.Path
    model: Any
    variant: str
    config: FineTuneConfig
    train: Dict[str, List[Label]]
    val: Dict[str, List[Label]]
    parent: Optional[str]  # the inherit_from head when the variant is new
    description: str
    device: str = "cpu"


# ---------------------------------------------------------------------- preparation
def prepare_run(checkpoint: pathlib.Path, frames, *, variant: str,
                config: FineTuneConfig, replay, validation=None,
                ignore_frame_variants: bool = False, device: str = "cpu",
                source_model=None) -> Run:
    """Check everything and split the labels. With ``validation`` (labelled frames of
    ``variant`` that are never trained on, e.g. a learner's held-out labels) there is
    no split at all: every frame trains and ``validation`` selects and reports.
    ``source_model``: the weights of ``checkpoint`` already in memory (a calculator's
    live model, possibly with a variant it created): trained on a copy, not read."""
    _metatrain.import_metatrain()
    groups = group_by_variant(frames, variant=variant, replay=replay,
                              ignore_frame_variants=ignore_frame_variants)
    if len(groups[variant]) < config.min_frames:
        held = getattr(frames, "variants", None)  # a LabelBuffer names what it holds
        held = f" (the buffer holds labels of {list(held)})" if isinstance(held, tuple) else ""
        raise TrainingDataError(
            f"too few labelled frames for {variant!r}: got {len(groups[variant])}{held}, "
            f"need at least min_frames={config.min_frames}; label more structures "
            "first (or lower FineTuneConfig.min_frames)"
        )
    if source_model is not None:
        model = _metatrain.copy_model(source_model, device=device)
    else:
        try:
            with _metatrain.routed_logs(), _metatrain.seeded(config.seed):
                model = _metatrain.load_model(checkpoint)  # building a PET draws random numbers
        except CheckpointError as exc:
            raise CheckpointError(f"cannot fine-tune {str(checkpoint)!r}: {exc}") from exc
        model = model.to(device)
    _check_elements(model, groups)
    parent = _check_variants(model, groups, variant, config)
    rng = np.random.default_rng(config.seed)
    train, val = {}, {}
    fraction = 0.0 if validation is not None else config.validation_fraction
    for name in sorted(groups):
        train[name], val[name] = _split(groups[name], fraction, rng)
    if validation is not None:
        validation = list(validation)
        if not ignore_frame_variants:
            check_frame_variants(validation, variant, what="validation frame")
        val[variant] = labels_from_frames(validation)
        for i, label in enumerate(val[variant]):
            check_elements(label.atoms, _metatrain.atomic_types(model),
                           what=f"validation frame {i}", fix="drop it")
    if parent is None:
        description = model.dataset_info.targets[variant].description
        if config.description and config.description != description:
            logger.info("variant %r keeps its description %r (descriptions must not "
                        "change across rounds)", variant, description)
    else:
        description = config.description or new_variant_description(variant, parent)
    return Run(source=checkpoint, model=model, variant=variant, config=config,
               train=train, val=val, parent=parent, description=description, device=device)


def _check_elements(model, groups: Dict[str, List[Label]]) -> None:
    known = _metatrain.atomic_types(model)
    for name, labels in groups.items():
        for i, label in enumerate(labels):
            check_elements(label.atoms, known, what=f"frame {i} of {name!r}",
                           fix="PET cannot add elements by fine-tuning: drop these frames")


def _check_variants(model, groups, variant: str, config: FineTuneConfig) -> Optional[str]:
    available = _metatrain.energy_variants(model)
    for name, labels in groups.items():
        if name != variant:
            require_variant(name, available, where="the checkpoint", error=TrainingDataError,
                            fix="(replay keeps existing heads, it cannot create new ones)")
        if not labels:
            raise TrainingDataError(f"variant {name!r} has no labelled frames in this run; "
                                "give it labels or leave it out of replay")
    if variant in available:
        return None
    if config.inherit_from is None:
        require_variant(variant, available, where="the checkpoint", error=TrainingDataError,
                        fix="Set FineTuneConfig(inherit_from='energy') to create it")
    require_variant(config.inherit_from, available, where="the checkpoint",
                    error=TrainingDataError,
                    fix=f"(inherit_from must name an existing head to create {variant!r})")
    return config.inherit_from


def split_indices(n: int, fraction: float, rng: np.random.Generator):
    """(train, validation) indices: ``round(fraction * n)`` held out, at least one
    when ``fraction > 0`` and ``n >= 2``, never all."""
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, int(round(fraction * n))))
    order = rng.permutation(n)
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def _split(labels: List[Label], fraction: float, rng: np.random.Generator):
    train, val = split_indices(len(labels), fraction, rng)
    return [labels[i] for i in train], [labels[i] for i in val]


