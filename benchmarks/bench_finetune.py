"""Benchmark: in-process refits (heads linear/SGD, full, LoRA, full+replay) vs `mtt train`.

Two levels of theory on rattled CuNi cells: EMT (the base model's level) and a
re-parameterised EMT (the new variant ``energy/reparam``). The base PET is the one the
tests use (``tests/data/emt-pet-base.ckpt``, made by ``scripts/train_emt_base.py``;
``--train-base`` trains a quick one instead); every method then refits the new variant on
the same labels, and the same heads job runs through ``mtt train`` as a subprocess
with metatrain's fine-tuning options (method: heads, read_from, inherit_heads) and
the same split, epochs, learning rate, batch size and seed.

    OMP_NUM_THREADS=1 python benchmarks/bench_finetune.py [--base model.ckpt] [--out DIR]

Prints one table: wall time, held-out errors on the new level (and on the old level
for the replay run), and the speed-up of each run against the mtt subprocess.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "scripts"))

import train_emt_base  # noqa: E402  (scripts/: the base model, mtt runs, error metrics)
from train_emt_base import errors, run_mtt, targets  # noqa: E402

NEW = "energy/reparam"
DESCRIPTION = "re-parameterised EMT (benchmark level)"


def train_base(workdir: pathlib.Path, epochs: int) -> pathlib.Path:
    print(f"training a base model ({epochs} epochs) ...", flush=True)
    frames = train_emt_base.training_frames(320, train_emt_base.SEED)
    return train_emt_base.train(workdir, frames, epochs)


def mtt_heads(workdir: pathlib.Path, base, train, val, cfg, *, variant: str = NEW,
              description: str = DESCRIPTION, device: str = "cpu") -> float:
    """``mtt train`` with ``method: heads`` of a new ``variant`` inherited from "energy";
    returns its wall time (subprocess)."""
    import ase.io

    workdir.mkdir(parents=True, exist_ok=True)
    ase.io.write(workdir / "train.xyz", train, format="extxyz")
    ase.io.write(workdir / "val.xyz", val, format="extxyz")
    options = {
        "seed": cfg.seed, "device": device,
        "architecture": {"name": "pet", "training": {
            "batch_size": cfg.batch_size, "num_epochs": cfg.num_epochs, "num_workers": 0,
            "learning_rate": cfg.learning_rate,
            "finetune": {"method": "heads", "read_from": str(base),
                         "config": {"head_modules": list(cfg.head_modules),
                                    "last_layer_modules": list(cfg.last_layer_modules)},
                         "inherit_heads": {variant: "energy"}}}},
        "training_set": {"systems": {"read_from": "train.xyz", "length_unit": "angstrom"},
                         "targets": targets(variant, description)},
        "validation_set": {"systems": {"read_from": "val.xyz", "length_unit": "angstrom"},
                           "targets": targets(variant, description)},
        "test_set": 0.0,
    }
    return run_mtt(workdir, options)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(HERE.parent / "tests" / "data" / "emt-pet-base.ckpt"),
                        help="base PET checkpoint (default: the tests' EMT base)")
    parser.add_argument("--train-base", action="store_true",
                        help="train a base with scripts/train_emt_base.py instead (--base-epochs)")
    parser.add_argument("--base-epochs", type=int, default=60)
    parser.add_argument("--replay", type=int, default=48, help="replayed EMT frames")
    parser.add_argument("--labels", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    args = parser.parse_args()

    import torch
    from test_finetune import ReparamEMT, level_frames
    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune
    from ase_petft.finetune.prepare import split_indices
    import numpy as np

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench-finetune-"))
    base = train_base(out / "base", args.base_epochs) if args.train_base else pathlib.Path(args.base)

    labels = level_frames(args.labels, seed=3, calc=ReparamEMT)
    test_new = level_frames(12, seed=50, calc=ReparamEMT)
    test_old = level_frames(12, seed=50)
    replay = level_frames(args.replay, seed=7)
    sgd = dict(num_epochs=args.epochs, learning_rate=1e-3, batch_size=4, seed=0)
    runs = {
        "heads linear (rot 0)": FineTuneConfig(method="heads", solver="linear", rotations=0),
        "heads linear (rot 1)": FineTuneConfig(method="heads", solver="linear", rotations=1),
        "heads sgd": FineTuneConfig(method="heads", solver="sgd", **sgd),
        "heads sgd, mtt baseline": FineTuneConfig(method="heads", solver="sgd", **sgd,
                                                  new_variant_baseline="metatrain"),
        "full sgd": FineTuneConfig(method="full", **sgd),
        "lora sgd": FineTuneConfig(method="lora", **sgd),
        "full sgd + replay": FineTuneConfig(method="full", **sgd),
    }
    rows = [("zero-shot (energy head)", None, errors(base, test_new, "energy"),
             errors(base, test_old, "energy"))]
    for name, cfg in runs.items():
        kwargs = {"replay": {"energy": replay}} if "replay" in name else {}
        start = time.perf_counter()
        result = finetune(base, labels, variant=NEW, config=cfg,
                          output_dir=out / name.replace(" ", "_"), **kwargs)
        wall = time.perf_counter() - start
        old = errors(result.checkpoint_path, test_old, "energy") if "replay" in name or \
            "heads" in name else {}
        rows.append((name, wall, errors(result.checkpoint_path, test_new, NEW), old))
        print(f"{name}: {wall:.1f} s", flush=True)

    cfg = runs["heads sgd"]
    # the split our engine makes for the first (only) variant of the run
    train_idx, val_idx = split_indices(len(labels), cfg.validation_fraction,
                                       np.random.default_rng(cfg.seed))
    train_frames, val_frames = [labels[i] for i in train_idx], [labels[i] for i in val_idx]
    wall = mtt_heads(out / "mtt_heads", base, train_frames, val_frames, cfg)
    rows.append(("mtt train heads (subprocess)", wall,
                 errors(out / "mtt_heads" / "model.ckpt", test_new, NEW), {}))
    print_table(rows, mtt_wall=wall, n=len(labels))


def print_table(rows, *, mtt_wall: float, n: int) -> None:
    print(f"\nheld-out: 12 structures (32 atoms) per level; {n} labels of the new level")
    head = (f"{'run':30s} {'wall s':>7s} {'x mtt':>6s} {'E meV/at':>9s} {'F meV/A':>8s} "
            f"{'S meV/A3':>9s} {'old F meV/A':>11s}")
    print(head)
    print("-" * len(head))
    for name, wall, new, old in rows:
        speed = "" if wall is None else f"{mtt_wall / wall:6.1f}"
        wall_s = "" if wall is None else f"{wall:7.1f}"
        print(f"{name:30s} {wall_s:>7s} {speed:>6s} {new['energy_mae_meV_per_atom']:9.2f} "
              f"{new['forces_mae_meV_per_A']:8.1f} {new.get('stress_mae_meV_per_A3', float('nan')):9.2f} "
              f"{old.get('forces_mae_meV_per_A', float('nan')):11.1f}")


if __name__ == "__main__":
    main()
