"""One fine-tuning run after its checks: new-variant set-up, solver, metrics, divergence.

``train`` runs the chosen solver (the closed-form heads refit or metatrain's trainer,
both through the adapter) on a prepared :class:`~ase_petft.finetune.prepare.Run` and
returns the trained model with its metrics. Called by :func:`ase_petft.finetune.finetune`.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Any, Dict, List, Optional

import numpy as np
import torch

from .. import _metatrain
from ..config import FineTuneConfig
from ..errors import FineTuneError
from ..labels import Label, reference_dicts
from ..metrics import error_metrics
from . import rowcache
from .prepare import Run
from .solver import StructureRows, solve

logger = logging.getLogger(__name__)


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
    row_cache: Any = None  # rowcache.RowCache of a closed-form heads refit


# ---------------------------------------------------------------------- training
def train(run: Run, *, scratch_dir: str, progress=None, reuse_rows_from=()) -> Trained:
    config, model = run.config, run.model
    replay_names = [v for v in run.train if v != run.variant]
    eval_sets = _eval_sets(run)
    eval_key = _labels_key(eval_sets.get(run.variant, []))
    known = _source_evaluation(run, eval_key)
    before = {name: known if (name == run.variant and known is not None) else
              _errors(model, labels, name if name in _metatrain.energy_variants(model)
                      else run.parent) for name, labels in eval_sets.items()}
    before_variants = _metatrain.energy_variants(model)
    offset = None  # the per-element correction of the composition, when one was fitted
    with _metatrain.seeded(config.seed):
        if run.parent is not None and config.new_variant_baseline == "residual":
            offset = _create_variant(run)
        elif config.new_variant_baseline == "residual":
            # a head a calculator created (a learner's generation 0) and no refit fitted
            # yet: the closed-form solve, pulled toward the parent head, would otherwise
            # have to absorb the offset between the levels (measured: 1-2.7 eV/atom left),
            # and SGD would spend its first epochs (and the backbone) on it: on four
            # molecules held out of the demo model's training, full refits without this
            # correction ended worse than zero-shot on two (BENCHMARKS.md, issue 10)
            twin = _untouched_copy_of(model, run.variant)
            if twin is not None:
                offset = _correct_composition(run, twin)
        solver_info = cache = None
        if config.effective_solver == "linear":
            best_epoch = None
            solver_info, cache = _refit_heads_linear(model, run.variant, run.train[run.variant],
                                                     config, reuse_rows_from)
        else:
            best_epoch = _metatrain.train_sgd(
                _metatrain.SgdRun(model=model, variant=run.variant, config=config,
                                  source=str(run.source), train=run.train, val=run.val,
                                  parent=run.parent, description=run.description),
                scratch_dir=scratch_dir, progress=progress, device=run.device)
    _check_finite(model)
    after = {name: _errors(model, labels, name) for name, labels in eval_sets.items()}
    _check_divergence(before[run.variant], after[run.variant], config, run.variant)
    metrics = {
        "variant": run.variant, "method": config.method,
        "solver": config.effective_solver,
        "split": "validation" if run.val[run.variant] else "train",
        "before": before[run.variant], "after": after[run.variant],
        "created_variant": run.parent is not None,  # "before" is then the parent head's
        "evaluation_labels": eval_key,  # which labels "before"/"after" were measured on
        "replay": {v: {"before": before[v], "after": after[v]} for v in replay_names},
        # eV per atom of each element added to the parent's composition (the offset
        # between two levels of theory), or None: the composition was not refitted
        "composition_correction_eV": offset,
    }
    if solver_info is not None:
        metrics["linear_solver"] = solver_info
    variants = _metatrain.energy_variants(model)
    return Trained(
        model=model, variant=run.variant, config=config, source=run.source,
        n_train=sum(len(v) for v in run.train.values()),
        n_val=sum(len(v) for v in run.val.values()), metrics=metrics,
        dropped=[v for v in before_variants if v not in variants], variants=variants,
        best_epoch=best_epoch, row_cache=cache,
    )


def _refit_heads_linear(model, variant: str, labels: List[Label], config,
                        reuse_rows_from=()) -> tuple:
    """Rows from the adapter (reused from earlier refits where exact, see
    :mod:`.rowcache`), model selection here (:mod:`.solver`), update back. Returns
    the solver's record and the rows for the next refit."""
    fingerprint = _metatrain.backbone_fingerprint(model, variant)
    theta = _metatrain.last_layer_vector(model, variant)
    setting = rowcache.row_setting(config)
    keys = [rowcache.label_key(label) for label in labels]
    known: Dict[str, tuple] = {}
    if config.rotations == 0:  # rotated copies are random: never reused
        for cache in rowcache.load(reuse_rows_from, variant=variant, fingerprint=fingerprint,
                                   setting=setting):
            known.update({k: v for k, v in cache.at(theta).items() if k in keys})
    missing = [(k, label) for k, label in zip(keys, labels) if k not in known]
    fresh = _metatrain.heads_rows(model, variant, [label for _, label in missing],
                                  config=config) if missing else []
    if config.rotations == 0:
        known.update({k: tuple(r) for (k, _), r in zip(missing, fresh)})
        ordered = [known[k] for k in keys]
    else:  # heads_rows returned the labels and their rotated copies
        ordered = fresh
    rows = [StructureRows(A=np.asarray(a, dtype=np.float64), y=y, w=w, kind=k)
            for a, y, w, k in ordered]
    groups = [_group_key(label) for label in labels] * (1 + config.rotations)
    delta, info = solve(rows, ridge=config.ridge, groups=groups,
                        keep_parent_unless_better=config.keep_parent_unless_better)
    info["rows_reused"] = len(labels) - len(missing) if config.rotations == 0 else 0
    if info["selected"] == "refit":
        _metatrain.apply_heads_update(model, variant, delta)
    logger.info("linear heads refit of %r (%d of %d labels' rows reused): %s", variant,
                info["rows_reused"], len(labels), info["reason"])
    cache = None
    if config.rotations == 0:
        compact = {k: (_compact(known[k][0]), *known[k][1:]) for k in keys}
        cache = rowcache.RowCache(variant, fingerprint, setting, theta, compact)
    return info, cache


