"""``petft report``: figures and a summary of an on-the-fly learning run."""

from __future__ import annotations

import argparse

from ._cli_common import EXIT_OK, UsageError, existing_file


def add_report_parser(sub) -> None:
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
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="report directory")
    p.add_argument("--buffer", default=None, metavar="FILE",
                   help="the run's label buffer (.h5): enables the parity plot")
    p.add_argument("--variant", default=None,
                   help="the run's variant (default: read from the refits)")
    p.add_argument("--max-generations", type=int, default=4,
                   help="generations shown in the parity plot (default 4)")
    p.set_defaults(func=run_report)


def run_report(args: argparse.Namespace) -> int:
    from .report import write_report
    from .variants import validate_variant

    buffer = None if args.buffer is None else existing_file(args.buffer, "label buffer")
    variant = None if args.variant is None else validate_variant(args.variant)
    if args.max_generations < 1:
        raise UsageError("--max-generations must be at least 1")
    report = write_report(args.workdir, args.output, buffer=buffer, variant=variant,
                          max_parity_generations=args.max_generations)
    print(report.summary.rstrip())
    print("\nwrote " + ", ".join(str(p) for p in report.files.values()))
    return EXIT_OK
