"""Does σ mean something? Calibration of the energy uncertainty on an independent trajectory.

The demo scenario: the shipped demo PET, a new head ``energy/gfn2`` refitted (linear
heads) on GFN2-xTB labels of a molecule's MD, then the uncertainty fitted on those
labels (training) and calibrated on a few held-out ones. Evaluated on frames the fit
never saw — an independent GFN2 MD trajectory and rattled structures (σ 0.05-0.15 Å,
partly out of distribution) —, for the last-layer posterior (the default) and
metatrain's LLPR on the same labels and weights:

- Spearman ρ between σ (eV/atom) and the actual |energy error| per atom, and between σ
  and the structure's force MAE;
- coverage: the share of structures whose |energy error| is within 1σ and 2σ
  (a Gaussian would give 68 % and 95 %).

On each of several molecules held out of the demo model's training (one table row per
molecule and method, then the mean over molecules: one molecule's 60 frames give a
noisy ρ).

    python benchmarks/bench_uncertainty.py [--molecules CH3CONH2 HCOOCH3 C3H9N C4H4O] [--labels 16]
"""

from __future__ import annotations

import argparse
import pathlib
import tempfile

import numpy as np


def frames_of(name: str, gfn, n: int, seed: int, temperature_K: float = 400.0):
    from ase_petft import label

    from bench_robust import build, langevin

    atoms = build(name)
    atoms.calc = gfn
    dyn = langevin(atoms, temperature_K, seed)
    dyn.run(100)
    out = []
    for _ in range(n):
        dyn.run(30)
        out.append(label(atoms, gfn))
    return out


def rattled(name: str, gfn, n: int, seed: int):
    from ase_petft import label

    from bench_robust import build

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = build(name)
        atoms.positions += rng.normal(0.0, 0.05 + 0.10 * i / max(n - 1, 1), atoms.positions.shape)
        out.append(label(atoms, gfn))
    return out


def evaluate(calc, frames) -> dict:
    from scipy.stats import spearmanr

    sigma, e_err, f_err = [], [], []
    for frame in frames:
        probe = frame.copy()
        probe.calc = calc
        e_err.append(abs(probe.get_potential_energy() - frame.get_potential_energy()) / len(frame))
        f_err.append(float(np.abs(probe.get_forces() - frame.get_forces()).mean()))
        sigma.append(calc.get_energy_uncertainty(frame))
    sigma, e_err = np.array(sigma), np.array(e_err)
    return {"rho_energy": float(spearmanr(sigma, e_err)[0]),
            "rho_forces": float(spearmanr(sigma, f_err)[0]),
            "cover_1": float(np.mean(e_err <= sigma)), "cover_2": float(np.mean(e_err <= 2 * sigma)),
            "median_sigma_meV": 1e3 * float(np.median(sigma))}


def run_molecule(molecule: str, n_labels: int, seed: int, gfn2) -> dict:
    from ase_petft import FineTunableCalculator, FineTuneConfig
    from ase_petft.data import demo_checkpoint

    labels = frames_of(molecule, gfn2, n_labels, seed)
    test = frames_of(molecule, gfn2, 40, seed + 100) + rattled(molecule, gfn2, 20, seed + 200)
    n_held = max(2, n_labels // 4)
    train, held = labels[n_held:], labels[:n_held]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="petft-unc-"))
    base = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2", workdir=workdir)
    base.finetune(train, FineTuneConfig())
    out = {}
    for method in METHODS:
        calc = FineTunableCalculator(base.checkpoint_path, variant="energy/gfn2",
                                     inherit_from=None, uncertainty=method)
        calc.fit_uncertainty(train, held)
        out[method] = evaluate(calc, test)
    return out


METHODS = ("posterior", "llpr")


def row(name: str, method: str, r: dict) -> str:
    return (f"| {name} | {method} | {r['rho_energy']:.2f} | {r['rho_forces']:.2f} | "
            f"{100 * r['cover_1']:.0f} % | {100 * r['cover_2']:.0f} % | "
            f"{r['median_sigma_meV']:.1f} |")


def main() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from tblite.ase import TBLite

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecules", nargs="+", default=["CH3CONH2", "HCOOCH3", "C3H9N",
                                                            "C4H4O"])
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gfn2 = TBLite(method="GFN2-xTB", verbosity=0)
    n_held = max(2, args.labels // 4)
    print(f"per molecule: {args.labels - n_held} training + {n_held} held-out GFN2 labels "
          "(400 K MD); 60 test frames (40 of an independent MD, 20 rattled 0.05-0.15 Å)")
    results = {m: run_molecule(m, args.labels, args.seed, gfn2) for m in args.molecules}
    print("| molecule | method | ρ(σ, abs energy error) | ρ(σ, force MAE) | within 1σ | "
          "within 2σ | median σ (meV/atom) |")
    print("|---|---|---|---|---|---|---|")
    for molecule, by_method in results.items():
        for method, r in by_method.items():
            print(row(molecule, method, r))
    for method in METHODS:
        mean = {k: float(np.mean([results[m][method][k] for m in results]))
                for k in results[args.molecules[0]][method]}
        print(row("**mean**", method, mean))


if __name__ == "__main__":
    main()
