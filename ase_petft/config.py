"""Configuration and result records of fine-tuning runs (frozen, keyword-only).

:class:`FineTuneConfig` holds every *setting* of a refit (JSON-serialisable; it is
written next to each generation); the *data* (labelled frames, replay frames) are
arguments of :func:`ase_petft.finetune.finetune`. :class:`FineTuneResult` describes
one generation directory.

Units: energies in eV, forces in eV/Å, stress in eV/Å³ (ASE). Validation metrics in
:attr:`FineTuneResult.metrics` are reported in meV/atom, meV/Å and meV/Å³ (the key
names carry the unit).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import types
from typing import Any, Dict, Mapping, Optional, Tuple

from .errors import ConfigError
from .validation import (choice as _choice, is_int as _is_int, non_negative_float as
                         _non_negative_float, non_negative_int as _non_negative_int,
                         positive_float as _positive_float, positive_int as _positive_int,
                         real as _real)
from .variants import validate_variant

__all__ = ["FineTuneConfig", "FineTuneResult", "METHODS", "SOLVERS"]

METHODS = ("heads", "full", "lora")
SOLVERS = ("auto", "sgd", "linear")
BASELINES = ("residual", "metatrain")

#: PET module prefixes trained by ``method="heads"`` (metatrain's own defaults)
DEFAULT_HEAD_MODULES = ("node_heads", "edge_heads")
DEFAULT_LAST_LAYER_MODULES = ("node_last_layers", "edge_last_layers")
#: PET linear layers wrapped by ``method="lora"`` (metatrain's own defaults)
DEFAULT_LORA_TARGETS = ("input_linear", "output_linear")

# trainer hypers owned by FineTuneConfig fields or by the engine: not overridable
_RESERVED_OVERRIDES = {
    "num_epochs": "num_epochs",
    "learning_rate": "learning_rate",
    "batch_size": "batch_size",
    "finetune": "method / head_modules / lora_* / inherit_from",
    "num_workers": "(always 0: determinism)",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuneConfig:
    """Settings of one fine-tuning run (the defaults suit 5-100 on-the-fly labels).

    :param method: ``"heads"`` (backbone frozen; other variants stay bit-identical),
        ``"full"`` (every weight trains) or ``"lora"`` (low-rank adapters, merged into
        the weights afterwards). ``full`` and ``lora`` remove every variant that has
        no data in the run (metatrain's behaviour): pass ``replay=`` to keep them.
    :param solver: how ``heads`` is solved. ``"linear"``: a closed-form ridge
        regression of the last layers (node/edge ``last_layers``) on energies, forces
        and stress, head MLPs frozen — seconds instead of minutes, and more robust
        with very few labels. ``"sgd"``: metatrain's trainer (trains head MLPs and
        last layers, like ``mtt train`` with ``method: heads``). ``"auto"``:
        ``linear`` for ``heads``, ``sgd`` for ``full``/``lora``.
    :param num_epochs: SGD epochs (the best validation epoch is kept, not the last).
    :param learning_rate: Adam learning rate (optimizer and cosine schedule are reset
        at every run, as in metatrain fine-tuning).
    :param batch_size: structures per SGD batch.
    :param validation_fraction: share of the labels held out per variant (at least
        one frame when > 0 and at least two labels exist). They select the best epoch
        and give the reported metrics. ``0`` trains on everything and reports
        training-set metrics.
    :param seed: seeds the split, the initialisation of new weights and the SGD.
    :param energy_weight, forces_weight, stress_weight: loss weights (energy per
        atom, forces, stress; metatrain's MSE loss). Forces/stress are used only
        when every frame of a variant has them (stress: periodic cells only).
    :param head_modules, last_layer_modules: PET module prefixes trained by
        ``heads`` with the SGD solver (metatrain's defaults).
    :param lora_rank, lora_alpha, lora_target_modules: LoRA settings.
    :param inherit_from: variant a *new* variant is initialised from (first round
        only; later rounds continue from the trained head). ``None``: a variant
        missing from the checkpoint is an error.
    :param new_variant_baseline: ``"residual"`` (default): a new variant keeps the
        parent's scale and gets the parent's composition plus a minimum-norm
        per-element correction fitted to ``E_new - parent prediction``.
        ``"metatrain"``: metatrain refits composition (on the totals) and scale,
        exactly like ``mtt train`` with ``inherit_heads`` (see DESIGN.md §5 for why
        this is usually worse with few labels).
    :param ridge: relative ridge strength of the ``linear`` solver (toward the
        current last-layer weights); ``None`` chooses it by evidence maximisation.
    :param keep_parent_unless_better: ``linear`` solver: keep the current head when no
        setting's leave-one-structure-out error beats the head's own error on the same
        labels (default). ``False`` always applies the best setting found.
    :param rotations: extra randomly rotated copies per structure used by the
        ``linear`` solver (PET is not rotation-invariant by construction; metatrain's
        SGD rotates every batch). Default 0: each copy costs as much as the structure
        itself, and copies did not lower the held-out error on randomly rotated test
        frames (24 GFN2 labels of the demo molecule: force MAE 125/127/128 meV/Å with
        0/1/3 copies; EMT CuNi cells: 19.1/19.5 meV/Å with 0/1).
    :param min_frames: fewer labelled frames for the target variant is an error.
    :param divergence_factor: the run fails if the validation force (or energy)
        error after training exceeds this factor times the error before.
    :param trainer_overrides: any other key of metatrain's PET trainer hypers
        (``weight_decay``, ``warmup_fraction``, ``loss``, ``best_model_metric`` ...),
        validated by metatrain's own checks.
    :param description: description of a *new* variant (default: the same text
        :class:`~ase_petft.FineTunableCalculator` uses; it must not change across
        rounds, so existing variants keep theirs).
    """

    method: str = "heads"
    solver: str = "auto"
    num_epochs: int = 60
    learning_rate: float = 1e-3
    batch_size: int = 4
    validation_fraction: float = 0.2
    seed: int = 0
    energy_weight: float = 1.0
    forces_weight: float = 1.0
    stress_weight: float = 1.0
    head_modules: Tuple[str, ...] = DEFAULT_HEAD_MODULES
    last_layer_modules: Tuple[str, ...] = DEFAULT_LAST_LAYER_MODULES
    lora_rank: int = 4
    lora_alpha: float = 8.0
    lora_target_modules: Tuple[str, ...] = DEFAULT_LORA_TARGETS
    inherit_from: Optional[str] = "energy"
    new_variant_baseline: str = "residual"
    ridge: Optional[float] = None
    keep_parent_unless_better: bool = True
    rotations: int = 0
    min_frames: int = 2
    divergence_factor: float = 10.0
    trainer_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    description: Optional[str] = None

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("solver", self.solver, SOLVERS)
        _choice("new_variant_baseline", self.new_variant_baseline, BASELINES)
        if self.solver == "linear" and self.method != "heads":
            raise ConfigError(
                f"solver='linear' only solves method='heads', got method="
                f"{self.method!r}; use solver='sgd' (or 'auto') for full/lora"
            )
        for name in ("num_epochs", "batch_size", "lora_rank", "min_frames"):
            _positive_int(name, getattr(self, name))
        _non_negative_int("rotations", self.rotations)
        _non_negative_int("seed", self.seed)
        for name in ("learning_rate", "lora_alpha", "divergence_factor"):
            _positive_float(name, getattr(self, name))
        for name in ("energy_weight", "forces_weight", "stress_weight"):
            _non_negative_float(name, getattr(self, name))
        if self.energy_weight == self.forces_weight == self.stress_weight == 0:
            raise ConfigError("energy_weight, forces_weight and stress_weight are all "
                                "0: nothing would be trained; set at least one > 0")
        if self.ridge is not None:
            _positive_float("ridge", self.ridge)
        _fraction(self.validation_fraction)
        for name in ("head_modules", "last_layer_modules", "lora_target_modules"):
            object.__setattr__(self, name, _names(name, getattr(self, name)))
        if self.inherit_from is not None:
            object.__setattr__(self, "inherit_from", validate_variant(self.inherit_from))
        if self.description is not None and not (
            isinstance(self.description, str) and self.description.strip()
        ):
            raise ConfigError(f"description must be a non-empty string or None, got "
                                f"{self.description!r}")
        object.__setattr__(self, "trainer_overrides", _overrides(self.trainer_overrides))
        _refuse_ignored(self)

    @property
    def effective_solver(self) -> str:
        """``sgd`` or ``linear`` (resolves ``"auto"``)."""
        if self.solver != "auto":
            return self.solver
        return "linear" if self.method == "heads" else "sgd"

    def replace(self, **changes: Any) -> "FineTuneConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-safe dict (tuples as lists, overrides as a plain dict)."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, Mapping):
                value = json.loads(json.dumps(dict(value), default=str))
            out[field.name] = value
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class FineTuneResult:
    """One generation written by a fine-tuning run.

    :param generation: generation number (``None`` when unknown: plain ``finetune``
        without ``generation=``).
    :param checkpoint_path: metatrain checkpoint (``.ckpt``) with the *best* epoch's
        weights; ``mtt export`` / ``mtt eval`` / ``FineTunableCalculator`` read it.
    :param model_path: exported metatomic model (``.pt``), or ``None`` if not
        exported (hot swaps need only the checkpoint).
    :param n_train, n_val: labelled frames used for training / validation (all
        variants of the run).
    :param metrics: ``{"before": {...}, "after": {...}, "split": "validation" or
        "train", "variant": ..., "solver": ..., "replay": {variant: {...}}}`` with
        ``energy_mae_meV_per_atom``, ``energy_rmse_meV_per_atom``,
        ``forces_mae_meV_per_A``, ``forces_rmse_meV_per_A``, ``stress_mae_meV_per_A3``
        (when labelled) for the target variant.
    :param wall_time_s: wall time of the whole run.
    :param variant: the variant that was trained.
    :param dropped_variants: variants the new checkpoint no longer has (full/lora
        without replay for them).
    """

    generation: Optional[int]
    checkpoint_path: pathlib.Path
    model_path: Optional[pathlib.Path]
    n_train: int
    n_val: int
    metrics: Mapping[str, Any]
    wall_time_s: float
    variant: str = "energy"
    dropped_variants: Tuple[str, ...] = ()

    @property
    def output_dir(self) -> pathlib.Path:
        return self.checkpoint_path.parent

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        out["checkpoint_path"] = str(self.checkpoint_path)
        out["model_path"] = None if self.model_path is None else str(self.model_path)
        out["dropped_variants"] = list(self.dropped_variants)
        out["metrics"] = json.loads(json.dumps(dict(self.metrics), default=float))
        return out


# ---------------------------------------------------------------------- validation
# settings each solver/method uses; any other setting changed from its default has no
# effect and is refused (a silently ignored `num_epochs=200` cost users hours)
_SGD_ONLY = ("num_epochs", "learning_rate", "batch_size", "trainer_overrides")
_LINEAR_ONLY = ("ridge", "rotations", "keep_parent_unless_better")
_IGNORED = {
    ("heads", "linear"): _SGD_ONLY + ("head_modules", "last_layer_modules", "lora_rank",
                                      "lora_alpha", "lora_target_modules"),
    ("heads", "sgd"): _LINEAR_ONLY + ("lora_rank", "lora_alpha", "lora_target_modules"),
    ("full", "sgd"): _LINEAR_ONLY + ("head_modules", "last_layer_modules",
                                     "lora_rank", "lora_alpha", "lora_target_modules"),
    ("lora", "sgd"): _LINEAR_ONLY + ("head_modules", "last_layer_modules"),
}


def _refuse_ignored(config: "FineTuneConfig") -> None:
    defaults = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
                for f in dataclasses.fields(config)}
    key = (config.method, config.effective_solver)
    changed = [name for name in _IGNORED[key] if getattr(config, name) != defaults[name]]
    if changed:
        raise ConfigError(
            f"{', '.join(f'{n}={getattr(config, n)!r}' for n in changed)} has no effect with "
            f"method={config.method!r}, solver={config.effective_solver!r}; leave "
            f"{'it' if len(changed) == 1 else 'them'} at the default, or choose a method/"
            "solver that uses it (epochs, learning rate, batch size and trainer overrides "
            "need solver='sgd'; ridge and rotations need the linear heads solver; LoRA "
            "settings need method='lora')"
        )


def _fraction(value: Any) -> None:
    if not _real(value) or not 0 <= value < 1:
        raise ConfigError(
            f"validation_fraction must be in [0, 1), got {value!r} (for example 0.2 "
            "holds out one label in five; 0 trains on all labels)"
        )


def _names(name: str, value: Any) -> Tuple[str, ...]:
    if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(
            f"{name} must be a sequence of non-empty module names, got {value!r} "
            f"(for example {list(DEFAULT_HEAD_MODULES)!r})"
        )
    if not value:
        raise ConfigError(f"{name} must not be empty")
    return tuple(value)


def _overrides(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"trainer_overrides must be a mapping of metatrain PET trainer hypers, got "
            f"{type(value).__name__}"
        )
    for key in value:
        if key in _RESERVED_OVERRIDES:
            raise ConfigError(
                f"trainer_overrides[{key!r}] is controlled by FineTuneConfig; set "
                f"{_RESERVED_OVERRIDES[key]} instead"
            )
    if value:
        known = _trainer_keys()
        unknown = sorted(str(k) for k in value if k not in known)
        if unknown:
            raise ConfigError(
                f"trainer_overrides has keys metatrain's PET trainer does not know: "
                f"{unknown}; known keys: {sorted(known - set(_RESERVED_OVERRIDES))}")
    try:
        copied = json.loads(json.dumps(dict(value)))  # deep copy; rejects non-JSON values
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"trainer_overrides must hold plain JSON values (numbers, strings, lists, "
            f"dicts), got {dict(value)!r}: {exc}"
        ) from exc
    return types.MappingProxyType(copied)


def _trainer_keys() -> frozenset:
    """The keys of metatrain's PET ``training`` hypers (metatrain is imported only
    when overrides are given)."""
    from . import _metatrain

    return frozenset(_metatrain.default_pet_hypers()["training"])
