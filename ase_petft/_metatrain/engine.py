"""The fine-tuning engine: checks, new-variant set-up, solver dispatch, metrics.

``prepare_run`` validates everything that can be checked before any training
(labels, elements, variants, split); ``train`` runs the chosen solver and returns
the trained model with its metrics. Called by :func:`ase_petft.finetune.finetune`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import warnings
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from ..config import FineTuneConfig
from ..errors import CheckpointError, FineTuneError
from . import (atomic_types, energy_variants, load_model, preserved_global_state,
               add_variant)
from . import training
from .labels import Label, group_by_variant

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


@dataclasses.dataclass
class Trained:
    model: Any
    variant: str
    config: FineTuneConfig
    source: pathlib.Path
    n_train: int
    n_val: int
    metrics: Dict[str, Any]
    dropped: List[str]
    variants: List[str]
    best_epoch: Optional[int]


def default_description(variant: str, inherit_from: str) -> str:
    """Same text as FineTunableCalculator uses for a variant it creates."""
    return f"{variant} (ase_petft variant, initialised from {inherit_from})"


# ---------------------------------------------------------------------- preparation
def prepare_run(checkpoint: pathlib.Path, frames, *, variant: str,
                config: FineTuneConfig, replay) -> Run:
    training.import_metatrain()
    groups = group_by_variant(frames, variant=variant, replay=replay)
    if len(groups[variant]) < config.min_frames:
        raise FineTuneError(
            f"too few labelled frames for {variant!r}: got {len(groups[variant])}, "
            f"need at least min_frames={config.min_frames}; label more structures "
            "first (or lower FineTuneConfig.min_frames)"
        )
    try:
        with training.routed_logs(), training.seeded(config.seed):
            model = load_model(checkpoint)  # building a PET draws random numbers
    except CheckpointError as exc:
        raise FineTuneError(f"cannot fine-tune {str(checkpoint)!r}: {exc}") from exc
    _check_elements(model, groups)
    parent = _check_variants(model, groups, variant, config)
    rng = np.random.default_rng(config.seed)
    train, val = {}, {}
    for name in sorted(groups):
        train[name], val[name] = _split(groups[name], config.validation_fraction, rng)
    if parent is None:
        description = model.dataset_info.targets[variant].description
        if config.description and config.description != description:
            logger.info("variant %r keeps its description %r (descriptions must not "
                        "change across rounds)", variant, description)
    else:
        description = config.description or default_description(variant, parent)
    return Run(source=checkpoint, model=model, variant=variant, config=config,
               train=train, val=val, parent=parent, description=description)


def _check_elements(model, groups: Dict[str, List[Label]]) -> None:
    from ase.data import chemical_symbols

    known = set(atomic_types(model))
    for name, labels in groups.items():
        for i, label in enumerate(labels):
            unknown = sorted(set(int(z) for z in label.atoms.numbers) - known)
            if unknown:
                raise FineTuneError(
                    f"frame {i} of {name!r} contains element(s) "
                    f"{[chemical_symbols[z] for z in unknown]} the model does not know "
                    f"(it knows {[chemical_symbols[z] for z in sorted(known)]}); PET "
                    "cannot add elements by fine-tuning: drop these frames"
                )


def _check_variants(model, groups, variant: str, config: FineTuneConfig) -> Optional[str]:
    available = energy_variants(model)
    for name, labels in groups.items():
        if name != variant and name not in available:
            raise FineTuneError(
                f"replay variant {name!r} is not in the checkpoint (it has {available}); "
                "replay keeps existing heads, it cannot create new ones"
            )
        if not labels:
            raise FineTuneError(f"variant {name!r} has no labelled frames in this run; "
                                "give it labels or leave it out of replay")
    if variant in available:
        return None
    if config.inherit_from is None:
        raise FineTuneError(
            f"variant {variant!r} is not in the checkpoint (it has {available}) and "
            "inherit_from is None; set FineTuneConfig(inherit_from='energy') to create it"
        )
    if config.inherit_from not in available:
        raise FineTuneError(
            f"cannot create {variant!r} from {config.inherit_from!r}: the checkpoint "
            f"has only {available}"
        )
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


# ---------------------------------------------------------------------- training
def train(run: Run, *, scratch_dir: str, progress=None) -> Trained:
    config, model = run.config, run.model
    replay_names = [v for v in run.train if v != run.variant]
    eval_sets = _eval_sets(run)
    before = {name: _errors(model, labels, name if name in energy_variants(model)
                            else run.parent) for name, labels in eval_sets.items()}
    before_variants = energy_variants(model)
    with training.seeded(config.seed):
        if run.parent is not None and config.new_variant_baseline == "residual":
            _create_variant(run)
        if config.effective_solver == "linear":
            from .linear import refit_heads

            best_epoch = None
            refit_heads(model, run.variant, run.train[run.variant], config=config)
        else:
            best_epoch = _train_sgd(run, scratch_dir, progress)
    _check_finite(model)
    after = {name: _errors(model, labels, name) for name, labels in eval_sets.items()}
    _check_divergence(before[run.variant], after[run.variant], config, run.variant)
    metrics = {
        "variant": run.variant, "method": config.method,
        "solver": config.effective_solver,
        "split": "validation" if run.val[run.variant] else "train",
        "before": before[run.variant], "after": after[run.variant],
        "replay": {v: {"before": before[v], "after": after[v]} for v in replay_names},
    }
    variants = energy_variants(model)
    return Trained(
        model=model, variant=run.variant, config=config, source=run.source,
        n_train=sum(len(v) for v in run.train.values()),
        n_val=sum(len(v) for v in run.val.values()), metrics=metrics,
        dropped=[v for v in before_variants if v not in variants], variants=variants,
        best_epoch=best_epoch,
    )


def _eval_sets(run: Run) -> Dict[str, List[Label]]:
    return {name: (run.val[name] or run.train[name]) for name in run.train}


def _create_variant(run: Run) -> None:
    """New variant = copy of the parent head, parent scale, corrected composition."""
    model, variant, parent = run.model, run.variant, run.parent
    add_variant(model, variant, inherit_from=parent, description=run.description)
    labels = run.train[variant]
    predicted = training.predict(model, [l.atoms for l in labels], parent,
                                 forces=False, stress=False)
    residual = np.array([l.energy - p["energy"] for l, p in zip(labels, predicted)])
    types = sorted(atomic_types(model))
    counts = np.array([[np.sum(l.atoms.numbers == z) for z in types] for l in labels],
                      dtype=float)
    correction = np.linalg.pinv(counts, rcond=1e-10) @ residual  # minimum norm
    weights = training.composition_weights(model, parent)
    new = {z: weights[z] + float(c) for z, c in zip(types, correction)}
    training.set_composition_weights(model, variant, new)
    logger.info(
        "new variant %r initialised from %r: heads copied (metatrain inherit_heads), "
        "parent scale kept and composition = parent + minimum-norm residual correction "
        "%s eV (metatrain would refit scale and composition from the new totals; "
        "new_variant_baseline='metatrain' does that)", variant, parent,
        {int(z): round(float(c), 4) for z, c in zip(types, correction)},
    )


def _train_sgd(run: Run, scratch_dir: str, progress) -> int:
    config, model = run.config, run.model
    targets = {name: _trained_target_info(run, name) for name in run.train}
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.restart(training.run_info(model, targets))
    training.register_scaler_targets(model)
    train_sets, val_sets = [], []
    for name, info in targets.items():
        grads = dict(forces="positions" in info.gradients, stress="strain" in info.gradients)
        train_sets.append(training.build_dataset(run.train[name], name, **grads))
        val_sets.append(training.build_dataset(run.val[name] or run.train[name], name, **grads))
    if not any(run.val.values()):
        logger.info("validation_fraction=0: the best epoch is chosen on the training set")
    hypers = training.trainer_hypers(
        model, targets=targets, settings=_settings(run), finetune=_finetune_hypers(run),
        loss_weights={"energy": config.energy_weight, "forces": config.forces_weight,
                      "stress": config.stress_weight},
        overrides=config.trainer_overrides,
    )
    model, best_epoch = training.run_trainer(model, hypers, train_sets, val_sets,
                                             scratch_dir=scratch_dir, progress=progress)
    if config.method == "lora":
        logger.debug("merged %d LoRA adapters into the weights", training.merge_lora(model))
    model.finetune_config = {}
    training.register_scaler_targets(model)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    logger.info("best epoch %d of %d kept (metatrain keeps the best, not the last)",
                best_epoch, config.num_epochs)
    return best_epoch


def _trained_target_info(run: Run, name: str):
    """The variant's target info with the gradients its labels actually have:
    metatrain's metrics divide by zero for a gradient no frame carries (molecules have
    no stress, a learner may label energies and forces only)."""
    from .predict import _with_gradients

    labels = list(run.train[name]) + list(run.val.get(name) or [])
    forces = any(label.forces is not None for label in labels)
    stress = any(label.stress is not None and label.periodic for label in labels)
    return _with_gradients(_target_info(run, name), forces, stress)


def _target_info(run: Run, name: str):
    from . import energy_target_info

    if name in run.model.dataset_info.targets:
        return run.model.dataset_info.targets[name]
    return energy_target_info(run.description)


def _settings(run: Run) -> Dict[str, Any]:
    config = run.config
    smallest = min(len(labels) for labels in run.train.values())
    batch_size = min(config.batch_size, smallest)
    if batch_size < config.batch_size:
        logger.info("batch_size %d > %d frames in the smallest training set: using %d",
                    config.batch_size, smallest, batch_size)
    settings = {
        "num_epochs": config.num_epochs, "learning_rate": config.learning_rate,
        "batch_size": batch_size, "num_workers": 0, "log_interval": 1,
        "checkpoint_interval": config.num_epochs + 1,
    }
    if _has_missing_labels(run) and "best_model_metric" not in config.trainer_overrides:
        settings["best_model_metric"] = "loss"  # NaN labels make MAE metrics NaN
    return settings


def _has_missing_labels(run: Run) -> bool:
    labels = [l for group in run.train.values() for l in group]
    labels += [l for group in run.val.values() for l in group]
    return any(l.forces is None or l.stress is None or not l.periodic for l in labels)


def _finetune_hypers(run: Run) -> Dict[str, Any]:
    config = run.config
    hypers: Dict[str, Any] = {"read_from": str(run.source), "method": config.method,
                              "inherit_heads": {}}
    if config.method == "heads":
        hypers["config"] = {"head_modules": list(config.head_modules),
                            "last_layer_modules": list(config.last_layer_modules)}
    elif config.method == "lora":
        hypers["config"] = {"rank": config.lora_rank, "alpha": config.lora_alpha,
                            "target_modules": list(config.lora_target_modules)}
    else:
        hypers["config"] = {}
    if run.parent is not None and config.new_variant_baseline == "metatrain":
        hypers["inherit_heads"] = {run.variant: run.parent}  # first round only
    return hypers


# ---------------------------------------------------------------------- checks/metrics
def _check_finite(model) -> None:
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise FineTuneError(
            f"training produced NaN/inf weights ({bad[:3]}...); lower learning_rate "
            "or check the labels"
        )


def _check_divergence(before, after, config: FineTuneConfig, variant: str) -> None:
    for key in ("forces_mae_meV_per_A", "energy_mae_meV_per_atom"):
        if key in before and key in after:
            if not np.isfinite(after[key]) or after[key] > config.divergence_factor * max(before[key], 1e-6):
                raise FineTuneError(
                    f"fine-tuning {variant!r} diverged: {key} went from "
                    f"{before[key]:.4g} to {after[key]:.4g} (more than "
                    f"divergence_factor={config.divergence_factor}x); lower "
                    "learning_rate or num_epochs, or check the labels' units"
                )
            return


def _errors(model, labels: List[Label], variant: Optional[str]) -> Dict[str, float]:
    """MAE/RMSE of ``variant`` on ``labels`` (meV/atom, meV/Å, meV/Å³)."""
    if variant is None or not labels:
        return {}
    want_forces = all(l.forces is not None for l in labels)
    want_stress = all(l.stress is not None and l.periodic for l in labels)
    pred = training.predict(model, [l.atoms for l in labels], variant,
                            forces=want_forces, stress=want_stress)
    return error_metrics(labels, pred)


def error_metrics(labels: List[Label], pred: List[Dict[str, np.ndarray]]) -> Dict[str, float]:
    e = np.array([(p["energy"] - l.energy) / l.n_atoms for l, p in zip(labels, pred)])
    out = {"n_frames": len(labels),
           "energy_mae_meV_per_atom": 1e3 * float(np.mean(np.abs(e))),
           "energy_rmse_meV_per_atom": 1e3 * float(np.sqrt(np.mean(e**2)))}
    if all("forces" in p for p in pred):
        f = np.concatenate([(p["forces"] - l.forces).ravel() for l, p in zip(labels, pred)])
        out["forces_mae_meV_per_A"] = 1e3 * float(np.mean(np.abs(f)))
        out["forces_rmse_meV_per_A"] = 1e3 * float(np.sqrt(np.mean(f**2)))
    if pred and all("stress" in p for p in pred):
        s = np.concatenate([p["stress"] - l.stress for l, p in zip(labels, pred)])
        out["stress_mae_meV_per_A3"] = 1e3 * float(np.mean(np.abs(s)))
    return out


def save_exported(model, path) -> None:
    """Export (eval mode, frozen: never train ``model`` afterwards) and save a .pt."""
    with preserved_global_state(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.export().save(str(path))
