"""Uncertainty-triggered labelling against labelling every 10 steps, same MD, same seed.

The demo scenario (demo PET pretrained on GFN1-xTB, new head ``energy/gfn2``, GFN2-xTB
oracle, Langevin MD of the held-out demo molecule) run twice with inline refits
(reproducible), once per selection policy; the final model of each run is scored on
GFN2-labelled frames of an independent MD. A third run with background refits counts
the MD steps taken while a refit was running and their step time.

    python benchmarks/bench_learner.py [--steps 1000] [--threshold 0.01]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile
import time

import numpy as np


def _run(policy, settings, holdout, workdir: pathlib.Path, *, background: bool,
         refit_every: int, max_labels=None):
    from ase.build import molecule

    from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer
    from ase_petft.demo import _langevin, _start, _xtb, demo_molecule
    from ase_petft.learner import OnTheFlyLearner
    from ase_petft.data import demo_checkpoint

    atoms = _start(molecule(demo_molecule()), settings, settings.seed)
    calc = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2")
    atoms.calc = calc
    step_times, during = [], []
    with LabelBuffer(workdir / "labels.h5", mode="w-") as buffer:
        learner = OnTheFlyLearner(
            calc, _xtb("GFN2-xTB"), buffer, select=policy, refit_every=refit_every,
            background=background, holdout_fraction=0.2, workdir=workdir / "learner",
            config=FineTuneConfig(method="heads", seed=0), max_labels=max_labels,
        )
        dyn = _langevin(atoms, settings, settings.seed)
        learner.attach(dyn)  # records dyn.nsteps; the watchdog can restore the atoms
        last = [time.perf_counter()]

        def clock():
            now = time.perf_counter()
            step_times.append(now - last[0])
            during.append(learner.refit_in_progress)
            last[0] = now

        dyn.attach(clock, interval=1)
        start = time.perf_counter()
        dyn.run(settings.steps)
        learner.close()
        wall = time.perf_counter() - start
    from ase_petft.metrics import calculator_errors

    errors = calculator_errors(holdout, calc)
    times = np.array(step_times[1:])
    flags = np.array(during[1:], dtype=bool)
    return {
        "oracle_calls": learner.reference_calls, "generation": calc.generation,
        "wall_s": wall, **errors,
        "steps_during_refit": int(flags.sum()),
        "ms_per_step_refit": 1e3 * float(np.median(times[flags])) if flags.any() else None,
        "ms_per_step_idle": 1e3 * float(np.median(times[~flags])) if (~flags).any() else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threshold", type=float, default=0.01, help="eV/atom")
    parser.add_argument("--max-gap", type=int, default=400)
    parser.add_argument("--min-gap", type=int, default=20)
    parser.add_argument("--budget", type=float, default=0.2,
                        help="label budget of the uncertainty run, as a fraction of "
                        "the every(10) run's labels")
    parser.add_argument("--quick", action="store_true", help="300 steps")
    args = parser.parse_args()
    from ase_petft.demo import DemoSettings, _holdout_frames, _xtb, demo_molecule
    from ase_petft.learner import every, max_gap, min_gap, uncertainty_above

    steps = 300 if args.quick else args.steps
    settings = DemoSettings(steps=steps, checkpoints=1, n_holdout=12)
    holdout, _ = _holdout_frames(demo_molecule(), settings, _xtb("GFN2-xTB"),
                                 _xtb("GFN1-xTB"))
    budget = max(2, int(args.budget * steps / 10))
    uncertain = (f"(uncertainty_above({args.threshold}) & min_gap({args.min_gap})) "
                 f"| max_gap({args.max_gap}), max_labels={budget}")
    policies = {
        "every(10)": (every(10), 10, False, None),
        uncertain: ((uncertainty_above(args.threshold) & min_gap(args.min_gap))
                    | max_gap(args.max_gap), 3, False, budget),
        "every(10), background refits": (every(10), 10, True, None),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (policy, refit_every, background, cap)) in enumerate(policies.items()):
            rows[name] = _run(policy, settings, holdout, pathlib.Path(tmp) / f"run{i}",
                              background=background, refit_every=refit_every,
                              max_labels=cap)
    base = rows["every(10)"]
    print(f"# {steps} MD steps of {demo_molecule()} at {settings.temperature_K:.0f} K, "
          f"{len(holdout)} held-out GFN2-xTB frames; refits heads/linear")
    print("| policy | oracle calls | calls / every(10) | final F MAE meV/Å | "
          "F MAE / every(10) | final E MAE meV/atom | generation | wall s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in rows.items():
        print(f"| {name} | {row['oracle_calls']} | "
              f"{row['oracle_calls'] / base['oracle_calls']:.2f} | "
              f"{row['forces_mae_meV_per_A']:.1f} | "
              f"{row['forces_mae_meV_per_A'] / base['forces_mae_meV_per_A']:.2f} | "
              f"{row['energy_mae_meV_per_atom']:.1f} | {row['generation']} | "
              f"{row['wall_s']:.0f} |")
    bg = rows["every(10), background refits"]
    print()
    print("| background refits | MD steps taken during refits | ms/step during refit | "
          "ms/step otherwise | ratio |")
    print("|---|---:|---:|---:|---:|")
    ratio = (bg["ms_per_step_refit"] / bg["ms_per_step_idle"]
             if bg["ms_per_step_refit"] and bg["ms_per_step_idle"] else float("nan"))
    print(f"| every(10) | {bg['steps_during_refit']} | {bg['ms_per_step_refit'] or 0:.1f} | "
          f"{bg['ms_per_step_idle'] or 0:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
