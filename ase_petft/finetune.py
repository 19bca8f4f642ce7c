"""In-process fine-tuning of PET checkpoints: heads-only, full and LoRA.

``finetune(checkpoint, frames, variant=..., config=..., output_dir=...)`` refits one
energy variant on labelled ``ase.Atoms`` and writes a *generation directory*::

    output_dir/model.ckpt     metatrain checkpoint (best epoch; mtt export/eval read it)
    output_dir/model.pt       exported metatomic model (LAMMPS, i-PI, ASE)
    output_dir/config.json    the FineTuneConfig and run facts
    output_dir/metrics.json   validation errors before/after (meV/atom, meV/Å, meV/Å³)

Data:

- ``frames``: labelled frames of ``variant`` — a list of ``ase.Atoms`` whose
  calculator holds ``energy`` (and ideally ``forces``/``stress``), or a buffer with
  ``.frames(variant=...)``.
- ``replay``: labels of *other* variants trained in the same run (multi-fidelity):
  ``{"energy": frames_or_buffer, ...}`` or a list of frames tagged with
  ``atoms.info["variant"]``. With ``full``/``lora`` this is what keeps those heads
  (metatrain drops every head without data when the backbone changes).

Deviations from ``mtt train`` fine-tuning (each is logged at INFO when it applies):
a *new* variant is created before training as a copy of ``inherit_from`` (heads
and last layers, like metatrain's ``inherit_heads``), keeps the parent's scale and
gets the parent's composition plus a minimum-norm correction fitted to the residual
of the new labels (metatrain would refit both from the new labels' totals; see
DESIGN.md §5, scale and composition traps). ``FineTuneConfig(new_variant_baseline=
"metatrain")`` restores metatrain's behaviour. LoRA adapters are merged into the
weights, so every checkpoint is a plain PET.

The input checkpoint is never written; on failure a :class:`FineTuneError` is raised
(cause chained) and ``output_dir`` holds no new ``model.ckpt``. Logging goes through
``logging`` (metatrain's own chatter is routed to ``ase_petft._metatrain.training.trainer``
at DEBUG); torch thread counts are not changed (set ``OMP_NUM_THREADS`` or
``torch.set_num_threads`` yourself; see DESIGN.md §5, thread trap).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from .config import FineTuneConfig, FineTuneResult
from .errors import FineTuneError, PetftError
from .variants import validate_variant

logger = logging.getLogger(__name__)

__all__ = ["finetune", "finetune_calculator", "FineTuneConfig", "FineTuneResult"]

CHECKPOINT_NAME = "model.ckpt"
MODEL_NAME = "model.pt"

Progress = Callable[[int, int], None]


def finetune(checkpoint: os.PathLike | str, frames, *, variant: str,
             config: Optional[FineTuneConfig] = None, output_dir: os.PathLike | str,
             replay=None, generation: Optional[int] = None,
             progress: Optional[Progress] = None, export: bool = True) -> FineTuneResult:
    """Fine-tune ``variant`` of a PET checkpoint on labelled frames, in-process.

    :param checkpoint: metatrain PET checkpoint (trusted pickle); never modified.
    :param frames: labelled frames of ``variant`` (list of ``ase.Atoms`` or a buffer).
    :param variant: ``"energy"`` or ``"energy/<name>"``; a variant missing from the
        checkpoint is created from ``config.inherit_from``.
    :param config: settings (default ``FineTuneConfig()``: heads, linear solver).
    :param output_dir: the generation directory to write (created if needed).
    :param replay: labels of other variants trained together (see module doc).
    :param generation: generation number recorded in the result, if known.
    :param progress: ``progress(epoch, num_epochs)`` called after each SGD epoch.
    :param export: also write the exported metatomic ``model.pt``.
    :raises FineTuneError: too few/unlabelled frames, unknown elements, a variant
        without labels, divergence or NaN weights; the cause is chained.
    """
    from ._metatrain import engine

    start = time.perf_counter()
    config = FineTuneConfig() if config is None else config
    if not isinstance(config, FineTuneConfig):
        raise FineTuneError(f"config must be a FineTuneConfig, got {type(config).__name__}")
    variant = validate_variant(variant)
    checkpoint = pathlib.Path(checkpoint).resolve()
    output_dir = pathlib.Path(output_dir).resolve()
    _check_paths(checkpoint, output_dir)
    run = engine.prepare_run(checkpoint, frames, variant=variant, config=config,
                             replay=replay)
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".scratch-") as scratch:
            trained = engine.train(run, scratch_dir=scratch, progress=progress)
        paths = _write_generation(trained, output_dir, export=export)
    except PetftError:
        raise
    except Exception as exc:  # metatrain/torch failures: say what was being done
        raise FineTuneError(
            f"fine-tuning {variant!r} ({config.method}, {config.effective_solver}) "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    wall = time.perf_counter() - start
    result = FineTuneResult(
        generation=generation, checkpoint_path=paths[0], model_path=paths[1],
        n_train=trained.n_train, n_val=trained.n_val, metrics=trained.metrics,
        wall_time_s=wall, variant=variant, dropped_variants=tuple(trained.dropped),
    )
    _write_json(output_dir / "metrics.json", {**result.to_dict(), "config": config.to_dict()})
    logger.info("fine-tuned %s (%s/%s) in %.1f s: %s", variant, config.method,
                config.effective_solver, wall, _summary(trained.metrics))
    return result


def finetune_calculator(calc, frames, config: Optional[FineTuneConfig] = None, *,
                        output_dir: Optional[os.PathLike | str] = None, replay=None,
                        progress: Optional[Progress] = None) -> FineTuneResult:
    """Fine-tune the live model of ``calc`` and hot-swap the result into it.

    Training starts from the calculator's *current* generation (its live weights,
    including a variant it created), the trained weights are copied into the same
    calculator object (``calc.generation`` += 1) without re-exporting it. The
    generation directory defaults to ``<calc workdir or a temp dir>/gen-XXXX``.
    """
    config = FineTuneConfig() if config is None else config
    generation = int(calc.generation) + 1
    if output_dir is None:
        output_dir = _default_generation_dir(calc, generation)
    output_dir = pathlib.Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    source = output_dir / "input.ckpt"
    calc.save_checkpoint(source)
    result = finetune(source, frames, variant=calc.variant, config=config,
                      output_dir=output_dir, replay=replay, generation=generation,
                      progress=progress, export=True)
    from ._metatrain import load_model

    new_model = load_model(result.checkpoint_path)
    swapped = calc._swap_from_model(new_model, result.checkpoint_path)
    if swapped != generation:
        logger.warning("calculator reports generation %d after the swap, expected %d",
                       swapped, generation)
    return result


# ---------------------------------------------------------------------- helpers
def _check_paths(checkpoint: pathlib.Path, output_dir: pathlib.Path) -> None:
    if not checkpoint.is_file():
        raise FineTuneError(f"checkpoint {str(checkpoint)!r} does not exist; pass the "
                            "path of a metatrain PET checkpoint (.ckpt)")
    if output_dir.exists() and not output_dir.is_dir():
        raise FineTuneError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    for name in (CHECKPOINT_NAME, MODEL_NAME):
        if (output_dir / name).resolve() == checkpoint:
            raise FineTuneError(
                f"output_dir {str(output_dir)!r} would overwrite the input checkpoint "
                f"{str(checkpoint)!r}; write each generation to a new directory"
            )


def _write_generation(trained, output_dir: pathlib.Path, *, export: bool):
    from . import _metatrain
    from ._metatrain.engine import save_exported

    ckpt = _metatrain.save_checkpoint(trained.model, output_dir / CHECKPOINT_NAME)
    model_path = None
    if export:  # export() puts the module in eval mode, requires_grad False: do it last
        model_path = output_dir / MODEL_NAME
        tmp = output_dir / ("tmp-" + MODEL_NAME)
        save_exported(trained.model, tmp)
        os.replace(tmp, model_path)
    _write_json(output_dir / "config.json", {
        "config": trained.config.to_dict(), "variant": trained.variant,
        "source_checkpoint": str(trained.source), "variants": trained.variants,
        "dropped_variants": trained.dropped, "best_epoch": trained.best_epoch,
    })
    return ckpt, model_path


def _write_json(path: pathlib.Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default))
    os.replace(tmp, path)


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, (pathlib.Path,)):
        return str(value)
    return repr(value)


def _summary(metrics: Dict[str, Any]) -> str:
    before, after = metrics.get("before", {}), metrics.get("after", {})
    parts: List[str] = []
    for key in ("energy_mae_meV_per_atom", "forces_mae_meV_per_A"):
        if key in after:
            parts.append(f"{key} {before.get(key, float('nan')):.3g} -> {after[key]:.3g}")
    return ", ".join(parts) or "no validation metrics"


def _default_generation_dir(calc, generation: int) -> pathlib.Path:
    base = getattr(calc, "workdir", None)
    if base is None:  # a new temporary directory per fine-tune (calculator's contract)
        base = tempfile.mkdtemp(prefix="petft-")
    return pathlib.Path(base) / f"gen-{generation:04d}"
