"""The ``petft`` command.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr, no traceback),
1 a failure during the job.
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
import sys
import tempfile
from typing import List, Optional

from . import __version__
from .errors import PetftError

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoSettings, run_demo

    settings = DemoSettings(
        steps_before=args.steps, steps_after=args.steps, n_labels=args.labels,
        n_holdout=args.holdout, method=args.method, seed=args.seed,
    )
    workdir = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(
        tempfile.mkdtemp(prefix="petft-demo-")
    )
    total = settings.steps_before + settings.steps_after
    with _progress(total, "MD steps", args.quiet) as bar:
        report = run_demo(settings, workdir=workdir, progress=bar.update)
    print(f"\nMolecule {report.molecule} ({report.n_atoms} atoms), {report.md_steps} MD "
          f"steps at {settings.temperature_K:.0f} K; {report.n_labels} GFN2-xTB labels, "
          f"refit + swap in {report.refit_time_s:.1f} s (generation {report.generation}).")
    print(f"Errors against GFN2-xTB on {report.n_holdout} held-out frames from the MD "
          "after the swap:\n")
    width = max(len(r["model"]) for r in report.rows)
    print(f"  {'model':<{width}}  E MAE meV/atom  F MAE meV/Å")
    for row in report.rows:
        print(f"  {row['model']:<{width}}  {row['energy_mae_meV_per_atom']:14.1f}"
              f"  {row['forces_mae_meV_per_A']:11.1f}")
    print(f"\nTotal {report.wall_time_s:.0f} s; generations in {report.workdir}")
    return EXIT_OK


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _progress(total: int, desc: str, quiet: bool):
    if quiet:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, leave=False)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="petft",
        description="On-the-fly fine-tuning of PET potentials in ASE simulations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo", help="MD with the demo model, GFN2-xTB labels, refit, hot swap",
        description="Run MD with the shipped demo model on a molecule outside its "
        "training data, label frames with GFN2-xTB, fine-tune a new 'energy/gfn2' "
        "head in-process, hot-swap it into the running calculator and report errors "
        "before/after on held-out frames.",
    )
    demo.add_argument("--steps", type=int, default=200, help="MD steps before and after the refit")
    demo.add_argument("--labels", type=int, default=10, help="GFN2-xTB labels to train on")
    demo.add_argument("--holdout", type=int, default=10, help="held-out frames for errors")
    demo.add_argument("--method", choices=["heads", "full", "lora"], default="heads")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--workdir", default=None, help="where generations are written")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: 2 for bad usage, 0 for --help
        return int(exc.code or 0)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return args.func(args)
    except (PetftError, ValueError, FileNotFoundError) as exc:
        print(f"petft {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a failure during the job: say what, keep it short
        logging.getLogger("ase_petft.cli").debug("traceback", exc_info=True)
        print(f"petft {args.command}: failed: {type(exc).__name__}: {exc} "
              "(run with -vv for the traceback)", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
