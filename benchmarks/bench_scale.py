"""Benchmark: refits at foundation-model size (metatrain's default PET hypers, ~2.9 M
parameters, the size class of PET-MAD), on CPU or CUDA.

No download: the backbone is a freshly initialised PET with metatrain's default hypers
(random weights: the timings are those of the real architecture; the errors compare the
methods with each other, not with a trained model). Labels: EMT on 32-atom CuNi cells
and on 12-atom organic molecules (ASE's EMT has H/C/N/O parameters), as a new variant
``energy/emt``. In one run it prints:

1. the Jacobian of the linear heads solver per structure, feature-wise and force-wise
   passes (time and peak memory, each in a fresh child process);
2. a from-scratch closed-form heads refit of ``--labels`` labels;
3. the refit after one more label (rows of the others reused: ``rowcache``);
4. our in-process SGD heads refit and ``mtt train`` with ``method: heads`` (subprocess),
   both ``--epochs`` epochs on the same labels and validation frames;

with held-out force errors, and the speed-ups against ``mtt train``.

    OMP_NUM_THREADS=1 python benchmarks/bench_scale.py [--device cuda] [--labels 24]
        [--epochs 60] [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE.parent / "scripts"))
sys.path.insert(0, str(HERE))

NEW = "energy/emt"
TYPES = (1, 6, 7, 8, 28, 29)


def labelled(frames):
    from ase.calculators.emt import EMT
    from ase.calculators.singlepoint import SinglePointCalculator

    out = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.calc = EMT()
        results = {"energy": atoms.get_potential_energy(), "forces": atoms.get_forces()}
        if atoms.pbc.all():
            results["stress"] = atoms.get_stress()
        atoms.calc = SinglePointCalculator(atoms, **results)
        out.append(atoms)
    return out


def molecules(n: int, seed: int):
    """Rattled 12-atom organic molecules (isopropanol, C3H8O) and 12-atom propane+O2."""
    import numpy as np
    from ase.build import molecule

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        atoms = molecule("C2H6CHOH")  # isopropanol: 12 atoms
        atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
        out.append(atoms)
    return out


def cells(n: int, seed: int):
    from conftest import emt_frames

    return [a for a in emt_frames(n, seed=seed)]


def build_base(out: pathlib.Path) -> pathlib.Path:
    from ase_petft import _metatrain

    model = _metatrain.new_pet_model(atomic_types=TYPES, variants={
        "energy": "random-weight PET (metatrain default hypers)"}, seed=0)
    path = out / "base.ckpt"
    _metatrain.save_checkpoint(model, path)
    n = sum(p.numel() for p in model.parameters())
    last = sum(p.numel() for _, p in _metatrain.last_layer_parameters(model, "energy"))
    print(f"PET with metatrain's default hypers: {n:,} parameters, {last} last-layer "
          f"parameters per variant", flush=True)
    return path


# ---------------------------------------------------------------------- Jacobians
def jacobian_child(base: str, kind: str, mode: str, device: str) -> None:
    """Runs in a fresh process: one structure's heads rows; prints JSON."""
    import resource

    import torch

    from ase_petft import _metatrain
    from ase_petft.config import FineTuneConfig
    from ase_petft.labels import labels_from_frames

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = _metatrain.load_model(pathlib.Path(base)).to(device)
    frames = labelled(cells(1, 5) if kind == "cell" else molecules(1, 5))
    config = FineTuneConfig()
    object.__setattr__(config, "jacobian", mode)
    label = labels_from_frames(frames)
    _metatrain.heads_rows(model, "energy", label, config=config)  # warm-up (lazy imports)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    rows = _metatrain.heads_rows(model, "energy", label, config=config)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    gpu = torch.cuda.max_memory_allocated() if device.startswith("cuda") else None
    print(json.dumps({"wall_s": wall, "peak_rss_bytes": peak,
                      "rss_growth_bytes": (peak - before * 1024), "gpu_peak_bytes": gpu,
                      "rows": int(rows[0][0].shape[0]), "atoms": len(frames[0])}))


def jacobians(base: pathlib.Path, device: str) -> list:
    out = []
    for kind in ("cell", "molecule"):
        for mode in ("features", "forces"):
            proc = subprocess.run([sys.executable, __file__, "--jacobian-child", str(base), kind,
                                   mode, device], capture_output=True, text=True,
                                  env=dict(os.environ))
            if proc.returncode != 0:
                raise SystemExit(f"Jacobian child failed:\n{proc.stderr[-3000:]}")
            data = json.loads(proc.stdout.strip().splitlines()[-1])
            out.append((kind, mode, data))
            print(f"Jacobian {kind} ({data['atoms']} atoms) {mode}-wise: {data['wall_s']:.2f} s, "
                  f"peak RSS {data['peak_rss_bytes'] / 2**30:.2f} GiB", flush=True)
    return out


