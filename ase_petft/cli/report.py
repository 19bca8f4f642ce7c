"""``petft report``: figures and a summary of an on-the-fly learning run."""

from __future__ import annotations

import argparse
import pathlib

from ._common import EXIT_OK, UsageError, existing_dir, existing_file


def add_parser(sub) -> None:
    p = sub.add_parser(
        "report", help="plots and a summary of an OnTheFlyLearner run",
        description="Read a learner work directory (history.jsonl, gen-*/decision.json, "
        "gen-*/metrics.json) and write PNG figures: errors.png (held-out errors per "
        "refit), trajectory.png (uncertainty and reference calls along the run), "
        "refit_times.png and, with --buffer, parity.png (predicted vs reference forces "
        "of the accepted generations on the held-out labels); plus summary.txt and "
        "report.json (the data behind the figures).",
    )
    p.add_argument("workdir", metavar="WORKDIR", help="the learner's workdir")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="report directory (created if needed; its figures are replaced)")
    p.add_argument("--buffer", default=None, metavar="FILE",
                   help="the run's label buffer (.h5): enables the parity plot")
    p.add_argument("--variant", default=None,
                   help="the run's variant (default: read from the refits)")
    p.add_argument("--max-generations", type=int, default=4,
                   help="generations shown in the parity plot (default 4)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..variants import validate_variant

    workdir = existing_dir(args.workdir, "learner work directory")
    output = _output_dir(args.output)
    buffer = None if args.buffer is None else existing_file(args.buffer, "label buffer")
    variant = None if args.variant is None else validate_variant(args.variant)
    if args.max_generations < 1:
        raise UsageError("--max-generations must be at least 1")
    from ..report import write_report  # imports torch: after the checks of the arguments

    report = write_report(workdir, output, buffer=buffer, variant=variant,
                          max_parity_generations=args.max_generations)
    print(report.summary.rstrip())
    print("\nwrote " + ", ".join(str(p) for p in report.files.values()))
    return EXIT_OK


def _output_dir(path: str) -> pathlib.Path:
    """``path`` as a Path, or a UsageError if it (or a parent) is an existing file."""
    output = pathlib.Path(path)
    found = next((p for p in (output, *output.parents) if p.exists()), None)
    if found is not None and not found.is_dir():
        what = "exists and is not a directory" if found == output else \
            f"cannot be created: {str(found)!r} is a file"
        raise UsageError(f"output {path!r} {what}; the report is a directory of figures: "
                         "give a new or existing directory")
    return output
