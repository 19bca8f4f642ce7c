"""Shared fixtures: tiny real PET models trained by metatrain's own CLI on EMT labels."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import json

import numpy as np
import pytest

# one torch/OpenMP thread per test process: 2-core machines, see DESIGN.md (thread trap)
os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY_HYPERS = {
    "cutoff": 4.0,
    "d_pet": 8,
    "d_head": 8,
    "d_node": 8,
    "d_feedforward": 8,
    "num_heads": 1,
    "num_attention_layers": 1,
    "num_gnn_layers": 1,
}


def emt_frames(n, *, seed, size=2, rattle=0.08, elements=("Cu", "Ni")):
    """Labelled periodic CuNi fcc cells (energy, forces, stress) from EMT."""
    from ase.build import bulk
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((size, size, size))
        atoms.symbols = rng.choice(list(elements), size=len(atoms))
        atoms.set_cell(atoms.cell * rng.uniform(0.97, 1.03), scale_atoms=True)
        atoms.positions += rng.normal(scale=rattle, size=atoms.positions.shape)
        atoms.calc = EMT()
        results = {
            "energy": atoms.get_potential_energy(),
            "forces": atoms.get_forces(),
            "stress": atoms.get_stress(),
        }
        atoms.calc = SinglePointCalculator(atoms, **results)
        frames.append(atoms)
    return frames


def mtt_train(workdir: pathlib.Path, frames, *, epochs=2, hypers=None, seed=0,
              description="EMT total energy (ase.calculators.emt)"):
    """Train a PET with metatrain's CLI (`mtt train`) and return the checkpoint path."""
    import ase.io

    workdir.mkdir(parents=True, exist_ok=True)
    ase.io.write(workdir / "train.xyz", frames, format="extxyz")
    options = {
        "seed": seed,
        "architecture": {
            "name": "pet",
            "model": dict(hypers or TINY_HYPERS),
            "training": {"batch_size": 4, "num_epochs": epochs, "num_workers": 0},
        },
        "training_set": {
            "systems": {"read_from": "train.xyz", "length_unit": "angstrom"},
            "targets": {
                "energy": {
                    "key": "energy",
                    "unit": "eV",
                    "description": description,
                    "forces": {"key": "forces"},
                    "stress": {"key": "stress"},
                }
            },
        },
        "validation_set": 0.25,
        "test_set": 0.0,
    }
    # JSON is valid YAML
    (workdir / "options.yaml").write_text(json.dumps(options, indent=2))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "metatrain", "train", "options.yaml", "-o", "model.pt"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"mtt train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return workdir / "model.ckpt"


@pytest.fixture(scope="session")
def emt_checkpoint(tmp_path_factory):
    """A tiny float32 PET for Cu/Ni trained 2 epochs on EMT by `mtt train`."""
    work = tmp_path_factory.mktemp("emt_model")
    return mtt_train(work, emt_frames(12, seed=1), epochs=2)


@pytest.fixture
def cuni_atoms():
    return emt_frames(1, seed=123)[0]


# calculators whose results are model predictions: buffers and label() must refuse them
from ase.calculators.calculator import Calculator  # noqa: E402

class ModelLike(Calculator):
    implemented_properties = ["energy", "forces"]
    _ase_petft_model_prediction = True


class MetatomicLike(Calculator):
    implemented_properties = ["energy", "forces"]


MetatomicLike.__module__ = "metatomic.torch.ase_calculator"


def without_known_noise(filters):
    """``warnings.filters`` less the targeted filters ase_petft installs once for the
    known noise of its dependencies (``_metatrain._state.KNOWN_NOISE``)."""
    from ase_petft._metatrain._state import KNOWN_NOISE

    ours = {(message, category) for message, category in KNOWN_NOISE}
    return [f for f in filters
            if not (f[0] == "ignore" and f[1] is not None and (f[1].pattern, f[2]) in ours)]


def perturbed_checkpoint(src: pathlib.Path, dest: pathlib.Path, *, seed: int,
                         scale: float = 0.05, only: str = "") -> pathlib.Path:
    """Same architecture, different weights (a stand-in for a refit generation)."""
    import torch

    from ase_petft import _metatrain

    model = _metatrain.load_model(src)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if only in name:
                param.add_(scale * torch.randn(param.shape, generator=gen, dtype=param.dtype))
    return _metatrain.save_checkpoint(model, dest)


def assert_filters_only_gained_targeted_ignores(before, after):
    """Nothing of the host's warning filters was removed or reordered, and everything
    added is a targeted ``ignore`` of one message (ours for known noise, or the ones
    metatrain itself adds while evaluating models): never a blanket filter."""
    kept = [f for f in after if f in before]
    assert kept == list(before)
    added = [f for f in after if f not in before]
    assert all(f[0] == "ignore" and f[1] is not None for f in added), added
