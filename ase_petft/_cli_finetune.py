"""``petft finetune`` and ``petft export``: train a variant, write a metatomic model."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import warnings
from typing import Any, Dict, List

from ._cli_common import (EXIT_OK, UsageError, epoch_bar, existing_file, read_labels,
                          read_replay)
from .errors import FineTuneError, VariantError

_METRIC_ROWS = (
    ("energy MAE", "energy_mae_meV_per_atom", "meV/atom"),
    ("energy RMSE", "energy_rmse_meV_per_atom", "meV/atom"),
    ("forces MAE", "forces_mae_meV_per_A", "meV/Å"),
    ("forces RMSE", "forces_rmse_meV_per_A", "meV/Å"),
    ("stress MAE", "stress_mae_meV_per_A3", "meV/Å³"),
)


# ---------------------------------------------------------------------- finetune
def add_finetune_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune one energy variant of a PET checkpoint on labels",
        description="Fine-tune (in-process) one energy variant of a metatrain PET "
        "checkpoint on reference labels and write a generation directory: model.ckpt "
        "(metatrain checkpoint), model.pt (metatomic model), metrics.json, config.json. "
        "A variant missing from the checkpoint is created from --inherit-from.",
        epilog="LABELS: a label buffer (.h5, see 'petft buffer'), or any file ase.io "
        "reads with energies (and forces) attached: extended XYZ, ASE trajectory "
        "(.traj), ASE database (.db). Example: petft finetune pet.ckpt labels.h5 "
        "--variant energy/pbe0 -o gen-0001",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="metatrain PET checkpoint (.ckpt)")
    p.add_argument("labels", metavar="LABELS", help="labels of VARIANT: buffer or ASE file")
    p.add_argument("--variant", required=True, help="energy variant to train, e.g. energy/pbe0")
    p.add_argument("--method", choices=["heads", "full", "lora"], default="heads",
                   help="heads: last layers only, other variants untouched (default); "
                   "full: every weight; lora: low-rank adapters")
    p.add_argument("--solver", choices=["auto", "sgd", "linear"], default="auto",
                   help="auto: closed-form 'linear' for heads, 'sgd' for full/lora")
    p.add_argument("--epochs", type=int, default=60, help="SGD epochs (default 60)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--validation-fraction", type=float, default=0.2,
                   help="share of labels held out for validation (default 0.2)")
    p.add_argument("--inherit-from", default="energy",
                   help="variant a new variant starts from ('none': must exist)")
    p.add_argument("--replay", nargs="+", default=[], metavar="OTHER_LABELS",
                   help="labels of other variants trained in the same run (keeps their "
                   "heads with full/lora): buffers give their own variants")
    p.add_argument("--replay-variant", default="energy",
                   help="variant of replay files that are not buffers (default energy)")
    p.add_argument("--index", default=":", help="ASE index of the frames to read (default ':')")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="new generation directory")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_finetune)


def _config(args: argparse.Namespace):
    from .config import FineTuneConfig

    inherit = None if args.inherit_from.lower() == "none" else args.inherit_from
    try:
        return FineTuneConfig(
            method=args.method, solver=args.solver, num_epochs=args.epochs,
            learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
            validation_fraction=args.validation_fraction, inherit_from=inherit,
        )
    except FineTuneError as exc:  # a bad option value is bad usage
        raise UsageError(str(exc)) from exc


def _output_dir(path: str, checkpoint: pathlib.Path) -> pathlib.Path:
    out = pathlib.Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"output {path!r} exists and is not a directory")
    if (out / "model.ckpt").exists():
        raise UsageError(f"{path!r} already holds a model.ckpt; write each fine-tuned "
                         "generation to a new directory")
    if out.resolve() == checkpoint.resolve().parent and checkpoint.name == "model.ckpt":
        raise UsageError("the output directory is the checkpoint's own directory")
    return out


def run_finetune(args: argparse.Namespace) -> int:
    from .finetune import finetune
    from .variants import validate_variant

    variant = validate_variant(args.variant)
    checkpoint = existing_file(args.checkpoint, "checkpoint")
    labels_path = existing_file(args.labels, "labels file")
    config = _config(args)
    out = _output_dir(args.output, checkpoint)
    frames = read_labels(labels_path, variant, index=args.index)
    if len(frames) < config.min_frames:
        raise UsageError(f"{args.labels!r} holds {len(frames)} label(s) of {variant!r}; "
                         f"fine-tuning needs at least {config.min_frames}")
    replay = read_replay(args.replay, exclude=variant,
                         default_variant=validate_variant(args.replay_variant)) or None
    check_inputs(checkpoint, variant, config.inherit_from, frames, replay or {})
    _say(args, f"fine-tuning {variant!r} of {checkpoint} on {len(frames)} labels "
               f"({config.method}, {config.effective_solver} solver)"
               + (f" with replay of {sorted(replay)}" if replay else ""))
    with epoch_bar("epochs", args.quiet or config.effective_solver != "sgd") as bar:
        result = finetune(checkpoint, frames, variant=variant, config=config,
                          output_dir=out, replay=replay, progress=bar)
    print(format_result(result))
    return EXIT_OK


def check_inputs(checkpoint: pathlib.Path, variant: str, inherit_from, frames,
                 replay: Dict[str, list]) -> None:
    """Refuse (exit 2) what fine-tuning would refuse: unknown variants or elements."""
    from ase.data import chemical_symbols

    from . import _metatrain

    model = _metatrain.load_model(checkpoint)
    available = _metatrain.energy_variants(model)
    if variant not in available:
        if inherit_from is None:
            check_variant(model, variant)
        elif inherit_from not in available:
            raise VariantError(f"cannot create {variant!r} from --inherit-from "
                               f"{inherit_from!r}: the checkpoint has {available}")
    for name in replay:
        if name not in available:
            raise VariantError(f"replay variant {name!r} is not in the checkpoint (it has "
                               f"{available}); replay keeps existing heads")
    known = set(_metatrain.atomic_types(model))
    for atoms in [*frames, *(a for group in replay.values() for a in group)]:
        unknown = sorted(set(int(z) for z in atoms.numbers) - known)
        if unknown:
            raise UsageError(
                f"labels contain element(s) {[chemical_symbols[z] for z in unknown]} the "
                f"model does not know (it knows {[chemical_symbols[z] for z in sorted(known)]})")


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet:
        print(text, file=sys.stderr, flush=True)


def format_result(result) -> str:
    """The validation errors of a :class:`~ase_petft.FineTuneResult` as a small table."""
    metrics = result.metrics
    split = metrics.get("split", "validation")
    lines = [f"fine-tuned {result.variant!r} ({metrics.get('method')}, "
             f"{metrics.get('solver')} solver) in {result.wall_time_s:.1f} s: "
             f"{result.n_train} training and {result.n_val} validation labels", ""]
    lines += _metric_table(f"{split} errors of {result.variant!r}",
                           metrics.get("before", {}), metrics.get("after", {}))
    for name, pair in sorted(metrics.get("replay", {}).items()):
        lines += [""] + _metric_table(f"{split} errors of replayed {name!r}",
                                      pair.get("before", {}), pair.get("after", {}))
    if result.dropped_variants:
        lines += ["", f"note: the new checkpoint no longer has {list(result.dropped_variants)} "
                      "(full/LoRA without replay for them; pass --replay to keep them)"]
    lines += ["", f"checkpoint: {result.checkpoint_path}"]
    if result.model_path is not None:
        lines.append(f"metatomic model (all variants): {result.model_path}")
    return "\n".join(lines)


def _metric_table(title: str, before: Dict[str, Any], after: Dict[str, Any]) -> List[str]:
    n = after.get("n_frames", before.get("n_frames"))
    lines = [f"{title}" + (f" ({n} frames)" if n else "") + ":",
             f"  {'':<12} {'unit':<9} {'before':>10} {'after':>10}"]
    for label, key, unit in _METRIC_ROWS:
        if key in after or key in before:
            lines.append(f"  {label:<12} {unit:<9} {_num(before.get(key)):>10} "
                         f"{_num(after.get(key)):>10}")
    return lines


def _num(value) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------- export
def add_export_parser(sub) -> None:
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
    p.set_defaults(func=run_export)


def check_variant(model, variant: str) -> None:
    from . import _metatrain
    from .variants import closest_variant

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

    from . import _metatrain

    model = _metatrain.load_model(checkpoint)
    check_variant(model, variant)
    dtype = getattr(torch, dtype) if dtype else next(model.parameters()).dtype
    output.parent.mkdir(parents=True, exist_ok=True)
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


def run_export(args: argparse.Namespace) -> int:
    from .variants import validate_variant

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
