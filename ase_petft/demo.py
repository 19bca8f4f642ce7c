"""The main job, ``petft demo``: a running MD learns a new level of theory.

The shipped demo PET (pretrained on GFN1-xTB) drives a Langevin MD of a molecule that
is not in its training set, through a *new* variant ``energy/gfn2`` that starts as a
copy of the GFN1 head. An :class:`~ase_petft.learner.OnTheFlyLearner` labels the
structures the model is unsure about with GFN2-xTB (tblite) — plus one every
``max_gap`` steps — into an HDF5 buffer, refits the head in a background thread and
hot-swaps each accepted generation into the running calculator. Along the run, the
current model is scored against GFN2-xTB on held-out frames from an independent MD
that no model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from typing import Callable, Dict, List, Optional

import numpy as np

from .errors import ConfigError, InputError, WorkFailedError
from .metrics import calculator_errors, errors_against
from .validation import positive_int

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "DemoReport", "run_demo", "demo_molecule"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Knobs of the demo (defaults: under 2 minutes on 2 CPU cores)."""

    # 1 ps: 24 labels at least 60 steps (30 fs) apart spread over most of it, so the
    # background refits land during the run (600 steps with labels 20 apart used only
    # the first 4 labels before the run ended: 0.58-0.75x zero-shot over 3 seeds)
    steps: int = 2000
    checkpoints: int = 6
    threshold_eV_per_atom: float = 0.01
    min_gap: int = 60
    max_gap: int = 200
    refit_every: int = 4
    max_labels: int = 24
    n_holdout: int = 12
    temperature_K: float = 400.0
    timestep_fs: float = 0.5
    # heads (closed form): on the demo molecule 0.32-0.41 of zero-shot over 3 seeds with
    # 14-16 calls (full: 0.43-0.49, 19-24 calls), seconds per refit instead of tens
    # (BENCHMARKS.md: petft demo, bench_robust.py)
    method: str = "heads"
    background: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoints", "min_gap", "max_gap", "refit_every", "max_labels",
                     "n_holdout"):
            positive_int(f"demo setting {name}", getattr(self, name))
        if self.checkpoints > self.steps:
            raise ConfigError("demo: more error checkpoints than MD steps")


@dataclasses.dataclass(frozen=True)
class DemoReport:
    molecule: str
    n_atoms: int
    rows: List[Dict[str, float]]       # error versus simulation time
    baselines: List[Dict[str, float]]  # GFN1-xTB itself, zero-shot head
    oracle_calls: int
    n_labels: int
    generation: int
    refit_times_s: List[float]
    md_ms_per_step: float
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
        raise InputError(
            "the demo needs tblite (GFN-xTB): pip install 'ase-petft[demo]'"
        ) from exc
    return TBLite(method=method, verbosity=0)


def _langevin(atoms, settings: DemoSettings, seed: int):
    from ase import units
    from ase.md.langevin import Langevin

    return Langevin(
        atoms, settings.timestep_fs * units.fs, temperature_K=settings.temperature_K,
        friction=0.02, rng=np.random.default_rng(seed), fixcm=False,
    )


def _holdout_frames(name: str, settings: DemoSettings, gfn2, gfn1) -> tuple:
    """Frames of an independent MD (GFN1 demo head, another seed), labelled with GFN2
    (the held-out set) and GFN1 (to show the level-of-theory gap). Frames on which
    either reference fails (SCF not converged) are skipped."""
    from ase.build import molecule

    from .calculator import FineTunableCalculator
    from .data import demo_checkpoint
    from .errors import LabellingError
    from .labelling import label

    atoms = _start(molecule(name), settings, settings.seed + 1000)
    atoms.calc = FineTunableCalculator(demo_checkpoint())
    dyn = _langevin(atoms, settings, settings.seed + 1000)
    frames_gfn2, frames_gfn1 = [], []
    for _ in range(4 * settings.n_holdout):
        dyn.run(25)
        try:
            pair = label(atoms, gfn2), label(atoms, gfn1)
        except LabellingError as exc:
            logger.info("held-out frame skipped: %s", exc)
            continue
        frames_gfn2.append(pair[0])
        frames_gfn1.append(pair[1])
        if len(frames_gfn2) == settings.n_holdout:
            break
    return frames_gfn2, frames_gfn1


