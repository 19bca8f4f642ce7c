"""Slow accuracy checks of the fine-tuning engine on a two-level toy (issue #4).

A base PET (d_pet 32, ~100 k parameters) is trained ~60-90 s by ``mtt train`` on EMT;
the new level is ``ReparamEMT``. Run with ``pytest -m slow tests/test_finetune_slow.py``.
The numbers are printed (``-s``) and reported in the issue; thresholds are set from
what a base model trained this briefly can reach (its own force error on EMT is
~220 meV/Å, which bounds every refit from below).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from test_finetune import NEW, ReparamEMT, force_mae, level_frames

pytestmark = pytest.mark.slow

BASE_HYPERS = {"cutoff": 4.0, "d_pet": 32, "d_head": 32, "d_node": 64, "d_feedforward": 64,
               "num_heads": 2, "num_attention_layers": 1, "num_gnn_layers": 2}


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory):
    import ase.io

    work = tmp_path_factory.mktemp("base")
    ase.io.write(work / "train.xyz", level_frames(48, seed=1), format="extxyz")
    target = {"energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"},
                         "stress": {"key": "stress"},
                         "description": "EMT total energy (ase.calculators.emt)"}}
    options = {"seed": 0, "architecture": {"name": "pet", "model": BASE_HYPERS, "training": {
        "batch_size": 8, "num_epochs": 40, "num_workers": 0, "learning_rate": 6e-3,
        "warmup_fraction": 0.05}},
        "training_set": {"systems": {"read_from": "train.xyz", "length_unit": "angstrom"},
                         "targets": target}, "validation_set": 0.1, "test_set": 0.0}
    (work / "options.yaml").write_text(json.dumps(options))
    proc = subprocess.run([sys.executable, "-m", "metatrain", "train", "options.yaml"],
                          cwd=work, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / "model.ckpt"


def test_two_level_heads_and_full_reduce_new_level_error(base_checkpoint, tmp_path):
    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune

    train = level_frames(24, seed=3, calc=ReparamEMT)
    test = level_frames(12, seed=50, calc=ReparamEMT)
    zero = force_mae(base_checkpoint, test, "energy")
    found = {"zero-shot": zero}
    for name, config in {
        "heads": FineTuneConfig(method="heads", rotations=0),
        "full": FineTuneConfig(method="full", num_epochs=40),
    }.items():
        result = finetune(base_checkpoint, train, variant=NEW, config=config,
                          output_dir=tmp_path / name)
        found[name] = force_mae(result.checkpoint_path, test, NEW)
    print("held-out force MAE (meV/A):", found,
          {k: f"{1 - v / zero:.0%} drop" for k, v in found.items()})
    assert found["heads"] < 0.85 * zero
    assert found["full"] < zero


def test_full_with_replay_keeps_old_level(base_checkpoint, tmp_path):
    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune

    test_old = level_frames(12, seed=50)
    before = force_mae(base_checkpoint, test_old, "energy")
    result = finetune(base_checkpoint, level_frames(24, seed=3, calc=ReparamEMT),
                      variant=NEW, config=FineTuneConfig(method="full", num_epochs=40),
                      output_dir=tmp_path / "gen",
                      replay={"energy": level_frames(24, seed=7)})
    after = force_mae(result.checkpoint_path, test_old, "energy")
    print(f"old level force MAE {before:.1f} -> {after:.1f} meV/A with replay")
    assert after < 1.10 * before
