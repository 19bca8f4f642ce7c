"""What σ (the posterior energy uncertainty) adds to an MD step.

A selection policy with ``uncertainty_above`` asks for σ of the structure the step has
just evaluated. Before, σ cost a forward and backward pass of its own; now the force
pass's backward also gives the last-layer gradient σ needs, while the posterior is
fitted. Measured side by side in one run, calls interleaved, each call on moved atoms:

- ``forces, σ not fitted``: a calculator whose uncertainty is not fitted (what a step
  cost before, without σ);
- ``forces, σ fitted``: the same weights with the posterior fitted (the force pass now
  also keeps the last-layer gradient);
- ``σ of that structure``: served from that gradient;
- ``σ, own pass``: the same σ computed by its own pass (what it cost before).

    python benchmarks/bench_sigma_step.py [--checkpoint CKPT] [--repeats 30] [--sizes 9 64 256]
                                          [--device cuda]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _systems import random_organic_cell  # noqa: E402


def _structure(n: int):
    from ase.build import molecule

    if n == 9:
        return molecule("CH3CONH2")
    return random_organic_cell(n, seed=n)


def _labels(atoms, n: int = 4):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for seed in range(n):
        frame = atoms.copy()
        frame.rattle(0.05, seed=seed)
        frame.calc = EMT()
        results = {"energy": frame.get_potential_energy(), "forces": frame.get_forces()}
        frame.calc = SinglePointCalculator(frame, **results)
        out.append(frame)
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(sizes, repeats, checkpoint, device="cpu"):
    from ase_petft import FineTunableCalculator

    plain = FineTunableCalculator(checkpoint, device=device)
    fitted = FineTunableCalculator(checkpoint, device=device)
    rows = []
    for n in sizes:
        atoms = _structure(n)
        labels = _labels(atoms)
        fitted.fit_uncertainty(labels[:3], labels[3:])
        rng = np.random.default_rng(0)
        times = {k: [] for k in ("plain", "fused", "sigma_fused", "sigma_own")}
        deviation = 0.0
        for i in range(repeats + 2):
            atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
            a, b = atoms.copy(), atoms.copy()
            a.calc, b.calc = plain, fitted
            t_plain = _timed(a.get_forces)
            t_fused = _timed(b.get_forces)
            sigma = [None]
            t_sigma = _timed(lambda: sigma.__setitem__(0, fitted.get_energy_uncertainty(b)))
            fitted._uncertainty._features.clear()  # the same σ, by its own pass
            fitted._features = None
            own = [None]
            t_own = _timed(lambda: own.__setitem__(0, fitted.get_energy_uncertainty(b)))
            deviation = max(deviation, abs(sigma[0] - own[0]) / own[0])
            if i >= 2:  # warm-up
                for key, t in zip(times, (t_plain, t_fused, t_sigma, t_own)):
                    times[key].append(t)
        med = {k: 1e3 * float(np.median(v)) for k, v in times.items()}
        before = med["plain"] + med["sigma_own"]
        after = med["fused"] + med["sigma_fused"]
        rows.append((n, med, before, after, deviation))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the demo model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[9, 64, 256],
                        help="9: acetamide; otherwise a random organic cell of that size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    import torch

    from ase_petft import demo_checkpoint

    torch.set_num_threads(1)
    rows = bench(args.sizes, args.repeats, args.checkpoint or demo_checkpoint(), args.device)
    print(f"# ms per call, median of {args.repeats}, 1 thread, {args.device}; "
          "a step with σ = forces + σ")
    print("| atoms | forces, σ not fitted | forces, σ fitted | σ of that structure "
          "| σ, own pass | step before | step now | now / before | max rel. σ diff |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, med, before, after, deviation in rows:
        print(f"| {n} | {med['plain']:.2f} | {med['fused']:.2f} | {med['sigma_fused']:.2f} "
              f"| {med['sigma_own']:.2f} | {before:.2f} | {after:.2f} | {after / before:.2f} "
              f"| {deviation:.1e} |")


if __name__ == "__main__":
    main()
