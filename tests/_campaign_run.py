"""A campaign run for the restart test: two walkers in threads, an EMT reference that
logs the structure of every call it makes (one line per call, appended and flushed).

usage: python _campaign_run.py CHECKPOINT WORKDIR STEPS MAX_LABELS
"""

import functools
import pathlib
import sys
import time

import numpy as np
from ase import units
from ase.calculators.emt import EMT
from ase.md.langevin import Langevin

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from conftest import emt_frames  # noqa: E402

from ase_petft import Campaign, FineTuneConfig, LabelBuffer, Walker  # noqa: E402
from ase_petft._provenance import content_key  # noqa: E402
from ase_petft.learner import every  # noqa: E402
from ase_petft.learner.gate import GateConfig  # noqa: E402


class LoggingEMT(EMT):
    """EMT that takes 0.2 s per call (a kill lands while calls are in flight) and logs
    the structure it was asked about."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def calculate(self, atoms=None, properties=("energy",), system_changes=None):
        with open(self.log, "a") as handle:
            handle.write(content_key(atoms.numbers, atoms.positions, atoms.cell, atoms.pbc)
                         + "\n")
        time.sleep(0.2)
        super().calculate(atoms, properties, system_changes or ["positions"])


def walkers(steps):
    out = []
    for i, temperature in enumerate((300, 500)):
        atoms = emt_frames(1, seed=40 + i)[0]
        atoms.set_momenta(np.random.default_rng(i).normal(0, 0.05, (len(atoms), 3)))
        out.append(Walker(name=f"T{temperature}", atoms=atoms, steps=steps, snapshot_every=5,
                          dynamics=functools.partial(
                              Langevin, timestep=1 * units.fs, temperature_K=temperature,
                              friction=0.02, fixcm=False)))
    return out


def main(checkpoint, workdir, steps, max_labels):
    workdir = pathlib.Path(workdir)
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer, Campaign(
            checkpoint, variant="energy/emt", reference=LoggingEMT(workdir / "calls.log"),
            buffer=buffer, workdir=workdir / "campaign", select=every(3), refit_every=4,
            max_labels=max_labels, tolerance=10.0,
            config=FineTuneConfig(keep_parent_unless_better=False),
            gate=GateConfig(probe_steps=0, harm_factor=1e9)) as campaign:
        result = campaign.run(walkers(steps), stop_when_budget_spent=True)
    print("RESULT", result.reference_calls, result.labels, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
