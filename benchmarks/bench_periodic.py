"""On-the-fly learning of a periodic system, stress included (issue: robust learning).

The molecules of ``bench_robust.py`` have no cell. Here: a box of 8 water molecules
(6.2 Å, about 1 g/cm³, periodic), the shipped demo PET with a new head ``energy/gfn2``
(it was pretrained on gas-phase GFN1-xTB molecules: no condensed phase, no stress),
periodic GFN2-xTB (tblite) as the reference for energies, forces and stress, Langevin
MD at 350 K with the README's recipe. The final model is compared with zero-shot on
frames of an independent GFN2-xTB MD of the same box.

    python benchmarks/bench_periodic.py [--seed 0] [--method heads] [--frames 12]

A periodic GFN2 call on these 24 atoms takes about 2 s on one core: the independent
frames cost most of the run (12 frames, 40 MD steps apart: about 11 minutes).
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import tempfile
import time

import numpy as np

GPA_PER_EV_PER_A3 = 160.21766


def water_box(seed: int):
    """8 randomly oriented water molecules on a 2×2×2 grid of a 6.2 Å periodic cube."""
    from ase import Atoms
    from ase.build import molecule
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    side = 6.2
    atoms = Atoms(cell=[side] * 3, pbc=True)
    for corner in np.ndindex(2, 2, 2):
        water = molecule("H2O")
        water.positions -= water.get_center_of_mass()
        water.positions = Rotation.random(random_state=int(rng.integers(2**31))).apply(
            water.positions)
        water.positions += (np.array(corner) + 0.5) * side / 2
        atoms += water
    return atoms


def langevin(atoms, temperature_K: float, seed: int):
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K,
                                 rng=np.random.default_rng(seed))
    return Langevin(atoms, 0.5 * units.fs, temperature_K=temperature_K, friction=0.02,
                    rng=np.random.default_rng(seed), fixcm=False)


def gfn2():
    from tblite.ase import TBLite

    return TBLite(method="GFN2-xTB", verbosity=0)


def independent_frames(n: int, every: int, temperature_K: float, seed: int) -> list:
    from ase.calculators.singlepoint import SinglePointCalculator

    atoms = water_box(seed)
    atoms.calc = gfn2()
    dyn = langevin(atoms, temperature_K, seed)
    frames = []
    for _ in range(n):
        dyn.run(every)
        frame = atoms.copy()
        frame.calc = SinglePointCalculator(frame, energy=atoms.get_potential_energy(),
                                           forces=atoms.get_forces(),
                                           stress=atoms.get_stress())
        frames.append(frame)
    return frames


def errors(frames, calc) -> dict:
    from ase_petft.metrics import calculator_errors

    out = calculator_errors(frames, calc)
    stress = []
    for frame in frames:
        probe = frame.copy()
        probe.calc = calc
        stress.append(np.abs(probe.get_stress() - frame.get_stress()))
    out["stress_mae_GPa"] = float(np.mean(stress)) * GPA_PER_EV_PER_A3
    return out


def main() -> None:
    from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer
    from ase_petft.data import demo_checkpoint
    from ase_petft.learner import OnTheFlyLearner, max_gap, min_gap, uncertainty_above

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="heads", choices=("heads", "full"))
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--temperature", type=float, default=350.0)
    parser.add_argument("--frames", type=int, default=12)
    args = parser.parse_args()

    start = time.perf_counter()
    test = independent_frames(args.frames, 40, args.temperature, 1000 + args.seed)
    frames_s = time.perf_counter() - start
    calc = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2")
    before = errors(test, calc)
    atoms = water_box(args.seed)
    atoms.calc = calc
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="petft-periodic-"))
    temperatures = []
    with LabelBuffer(workdir / "labels.h5", mode="w-") as buffer:
        learner = OnTheFlyLearner(
            calc, gfn2(), buffer, workdir=workdir / "learner",
            select=(uncertainty_above(0.01) & min_gap(60)) | max_gap(200),
            refit_every=4, max_labels=24, properties=("energy", "forces", "stress"),
            config=FineTuneConfig(method=args.method, seed=args.seed))
        dyn = langevin(atoms, args.temperature, args.seed)
        learner.attach(dyn)
        dyn.attach(lambda: temperatures.append(atoms.get_temperature()), interval=10)
        dyn.run(args.steps)
        learner.flush()
        learner.close()
    after = errors(test, calc)
    print(f"water box (24 atoms, periodic), {args.steps} steps at {args.temperature:.0f} K, "
          f"method {args.method}, seed {args.seed}: {learner.reference_calls} GFN2 calls, "
          f"generation {calc.generation}, max T {max(temperatures):.0f} K; independent "
          f"frames {frames_s:.0f} s, learning run {time.perf_counter() - start - frames_s:.0f} s")
    print(f"\nerrors on {len(test)} frames of an independent GFN2-xTB MD:")
    print("| quantity | zero-shot | final | ratio |")
    print("|---|---:|---:|---:|")
    for key, title in (("forces_mae_meV_per_A", "F MAE (meV/Å)"),
                       ("energy_mae_meV_per_atom", "E MAE raw (meV/atom)"),
                       ("energy_mae_offset_removed_meV_per_atom", "E MAE offset removed"),
                       ("stress_mae_GPa", "stress MAE (GPa)")):
        print(f"| {title} | {before[key]:.2f} | {after[key]:.2f} | "
              f"{after[key] / before[key]:.2f} |")
    print("\nevents:", dict(collections.Counter(r["event"] for r in learner.history)))
    for row in learner.history:
        if row["event"] in ("swap", "refit_rejected", "review", "unphysical", "rollback",
                            "label_failed"):
            detail = row.get("reason") or row.get("error") or (
                f"passed {row.get('passed')}" if row["event"] == "review" else "")
            print(f"  {row['event']} {row.get('generation')}: {str(detail)[:160]}")


if __name__ == "__main__":
    main()
