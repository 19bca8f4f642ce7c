"""Writer process for the buffer's kill and concurrent-reader tests.

``python _buffer_writer.py PATH TAG [COUNT]`` appends deterministic frames (ids
``TAG-0``, ``TAG-1``, ...) to the buffer at PATH and prints ``INDEX ID`` (flushed)
after each append has returned; with COUNT it stops after COUNT frames, else it runs
until killed. It imports only ase_petft.buffer, h5py and ase (never torch); the first
line it prints says which heavy modules got imported.

:func:`make_frame` is also used by the tests to rebuild the expected frames.
"""

from __future__ import annotations

import itertools
import sys
import zlib

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

ELEMENTS = (1, 6, 8, 28, 29)


def make_frame(frame_id: str) -> tuple:
    """(labelled atoms, variant, metadata) fully determined by ``frame_id``."""
    rng = np.random.default_rng(zlib.crc32(frame_id.encode()))
    n = int(rng.integers(1, 41))
    periodic = bool(rng.integers(0, 2))
    cell = np.diag(rng.uniform(5.0, 12.0, size=3)) + rng.normal(scale=0.2, size=(3, 3))
    atoms = Atoms(numbers=rng.choice(ELEMENTS, size=n), positions=rng.uniform(0, 5, size=(n, 3)),
                  cell=cell if periodic else None, pbc=periodic)
    results = {"energy": float(rng.normal(scale=50.0)), "forces": rng.normal(size=(n, 3))}
    if periodic:
        results["stress"] = rng.normal(scale=0.01, size=6)
    atoms.calc = SinglePointCalculator(atoms, **results)
    variant = ("energy", "energy/pbe0")[int(rng.integers(0, 2))]
    metadata = {"frame_id": frame_id, "step": int(rng.integers(0, 10**6)),
                "prediction": rng.normal(size=3), "uncertainty": float(rng.uniform())}
    return atoms, variant, metadata


def main(argv: list) -> None:
    from ase_petft.buffer import LabelBuffer

    path, tag = argv[0], argv[1]
    count = int(argv[2]) if len(argv) > 2 else None
    heavy = sorted(m for m in ("torch", "metatrain", "metatomic") if m in sys.modules)
    print(f"heavy-modules {','.join(heavy) or '-'}", flush=True)
    with LabelBuffer(path, "a") as buffer:
        for k in itertools.count() if count is None else range(count):
            frame_id = f"{tag}-{k}"
            atoms, variant, metadata = make_frame(frame_id)
            index = buffer.append(atoms, variant=variant, **metadata)
            print(f"{index} {frame_id}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