def _group_key(label: Label) -> str:
    """The solver's leave-out group of a label: the structure it was rattled from (the
    learner's ``rattled_from`` metadata), else its own structure. Rotated copies
    (``config.rotations``) follow their label."""
    from .._provenance import content_key

    atoms = label.atoms
    parent = atoms.info.get("rattled_from")
    if isinstance(parent, str) and parent:
        return parent
    return content_key(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc)


def _compact(A: np.ndarray) -> np.ndarray:
    """float32 when that loses nothing (rows of a float32 model are float32 numbers)."""
    single = A.astype(np.float32)
    return single if np.array_equal(single.astype(A.dtype), A) else A


def _labels_key(labels: List[Label]) -> str:
    """One hash of a list of labels (order included)."""
    import hashlib

    return hashlib.sha1("".join(rowcache.label_key(label) for label in labels).encode()
                        ).hexdigest()


def _source_evaluation(run: Run, eval_key: str) -> Optional[Dict[str, float]]:
    """The errors of the input model on these very labels, if the run that wrote the
    input checkpoint measured them (its "after" on the same evaluation labels): an
    incremental refit then does not evaluate its input again."""
    from .generation import METRICS_NAME, read_json

    if run.parent is not None:
        return None
    previous = read_json(pathlib.Path(run.source).parent / METRICS_NAME) or {}
    metrics = previous.get("metrics") or {}
    same = (metrics.get("evaluation_labels") == eval_key and metrics.get("variant") == run.variant
            and previous.get("checkpoint_path") is not None
            and pathlib.Path(previous["checkpoint_path"]).resolve() == pathlib.Path(run.source).resolve())
    return dict(metrics["after"]) if same and metrics.get("after") else None


def _eval_sets(run: Run) -> Dict[str, List[Label]]:
    return {name: (run.val[name] or run.train[name]) for name in run.train}


def _create_variant(run: Run) -> Dict[int, float]:
    """New variant = copy of the parent head, parent scale, corrected composition."""
    _metatrain.add_variant(run.model, run.variant, inherit_from=run.parent,
                           description=run.description)
    return _correct_composition(run, run.parent)


def _correct_composition(run: Run, parent: str) -> Dict[int, float]:
    """Composition of the variant = the parent's + a minimum-norm per-element correction
    fitted to the training labels' residuals under the parent (the offset between two
    levels of theory, ~3 eV/atom for GFN1 → GFN2, which the heads would otherwise have
    to absorb). Returns the correction, eV per atom of each element."""
    model, variant = run.model, run.variant
    correction = composition_correction(model, parent, run.train[variant])
    weights = _metatrain.composition_weights(model, parent)
    _metatrain.set_composition_weights(
        model, variant, {z: weights[z] + c for z, c in correction.items()})
    logger.info(
        "variant %r starts from %r: heads copied (metatrain inherit_heads), parent scale "
        "kept and composition = parent + minimum-norm residual correction %s eV "
        "(metatrain would refit scale and composition from the new totals; "
        "new_variant_baseline='metatrain' does that)", variant, parent,
        {z: round(c, 4) for z, c in correction.items()},
    )
    return correction


def composition_correction(model, variant: str, labels: List[Label]) -> Dict[int, float]:
    """The minimum-norm per-element energy correction (eV per atom of each of the
    model's elements) that best removes the residuals label − ``variant``'s prediction
    on ``labels``: the offset between two levels of theory. With one composition only
    the total per structure is determined, and the minimum norm spreads it by count."""
    predicted = _metatrain.predict(model, [l.atoms for l in labels], variant,
                                   forces=False, stress=False)
    residual = np.array([l.energy - p["energy"] for l, p in zip(labels, predicted)])
    types = sorted(_metatrain.atomic_types(model))
    counts = np.array([[np.sum(l.atoms.numbers == z) for z in types] for l in labels],
                      dtype=float)
    correction = np.linalg.pinv(counts, rcond=1e-10) @ residual
    return {int(z): float(c) for z, c in zip(types, correction)}


def _untouched_copy_of(model, variant: str) -> Optional[str]:
    """The variant ``variant`` is still a bit-identical copy of (last layers and
    composition), e.g. a head a calculator created from ``inherit_from`` and no refit
    has fitted yet; None if it has been fitted."""
    own = _metatrain.last_layer_vector(model, variant)
    composition = _metatrain.composition_weights(model, variant)
    for other in _metatrain.energy_variants(model):
        if other != variant and np.array_equal(_metatrain.last_layer_vector(model, other), own) \
                and _metatrain.composition_weights(model, other) == composition:
            return other
    return None


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
    pred = _metatrain.predict(model, [l.atoms for l in labels], variant,
                              forces=want_forces, stress=want_stress)
    return error_metrics(pred, reference_dicts(labels), [l.n_atoms for l in labels])
