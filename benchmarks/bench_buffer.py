"""Throughput of LabelBuffer: appends (durable and not), batched extends, reads.

    python benchmarks/bench_buffer.py [--frames 400] [--dir /path/on/the/disk/to/test]

Prints one table; every row is measured in the same run on the same disk. The
durability guarantee (one fsync per append, SWMR ordering) is on unless the row
says ``fsync=False``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator

try:
    from ase_petft.buffer import LabelBuffer
except ImportError:  # run from a source checkout without installing
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
    from ase_petft.buffer import LabelBuffer


def make_frames(n_frames: int, n_atoms: int, *, seed: int) -> list:
    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n_frames):
        atoms = Atoms(numbers=rng.choice([28, 29], size=n_atoms),
                      positions=rng.uniform(0, 10, size=(n_atoms, 3)), cell=np.eye(3) * 10, pbc=True)
        atoms.calc = SinglePointCalculator(atoms, energy=float(rng.normal()),
                                           forces=rng.normal(size=(n_atoms, 3)),
                                           stress=rng.normal(size=6))
        frames.append(atoms)
    return frames


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def bench_raw_fsync(directory: pathlib.Path, count: int = 200) -> float:
    """Bare pwrite + fsync of a 30 kB block: the disk's ceiling for durable appends."""
    import os

    fd = os.open(directory / "raw.bin", os.O_RDWR | os.O_CREAT)
    try:
        block = np.random.default_rng(0).bytes(30_000)
        start = time.perf_counter()
        for _ in range(count):
            os.pwrite(fd, block, 0)
            os.fsync(fd)
        return rate(count, time.perf_counter() - start)
    finally:
        os.close(fd)


def bench_size(directory: pathlib.Path, n_atoms: int, n_frames: int) -> list:
    frames = make_frames(n_frames, n_atoms, seed=n_atoms)
    rows = []
    for fsync in (True, False):
        path = directory / f"append-{n_atoms}-{fsync}.h5"
        with LabelBuffer(path, "w-", fsync=fsync) as buffer:
            start = time.perf_counter()
            for step, atoms in enumerate(frames):
                buffer.append(atoms, variant="energy/pbe0", step=step, uncertainty=0.01)
            rows.append((n_atoms, f"append (fsync={fsync})", rate(n_frames, time.perf_counter() - start)))
    path = directory / f"extend-{n_atoms}.h5"
    with LabelBuffer(path, "w-") as buffer:
        start = time.perf_counter()
        for first in range(0, n_frames, 50):
            buffer.extend(frames[first:first + 50], variant="energy/pbe0")
        rows.append((n_atoms, "extend, 50 per call", rate(n_frames, time.perf_counter() - start)))
    with LabelBuffer(directory / f"append-{n_atoms}-True.h5", "r") as buffer:
        start = time.perf_counter()
        count = sum(1 for _ in buffer.frames())
        rows.append((n_atoms, "read, iterate frames()", rate(count, time.perf_counter() - start)))
        order = np.random.default_rng(0).permutation(len(buffer))[:200]
        start = time.perf_counter()
        for i in order:
            buffer[int(i)]
        rows.append((n_atoms, "read, random buffer[i]", rate(len(order), time.perf_counter() - start)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=400, help="frames per size (512-atom: a quarter)")
    parser.add_argument("--dir", type=pathlib.Path, default=None, help="directory on the disk to test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        rows = [(0, "bare pwrite+fsync (disk)", bench_raw_fsync(pathlib.Path(tmp)))]
        rows += bench_size(pathlib.Path(tmp), 32, args.frames)
        rows += bench_size(pathlib.Path(tmp), 512, max(20, args.frames // 4))
    print(f"{'atoms':>6}  {'operation':<26} {'frames/s':>10}")
    for n_atoms, operation, value in rows:
        print(f"{n_atoms or '-':>6}  {operation:<26} {value:>10.0f}")
    durable = {n: v for n, op, v in rows if op == "append (fsync=True)"}
    fast = {n: v for n, op, v in rows if op == "append (fsync=False)"}
    disk = rows[0][2]
    for n in durable:
        print(f"{n} atoms: durable appends run at {durable[n] / fast[n]:.2f}x the un-synced rate "
              f"and {durable[n] / disk:.2f}x the bare fsync rate")


if __name__ == "__main__":
    main()
