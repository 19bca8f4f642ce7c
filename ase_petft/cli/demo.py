"""``petft demo``: the main job (:func:`ase_petft.demo.run_demo`) and its printed report."""

from __future__ import annotations

import argparse
import pathlib
import tempfile

from ._common import EXIT_OK, step_bar


def add_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="MD with the demo model, GFN2-xTB labels, refit, hot swap",
        description="Run MD with the shipped demo model on a molecule outside its "
        "training data, label frames with GFN2-xTB, fine-tune a new 'energy/gfn2' "
        "head in-process, hot-swap it into the running calculator and report errors "
        "before/after on held-out frames.",
    )
    add_arguments(p)
    p.set_defaults(func=run)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``petft demo`` (defaults: those of :class:`~ase_petft.demo.DemoSettings`)."""
    from ..demo import DemoSettings

    defaults = DemoSettings()
    parser.add_argument("--steps", type=int, default=defaults.steps, help="MD steps")
    parser.add_argument("--threshold", type=float, default=defaults.threshold_eV_per_atom,
                        help="label when the energy uncertainty exceeds this (eV/atom)")
    parser.add_argument("--min-gap", type=int, default=defaults.min_gap,
                        help="never label two structures closer than this many steps")
    parser.add_argument("--max-gap", type=int, default=defaults.max_gap,
                        help="label at least every this many steps")
    parser.add_argument("--max-labels", type=int, default=defaults.max_labels,
                        help="budget of GFN2-xTB calls")
    parser.add_argument("--refit-every", type=int, default=defaults.refit_every)
    parser.add_argument("--method", choices=["heads", "full", "lora"], default=defaults.method)
    parser.add_argument("--inline", action="store_true",
                        help="refit inline instead of in a background thread")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1,
                        help="run this many seeds (seed, seed+1, ...) and print the spread")
    parser.add_argument("--workdir", default=None,
                        help="where the buffer and generations go (default: a new temp dir)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def settings_from_args(args: argparse.Namespace):
    """The :class:`~ase_petft.demo.DemoSettings` of parsed ``petft demo`` options."""
    from ..demo import DemoSettings

    return DemoSettings(
        steps=args.steps, threshold_eV_per_atom=args.threshold, min_gap=args.min_gap,
        max_gap=args.max_gap,
        max_labels=args.max_labels, refit_every=args.refit_every, method=args.method,
        background=not args.inline, seed=args.seed,
        checkpoints=min(DemoSettings().checkpoints, args.steps),
    )


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..demo import run_demo
    from ..errors import UsageError

    if args.seeds < 1:
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    base = settings_from_args(args)
    root = pathlib.Path(args.workdir) if args.workdir else pathlib.Path(
        tempfile.mkdtemp(prefix="petft-demo-"))
    reports = []
    for index in range(args.seeds):
        settings = dataclasses.replace(base, seed=base.seed + index)
        workdir = root if args.seeds == 1 else root / f"seed-{settings.seed}"
        with step_bar(settings.steps, f"MD steps (seed {settings.seed})", args.quiet) as bar:
            report = run_demo(settings, workdir=workdir, progress=bar.update)
        print(format_report(report, settings), flush=True)
        reports.append((settings.seed, report))
    if args.seeds > 1:
        print(format_spread(reports))
    return EXIT_OK


def format_spread(reports) -> str:
    """One line per seed and the spread of the final force error."""
    lines = ["", "Seeds (held-out errors against GFN2-xTB at the end of each run):", "",
             "  seed  calls  gen  F zero-shot  F final  final/zero-shot  F GFN1-xTB"]
    finals = []
    for seed, report in reports:
        zero = _baseline(report, "zero-shot")["forces_mae_meV_per_A"]
        gfn1 = _baseline(report, "GFN1")["forces_mae_meV_per_A"]
        final = report.rows[-1]["forces_mae_meV_per_A"]
        finals.append(final / zero)
        lines.append(f"  {seed:4d}  {report.oracle_calls:5d}  {report.generation:3d}  "
                     f"{zero:11.1f}  {final:7.1f}  {final / zero:15.2f}  {gfn1:10.1f}")
    lines.append(f"  final/zero-shot: mean {sum(finals) / len(finals):.2f}, range "
                 f"{min(finals):.2f}-{max(finals):.2f} over {len(finals)} seeds")
    return "\n".join(lines)


def _baseline(report, word: str) -> dict:
    return next(row for row in report.baselines if word in row["model"])


def format_report(report, settings) -> str:
    """The printed result of the demo: errors against GFN2-xTB along the run."""
    lines = [
        f"Molecule {report.molecule} ({report.n_atoms} atoms, not in the demo model's "
        f"training set), Langevin {settings.temperature_K:.0f} K, "
        f"{settings.timestep_fs} fs steps, MD {report.md_ms_per_step:.1f} ms/step.",
        f"GFN2-xTB oracle calls: {report.oracle_calls} (labels in buffer: "
        f"{report.n_labels}); generation {report.generation}; refits "
        + ", ".join(f"{t:.1f}" for t in report.refit_times_s) + " s.",
        "",
        "Errors against GFN2-xTB on held-out frames (independent MD). Two levels of",
        "theory differ by a near-constant energy per atom; 'E shape' removes that mean",
        "offset (what a fitted per-element baseline absorbs) and shows what is left:",
        "",
        f"  {'reference point':<48}  E MAE meV/atom  E shape  F MAE meV/Å",
    ]
    for row in report.baselines:
        lines.append(f"  {row['model']:<48}  {row['energy_mae_meV_per_atom']:14.1f}"
                     f"  {row.get('energy_mae_offset_removed_meV_per_atom', float('nan')):7.1f}"
                     f"  {row['forces_mae_meV_per_A']:11.1f}")
    lines += ["", f"  {'time ps':>7}  {'oracle calls':>12}  {'generation':>10}"
                  f"  E MAE meV/atom  E shape  F MAE meV/Å"]
    for row in report.rows:
        lines.append(f"  {row['time_ps']:7.3f}  {row['oracle_calls']:12d}"
                     f"  {row['generation']:10d}  {row['energy_mae_meV_per_atom']:14.1f}"
                     f"  {row.get('energy_mae_offset_removed_meV_per_atom', float('nan')):7.1f}"
                     f"  {row['forces_mae_meV_per_A']:11.1f}")
    lines += ["", f"Total {report.wall_time_s:.0f} s; buffer and generations in "
                  f"{report.workdir}"]
    return "\n".join(lines)
