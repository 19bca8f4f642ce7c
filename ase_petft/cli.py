"""The ``petft`` command: demo, finetune, buffer {info,export,import}, export, report.

Exit codes: 0 success, 2 bad usage or bad input (one line on stderr, no traceback),
1 a failure during the job (see :func:`ase_petft._cli_common.exit_code`). The
subcommands other than ``demo`` live in ``_cli_finetune``, ``_cli_buffer`` and
``_cli_report``; ``petft COMMAND --help`` describes each.
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
from ._cli_buffer import add_buffer_parser
from ._cli_common import exit_code, one_line
from ._cli_finetune import add_export_parser, add_finetune_parser
from ._cli_report import add_report_parser

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _demo(args: argparse.Namespace) -> int:
    from . import demo

    settings = demo.settings_from_args(args)
    workdir = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(
        tempfile.mkdtemp(prefix="petft-demo-")
    )
    with _progress(settings.steps, "MD steps", args.quiet) as bar:
        report = demo.run_demo(settings, workdir=workdir, progress=bar.update)
    print(demo.format_report(report, settings))
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
    from .demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)
    add_finetune_parser(sub)
    add_buffer_parser(sub)
    add_export_parser(sub)
    add_report_parser(sub)
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
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_FAILURE
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return EXIT_FAILURE
    except Exception as exc:  # say what, on one line; the traceback only with -vv
        logging.getLogger("ase_petft.cli").debug("traceback", exc_info=True)
        code, name = exit_code(exc), " ".join([args.command, getattr(args, "action", "")])
        if code == EXIT_USAGE:
            print(f"petft {name.strip()}: error: {one_line(exc)}", file=sys.stderr)
        else:
            print(f"petft {name.strip()}: failed: {type(exc).__name__}: {one_line(exc)} "
                  "(run with -vv for the traceback)", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
