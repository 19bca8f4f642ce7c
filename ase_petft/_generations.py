"""A learner's work directory: one folder per refit, a decision in each, a pointer.

::

    workdir/gen-0000/model.ckpt     the starting weights (incl. a newly created variant)
    workdir/gen-NNNN/               refit number NNNN (finetune()'s generation directory)
        model.ckpt  model.pt  config.json  metrics.json
        decision.json               accepted?, held-out errors of old and new model
    workdir/current.json            the generation the calculator runs (after a swap)
    workdir/history.jsonl           the learner's event log, one JSON object per line

Generation numbers count refits; a rejected refit keeps its folder and its number is
never given to a running model. The refit job itself (:func:`run_refit`) is a plain
function of plain inputs, so it can run inline, in a thread or on any executor.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any, Dict, List, Optional

import numpy as np

logger = logging.getLogger(__name__)

DECISION = "decision.json"
CURRENT = "current.json"
HISTORY = "history.jsonl"


def gen_dir(workdir: pathlib.Path, generation: int) -> pathlib.Path:
    return workdir / f"gen-{generation:04d}"


def write_json(path: pathlib.Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_plain))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _plain(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def read_json(path: pathlib.Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def decisions(workdir: pathlib.Path) -> List[Dict[str, Any]]:
    """Every finished refit's decision, oldest first (unfinished folders skipped)."""
    found = []
    for folder in sorted(workdir.glob("gen-[0-9][0-9][0-9][0-9]")):
        data = read_json(folder / DECISION)
        if data is not None:
            found.append(data)
    return found


def last_number(workdir: pathlib.Path) -> int:
    numbers = [int(p.name[4:]) for p in workdir.glob("gen-[0-9][0-9][0-9][0-9]")]
    return max(numbers, default=0)


def append_history(workdir: pathlib.Path, row: Dict[str, Any]) -> None:
    with open(workdir / HISTORY, "a") as handle:
        handle.write(json.dumps(row, default=_plain) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(workdir: pathlib.Path) -> List[Dict[str, Any]]:
    path = workdir / HISTORY
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by a crash: skip it
            continue
    return rows


@dataclasses.dataclass(frozen=True)
class RefitSpec:
    """Everything a refit needs, as plain data (picklable for process executors)."""

    source_checkpoint: pathlib.Path
    source_generation: int
    train: list
    holdout: list
    variant: str
    config: Any
    output_dir: pathlib.Path
    generation: int
    tolerance: float
    n_labels_total: int
    preload: bool = True


@dataclasses.dataclass
class RefitOutcome:
    generation: int
    accepted: bool
    reason: str
    decision: Dict[str, Any]
    checkpoint_path: Optional[pathlib.Path] = None
    model: Any = None


def holdout_errors(checkpoint: pathlib.Path, frames: list, variant: str) -> Dict[str, float]:
    """Energy (meV/atom) and force (meV/Å) MAE of a checkpoint's ``variant`` on frames."""
    from . import _metatrain
    from ._metatrain.labels import labels_from_frames
    from ._metatrain.training import predict

    model = _metatrain.load_model(checkpoint)
    labels = labels_from_frames(frames)
    preds = predict(model, [lab.atoms for lab in labels], variant, stress=False)
    e_err = [abs(p["energy"] - lab.energy) / lab.n_atoms for p, lab in zip(preds, labels)]
    f_err = [np.abs(p["forces"] - lab.forces).ravel() for p, lab in zip(preds, labels)
             if lab.forces is not None]
    return {
        "energy_mae_meV_per_atom": 1e3 * float(np.mean(e_err)),
        "forces_mae_meV_per_A": 1e3 * float(np.mean(np.concatenate(f_err))) if f_err else None,
    }


def _score(errors: Dict[str, Optional[float]]) -> float:
    forces = errors.get("forces_mae_meV_per_A")
    return forces if forces is not None else errors["energy_mae_meV_per_atom"]


def run_refit(spec: RefitSpec) -> RefitOutcome:
    """Fine-tune, judge the result on held-out labels, write the decision."""
    from .finetune import finetune

    start = time.perf_counter()
    result = finetune(spec.source_checkpoint, spec.train, variant=spec.variant,
                      config=spec.config, output_dir=spec.output_dir,
                      generation=spec.generation)
    decision: Dict[str, Any] = {
        "generation": spec.generation, "source_generation": spec.source_generation,
        "n_train": len(spec.train), "n_holdout": len(spec.holdout),
        "n_labels_total": spec.n_labels_total, "fit_wall_time_s": result.wall_time_s,
        "fit_metrics": dict(result.metrics),
    }
    if spec.holdout:
        old = holdout_errors(spec.source_checkpoint, spec.holdout, spec.variant)
        new = holdout_errors(result.checkpoint_path, spec.holdout, spec.variant)
        accepted = _score(new) <= (1.0 + spec.tolerance) * _score(old)
        reason = (f"held-out score {_score(new):.4g} vs current {_score(old):.4g} "
                  f"(tolerance {spec.tolerance:.0%})")
        decision.update(old=old, new=new)
    else:
        accepted, reason = True, "no held-out labels yet: accepted without a gate"
    decision.update(accepted=bool(accepted), reason=reason,
                    wall_time_s=time.perf_counter() - start, finished_at=time.time())
    write_json(spec.output_dir / DECISION, decision)
    model = None
    if accepted and spec.preload:
        from . import _metatrain

        model = _metatrain.load_model(result.checkpoint_path)
    return RefitOutcome(generation=spec.generation, accepted=bool(accepted), reason=reason,
                        decision=decision, checkpoint_path=result.checkpoint_path,
                        model=model)
