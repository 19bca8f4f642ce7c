"""In-process fine-tuning of PET checkpoints: heads-only, full and LoRA.

``finetune(checkpoint, frames, variant=..., config=..., output_dir=...)`` refits one
energy variant on labelled ``ase.Atoms`` and writes a *generation directory*::

    output_dir/model.ckpt  model.pt  config.json  metrics.json

(see :mod:`ase_petft.finetune.generation`). The package's modules: ``prepare`` (checks
before training: labels, elements, variants, split), ``data`` (labels per variant,
replay), ``run`` (new-variant set-up, solver, metrics, divergence) and ``generation``
(the directory format). Only ``run``/``prepare`` call metatrain, through
``ase_petft._metatrain``.

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

The input checkpoint is never written. Bad input raises an
:class:`~ase_petft.errors.InputError` (``TrainingDataError``, ``ConfigError``,
``CheckpointError``, ``VariantError``) before any training; a failed run raises
:class:`FineTuneError` (cause chained) and ``output_dir`` holds no new ``model.ckpt``. Logging goes through
``logging`` (metatrain's own chatter is routed to ``ase_petft._metatrain.training.trainer``
at DEBUG); torch thread counts are not changed (set ``OMP_NUM_THREADS`` or
``torch.set_num_threads`` yourself; see DESIGN.md §5, thread trap).
"""

from __future__ import annotations

import logging
import os
import pathlib
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from .. import _metatrain
from ..config import FineTuneConfig, FineTuneResult
from ..errors import ConfigError, FineTuneError, PetftError
from ..variants import validate_variant
from ..devices import resolve_device
from .generation import (CHECKPOINT_NAME, METRICS_NAME, MODEL_NAME, check_output_dir,
                         remove_leftovers,
                         write_generation, write_json)

logger = logging.getLogger(__name__)

__all__ = ["finetune", "finetune_calculator", "FineTuneConfig", "FineTuneResult"]

Progress = Callable[[int, int], None]


def finetune(checkpoint: os.PathLike | str, frames, *, variant: str,
             config: Optional[FineTuneConfig] = None, output_dir: os.PathLike | str,
             replay=None, generation: Optional[int] = None,
             progress: Optional[Progress] = None, export: bool = True,
             overwrite: bool = False, validation=None,
             ignore_frame_variants: bool = False, device: Optional[str] = None
             ) -> FineTuneResult:
    """Fine-tune ``variant`` of a PET checkpoint on labelled frames, in-process.

    :param checkpoint: metatrain PET checkpoint (trusted pickle); never modified.
    :param frames: labelled frames of ``variant``: a list of ``ase.Atoms``, a
        :class:`LabelBuffer`, or a path (a label buffer, or a file ``ase.io.read`` reads).
    :param variant: ``"energy"`` or ``"energy/<name>"``; a variant missing from the
        checkpoint is created from ``config.inherit_from``.
    :param config: settings (default ``FineTuneConfig()``: heads, linear solver).
    :param output_dir: the generation directory to write (created if needed).
    :param replay: labels of other variants trained together (see module doc).
    :param generation: generation number recorded in the result, if known.
    :param progress: ``progress(epoch, num_epochs)`` called after each SGD epoch.
    :param export: also write the exported metatomic ``model.pt`` (verified).
    :param overwrite: replace a generation already in ``output_dir``.
    :param validation: labelled frames of ``variant`` that are never trained on; they
        pick the best SGD epoch and give the reported metrics, and no other labels are
        held out (``config.validation_fraction`` is then not used).
    :param ignore_frame_variants: train on frames whose ``atoms.info["variant"]`` names
        another variant (refused by default: a head would learn another level of theory).
    :param device: where the refit runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``; default
        CPU). A calculator's own refits run on its device.
    :raises InputError: bad input (too few/unlabelled frames, unknown elements, a
        variant without labels, a bad config or checkpoint), before any training.
    :raises FineTuneError: the run failed (divergence, NaN weights); cause chained.
    """
    result, _ = finetune_with_model(
        checkpoint, frames, variant=variant, config=config, output_dir=output_dir,
        replay=replay, generation=generation, progress=progress, export=export,
        overwrite=overwrite, validation=validation,
        ignore_frame_variants=ignore_frame_variants, device=device)
    return result


