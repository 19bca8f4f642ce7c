"""Molecular dynamics that refits its own potential every few labels, without stopping.

The demo PET (pretrained on GFN1-xTB) drives a Langevin MD through a new head
``energy/gfn2`` that starts as a copy of the GFN1 head. An ``OnTheFlyLearner``
labels every n-th step with GFN2-xTB, refits the head in a background thread every
few labels and hot-swaps each accepted generation into the *same* calculator between
two MD steps. At the end the zero-shot head and the final generation are scored on
frames of an independent GFN2-xTB MD.

    python examples/md_with_refits.py                 # ~1 minute on 2 cores
    python examples/md_with_refits.py --quick         # a few seconds
    python examples/md_with_refits.py --system cuni --checkpoint cuni-emt.ckpt

Then plot the run:  petft report WORKDIR/learner -o WORKDIR/report --buffer WORKDIR/labels.h5
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets OMP_NUM_THREADS before torch loads)

from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer  # noqa: E402
from ase_petft.learner import OnTheFlyLearner, every  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument("--steps", type=int, default=400, help="MD steps")
    parser.add_argument("--every", type=int, default=10, help="label every n-th step")
    parser.add_argument("--refit-every", type=int, default=6, help="refit after n new labels")
    parser.add_argument("--method", choices=["heads", "full", "lora"], default="heads")
    parser.add_argument("--inline", action="store_true",
                        help="refit inline instead of in a background thread")
    parser.add_argument("--test-frames", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    return _common.parse(parser, argv, {"steps": 60, "every": 2, "refit_every": 6,
                                        "test_frames": 3})


def run(args: argparse.Namespace) -> dict:
    setup = _common.setup_from_args(args)
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="petft-md-refits-"))
    calc = FineTunableCalculator(setup.checkpoint, variant=setup.variant)
    atoms = setup.start()
    atoms.calc = calc
    start = time.perf_counter()
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer:
        learner = OnTheFlyLearner(
            calc, setup.new_level(), buffer, select=every(args.every),
            refit_every=args.refit_every, background=not args.inline,
            config=FineTuneConfig(method=args.method, seed=args.seed,
                                  # epochs exist for metatrain's SGD, not the linear heads solver
                                  **({} if args.method == "heads" else {"num_epochs": 20})),
            workdir=workdir / "learner", holdout_fraction=0.25,
        )
        dyn = _common.langevin(atoms, setup, args.seed)
        dyn.attach(learner, interval=1)
        dyn.attach(lambda: _progress(dyn, calc, learner), interval=max(1, args.steps // 8))
        dyn.run(args.steps)
        learner.close()  # waits for a refit in flight and swaps it in
        n_labels = len(buffer)
    md_time = time.perf_counter() - start

    test = _common.label_all(_common.sample_structures(setup, args.test_frames,
                                                       seed=args.seed + 1), setup.new_level())
    zero_shot = FineTunableCalculator(setup.checkpoint, variant=setup.variant)
    rows = [{"model": f"{setup.old_name} itself", **_common.errors(setup.old_level(), test)},
            {"model": "generation 0 (copy of the pretrained head)",
             **_common.errors(zero_shot, test)},
            {"model": f"generation {calc.generation} (after the run)",
             **_common.errors(calc, test)}]
    return {"rows": rows, "generation": calc.generation, "n_labels": n_labels,
            "reference_calls": learner.reference_calls, "md_time_s": md_time,
            "workdir": workdir, "setup": setup, "n_test": len(test)}


def _progress(dyn, calc, learner) -> None:
    print(f"step {dyn.nsteps:5d}  generation {calc.generation}  labels "
          f"{learner.reference_calls:3d}  refit running: {learner.refit_in_progress}",
          flush=True)


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    setup, workdir = result["setup"], result["workdir"]
    print(f"\n{args.steps} MD steps in {result['md_time_s']:.1f} s with "
          f"{result['reference_calls']} {setup.new_name} calls; the calculator ran "
          f"generation {result['generation']} at the end.")
    print(f"\nErrors against {setup.new_name} on {result['n_test']} frames of an independent "
          "MD (MAE):\n")
    _common.print_table(result["rows"], ["model", "energy_mae_meV_per_atom",
                                         "forces_mae_meV_per_A"])
    print(f"\nPlots: petft report {workdir / 'learner'} -o {workdir / 'report'} "
          f"--buffer {workdir / 'labels.h5'}")
    return result


if __name__ == "__main__":
    main()
