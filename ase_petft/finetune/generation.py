"""The generation directory that one fine-tuning run writes::

    output_dir/model.ckpt     metatrain checkpoint (best epoch; mtt export/eval read it)
    output_dir/model.pt       exported metatomic model (LAMMPS, i-PI, ASE), verified
    output_dir/config.json    the FineTuneConfig and run facts
    output_dir/metrics.json   validation errors before/after (meV/atom, meV/Å, meV/Å³)

Every file is written to a temporary name and renamed, so a crash leaves either the
old file or the new one.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
from typing import Any, Dict, Optional

import numpy as np

from .. import _metatrain
from ..errors import ConfigError

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "model.ckpt"
MODEL_NAME = "model.pt"
CONFIG_NAME = "config.json"
METRICS_NAME = "metrics.json"


def remove_leftovers(output_dir: pathlib.Path) -> None:
    """Delete what a killed run left in a generation directory: its ``.scratch-*``
    training folder and half-written ``*.tmp`` files (a live run into the same folder
    is refused before this is called)."""
    output_dir = pathlib.Path(output_dir)
    if not output_dir.is_dir():
        return
    for leftover in [*output_dir.glob(".scratch-*"), *output_dir.glob("*.tmp"),
                     *output_dir.glob(".*.tmp")]:
        try:
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()
            logger.info("removed %s, left by an interrupted run", leftover)
        except OSError as exc:
            logger.warning("could not remove leftover %s: %s", leftover, exc)


def check_output_dir(checkpoint: pathlib.Path, output_dir: pathlib.Path, *,
                     overwrite: bool) -> None:
    """Refuse an output directory that is a file, would overwrite the input checkpoint,
    or already holds a generation (unless ``overwrite``)."""
    if output_dir.exists() and not output_dir.is_dir():
        raise ConfigError(f"output_dir {str(output_dir)!r} exists and is not a directory")
    for name in (CHECKPOINT_NAME, MODEL_NAME):
        if (output_dir / name).resolve() == checkpoint:
            raise ConfigError(
                f"output_dir {str(output_dir)!r} would overwrite the input checkpoint "
                f"{str(checkpoint)!r}; write each generation to a new directory"
            )
    if not overwrite and (output_dir / CHECKPOINT_NAME).exists():
        raise ConfigError(
            f"output_dir {str(output_dir)!r} already holds a generation ({CHECKPOINT_NAME}); "
            "choose a new directory, or pass overwrite=True to replace it"
        )


def write_generation(trained, output_dir: pathlib.Path, *, export: bool):
    """Write the trained model's checkpoint, (verified) export and config."""
    ckpt = _metatrain.save_checkpoint(trained.model, output_dir / CHECKPOINT_NAME)
    model_path: Optional[pathlib.Path] = None
    if export:  # export() puts the module in eval mode, requires_grad False: do it last
        model_path = _metatrain.export_model(trained.model, output_dir / MODEL_NAME,
                                             variant=trained.variant)
    write_json(output_dir / CONFIG_NAME, {
        "config": trained.config.to_dict(), "variant": trained.variant,
        "source_checkpoint": str(trained.source), "variants": trained.variants,
        "dropped_variants": trained.dropped, "best_epoch": trained.best_epoch,
    })
    return ckpt, model_path


def write_json(path: pathlib.Path, data: Dict[str, Any]) -> None:
    """Write ``data`` as JSON durably: temporary file, fsync, rename."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=json_default))
    with open(tmp, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def read_json(path: pathlib.Path) -> Optional[Dict[str, Any]]:
    """The JSON document at ``path``, or None if it is missing or torn."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def json_default(value):
    """JSON for numpy scalars/arrays (and ``str`` of anything else)."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
