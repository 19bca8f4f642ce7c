"""Active learning with a budget: label only where the model is unsure.

An ``OnTheFlyLearner`` watches a Langevin MD driven by the demo PET through a new head
``energy/gfn2``. A structure is sent to GFN2-xTB when the model's calibrated energy
uncertainty (LLPR, eV/atom) exceeds a threshold, or when ``--max-gap`` steps passed
without a label, and never more than ``--max-labels`` times. Refits run inline here
(reproducible); the uncertainty model is refitted after every label and swap.

    python examples/active_learning.py                  # ~1 minute on 2 cores
    python examples/active_learning.py --quick
    python examples/active_learning.py --system cuni --checkpoint cuni-emt.ckpt --quick

Prints how many steps were labelled and why, the uncertainty at the labelled steps,
and the errors before/after; ``--report DIR`` also writes the plots of
``petft report`` (through ``ase_petft.report.write_report``).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets OMP_NUM_THREADS before torch loads)

from ase_petft import FineTunableCalculator, FineTuneConfig, LabelBuffer  # noqa: E402
from ase_petft.learner import OnTheFlyLearner, max_gap, uncertainty_above  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threshold", type=float, default=None,
                        help="uncertainty trigger, eV/atom (default: per system)")
    parser.add_argument("--max-gap", type=int, default=100,
                        help="label at least every this many steps")
    parser.add_argument("--max-labels", type=int, default=20, help="reference-call budget")
    parser.add_argument("--refit-every", type=int, default=4)
    parser.add_argument("--test-frames", type=int, default=8)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    parser.add_argument("--report", default=None, metavar="DIR",
                        help="also write the run's plots into DIR")
    return _common.parse(parser, argv, {"steps": 40, "max_gap": 15, "max_labels": 8,
                                        "refit_every": 3, "test_frames": 3})


def run(args: argparse.Namespace) -> dict:
    setup = _common.setup_from_args(args)
    threshold = args.threshold or setup.threshold_eV_per_atom
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="petft-active-"))
    calc = FineTunableCalculator(setup.checkpoint, variant=setup.variant)
    atoms = setup.start()
    atoms.calc = calc
    policy = uncertainty_above(threshold) | max_gap(args.max_gap)
    with LabelBuffer(workdir / "labels.h5", mode="a") as buffer:
        with OnTheFlyLearner(calc, setup.new_level(), buffer, select=policy,
                             refit_every=args.refit_every, max_labels=args.max_labels,
                             background=False, holdout_fraction=0.25,
                             config=FineTuneConfig(method="heads", seed=args.seed),
                             workdir=workdir / "learner") as learner:
            dyn = _common.langevin(atoms, setup, args.seed)
            dyn.attach(learner, interval=1)
            dyn.run(args.steps)
    labels = [row for row in learner.history if row["event"] == "label"]
    test = _common.label_all(_common.sample_structures(setup, args.test_frames,
                                                       seed=args.seed + 1), setup.new_level())
    rows = [{"model": "generation 0 (copy of the pretrained head)",
             **_common.errors(FineTunableCalculator(setup.checkpoint, variant=setup.variant),
                              test)},
            {"model": f"generation {calc.generation} (after active learning)",
             **_common.errors(calc, test)}]
    return {"setup": setup, "threshold": threshold, "labels": labels, "rows": rows,
            "reference_calls": learner.reference_calls, "workdir": workdir,
            "policy": policy, "n_test": len(test)}


def _why(row, threshold: float) -> str:
    sigma = row.get("uncertainty")
    if sigma is None:
        return "no uncertainty model yet"
    return "uncertain" if sigma > threshold else "max_gap"


def main(argv=None) -> dict:
    args = parse_args(argv)
    result = run(args)
    setup, threshold = result["setup"], result["threshold"]
    print(f"policy {result['policy']}, budget {args.max_labels} labels: "
          f"{result['reference_calls']} {setup.new_name} calls in {args.steps} MD steps "
          f"({100 * result['reference_calls'] / args.steps:.0f} % of the steps)\n")
    _common.print_table(
        [{"step": r["step"], "generation": r["generation"],
          "sigma (meV/atom)": "-" if r.get("uncertainty") is None
          else f"{1e3 * r['uncertainty']:.2f}",
          "why": _why(r, threshold), "held out": "yes" if r.get("holdout") else ""}
         for r in result["labels"]],
        ["step", "generation", "sigma (meV/atom)", "why", "held out"])
    print(f"\nErrors against {setup.new_name} on {result['n_test']} frames of an "
          "independent MD (MAE):\n")
    _common.print_table(result["rows"], ["model", "energy_mae_meV_per_atom",
                                         "forces_mae_meV_per_A"])
    if args.report:
        from ase_petft.report import write_report

        report = write_report(result["workdir"] / "learner", args.report,
                              buffer=result["workdir"] / "labels.h5")
        print(f"\nplots: {', '.join(str(p) for p in report.files.values())}")
    return result


if __name__ == "__main__":
    main()
