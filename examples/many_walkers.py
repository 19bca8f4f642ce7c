"""Several MD walkers, one learner: walkers at different temperatures share labels and
generations.

The demo PET (pretrained on GFN1-xTB) runs one Langevin walker per temperature through
a new head ``energy/gfn2``. Each walker asks for GFN2-xTB labels without waiting for
them; one coordinator (this process) labels each structure once, refits in the
background and hot-swaps every accepted generation into every walker between two of
its steps. Walkers run in threads here, or with ``--dask`` as tasks on a local
dask.distributed cluster of worker processes (the reference calls too): the same
code runs on a cluster with ``dask-jobqueue``'s client.

    python examples/many_walkers.py                  # 4 walkers, a few minutes on 2 cores
    python examples/many_walkers.py --quick          # a short run
    python examples/many_walkers.py --walkers 2 --dask
    python examples/many_walkers.py --molecules CH3CONH2,HCOOCH3,C3H9N   # one per molecule
    python examples/many_walkers.py --system cuni --checkpoint cuni-emt.ckpt

Run it again with the same ``--workdir`` to resume every walker where it stopped.
The last line printed is one JSON object (walkers, generation_per_walker,
reference_calls, labels, wall_time_s, ...). Plots: ``petft report WORKDIR/campaign``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets OMP_NUM_THREADS before torch loads)

import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402

from ase_petft import (Campaign, FineTunableCalculator, FineTuneConfig, LabelBuffer,  # noqa: E402
                       Walker)
from ase_petft.learner import every  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _common.add_arguments(parser)
    parser.add_argument("--walkers", type=int, default=4, help="walkers (one per temperature)")
    parser.add_argument("--molecules", default=None,
                        help="comma-separated ase.build.molecule names: one walker per "
                             "molecule at the setup's temperature (instead of --walkers)")
    parser.add_argument("--steps", type=int, default=600, help="MD steps per walker")
    parser.add_argument("--every", type=int, default=20,
                        help="a walker asks for a label every n-th of its steps")
    parser.add_argument("--max-labels", type=int, default=40, help="label budget (all walkers)")
    parser.add_argument("--refit-every", type=int, default=8, help="refit after n new labels")
    parser.add_argument("--method", choices=["heads", "full", "lora"], default="heads")
    parser.add_argument("--dask", action="store_true",
                        help="walkers and reference calls on a local dask cluster")
    parser.add_argument("--test-frames", type=int, default=6)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    args = _common.parse(parser, argv, {"walkers": 2, "steps": 1000, "every": 8,
                                        "max_labels": 8, "refit_every": 4,
                                        "test_frames": 2})
    if args.molecules and args.system != "molecule":
        parser.error("--molecules needs --system molecule")
    if args.walkers < 1 or args.steps < 1 or args.every < 1 or args.max_labels < 1:
        parser.error("--walkers, --steps, --every and --max-labels must be positive")
    return args


def temperatures(setup, n: int) -> list:
    """``n`` temperatures around the setup's: 0.75×, 1×, 1.25×, ... of it."""
    return [setup.temperature_K * (0.75 + 0.25 * i) for i in range(n)]


def starts(setup, args) -> list:
    """(walker name, structure factory, temperature) of every walker."""
    if args.molecules:
        from ase.build import molecule

        return [(name, functools.partial(molecule, name), setup.temperature_K)
                for name in args.molecules.split(",")]
    return [(f"T{t:.0f}", setup.start, t) for t in temperatures(setup, args.walkers)]


def make_walkers(setup, args) -> list:
    walkers = []
    for i, (name, start, temperature) in enumerate(starts(setup, args)):
        atoms = start()
        _common.thermalize(atoms, temperature, np.random.default_rng(args.seed + i))
        walkers.append(Walker(
            name=name, atoms=atoms, steps=args.steps,
            dynamics=functools.partial(Langevin, timestep=setup.timestep_fs * units.fs,
                                       temperature_K=temperature, friction=0.02,
                                       fixcm=False)))
    return walkers


def _client(args):
    if not args.dask:
        return None
    try:
        import cloudpickle
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise SystemExit("--dask needs dask.distributed: pip install 'ase-petft[dask]'") from exc
    cloudpickle.register_pickle_by_value(_common)  # workers cannot import this folder
    cluster = LocalCluster(n_workers=min(args.walkers, 2), threads_per_worker=1,
                           processes=True, dashboard_address=None)
    return Client(cluster)


def run(args: argparse.Namespace) -> dict:
    setup = _common.setup_from_args(args)
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="petft-walkers-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = FineTuneConfig(method=args.method, seed=args.seed,
                            **({} if args.method == "heads" else {"num_epochs": 20}))
    client = _client(args)
    try:
        with LabelBuffer(workdir / "labels.h5", mode="a") as buffer, Campaign(
                setup.checkpoint, variant=setup.variant, reference=setup.new_level(),
                buffer=buffer, workdir=workdir / "campaign", select=every(args.every),
                refit_every=args.refit_every, max_labels=args.max_labels,
                config=config, holdout_fraction=0.25) as campaign:
            result = campaign.run(make_walkers(setup, args), client=client,
                                  stop_when_budget_spent=True)
            final = campaign.calc
    finally:
        if client is not None:
            client.close()
            client.cluster.close()
    test = []  # independent MD frames of every simulated molecule
    for name, start, _ in starts(setup, args)[:None if args.molecules else 1]:
        frames = _common.sample_structures(dataclasses.replace(setup, start=start),
                                           args.test_frames, seed=args.seed + 100)
        test += _common.label_all(frames, setup.new_level())
    zero_shot = FineTunableCalculator(setup.checkpoint, variant=setup.variant)
    rows = [{"model": "generation 0 (copy of the pretrained head)",
             **_common.errors(zero_shot, test)},
            {"model": f"generation {final.generation} (after the run)",
             **_common.errors(final, test)}]
    return {"result": result, "rows": rows, "workdir": workdir, "setup": setup,
            "n_test": len(test)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = run(args)
    result, setup = out["result"], out["setup"]
    print(f"\n{len(result.walkers)} walkers, {result.reference_calls} {setup.new_name} calls, "
          f"{result.labels} labels in the buffer, {result.wall_time_s:.1f} s:\n")
    _common.print_table([{"walker": name, "steps": w.get("steps"),
                          "label requests": w.get("label_requests"),
                          "swaps": len(w.get("swaps", [])) - 1,
                          "generation": w.get("generation"), "error": w.get("error") or ""}
                         for name, w in result.walkers.items()],
                        ["walker", "steps", "label requests", "swaps", "generation", "error"])
    print(f"\nErrors against {setup.new_name} on {out['n_test']} frames of an independent "
          "MD (MAE):\n")
    _common.print_table(out["rows"], ["model", "energy_mae_meV_per_atom",
                                      "forces_mae_meV_per_A"])
    print(f"\nPlots: petft report {out['workdir'] / 'campaign'} -o {out['workdir'] / 'report'} "
          f"--buffer {out['workdir'] / 'labels.h5'}")
    summary = {"walkers": len(result.walkers),
               "generation_per_walker": result.generation_per_walker,
               "generation": result.generation, "reference_calls": result.reference_calls,
               "labels": result.labels, "failed_labels": result.failed_labels,
               "wall_time_s": round(result.wall_time_s, 2),
               "forces_mae_meV_per_A": {"zero_shot": out["rows"][0]["forces_mae_meV_per_A"],
                                        "final": out["rows"][1]["forces_mae_meV_per_A"]},
               "workdir": str(out["workdir"])}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
