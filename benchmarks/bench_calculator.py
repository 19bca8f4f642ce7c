"""Per-call cost of FineTunableCalculator against metatomic's own ASE calculator.

Same weights, same structures, calls interleaved in one run (the machine is shared and
noisy: only ratios measured side by side mean something). Each call moves the atoms so
that nothing is served from a cache; energy + forces + stress are computed.

    python benchmarks/bench_calculator.py [--checkpoint CKPT] [--repeats 30]
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from _systems import random_organic_cell  # noqa: E402


def _one_call(atoms, calc, rng) -> float:
    atoms.positions += rng.normal(scale=1e-3, size=atoms.positions.shape)
    atoms.calc = calc
    start = time.perf_counter()
    atoms.get_potential_energy()
    atoms.get_forces()
    atoms.get_stress()
    return time.perf_counter() - start


def bench(sizes, repeats, checkpoint):
    import torch
    from metatomic_ase import MetatomicCalculator

    from ase_petft import FineTunableCalculator
    from ase_petft import _metatrain

    ours = FineTunableCalculator(checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        scripted_path = pathlib.Path(tmp) / "model.pt"
        exported = _metatrain.prepare_for_inference(
            _metatrain.load_model(checkpoint), dtype=torch.float32,
            device=torch.device("cpu"),
        )
        exported.save(str(scripted_path))
        references = {
            "metatomic (in-memory model)": MetatomicCalculator(exported),
            "metatomic (scripted .pt)": MetatomicCalculator(str(scripted_path)),
        }
        rows = []
        for n in sizes:
            atoms = random_organic_cell(n, seed=n)
            rng = np.random.default_rng(0)
            calcs = {"ase_petft": ours, **references}
            times = {name: [] for name in calcs}
            for calc in calcs.values():  # warm-up
                _one_call(atoms, calc, rng)
            for _ in range(repeats):
                for name, calc in calcs.items():
                    times[name].append(_one_call(atoms, calc, rng))
            base = np.median(times["ase_petft"])
            for name, values in times.items():
                med = np.median(values)
                rows.append((n, name, 1e3 * med, base / med))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="default: the demo model")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    args = parser.parse_args()
    import torch

    from ase_petft import demo_checkpoint

    torch.set_num_threads(1)
    checkpoint = args.checkpoint or demo_checkpoint()
    rows = bench(args.sizes, args.repeats, checkpoint)
    print(f"# single-point energy+forces+stress, median of {args.repeats}, 1 thread")
    print(f"| atoms | calculator | ms/call | ase_petft time / this time |")
    print("|---:|---|---:|---:|")
    for n, name, ms, ratio in rows:
        print(f"| {n} | {name} | {ms:.2f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
