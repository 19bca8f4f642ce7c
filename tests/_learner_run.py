"""A learner run for the restart tests: EMT reference that counts its calls in a file.

usage: python _learner_run.py CHECKPOINT WORKDIR STEPS REFIT_EVERY [interrupt]

With ``interrupt`` the refits are long full refits in the background, run inside
``with learner:``, and ``REFIT_RUNNING`` is printed once one is in flight (the test then
sends SIGINT).
"""

import pathlib
import sys

import numpy as np
from ase import units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from conftest import emt_frames  # noqa: E402

from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer  # noqa: E402
from ase_petft.learner import OnTheFlyLearner, every  # noqa: E402


class CountingEMT(EMT):
    def __init__(self, log):
        super().__init__()
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        with open(self.log, "a") as handle:
            handle.write("call\n")
        if system_changes is None:
            super().calculate(atoms, properties)
        else:
            super().calculate(atoms, properties, system_changes)


def interrupted(checkpoint, workdir, steps, refit_every):
    import signal

    # Ctrl-C in a terminal raises KeyboardInterrupt; a process started in the background
    # of a non-interactive shell (CI) inherits SIGINT ignored: restore Python's handler
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import faulthandler  # SIGUSR1: every thread's stack to stderr (a test that times out)

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    atoms = emt_frames(1, seed=21)[0]
    calc = FineTunableCalculator(checkpoint, variant="energy/emt")
    atoms.calc = calc
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer, OnTheFlyLearner(
            calc, EMT(), buffer, select=every(1), refit_every=refit_every, background=True,
            workdir=workdir / "learner",
            config=FineTuneConfig(method="full", num_epochs=100000, seed=0)) as learner:
        dyn = Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02,
                       rng=np.random.default_rng(0), fixcm=False)
        learner.attach(dyn)
        shown = []

        def report():
            if learner.refit_in_progress and not shown:
                shown.append(True)
                print("REFIT_RUNNING", flush=True)
        dyn.attach(report)
        dyn.run(steps)
    print("DONE", flush=True)


def main(checkpoint, workdir, steps, refit_every):
    workdir = pathlib.Path(workdir)
    atoms = emt_frames(1, seed=21)[0]
    calc = FineTunableCalculator(checkpoint, variant="energy/emt")
    atoms.calc = calc
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer:
        learner = OnTheFlyLearner(
            calc, CountingEMT(workdir / "calls.log"), buffer, select=every(2),
            refit_every=refit_every, background=False, workdir=workdir / "learner",
            config=FineTuneConfig(method="heads", seed=0),
        )
        print(f"START generation {calc.generation}", flush=True)
        dyn = Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02,
                       rng=np.random.default_rng(0), fixcm=False)
        dyn.attach(learner, interval=1)
        dyn.attach(lambda: print(f"STEP {learner._step} {calc.generation}", flush=True))
        dyn.run(steps)
        learner.close()
    print("DONE", flush=True)


if __name__ == "__main__":
    run = interrupted if sys.argv[5:] == ["interrupt"] else main
    run(sys.argv[1], pathlib.Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
