"""Do several walkers spend a label budget faster, at equal final error?

A campaign (demo PET, new head ``energy/gfn2``) spends the same label budget with 1, 2
and 4 walkers: replicas of a Langevin MD of one molecule at one temperature (different
seeds), a label every ``--every`` steps of each walker, heads refits every
``--refit-every`` labels, walkers in threads. The reference is GFN2-xTB made to take
``--latency`` seconds per call (a sleep before the real calculation), standing for DFT.
Printed: wall time until the budget's last label is in (from the campaign's start), its
ratio to one walker, and the final generation's force and energy MAE on frames of an
independent GFN2-xTB MD (the same frames for every row), next to zero-shot; the energy
error also with the mean per-atom offset removed (GFN1 and GFN2 differ by ~3 eV/atom, a
constant a heads refit may leave partly in place: it does not change forces). The MD is
not seeded: labels, refits and final errors vary from run to run; compare rows of one run.

    python benchmarks/bench_walkers.py [--latency 2] [--labels 24] [--molecule CH3CONH2]
    python benchmarks/bench_walkers.py --quick
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402


def _latency_reference(latency):
    from tblite.ase import TBLite

    class SlowGFN2(TBLite):
        """GFN2-xTB that takes ``latency`` s longer per call (a stand-in for DFT)."""

        def calculate(self, *args, **kwargs):
            time.sleep(latency)
            return super().calculate(*args, **kwargs)

    return SlowGFN2(method="GFN2-xTB", verbosity=0)


def _test_frames(molecule, n, seed):
    from ase import units
    from ase.build import molecule as build
    from ase.md.langevin import Langevin
    from tblite.ase import TBLite

    from ase_petft import label

    atoms = build(molecule)
    atoms.calc = TBLite(method="GFN2-xTB", verbosity=0)
    _thermalize(atoms, 400.0, seed)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=400.0, friction=0.02,
                   rng=np.random.default_rng(seed), fixcm=False)
    dyn.run(40)
    frames = []
    for _ in range(n):
        dyn.run(20)
        frame = atoms.copy()
        frame.calc = None
        frames.append(label(frame, TBLite(method="GFN2-xTB", verbosity=0)))
    return frames


def _thermalize(atoms, temperature, seed):
    from ase.md import velocitydistribution as vd

    vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature,
                                    rng=np.random.default_rng(seed))


def run_campaign(n_walkers, args, work):
    from ase import units
    from ase.build import molecule as build
    from ase.md.langevin import Langevin

    from ase_petft import Campaign, FineTuneConfig, LabelBuffer, Walker, demo_checkpoint
    from ase_petft.learner import every
    from ase_petft.learner import workdir as wd

    walkers = []
    for i in range(n_walkers):
        atoms = build(args.molecule)
        _thermalize(atoms, 400.0, 1000 + i)
        walkers.append(Walker(name=f"r{i}", atoms=atoms, steps=100_000, dynamics=functools.partial(
            Langevin, timestep=0.5 * units.fs, temperature_K=400.0, friction=0.02,
            fixcm=False)))
    folder = work / f"walkers-{n_walkers}"
    with LabelBuffer(folder / "labels.h5", mode="w-") as buffer, Campaign(
            demo_checkpoint(), variant="energy/gfn2", reference=_latency_reference(args.latency),
            buffer=buffer, workdir=folder / "campaign", select=every(args.every),
            refit_every=args.refit_every, max_labels=args.labels, holdout_fraction=0.25,
            config=FineTuneConfig(method="heads")) as campaign:
        result = campaign.run(walkers, stop_when_budget_spent=True)
        calc = campaign.calc
    history = wd.read_history(folder / "campaign")
    launched = min(r["time"] for r in history if r["event"] == "walker_launch")
    last_label = max(r["time"] for r in history if r["event"] == "label")
    return result, calc, last_label - launched


def main() -> None:
    from ase_petft import FineTunableCalculator, demo_checkpoint
    from ase_petft.metrics import calculator_errors

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=2.0, help="s added to each call")
    parser.add_argument("--labels", type=int, default=24, help="label budget")
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--refit-every", type=int, default=6)
    parser.add_argument("--walkers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--molecule", default="CH3CONH2")
    parser.add_argument("--test-frames", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small settings (smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.latency, args.labels, args.walkers, args.test_frames = 0.5, 8, [1, 2], 2
        args.refit_every = 4
    work = pathlib.Path(tempfile.mkdtemp(prefix="petft-bench-walkers-"))
    test = _test_frames(args.molecule, args.test_frames, seed=77)
    zero = calculator_errors(test, FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2"))
    rows, base = [], None
    for n in args.walkers:
        result, calc, spend_s = run_campaign(n, args, work)
        base = base or spend_s
        err = calculator_errors(test, calc)
        rows.append((n, spend_s, spend_s / base, result.reference_calls, result.generation,
                     err["forces_mae_meV_per_A"], err["energy_mae_meV_per_atom"],
                     err["energy_mae_offset_removed_meV_per_atom"]))
    print(f"{args.molecule}, 400 K replicas, budget {args.labels} GFN2-xTB labels "
          f"(+{args.latency:g} s each), label every {args.every} steps per walker, heads "
          f"refit every {args.refit_every}; errors on {len(test)} frames of an independent "
          f"GFN2 MD (zero-shot: F {zero['forces_mae_meV_per_A']:.0f} meV/Å, "
          f"E {zero['energy_mae_meV_per_atom']:.0f} meV/atom, offset removed "
          f"{zero['energy_mae_offset_removed_meV_per_atom']:.1f})\n")
    print("| walkers | time to spend the budget (s) | ratio to 1 walker | reference calls "
          "| final generation | F MAE (meV/Å) | E MAE (meV/atom) | E MAE offset removed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, spend, ratio, calls, gen, f_mae, e_mae, e_shape in rows:
        print(f"| {n} | {spend:.1f} | {ratio:.2f} | {calls} | {gen} | {f_mae:.0f} | {e_mae:.1f} "
              f"| {e_shape:.1f} |")


if __name__ == "__main__":
    sys.exit(main())
