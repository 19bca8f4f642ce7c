"""The main job, ``petft demo``: learn a new level of theory during a running MD.

The shipped demo PET (pretrained on GFN1-xTB) drives a Langevin MD of a molecule that
is not in its training set, through a *new* variant ``energy/gfn2`` that starts as a
copy of the GFN1 head. A few MD frames are labelled with GFN2-xTB (tblite), the new head
is fine-tuned in-process and hot-swapped into the running calculator, and the MD goes
on. Errors against GFN2-xTB are measured on held-out frames taken from the MD *after*
the swap (frames no model was trained on).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from .errors import PetftError

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "DemoReport", "run_demo", "demo_molecule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Knobs of the demo (defaults: under 3 minutes on 2 CPU cores)."""

    steps_before: int = 200
    steps_after: int = 200
    n_labels: int = 10
    n_holdout: int = 10
    temperature_K: float = 400.0
    timestep_fs: float = 0.5
    method: str = "heads"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps_before", "steps_after", "n_labels", "n_holdout"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer")
        if self.n_labels > self.steps_before or self.n_holdout > self.steps_after:
            raise ValueError("cannot take more frames than MD steps")


@dataclasses.dataclass(frozen=True)
class DemoReport:
    molecule: str
    n_atoms: int
    n_labels: int
    n_holdout: int
    rows: List[Dict[str, float]]
    refit_time_s: float
    md_steps: int
    generation: int
    wall_time_s: float
    workdir: str


def demo_molecule() -> str:
    """The held-out molecule named in the demo model's card."""
    card = pathlib.Path(__file__).parent / "data" / "demo_card.json"
    return json.loads(card.read_text())["demo_molecule"]


def _xtb(method: str):
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise PetftError(
            "the demo needs tblite (GFN-xTB): pip install 'ase-petft[demo]'"
        ) from exc
    return TBLite(method=method, verbosity=0)


def _md(atoms, settings: DemoSettings, seed: int):
    from ase import units
    from ase.md.langevin import Langevin

    return Langevin(
        atoms, settings.timestep_fs * units.fs, temperature_K=settings.temperature_K,
        friction=0.02, rng=np.random.default_rng(seed), fixcm=False,
    )


def _run_and_snapshot(dyn, atoms, n_steps: int, n_frames: int, tick) -> list:
    every = max(1, n_steps // n_frames)
    frames = []

    def snapshot():
        if len(frames) < n_frames and dyn.nsteps % every == every - 1:
            frames.append(atoms.copy())

    dyn.attach(snapshot, interval=1)
    dyn.attach(tick, interval=1)
    dyn.run(n_steps)
    dyn.observers.clear()
    return frames


def _errors(frames, calc) -> Dict[str, float]:
    e_err, f_err = [], []
    for ref in frames:
        probe = ref.copy()
        probe.calc = calc
        e_err.append((probe.get_potential_energy() - ref.get_potential_energy()) / len(ref))
        f_err.append(np.abs(probe.get_forces() - ref.get_forces()).ravel())
    return {
        "energy_mae_meV_per_atom": 1e3 * float(np.mean(np.abs(e_err))),
        "forces_mae_meV_per_A": 1e3 * float(np.mean(np.concatenate(f_err))),
    }


def run_demo(
    settings: DemoSettings = DemoSettings(),
    *,
    workdir: pathlib.Path,
    progress: Optional[Callable[[int], None]] = None,
) -> DemoReport:
    """Run the demo; ``progress(n)`` is called after every MD step."""
    from ase.build import molecule

    from .calculator import FineTunableCalculator
    from .config import FineTuneConfig
    from .data import demo_checkpoint
    from .labelling import label

    start = time.perf_counter()
    tick = (lambda: progress(1)) if progress else (lambda: None)
    gfn1, gfn2 = _xtb("GFN1-xTB"), _xtb("GFN2-xTB")
    name = demo_molecule()
    atoms = molecule(name)
    calc = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2", workdir=workdir)
    atoms.calc = calc
    from ase.md.velocitydistribution import Stationary

    dyn = _md(atoms, settings, settings.seed)
    train = _run_and_snapshot(dyn, atoms, settings.steps_before, settings.n_labels, tick)
    labelled = [label(frame, gfn2) for frame in train]
    t0 = time.perf_counter()
    result = calc.finetune(labelled, FineTuneConfig(method=settings.method, seed=settings.seed))
    refit_time = time.perf_counter() - t0
    logger.info("fine-tuned on %d GFN2 labels in %.1f s", len(labelled), refit_time)
    Stationary(atoms)
    holdout = _run_and_snapshot(dyn, atoms, settings.steps_after, settings.n_holdout, tick)
    holdout = [label(frame, gfn2) for frame in holdout]

    pretrained = FineTunableCalculator(demo_checkpoint(), variant="energy")
    rows = [
        {"model": "GFN1-xTB itself (level-of-theory gap)", **_errors(holdout, gfn1)},
        {"model": "PET 'energy' head (pretrained on GFN1)", **_errors(holdout, pretrained)},
        {"model": "PET 'energy/gfn2' generation 0 (zero-shot copy)",
         **_errors(holdout, FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2"))},
        {"model": f"PET 'energy/gfn2' generation {calc.generation} "
                  f"({settings.method}, {len(labelled)} labels)", **_errors(holdout, calc)},
    ]
    return DemoReport(
        molecule=name, n_atoms=len(atoms), n_labels=len(labelled), n_holdout=len(holdout),
        rows=rows, refit_time_s=refit_time, md_steps=settings.steps_before + settings.steps_after,
        generation=calc.generation, wall_time_s=time.perf_counter() - start,
        workdir=str(workdir),
    )
