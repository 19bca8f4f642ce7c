"""The ``petft`` command: demo, finetune, buffer {info,export,import}, export, report.

One module per subcommand (``demo``, ``finetune``, ``export``, ``buffer``,
``report``), each with ``add_parser(sub)`` and its runner; what they share (exit
codes, the one-line usage errors, progress bars, reading label files) is in
``_common``. ``petft COMMAND --help`` describes each command.

Exit codes: 0 success, 2 bad usage or bad input, 1 the work failed — an error's code
is :func:`ase_petft.errors.exit_code` (:class:`~ase_petft.errors.InputError` is 2).
Errors are one line on stderr; ``-vv`` logs the traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import List, Optional

from .. import __version__
from . import buffer, demo, export, finetune, report
from ._common import EXIT_FAILED, EXIT_INPUT, Parser, exit_code, one_line

__all__ = ["main", "build_parser"]

_COMMANDS = (demo, finetune, buffer, export, report)


def build_parser() -> Parser:
    """The argument parser of ``petft`` with every subcommand."""
    parser = Parser(
        prog="petft",
        description="On-the-fly fine-tuning of PET potentials in ASE simulations.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="log more (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in _COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``petft`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
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
        return EXIT_FAILED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stdout = open(os.devnull, "w")
        return EXIT_FAILED
    except Exception as exc:  # say what, on one line; the traceback only with -vv
        logging.getLogger(__name__).debug("traceback", exc_info=True)
        code = exit_code(exc)
        name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        if code == EXIT_INPUT:
            print(f"petft {name}: error: {one_line(exc)}", file=sys.stderr)
        else:
            print(f"petft {name}: failed: {type(exc).__name__}: {one_line(exc)} "
                  "(run with -vv for the traceback)", file=sys.stderr)
        return code