def _start(atoms, settings: DemoSettings, seed: int):
    """Velocities drawn at the MD temperature (no slow heating from 0 K)."""
    from ase.md import velocitydistribution as vd

    thermalize = getattr(vd, "thermalize_momenta", None) or vd.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=settings.temperature_K, rng=np.random.default_rng(seed))
    vd.Stationary(atoms)
    vd.ZeroRotation(atoms)
    return atoms


def run_demo(
    settings: DemoSettings = DemoSettings(),
    *,
    workdir: pathlib.Path,
    progress: Optional[Callable[[int], None]] = None,
) -> DemoReport:
    """Run the demo in ``workdir``; ``progress(n)`` is called after every MD step."""
    from ase.build import molecule

    from .buffer import LabelBuffer
    from .calculator import FineTunableCalculator
    from .config import FineTuneConfig
    from .data import demo_checkpoint
    from .learner import OnTheFlyLearner, max_gap, min_gap, uncertainty_above

    start = time.perf_counter()
    workdir = pathlib.Path(workdir)
    gfn1, gfn2 = _xtb("GFN1-xTB"), _xtb("GFN2-xTB")
    name = demo_molecule()
    holdout, holdout_gfn1 = _holdout_frames(name, settings, gfn2, gfn1)
    if not holdout:
        raise WorkFailedError("no held-out frame could be labelled with GFN2-xTB")
    baselines = [
        {"model": "GFN1-xTB itself (the level-of-theory gap)",
         **errors_against(holdout_gfn1, holdout)},
        {"model": "zero-shot 'energy/gfn2' (= pretrained GFN1 head)",
         **calculator_errors(holdout, FineTunableCalculator(demo_checkpoint()))},
    ]
    atoms = _start(molecule(name), settings, settings.seed)
    calc = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2")
    atoms.calc = calc
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer:
        learner = OnTheFlyLearner(
            calc, gfn2, buffer, workdir=workdir / "learner",
            select=(uncertainty_above(settings.threshold_eV_per_atom) & min_gap(settings.min_gap))
            | max_gap(settings.max_gap),
            refit_every=settings.refit_every, max_labels=settings.max_labels,
            config=FineTuneConfig(method=settings.method, seed=settings.seed),
            background=settings.background, holdout_fraction=0.2,
        )
        dyn = _langevin(atoms, settings, settings.seed)
        learner.attach(dyn)  # records dyn.nsteps; the watchdog can restore the atoms
        if progress is not None:
            dyn.attach(lambda: progress(1), interval=1)
        rows, md_time = _run_with_checkpoints(dyn, calc, learner, holdout, settings)
        learner.close()
        n_labels = len(buffer)
    refits = [r["refit_wall_time_s"] for r in learner.history
              if r["event"] in ("swap", "refit_rejected") and r.get("refit_wall_time_s")]
    return DemoReport(
        molecule=name, n_atoms=len(atoms), rows=rows, baselines=baselines,
        oracle_calls=learner.reference_calls, n_labels=n_labels,
        generation=calc.generation, refit_times_s=refits,
        md_ms_per_step=1e3 * md_time / settings.steps,
        wall_time_s=time.perf_counter() - start, workdir=str(workdir),
    )


def _run_with_checkpoints(dyn, calc, learner, holdout, settings: DemoSettings):
    rows, md_time = [], 0.0
    chunk = settings.steps // settings.checkpoints
    for index in range(settings.checkpoints):
        steps = chunk if index < settings.checkpoints - 1 else settings.steps - chunk * index
        t0 = time.perf_counter()
        dyn.run(steps)
        md_time += time.perf_counter() - t0
        if index == settings.checkpoints - 1:
            learner.flush()  # a last refit on every label, landed before the final score
        rows.append({
            "time_ps": dyn.nsteps * settings.timestep_fs / 1000.0,
            "oracle_calls": learner.reference_calls,
            "generation": calc.generation,
            **calculator_errors(holdout, calc),
        })
    return rows, md_time

