"""``petft finetune``: train one energy variant of a checkpoint on labels."""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any, Dict, List

from ._common import EXIT_OK, UsageError, epoch_bar, existing_file, read_labels, read_replay

_METRIC_ROWS = (
    ("energy MAE", "energy_mae_meV_per_atom", "meV/atom"),
    ("energy RMSE", "energy_rmse_meV_per_atom", "meV/atom"),
    ("forces MAE", "forces_mae_meV_per_A", "meV/Å"),
    ("forces RMSE", "forces_rmse_meV_per_A", "meV/Å"),
    ("stress MAE", "stress_mae_meV_per_A3", "meV/Å³"),
)

#: option (argparse dest) -> FineTuneConfig field; only options given are passed
_CONFIG_OPTIONS = {
    "method": "method", "solver": "solver", "epochs": "num_epochs", "lr": "learning_rate",
    "batch_size": "batch_size", "seed": "seed",
    "validation_fraction": "validation_fraction", "inherit_from": "inherit_from",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune one energy variant of a PET checkpoint on labels",
        description="Fine-tune (in-process) one energy variant of a metatrain PET "
        "checkpoint on reference labels and write a generation directory: model.ckpt "
        "(metatrain checkpoint), model.pt (metatomic model), metrics.json, config.json. "
        "A variant missing from the checkpoint is created from --inherit-from. "
        "Options not given keep FineTuneConfig's defaults.",
        epilog="LABELS: a label buffer (.h5, see 'petft buffer'), or any file ase.io "
        "reads with energies (and forces) attached: extended XYZ, ASE trajectory "
        "(.traj), ASE database (.db). Example: petft finetune pet.ckpt labels.h5 "
        "--variant energy/pbe0 -o gen-0001",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="metatrain PET checkpoint (.ckpt)")
    p.add_argument("labels", metavar="LABELS", help="labels of VARIANT: buffer or ASE file")
    p.add_argument("--variant", required=True, help="energy variant to train, e.g. energy/pbe0")
    p.add_argument("--method", choices=["heads", "full", "lora"], default=None,
                   help="heads: last layers only, other variants untouched (default); "
                   "full: every weight; lora: low-rank adapters")
    p.add_argument("--solver", choices=["auto", "sgd", "linear"], default=None,
                   help="auto (default): closed-form 'linear' for heads, 'sgd' for full/lora")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs of the sgd solver (default 60)")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of the sgd solver (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="structures per batch of the sgd solver (default 4)")
    p.add_argument("--seed", type=int, default=None, help="seed of the split and training "
                   "(default 0)")
    p.add_argument("--validation-fraction", type=float, default=None,
                   help="share of labels held out for validation (default 0.2)")
    p.add_argument("--inherit-from", default=None,
                   help="variant a new variant starts from (default energy; 'none': the "
                   "variant must exist)")
    p.add_argument("--replay", nargs="+", default=[], metavar="OTHER_LABELS",
                   help="labels of other variants trained in the same run (keeps their "
                   "heads with full/lora): buffers give their own variants")
    p.add_argument("--replay-variant", default="energy",
                   help="variant of replay files that are not buffers (default energy)")
    p.add_argument("--index", default=":", help="ASE index of the frames to read (default ':')")
    p.add_argument("-o", "--output", required=True, metavar="OUTDIR",
                   help="new generation directory")
    p.add_argument("--device", default=None,
                   help="where the refit runs: cpu (default), cuda or cuda:N")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """A FineTuneConfig of the options the user gave (the others keep its defaults).

    FineTuneConfig refuses a setting its method ignores (``--epochs`` with the linear
    solver, ...), so options are never passed with argparse defaults.
    """
    from ..config import FineTuneConfig

    given = {field: getattr(args, dest) for dest, field in _CONFIG_OPTIONS.items()
             if getattr(args, dest) is not None}
    if isinstance(given.get("inherit_from"), str) and given["inherit_from"].lower() == "none":
        given["inherit_from"] = None
    return FineTuneConfig(**given)


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


def run(args: argparse.Namespace) -> int:
    """Checks of the command line only; the checkpoint, variants and labels are checked
    by :func:`~ase_petft.finetune.finetune` (its input errors are exit code 2)."""
    from ..variants import validate_variant

    variant = validate_variant(args.variant)
    checkpoint = existing_file(args.checkpoint, "checkpoint")
    labels_path = existing_file(args.labels, "labels file")
    config = config_from_args(args)
    out = _output_dir(args.output, checkpoint)
    frames = read_labels(labels_path, variant, index=args.index)
    if len(frames) < config.min_frames:
        raise UsageError(f"{args.labels!r} holds {len(frames)} label(s) of {variant!r}; "
                         f"fine-tuning needs at least {config.min_frames}")
    replay = read_replay(args.replay, exclude=variant,
                         default_variant=validate_variant(args.replay_variant)) or None
    _say(args, f"fine-tuning {variant!r} of {checkpoint} on {len(frames)} labels "
               f"({config.method}, {config.effective_solver} solver)"
               + (f" with replay of {sorted(replay)}" if replay else ""))
    from ..finetune import finetune  # imports metatrain: after the checks of the arguments

    with epoch_bar("epochs", args.quiet or config.effective_solver != "sgd") as bar:
        result = finetune(checkpoint, frames, variant=variant, config=config,
                          output_dir=out, replay=replay, progress=bar, device=args.device)
    print(format_result(result))
    return EXIT_OK


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
