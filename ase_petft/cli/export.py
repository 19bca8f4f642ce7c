"""``petft export``: a checkpoint as a metatomic model for LAMMPS, i-PI and ASE."""

from __future__ import annotations

import argparse
import os
import pathlib
import warnings
from typing import List

from ..errors import FineTuneError, VariantError
from ._common import EXIT_OK, UsageError, existing_file


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint as a metatomic model (LAMMPS, i-PI, ASE)",
        description="Export a metatrain PET checkpoint as a TorchScript metatomic model "
        "(.pt) for LAMMPS (pair_style metatomic), i-PI and metatomic_ase. The file holds "
        "every energy variant of the checkpoint; --variant checks that the one you want "
        "exists and prints how to select it in each engine.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="metatrain PET checkpoint (.ckpt)")
    p.add_argument("--variant", default="energy", help="variant to check (default energy)")
    p.add_argument("--dtype", choices=["float32", "float64"], default=None,
                   help="precision of the exported model (default: the checkpoint's)")
    p.add_argument("-o", "--output", required=True, metavar="MODEL.pt")
    p.set_defaults(func=run)


def check_variant(model, variant: str) -> None:
    from .. import _metatrain
    from ..variants import closest_variant

    available = _metatrain.energy_variants(model)
    if variant not in available:
        close = closest_variant(variant, available)
        hint = f"; did you mean {close!r}?" if close else ""
        raise VariantError(f"the checkpoint has no variant {variant!r}; it has "
                           f"{available}{hint}")


def export_model(checkpoint: pathlib.Path, output: pathlib.Path, *, variant: str,
                 dtype=None) -> pathlib.Path:
    """Write the metatomic model of ``checkpoint`` to ``output`` and check it loads."""
    import torch

    from .. import _metatrain

    model = _metatrain.load_model(checkpoint)
    check_variant(model, variant)
    dtype = getattr(torch, dtype) if dtype else next(model.parameters()).dtype
    output = _metatrain.output_file(output, what="an exported model", example="model.pt")
    tmp = output.with_name(f".{output.name}.{os.getpid()}.tmp")
    try:
        exported = _metatrain.prepare_for_inference(model, dtype=dtype,
                                                    device=torch.device("cpu"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit deprecation noise
            exported.save(str(tmp))
        verify_export(tmp, variant, _metatrain.atomic_types(model))
        os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
    return output


def verify_export(path: pathlib.Path, variant: str, types: List[int]) -> float:
    """Load ``path`` with metatomic_ase and compute one energy of ``variant``."""
    import numpy as np
    from ase import Atoms
    from metatomic_ase import MetatomicCalculator

    suffix = None if variant == "energy" else variant.split("/", 1)[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calc = MetatomicCalculator(str(path), variants={"energy": suffix}, device="cpu",
                                   uncertainty_threshold=None)
    probe = Atoms(numbers=list(types), positions=[[1.6 * i, 0.0, 0.0] for i in range(len(types))])
    probe.calc = calc
    energy = float(probe.get_potential_energy())
    if not np.isfinite(energy):
        raise FineTuneError(f"the exported model gives a non-finite energy for {variant!r}")
    return energy


def run(args: argparse.Namespace) -> int:
    from ..variants import validate_variant

    variant = validate_variant(args.variant)
    checkpoint = existing_file(args.checkpoint, "checkpoint")
    output = pathlib.Path(args.output)
    if output.exists() and output.resolve() == checkpoint.resolve():
        raise UsageError("the output would overwrite the checkpoint")
    if output.is_dir():
        raise UsageError(f"output {args.output!r} is a directory; give a file name (model.pt)")
    export_model(checkpoint, output, variant=variant, dtype=args.dtype)
    print(export_instructions(output, variant))
    return EXIT_OK


def export_instructions(path: pathlib.Path, variant: str) -> str:
    suffix = None if variant == "energy" else variant.split("/", 1)[1]
    if suffix is None:
        return (f"wrote {path} (the 'energy' variant is the model's default output; "
                "no variant option is needed in LAMMPS, i-PI or metatomic_ase)")
    return "\n".join([
        f"wrote {path} (all variants; selected here: {variant!r})",
        "select the variant:",
        f"  metatomic_ase: MetatomicCalculator({str(path)!r}, variants={{'energy': {suffix!r}}})",
        f"  LAMMPS:        pair_style metatomic {path} variant {suffix}",
        f"  i-PI driver:   i-pi-py_driver -m metatomic -o "
        f"template=init.xyz,model={path},energy_variant={suffix}",
    ])
