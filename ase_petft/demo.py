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

from .errors import PetftError

logger = logging.getLogger(__name__)

__all__ = ["DemoSettings", "DemoReport", "run_demo", "demo_molecule", "prediction_errors"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class DemoSettings:
    """Knobs of the demo (defaults: well under 3 minutes on 2 CPU cores)."""

    steps: int = 600
    checkpoints: int = 6
    threshold_eV_per_atom: float = 0.01
    min_gap: int = 20
    max_gap: int = 200
    refit_every: int = 4
    max_labels: int = 24
    n_holdout: int = 12
    temperature_K: float = 400.0
    timestep_fs: float = 0.5
    method: str = "heads"
    background: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoints", "min_gap", "max_gap", "refit_every", "max_labels",
                     "n_holdout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PetftError(f"demo setting {name} must be a positive integer, "
                                 f"got {value!r}")
        if self.checkpoints > self.steps:
            raise PetftError("demo: more error checkpoints than MD steps")


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
        raise PetftError(
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


def _label_errors(frames, references) -> Dict[str, float]:
    """Errors of labelled ``frames`` (their own results) against ``references``."""
    e_err = [(a.get_potential_energy() - b.get_potential_energy()) / len(a)
             for a, b in zip(frames, references)]
    f_err = [np.abs(a.get_forces() - b.get_forces()).ravel()
             for a, b in zip(frames, references)]
    return {
        "energy_mae_meV_per_atom": 1e3 * float(np.mean(np.abs(e_err))),
        "forces_mae_meV_per_A": 1e3 * float(np.mean(np.concatenate(f_err))),
    }


def prediction_errors(frames, calc) -> Dict[str, float]:
    """Energy (meV/atom) and force (meV/Å) MAE of ``calc`` against labelled frames."""
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
        raise PetftError("no held-out frame could be labelled with GFN2-xTB")
    baselines = [
        {"model": "GFN1-xTB itself (the level-of-theory gap)",
         **_label_errors(holdout_gfn1, holdout)},
        {"model": "zero-shot 'energy/gfn2' (= pretrained GFN1 head)",
         **prediction_errors(holdout, FineTunableCalculator(demo_checkpoint()))},
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
        dyn.attach(learner, interval=1)
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
            learner.wait()  # the last refit lands before the final score
        rows.append({
            "time_ps": dyn.nsteps * settings.timestep_fs / 1000.0,
            "oracle_calls": learner.reference_calls,
            "generation": calc.generation,
            **prediction_errors(holdout, calc),
        })
    return rows, md_time


# ---------------------------------------------------------------------- command line
def add_arguments(parser) -> None:
    """Options of ``petft demo``."""
    defaults = DemoSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="MD steps")
    parser.add_argument("--threshold", type=float, default=defaults.threshold_eV_per_atom,
                        help="label when the energy uncertainty exceeds this (eV/atom)")
    parser.add_argument("--min-gap", type=int, default=defaults.min_gap,
                        help="never label two structures closer than this many steps")
    parser.add_argument("--max-gap", type=int, default=defaults.max_gap,
                        help="label at least every this many steps")
    parser.add_argument("--max-labels", type=int, default=defaults.max_labels,
                        help="budget of GFN2-xTB calls")
    parser.add_argument("--refit-every", type=int, default=defaults.refit_every)
    parser.add_argument("--method", choices=["heads", "full", "lora"], default="heads")
    parser.add_argument("--inline", action="store_true",
                        help="refit inline instead of in a background thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None,
                        help="where the buffer and generations go (default: a new temp dir)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def settings_from_args(args) -> DemoSettings:
    return DemoSettings(
        steps=args.steps, threshold_eV_per_atom=args.threshold, min_gap=args.min_gap,
        max_gap=args.max_gap,
        max_labels=args.max_labels, refit_every=args.refit_every, method=args.method,
        background=not args.inline, seed=args.seed,
        checkpoints=min(DemoSettings().checkpoints, args.steps),
    )


def format_report(report: DemoReport, settings: DemoSettings) -> str:
    lines = [
        f"Molecule {report.molecule} ({report.n_atoms} atoms, not in the demo model's "
        f"training set), Langevin {settings.temperature_K:.0f} K, "
        f"{settings.timestep_fs} fs steps, MD {report.md_ms_per_step:.1f} ms/step.",
        f"GFN2-xTB oracle calls: {report.oracle_calls} (labels in buffer: "
        f"{report.n_labels}); generation {report.generation}; refits "
        + ", ".join(f"{t:.1f}" for t in report.refit_times_s) + " s.",
        "",
        "Errors against GFN2-xTB on held-out frames (independent MD):",
        "",
        f"  {'reference point':<48}  E MAE meV/atom  F MAE meV/Å",
    ]
    for row in report.baselines:
        lines.append(f"  {row['model']:<48}  {row['energy_mae_meV_per_atom']:14.1f}"
                     f"  {row['forces_mae_meV_per_A']:11.1f}")
    lines += ["", f"  {'time ps':>7}  {'oracle calls':>12}  {'generation':>10}"
                  f"  E MAE meV/atom  F MAE meV/Å"]
    for row in report.rows:
        lines.append(f"  {row['time_ps']:7.3f}  {row['oracle_calls']:12d}"
                     f"  {row['generation']:10d}  {row['energy_mae_meV_per_atom']:14.1f}"
                     f"  {row['forces_mae_meV_per_A']:11.1f}")
    lines += ["", f"Total {report.wall_time_s:.0f} s; buffer and generations in "
                  f"{report.workdir}"]
    return "\n".join(lines)