def finetune_with_model(checkpoint, frames, *, variant: str, config=None, output_dir,
                        replay=None, generation=None, progress=None, export=True,
                        overwrite=False, validation=None, ignore_frame_variants=False,
                        reuse_rows_from=(), device=None, source_model=None):
    """:func:`finetune`, also returning the trained PET module (in-process callers
    swap it into a calculator without reading the checkpoint back). ``reuse_rows_from``:
    more generation folders whose heads rows may be reused (besides the input
    checkpoint's folder, see :mod:`.rowcache`). ``source_model``: the weights of
    ``checkpoint`` in memory (trained on a copy; the checkpoint is not read)."""
    from . import prepare, rowcache, run as engine

    start = time.perf_counter()
    config = FineTuneConfig() if config is None else config
    if not isinstance(config, FineTuneConfig):
        raise ConfigError(f"config must be a FineTuneConfig, got {type(config).__name__}")
    variant = validate_variant(variant)
    checkpoint = pathlib.Path(checkpoint).resolve()
    output_dir = pathlib.Path(output_dir).resolve()
    check_output_dir(checkpoint, output_dir, overwrite=overwrite)
    run = prepare.prepare_run(checkpoint, frames, variant=variant, config=config,
                              replay=replay, validation=validation,
                              ignore_frame_variants=ignore_frame_variants,
                              device=resolve_device(device), source_model=source_model)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create output_dir {str(output_dir)!r}: {exc}") from exc
    if not os.access(output_dir, os.W_OK):
        raise ConfigError(f"output_dir {str(output_dir)!r} is not writable; choose another")
    remove_leftovers(output_dir)
    prepared = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(dir=output_dir, prefix=".scratch-") as scratch:
            trained = engine.train(run, scratch_dir=scratch, progress=progress,
                                   reuse_rows_from=[checkpoint.parent, *map(pathlib.Path,
                                                                            reuse_rows_from)])
        fitted = time.perf_counter()
        paths = write_generation(trained, output_dir, export=export)
        if trained.row_cache is not None:
            rowcache.save(output_dir, trained.row_cache)
    except PetftError:
        raise
    except Exception as exc:  # metatrain/torch failures: say what was being done
        raise FineTuneError(
            f"fine-tuning {variant!r} ({config.method}, {config.effective_solver}) "
            f"failed: {type(exc).__name__}: {exc}"
        ) from exc
    wall = time.perf_counter() - start
    # where the time went: loading + checks, training (and validation), writing + export
    trained.metrics["timing_s"] = {"prepare": prepared - start, "train": fitted - prepared,
                                   "write": wall - (fitted - start)}
    result = FineTuneResult(
        generation=generation, checkpoint_path=paths[0], model_path=paths[1],
        n_train=trained.n_train, n_val=trained.n_val, metrics=trained.metrics,
        wall_time_s=wall, variant=variant, dropped_variants=tuple(trained.dropped),
    )
    write_json(output_dir / METRICS_NAME, {**result.to_dict(), "config": config.to_dict()})
    logger.info("fine-tuned %s (%s/%s) in %.1f s: %s", variant, config.method,
                config.effective_solver, wall, _summary(trained.metrics))
    # the module as its checkpoint reads back (export froze it): it predicts bit for bit
    # what the written checkpoint predicts, so callers swap it in without reading the file
    return result, _metatrain.thaw(trained.model)


def finetune_calculator(calc, frames, config: Optional[FineTuneConfig] = None, *,
                        output_dir: Optional[os.PathLike | str] = None, replay=None,
                        progress: Optional[Progress] = None, export: bool = True
                        ) -> FineTuneResult:
    """Fine-tune the live model of ``calc`` and hot-swap the result into it.

    Training starts from the calculator's *current* generation (its live weights,
    including a variant it created), on the calculator's device, from a copy of the
    live model (no checkpoint is read back); the trained module's weights are copied
    into the same calculator object (``calc.generation`` += 1). The generation
    directory (checkpoint, export, metrics: the crash-safe record) defaults to
    ``<calc workdir or a temp dir>/gen-XXXX``.
    """
    config = FineTuneConfig() if config is None else config
    generation = int(calc.generation) + 1
    if output_dir is None:
        output_dir = _default_generation_dir(calc, generation)
    result, model = finetune_with_model(
        calc.checkpoint_path, frames, variant=calc.variant, config=config,
        output_dir=output_dir, replay=replay, generation=generation, progress=progress,
        export=export, device=calc.device, source_model=calc.model_copy())
    swapped = calc.swap_model(result.checkpoint_path, model=model)
    if swapped != generation:
        logger.warning("calculator reports generation %d after the swap, expected %d",
                       swapped, generation)
    return result


# ---------------------------------------------------------------------- helpers
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
