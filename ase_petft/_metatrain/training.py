"""metatrain's side of an in-process fine-tuning run.

In-memory datasets (built like metatrain's ASE reader), trainer hypers (validated by
metatrain's own pydantic checks), the PET ``Trainer`` call with the best epoch
reloaded, LoRA merging, composition/scale access, and predictions of one variant
without a calculator. Nothing here writes outside the scratch directory it is given,
and the process-wide logging/warning/RNG state is restored after every call.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import random
import threading
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch

from ..errors import FineTuneError
from ..labels import Label
from ._state import ARCHITECTURE, preserved_logger_class

logger = logging.getLogger(__name__)
_trainer_log = logging.getLogger(__name__ + ".trainer")

__all__ = [
    "build_dataset", "run_info", "trainer_hypers", "run_trainer", "train_sgd",
    "merge_lora", "seeded", "register_scaler_targets", "import_metatrain",
]


_MODULES = (
    "metatrain.pet.trainer", "metatrain.utils.omegaconf", "metatrain.utils.data",
    "metatrain.utils.evaluate_model", "metatrain.utils.neighbor_lists",
    "metatrain.utils.architectures", "metatrain.pet.modules.finetuning",
)


def import_metatrain() -> None:
    """Import the metatrain modules used here once, silencing their import noise
    (OmegaConf resolver deprecations, logger class change) without touching the
    process-wide warning filters or logging configuration."""
    import importlib

    with preserved_logger_class():
        for name in _MODULES:
            importlib.import_module(name)


# ---------------------------------------------------------------------- datasets
def build_dataset(labels: Sequence[Label], target: str, *, forces: bool, stress: bool):
    """A metatrain ``Dataset`` of ``labels`` for the energy target ``target``.

    Forces are stored as negative position gradients and stress as σ·V strain
    gradients (metatrain's ASE reader convention); a label a frame lacks is NaN
    (metatrain's losses skip NaN targets).
    """
    from metatensor.torch import Labels, TensorBlock, TensorMap
    from metatomic.torch import systems_to_torch
    from metatrain.utils.data import Dataset

    systems = systems_to_torch([label.atoms for label in labels], dtype=torch.float64)
    maps = [_energy_map(i, label, forces, stress, Labels, TensorBlock, TensorMap)
            for i, label in enumerate(labels)]
    return Dataset.from_dict({"system": systems, target: maps})


def _energy_map(i, label, forces, stress, Labels, TensorBlock, TensorMap):
    prop = Labels("energy", torch.tensor([[0]]))
    block = TensorBlock(
        values=torch.tensor([[label.energy]], dtype=torch.float64),
        samples=Labels(["system"], torch.tensor([[i]])), components=[], properties=prop,
    )
    n = label.n_atoms
    if forces:
        values = (torch.full((n, 3), float("nan"), dtype=torch.float64)
                  if label.forces is None else -torch.tensor(label.forces))
        samples = torch.tensor([[0, i, a] for a in range(n)]).reshape(-1, 3)
        block.add_gradient("positions", TensorBlock(
            values=values.reshape(n, 3, 1),
            samples=Labels(["sample", "system", "atom"], samples),
            components=[Labels(["xyz"], torch.arange(3).reshape(-1, 1))], properties=prop,
        ))
    if stress:
        if label.stress is None or not label.periodic:
            values = torch.full((1, 3, 3, 1), float("nan"), dtype=torch.float64)
        else:
            from ase.stress import voigt_6_to_full_3x3_stress

            full = voigt_6_to_full_3x3_stress(label.stress) * label.atoms.cell.volume
            values = torch.tensor(full, dtype=torch.float64).reshape(1, 3, 3, 1)
        block.add_gradient("strain", TensorBlock(
            values=values, samples=Labels(["sample"], torch.tensor([[0]])),
            components=[Labels(["xyz_1"], torch.arange(3).reshape(-1, 1)),
                        Labels(["xyz_2"], torch.arange(3).reshape(-1, 1))],
            properties=prop,
        ))
    return TensorMap(Labels(["_"], torch.tensor([[0]])), [block])


def run_info(model, targets: Mapping[str, Any]):
    """DatasetInfo of a run: the model's length unit and types, these targets."""
    from metatrain.utils.data import DatasetInfo

    return DatasetInfo(length_unit=model.dataset_info.length_unit,
                       atomic_types=[int(z) for z in model.atomic_types],
                       targets=dict(targets))


def register_scaler_targets(model) -> None:
    """Work around metatrain's replay KeyError: every target known to the scaler.

    ``Scaler.restart`` keeps only the *new* targets in ``target_infos``; evaluating
    or training an older target (replay) then fails with a KeyError/ValueError.
    """
    for name, info in model.dataset_info.targets.items():
        model.scaler.target_infos.setdefault(name, info)


# ---------------------------------------------------------------------- hypers
def default_pet_hypers() -> Dict[str, Any]:
    from metatrain.utils.architectures import get_default_hypers

    with preserved_logger_class():
        return copy.deepcopy(get_default_hypers(ARCHITECTURE))


def trainer_hypers(model, *, targets: Mapping[str, Any], settings: Mapping[str, Any],
                   finetune: Mapping[str, Any], loss_weights: Mapping[str, float],
                   overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """Complete PET trainer hypers, validated by metatrain (FineTuneError if not)."""

    hypers = default_pet_hypers()["training"]
    hypers.update(copy.deepcopy(dict(overrides)))
    hypers.update(copy.deepcopy(dict(settings)))
    hypers["finetune"] = copy.deepcopy(dict(finetune))
    hypers["loss"] = _expanded_loss(targets, hypers.get("loss", "mse"), loss_weights)
    options = {"name": "pet", "model": copy.deepcopy(dict(model.hypers)), "training": hypers}
    try:
        from metatrain.utils.architectures import check_architecture_options

        with preserved_logger_class():
            check_architecture_options(name="pet", options=options)
    except Exception as exc:
        raise FineTuneError(
            f"metatrain rejected the trainer hypers: {exc}. Check trainer_overrides "
            "(keys and types of metatrain's PET 'training' section)"
        ) from exc
    return hypers


def _expanded_loss(targets, loss, weights) -> Dict[str, Any]:
    """metatrain's expanded loss dict, with our energy/forces/stress weights."""
    from omegaconf import OmegaConf
    from metatrain.utils.omegaconf import expand_loss_config

    if isinstance(loss, str):
        loss = {
            name: {"type": loss, "weight": weights["energy"],
                   "forces": {"type": loss, "weight": weights["forces"]},
                   "stress": {"type": loss, "weight": weights["stress"]}}
            for name in targets
        }
    flags = {name: {"quantity": "energy", "forces": {"key": "forces"},
                    "stress": {"key": "stress"}} for name in targets}
    conf = OmegaConf.create({"training_set": [{"targets": flags}],
                             "architecture": {"training": {"loss": loss}}})
    with preserved_logger_class():
        expanded = expand_loss_config(conf)
    out = OmegaConf.to_container(expanded["architecture"]["training"]["loss"], resolve=True)
    for name, info in targets.items():  # drop gradient terms the target does not have
        grads = out[name].get("gradients", {})
        for grad in list(grads):
            if grad not in info.gradients:
                del grads[grad]
    return out


# ---------------------------------------------------------------------- training
def _trainer_class():
    from metatrain.pet.trainer import Trainer

    class _InMemoryTrainer(Trainer):
        """metatrain's PET trainer without intermediate checkpoint files."""

        def save_checkpoint(self, model, path) -> None:  # noqa: D401
            return None

    return _InMemoryTrainer


def run_trainer(model, hypers: Dict[str, Any], train_sets: List, val_sets: List, *,
                scratch_dir: str, progress: Optional[Callable[[int, int], None]] = None,
                device=None):
    """Train ``model`` in place with metatrain's PET trainer; load the best epoch.

    Returns ``(model, best_epoch)``; the returned model may carry LoRA layers.
    """
    with preserved_logger_class():
        Trainer = _trainer_class()
    trainer = Trainer(hypers)
    dtype = next(model.parameters()).dtype
    model.train()  # eval-mode trap (DESIGN.md §5): the trainer never calls train()
    if progress is not None:
        val_sets = val_sets[:-1] + [EpochCounter(val_sets[-1], progress, hypers["num_epochs"])]
    try:
        with preserved_logger_class(), routed_logs():
            trainer.train(model=model, dtype=dtype, devices=[torch.device(device or "cpu")],
                          train_datasets=train_sets, val_datasets=val_sets,
                          checkpoint_dir=scratch_dir)
    except Exception as exc:
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        numeric = isinstance(exc, (OverflowError, FloatingPointError)) or any(
            word in str(exc).lower() for word in ("nan", "infinity", " inf"))
        if finite and not numeric:
            raise
        raise FineTuneError(
            f"training diverged (NaN/inf loss or weights; metatrain stopped with "
            f"{type(exc).__name__}: {exc}); lower learning_rate or check the labels"
        ) from exc
    best = trainer.best_model_state_dict
    if best is None or not np.isfinite(float(trainer.best_metric)):
        raise FineTuneError(
            "training diverged: no epoch had a finite validation metric (loss NaN/inf). "
            "Lower learning_rate, check the labels' units (eV, eV/Å), or use fewer "
            "epochs"
        )
    state = {k: v for k, v in best.items() if k != "finetune_config"}
    model.load_state_dict(state)
    model.additive_models[0].sync_tensor_maps()
    model.scaler.sync_tensor_maps()
    return model, int(trainer.best_epoch or 0)


class _Reroute(logging.Filter):
    """Moves metatrain's root/'metatrain' records of one thread to our logger."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread != self.thread:
            return True
        level = record.levelno if record.levelno >= logging.WARNING else logging.DEBUG
        _trainer_log.log(level, "%s", record.getMessage())
        return False


class EpochCounter(torch.utils.data.Dataset):
    """Wraps the last validation dataset: reading its last sample ends an epoch's
    validation pass, which drives ``progress(epoch, num_epochs)``."""

    def __init__(self, dataset, progress, num_epochs: int):
        self.dataset, self.progress, self.num_epochs = dataset, progress, num_epochs
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[index]
        if index == len(self.dataset) - 1:
            self.epoch += 1
            self.progress(min(self.epoch, self.num_epochs), self.num_epochs)
        return sample


@contextlib.contextmanager
def routed_logs() -> Iterator[None]:
    """metatrain logs to the root logger (``logging.info`` may even call
    ``basicConfig``); route its records to ``ase_petft`` at DEBUG (warnings stay
    warnings) for the duration of the call, in this thread only."""
    root, mtt = logging.getLogger(), logging.getLogger("metatrain")
    reroute = _Reroute()
    guard = logging.NullHandler() if not root.handlers else None
    if guard is not None:
        root.addHandler(guard)  # stops logging.info() from calling basicConfig()
    root.addFilter(reroute)
    mtt.addFilter(reroute)
    try:
        yield
    finally:
        mtt.removeFilter(reroute)
        root.removeFilter(reroute)
        if guard is not None:
            root.removeHandler(guard)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Seed torch, numpy and random for a block, then restore their states."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def merge_lora(model) -> int:
    """Fold LoRA adapters into their linear layers (W += α/r · B·A); returns count."""
    from metatrain.pet.modules.finetuning import LoRALinear

    merged = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                with torch.no_grad():
                    delta = child.scaling * (child.lora_B.weight @ child.lora_A.weight)
                    child.linear.weight += delta.to(child.linear.weight.dtype)
                setattr(parent, name, child.linear)
                merged += 1
    return merged


# ---------------------------------------------------------------------- SGD runs
@dataclasses.dataclass(frozen=True)
class SgdRun:
    """What metatrain's trainer needs for one run (plain data; labels per variant)."""

    model: Any
    variant: str
    config: Any  # FineTuneConfig
    source: str  # the checkpoint path metatrain records as read_from
    train: Dict[str, List[Label]]
    val: Dict[str, List[Label]]
    parent: Optional[str]  # inherit_from head when the variant is new
    description: str


def train_sgd(run: SgdRun, *, scratch_dir: str, progress=None, device=None) -> int:
    """Train ``run.model`` in place with metatrain's PET trainer (heads/full/LoRA as
    metatrain defines them); returns the best epoch, whose weights the model holds."""
    config, model = run.config, run.model
    targets = {name: _trained_target_info(run, name) for name in run.train}
    with preserved_logger_class():
        model.restart(run_info(model, targets))
    register_scaler_targets(model)
    train_sets, val_sets = [], []
    for name, info in targets.items():
        grads = dict(forces="positions" in info.gradients, stress="strain" in info.gradients)
        train_sets.append(build_dataset(run.train[name], name, **grads))
        val_sets.append(build_dataset(run.val[name] or run.train[name], name, **grads))
    if not any(run.val.values()):
        logger.info("validation_fraction=0: the best epoch is chosen on the training set")
    hypers = trainer_hypers(
        model, targets=targets, settings=_settings(run), finetune=_finetune_hypers(run),
        loss_weights={"energy": config.energy_weight, "forces": config.forces_weight,
                      "stress": config.stress_weight},
        overrides=config.trainer_overrides,
    )
    model, best_epoch = run_trainer(model, hypers, train_sets, val_sets,
                                    scratch_dir=scratch_dir, progress=progress, device=device)
    if config.method == "lora":
        logger.debug("merged %d LoRA adapters into the weights", merge_lora(model))
    model.finetune_config = {}
    register_scaler_targets(model)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    logger.info("best epoch %d of %d kept (metatrain keeps the best, not the last)",
                best_epoch, config.num_epochs)
    return best_epoch


def _trained_target_info(run: SgdRun, name: str):
    """The variant's target info with the gradients its labels actually have:
    metatrain's metrics divide by zero for a gradient no frame carries (molecules have
    no stress, a learner may label energies and forces only)."""
    from .predict import with_gradients

    labels = list(run.train[name]) + list(run.val.get(name) or [])
    forces = any(label.forces is not None for label in labels)
    stress = any(label.stress is not None and label.periodic for label in labels)
    return with_gradients(_target_info(run, name), forces, stress)


def _target_info(run: SgdRun, name: str):
    from .heads import energy_target_info

    if name in run.model.dataset_info.targets:
        return run.model.dataset_info.targets[name]
    return energy_target_info(run.description)


def _settings(run: SgdRun) -> Dict[str, Any]:
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


def _has_missing_labels(run: SgdRun) -> bool:
    labels = [l for group in run.train.values() for l in group]
    labels += [l for group in run.val.values() for l in group]
    return any(l.forces is None or l.stress is None or not l.periodic for l in labels)


def _finetune_hypers(run: SgdRun) -> Dict[str, Any]:
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