# ---------------------------------------------------------------------- refits
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--labels", type=int, default=24, help="labels (half cells, half molecules)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", help="work directory (default: a temporary one)")
    parser.add_argument("--quick", action="store_true", help="4 labels, 2 epochs (smoke run)")
    parser.add_argument("--skip-sgd", action="store_true", help="no SGD and no mtt runs")
    parser.add_argument("--skip-jacobians", action="store_true",
                        help="no per-structure Jacobian timings (4 child processes)")
    args = parser.parse_args()
    if args.quick:
        args.labels, args.epochs = 4, 2

    import torch

    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune
    from bench_finetune import mtt_heads
    from train_emt_base import errors

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = pathlib.Path(args.out or tempfile.mkdtemp(prefix="bench-scale-"))
    out.mkdir(parents=True, exist_ok=True)
    base = build_base(out)
    jac = [] if args.skip_jacobians else jacobians(base, args.device)

    half = args.labels // 2
    labels = labelled(cells(half, 1) + molecules(args.labels - half, 2))
    extra = labelled(cells(1, 3))
    held = labelled(cells(4, 50) + molecules(4, 51))
    rows = [("zero-shot (energy head)", None, errors(base, held, "energy"))]

    def timed(name, source, frames, config, folder, export=True):
        start = time.perf_counter()
        result = finetune(source, frames, variant=NEW, config=config, output_dir=out / folder,
                          validation=held, device=args.device, export=export)
        wall = time.perf_counter() - start
        rows.append((name.format(result=result), wall, errors(result.checkpoint_path, held, NEW)))
        phases = ", ".join(f"{k} {v:.2f} s" for k, v in result.metrics["timing_s"].items())
        print(f"{rows[-1][0]}: {wall:.2f} s ({phases})", flush=True)
        return result

    linear = FineTuneConfig(keep_parent_unless_better=False)
    first = timed(f"heads linear, {len(labels)} labels", base, labels, linear, "linear")
    timed("heads linear, +1 label (rows of {result.metrics[linear_solver][rows_reused]} reused)",
          first.checkpoint_path, labels + extra, linear, "linear+1")
    # what the on-the-fly learner runs: its refits skip the metatomic export (~0.8 s on
    # one CPU thread) and only an accepted generation is exported, after the gate
    timed("heads linear, +1 label, export=False", first.checkpoint_path, labels + extra,
          linear, "linear+1-noexport", export=False)
    mtt_wall = None
    if not args.skip_sgd:
        sgd = FineTuneConfig(method="heads", solver="sgd", num_epochs=args.epochs,
                             learning_rate=1e-3, batch_size=4, seed=0)
        timed(f"heads sgd (ours), {args.epochs} epochs", base, labels, sgd, "sgd")
        mtt_wall = mtt_heads(out / "mtt", base, labels, held, sgd, variant=NEW,
                             description="EMT (benchmark level)", device=args.device)
        rows.append((f"mtt train heads, {args.epochs} epochs", mtt_wall,
                     errors(out / "mtt" / "model.ckpt", held, NEW)))
    print_tables(jac, rows, mtt_wall, args)


def print_tables(jac, rows, mtt_wall, args) -> None:
    print(f"\ndevice {args.device}, torch threads {os.environ.get('OMP_NUM_THREADS', '1')}")
    if jac:
        print(f"{'Jacobian':34s} {'wall s':>7s} {'peak RSS GiB':>12s} {'GPU GiB':>8s}")
    for kind, mode, data in jac:
        gpu = "" if data["gpu_peak_bytes"] is None else f"{data['gpu_peak_bytes'] / 2**30:8.2f}"
        print(f"{kind + ' (' + str(data['atoms']) + ' atoms), ' + mode + '-wise':34s} "
              f"{data['wall_s']:7.2f} {data['peak_rss_bytes'] / 2**30:12.2f} {gpu:>8s}")
    print(f"\nheld-out: 4 cells (32 atoms) + 4 molecules (12 atoms), EMT as {NEW}")
    head = f"{'run':46s} {'wall s':>7s} {'x mtt':>6s} {'F MAE meV/A':>11s} {'E MAE meV/at':>12s}"
    print(head)
    print("-" * len(head))
    for name, wall, err in rows:
        speed = "" if wall is None or mtt_wall is None else f"{mtt_wall / wall:6.1f}"
        wall_s = "" if wall is None else f"{wall:7.1f}"
        print(f"{name:46s} {wall_s:>7s} {speed:>6s} {err['forces_mae_meV_per_A']:11.1f} "
              f"{err['energy_mae_meV_per_atom']:12.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--jacobian-child":
        jacobian_child(*sys.argv[2:])
    else:
        main()
