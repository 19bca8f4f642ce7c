#!/usr/bin/env python
"""Train the small EMT base PET shipped as ``tests/data/emt-pet-base.ckpt``.

The two-level fine-tuning checks of issue #4 (``tests/test_finetune_slow.py`` and
``benchmarks/bench_finetune.py``) refit a new variant (a re-parameterised EMT) on top
of a PET trained on EMT. A heads-only refit can never beat the base model's own error,
so the base must be well trained on its level: a model trained for a minute inside the
test (the first version) had ~205 meV/Å on EMT and bounded every refit. This script
trains the base once with ``mtt train`` (about 15 minutes on one CPU core) and writes
the checkpoint and a JSON card with its held-out errors next to it.

    OMP_NUM_THREADS=1 python scripts/train_emt_base.py [--frames 320] [--epochs 60]

Data: rattled, strained, randomly ordered CuNi fcc cells (32 atoms) labelled by ASE's
EMT (energy, forces, stress), seeded; the held-out check uses frames of another seed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT_DIR = REPO / "tests" / "data"
CHECKPOINT_NAME = "emt-pet-base.ckpt"
HYPERS = {"cutoff": 4.0, "d_pet": 32, "d_head": 32, "d_node": 64, "d_feedforward": 64,
          "num_heads": 2, "num_attention_layers": 1, "num_gnn_layers": 2}
SEED = 20261124


def training_frames(n: int, seed: int):
    """CuNi cells at several rattle amplitudes (0.02-0.12 Å), so the base sees both
    near-equilibrium and strongly distorted environments."""
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import emt_frames

    amplitudes = (0.02, 0.05, 0.08, 0.12)
    per = -(-n // len(amplitudes))
    frames = []
    for k, rattle in enumerate(amplitudes):
        frames += emt_frames(per, seed=seed + k, rattle=rattle)
    return frames[:n]


def targets(name: str, description: str) -> dict:
    """metatrain ``targets`` entry for an energy with forces and stress in extxyz."""
    return {name: {"key": "energy", "unit": "eV", "description": description,
                   "forces": {"key": "forces"}, "stress": {"key": "stress"}}}


def run_mtt(work: pathlib.Path, options: dict) -> float:
    """``mtt train`` on ``options`` in ``work``; returns the wall time in seconds."""
    (work / "options.yaml").write_text(json.dumps(options, indent=1))  # JSON is YAML
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "metatrain", "train", "options.yaml",
                           "-o", "model.pt"], cwd=work, env=env, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"mtt train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def train(work: pathlib.Path, frames, epochs: int) -> pathlib.Path:
    import ase.io

    work.mkdir(parents=True, exist_ok=True)
    ase.io.write(work / "train.xyz", frames, format="extxyz")
    options = {
        "seed": 0,
        "architecture": {"name": "pet", "model": HYPERS, "training": {
            "batch_size": 8, "num_epochs": epochs, "num_workers": 0, "learning_rate": 3e-3,
            "warmup_fraction": 0.02, "best_model_metric": "loss"}},
        "training_set": {"systems": {"read_from": "train.xyz", "length_unit": "angstrom"},
                         "targets": targets("energy", "EMT total energy (ase.calculators.emt)")},
        "validation_set": 0.1, "test_set": 0.0,
    }
    run_mtt(work, options)
    return work / "model.ckpt"


def errors(checkpoint, frames, variant: str) -> dict:
    """Energy/force/stress errors of ``variant`` of ``checkpoint`` on labelled frames."""
    sys.path.insert(0, str(REPO))
    from ase_petft.learner.gate import evaluate_generation

    return evaluate_generation(checkpoint, frames, variant)[0]


def held_out_errors(checkpoint: pathlib.Path) -> dict:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import emt_frames

    out = {}
    for rattle in (0.05, 0.08):
        metrics = errors(checkpoint, emt_frames(12, seed=50, rattle=rattle), "energy")
        out[f"rattle {rattle}"] = {k: round(float(v), 2) for k, v in metrics.items()}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=320)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", default=str(OUT_DIR), help="where to write the checkpoint")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="emt-base-") as tmp:
        checkpoint = train(pathlib.Path(tmp), training_frames(args.frames, SEED), args.epochs)
        shutil.copyfile(checkpoint, out / CHECKPOINT_NAME)
    wall = time.perf_counter() - start
    card = {"checkpoint": CHECKPOINT_NAME, "hypers": HYPERS, "frames": args.frames,
            "epochs": args.epochs, "training_wall_s": round(wall),
            "held_out_vs_emt": held_out_errors(out / CHECKPOINT_NAME),
            "units": {"energy": "meV/atom", "forces": "meV/Å", "stress": "meV/Å³"}}
    (out / "emt-pet-base.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card, indent=1))


if __name__ == "__main__":
    main()
