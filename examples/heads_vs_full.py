"""Heads-only or full fine-tuning? Accuracy on the new level, forgetting, time.

One set of labels of a *new* level of theory (GFN2-xTB for the demo model, which was
pretrained on GFN1-xTB), several ways to fit a new head ``energy/gfn2`` to it:

* ``heads`` (closed-form linear solver, and metatrain's SGD): only the last layers of
  the new head move; the pretrained ``energy`` head stays bit-identical;
* ``full``: every weight moves (backbone included); metatrain then drops every head
  without data, so the pretrained head is gone — unless its labels are *replayed*;
* ``lora``: low-rank adapters on the backbone (merged afterwards), same head rule.

The table shows the errors of the new head against the new level, the errors of the
pretrained ``energy`` head against its own (old) level after the run ("forgetting"),
and the wall time, all on held-out structures of an independent MD.

    python examples/heads_vs_full.py                # ~3 minutes on 2 cores
    python examples/heads_vs_full.py --quick
    python examples/heads_vs_full.py --system cuni --checkpoint cuni-emt.ckpt
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets OMP_NUM_THREADS before torch loads)

from ase_petft import (FineTunableCalculator, FineTuneConfig, FineTuneError,  # noqa: E402
                       finetune)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument("--labels", type=int, default=24, help="labels of the new level")
    parser.add_argument("--test", type=int, default=12, help="held-out structures")
    parser.add_argument("--epochs", type=int, default=40, help="SGD epochs")
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    return _common.parse(parser, argv, {"labels": 6, "test": 3, "epochs": 4})


def runs(args) -> dict:
    """name -> (FineTuneConfig, replay old-level labels?)"""
    sgd = dict(num_epochs=args.epochs, learning_rate=1e-3, batch_size=4, seed=args.seed)
    return {
        "heads (linear solver)": (FineTuneConfig(method="heads", seed=args.seed), False),
        "heads (SGD)": (FineTuneConfig(method="heads", solver="sgd", **sgd), False),
        "full": (FineTuneConfig(method="full", **sgd), False),
        "full + replay": (FineTuneConfig(method="full", **sgd), True),
        "lora": (FineTuneConfig(method="lora", **sgd), False),
    }


def row(name, checkpoint, setup, test, *, wall=None, dropped=()) -> dict:
    new = _common.errors(FineTunableCalculator(checkpoint, variant=setup.variant), test["new"])
    out = {"method": name, "time (s)": "-" if wall is None else f"{wall:.1f}",
           "new E (meV/atom)": new["energy_mae_meV_per_atom"],
           "new F (meV/Å)": new["forces_mae_meV_per_A"]}
    if "energy" in dropped:
        out["old-head F (meV/Å)"] = "dropped"
    else:
        old = _common.errors(FineTunableCalculator(checkpoint, variant="energy"), test["old"])
        out["old-head F (meV/Å)"] = old["forces_mae_meV_per_A"]
    return out


def run(args: argparse.Namespace) -> list:
    setup = _common.setup_from_args(args)
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="petft-heads-full-"))
    structures = _common.sample_structures(setup, args.labels, seed=args.seed)
    train = _common.label_all(structures, setup.new_level())
    replay = {"energy": _common.label_all(structures, setup.old_level())}
    held_out = _common.sample_structures(setup, args.test, seed=args.seed + 1)
    test = {"new": _common.label_all(held_out, setup.new_level()),
            "old": _common.label_all(held_out, setup.old_level())}
    rows = [row("zero-shot (copy of 'energy')", setup.checkpoint, setup, test)]
    for name, (config, with_replay) in runs(args).items():
        start = time.perf_counter()
        try:
            result = finetune(setup.checkpoint, train, variant=setup.variant, config=config,
                              replay=replay if with_replay else None,
                              output_dir=workdir / name.replace(" ", "_").replace("+", "and"))
        except FineTuneError as exc:  # one method failing must not hide the others
            print(f"{name}: failed: {exc}", file=sys.stderr, flush=True)
            rows.append({"method": name, "time (s)": "failed"})
            continue
        wall = time.perf_counter() - start
        rows.append(row(name, result.checkpoint_path, setup, test, wall=wall,
                        dropped=result.dropped_variants))
        print(f"{name}: {wall:.1f} s", file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> list:
    args = parse_args(argv)
    setup = _common.setup_from_args(args)
    rows = run(args)
    print(f"\n{args.labels} {setup.new_name} labels for the new head {setup.variant!r}; "
          f"held-out MAE on {args.test} structures: new head vs {setup.new_name}, "
          f"pretrained head vs {setup.old_name}; SGD runs: {args.epochs} epochs.\n")
    _common.print_table(rows, ["method", "time (s)", "new E (meV/atom)", "new F (meV/Å)",
                               "old-head F (meV/Å)"])
    return rows


if __name__ == "__main__":
    main()
