"""Does the learner's own work per label grow with the number of labels?

The learner labels every step of a Langevin MD (demo PET, a new head, ASE's EMT as a
near-free reference so that only the learner's own work is timed: validation, the HDF5
append with fsync, the in-memory label list, the uncertainty update), with refits off.
Printed: the median wall time of one labelled observer call around the 10th, 100th and
1000th label (MD step excluded), and its ratio to the 10th.

    python benchmarks/bench_learner_overhead.py [--labels 1000]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np


def main() -> None:
    from ase import units
    from ase.calculators.emt import EMT
    from ase.md.langevin import Langevin

    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    from bench_robust import build

    from ase_petft import FineTunableCalculator, LabelBuffer
    from ase_petft.data import demo_checkpoint
    from ase_petft.learner import OnTheFlyLearner, every

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--molecule", default="CH3CH2OH")
    args = parser.parse_args()
    work = pathlib.Path(tempfile.mkdtemp(prefix="petft-overhead-"))
    atoms = build(args.molecule)
    calc = FineTunableCalculator(demo_checkpoint(), variant="energy/emt")
    atoms.calc = calc
    times = []
    with LabelBuffer(work / "labels.h5", mode="w-") as buffer:
        learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(1),
                                  refit_every=10 * args.labels, background=False,
                                  workdir=work / "learner")
        dyn = Langevin(atoms, 0.25 * units.fs, temperature_K=300, friction=0.02,
                       rng=np.random.default_rng(0), fixcm=False)

        def timed():
            start = time.perf_counter()
            learner()
            times.append(time.perf_counter() - start)

        dyn.attach(timed, interval=1)
        dyn.run(args.labels)
        learner.close()
        n_labels = len(buffer)
    times = np.array(times)
    print(f"{args.molecule}: {n_labels} labels, learner work per labelled step "
          "(median of 9 around each point, ms)")
    print("| labels so far | ms per label | ratio to 10 |")
    print("|---:|---:|---:|")
    base = None
    for n in (10, 100, 1000):
        if n > len(times):
            break
        window = times[max(0, n - 5):n + 4]
        ms = 1e3 * float(np.median(window))
        base = base or ms
        print(f"| {n} | {ms:.1f} | {ms / base:.2f} |")


if __name__ == "__main__":
    main()
