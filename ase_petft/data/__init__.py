"""Data shipped with ase_petft: the small demo PET checkpoint and its model card."""

from __future__ import annotations

import pathlib

__all__ = ["demo_checkpoint", "DEMO_VARIANT_DESCRIPTION"]

_HERE = pathlib.Path(__file__).resolve().parent
DEMO_CHECKPOINT_NAME = "demo-pet-gfn1.ckpt"
DEMO_VARIANT_DESCRIPTION = "GFN1-xTB total energy (tblite), eV"


def demo_checkpoint() -> pathlib.Path:
    """Path of the shipped demo PET checkpoint (trained on GFN1-xTB, see data/README.md)."""
    path = _HERE / DEMO_CHECKPOINT_NAME
    if not path.is_file():
        from ..errors import CheckpointError

        raise CheckpointError(
            f"the demo checkpoint {DEMO_CHECKPOINT_NAME} is missing from the installed "
            "package; reinstall ase-petft or regenerate it with "
            "'python scripts/train_demo_model.py'"
        )
    return path
