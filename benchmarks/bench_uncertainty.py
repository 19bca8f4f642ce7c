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

    python benchmarks/bench_uncertainty.py [--molecule CH3CONH2] [--labels 16]
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


def main() -> None:
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from tblite.ase import TBLite

    from ase_petft import FineTunableCalculator, FineTuneConfig
    from ase_petft.data import demo_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--molecule", default="CH3CONH2")
    parser.add_argument("--labels", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    gfn2 = TBLite(method="GFN2-xTB", verbosity=0)
    labels = frames_of(args.molecule, gfn2, args.labels, args.seed)
    test = frames_of(args.molecule, gfn2, 40, args.seed + 100) + rattled(
        args.molecule, gfn2, 20, args.seed + 200)
    n_held = max(2, args.labels // 4)
    train, held = labels[n_held:], labels[:n_held]
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="petft-unc-"))
    base = FineTunableCalculator(demo_checkpoint(), variant="energy/gfn2", workdir=workdir)
    base.finetune(train, FineTuneConfig())
    checkpoint = base.checkpoint_path
    print(f"{args.molecule}: {len(train)} training + {n_held} held-out GFN2 labels; "
          f"{len(test)} test frames (40 independent MD, 20 rattled 0.05-0.15 Å)")
    print("| method | ρ(σ, abs energy error) | ρ(σ, force MAE) | within 1σ | within 2σ | "
          "median σ (meV/atom) |")
    print("|---|---|---|---|---|---|")
    for method in ("posterior", "llpr"):
        calc = FineTunableCalculator(checkpoint, variant="energy/gfn2", inherit_from=None,
                                     uncertainty=method)
        calc.fit_uncertainty(train, held)
        r = evaluate(calc, test)
        print(f"| {method} | {r['rho_energy']:.2f} | {r['rho_forces']:.2f} | "
              f"{100 * r['cover_1']:.0f} % | {100 * r['cover_2']:.0f} % | "
              f"{r['median_sigma_meV']:.1f} |")


if __name__ == "__main__":
    main()
