"""Multi-fidelity fine-tuning with real DFT: one PET, a PBE head and a PBE0 head.

The scenario of metatrain's fine-tuning documentation (a model fine-tuned from PBE to
the more expensive PBE0), run in-process on real DFT labels from PySCF:

1. structures of a small molecule are sampled by GFN1-xTB MD (the demo model's level);
2. each is labelled with PBE and with PBE0 (PySCF, ``--basis``, default def2-SVP);
3. ``finetune`` creates the head ``energy/pbe`` from the pretrained ``energy`` head and
   fits it to the PBE labels;
4. a second ``finetune`` creates ``energy/pbe0`` from ``energy/pbe`` (``inherit_from``)
   and fits it to the PBE0 labels, replaying the PBE labels (with ``--method full``
   this is what keeps the PBE head);
5. both heads of the final checkpoint are used — through ``FineTunableCalculator`` and
   through the exported metatomic model with ``variants={"energy": ...}`` — and scored
   against PBE and PBE0 on held-out structures.

    pip install 'ase-petft[dft,xtb]'
    python examples/pbe_to_pbe0.py --train 12 --test 6   # methyl formate, def2-SVP: ~5 minutes
    python examples/pbe_to_pbe0.py --quick        # water: ~20 s
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import _common  # noqa: E402  (sets OMP_NUM_THREADS before torch loads)

import numpy as np  # noqa: E402
from ase import units  # noqa: E402
from ase.calculators.calculator import Calculator, all_changes  # noqa: E402

from ase_petft import FineTunableCalculator, FineTuneConfig, finetune  # noqa: E402


class PySCFDFT(Calculator):
    """Kohn-Sham DFT energies and forces of molecules with PySCF (closed shell)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, *, xc: str, basis: str, charge: int = 0, spin: int = 0) -> None:
        super().__init__()
        self.parameters = {"xc": xc, "basis": basis, "charge": charge, "spin": spin}

    @property
    def name(self) -> str:  # recorded as the labels' reference
        return f"pyscf-{self.parameters['xc']}"

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        from pyscf import dft, gto

        super().calculate(atoms, properties, system_changes)
        p = self.parameters
        mol = gto.M(atom=list(zip(self.atoms.get_chemical_symbols(), self.atoms.positions)),
                    unit="Angstrom", basis=p["basis"], charge=p["charge"], spin=p["spin"],
                    verbose=0)
        scf = dft.RKS(mol, xc=p["xc"]) if p["spin"] == 0 else dft.UKS(mol, xc=p["xc"])
        energy = scf.kernel()
        if not scf.converged:
            raise RuntimeError(f"PySCF {p['xc']} SCF did not converge")
        gradient = scf.nuc_grad_method().kernel()
        self.results = {"energy": energy * units.Hartree,
                        "forces": -np.asarray(gradient) * units.Hartree / units.Bohr}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=None, help="default: the demo model")
    parser.add_argument("--molecule", default="HCOOCH3",
                        help="ase.build.molecule name (default: methyl formate, held out of "
                             "the demo model's training)")
    parser.add_argument("--basis", default="def2-svp")
    parser.add_argument("--train", type=int, default=16, help="labelled structures per level")
    parser.add_argument("--test", type=int, default=8, help="held-out structures")
    parser.add_argument("--method", choices=["heads", "full"], default="heads")
    parser.add_argument("--epochs", type=int, default=40, help="SGD epochs (full)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a new temporary folder")
    return _common.parse(parser, argv, {"molecule": "H2O", "train": 4, "test": 3,
                                        "epochs": 5})


def sample(name: str, n: int, *, seed: int, stride: int = 20) -> list:
    """Structures from a GFN1-xTB Langevin MD at 400 K (the demo model's own level)."""
    from ase.build import molecule
    from ase.md.langevin import Langevin

    atoms = molecule(name)
    atoms.calc = _common.xtb("GFN1-xTB")
    rng = np.random.default_rng(seed)
    _common.thermalize(atoms, 400, rng)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=400, friction=0.02, rng=rng,
                   fixcm=False)
    dyn.run(2 * stride)
    frames = []
    for _ in range(n):
        dyn.run(stride)
        frames.append(atoms.copy())
    for frame in frames:
        frame.calc = None
    return frames


def train_heads(checkpoint, data: dict, args, workdir: pathlib.Path):
    """PBE head from 'energy', then PBE0 head from 'energy/pbe' (replaying PBE)."""
    # epochs exist for metatrain's SGD (full), not for the closed-form heads solver
    config = FineTuneConfig(method=args.method, seed=args.seed,
                            **({"num_epochs": args.epochs} if args.method == "full" else {}))
    keep_gfn1 = {"energy": data["train"]["gfn1"]} if args.method == "full" else {}
    pbe = finetune(checkpoint, data["train"]["pbe"], variant="energy/pbe",
                   config=config.replace(inherit_from="energy"), replay=keep_gfn1 or None,
                   output_dir=workdir / "1-pbe")
    pbe0 = finetune(pbe.checkpoint_path, data["train"]["pbe0"], variant="energy/pbe0",
                    config=config.replace(inherit_from="energy/pbe"),
                    replay={"energy/pbe": data["train"]["pbe"], **keep_gfn1},
                    output_dir=workdir / "2-pbe0")
    return pbe, pbe0


def evaluate(checkpoint, data: dict, pbe: PySCFDFT) -> list:
    test = data["test"]
    rows = []
    for label, calc in [
        ("pretrained 'energy' head (GFN1, zero-shot)",
         FineTunableCalculator(checkpoint["base"], variant="energy")),
        ("PBE itself", pbe),
        ("'energy/pbe' (fine-tuned)",
         FineTunableCalculator(checkpoint["final"], variant="energy/pbe", inherit_from=None)),
        ("'energy/pbe0' (fine-tuned)",
         FineTunableCalculator(checkpoint["final"], variant="energy/pbe0", inherit_from=None)),
    ]:
        row = {"model": label}
        for level in ("pbe", "pbe0"):
            if calc is pbe and level == "pbe":
                continue
            err = _common.errors(calc, test[level])
            row[f"E vs {level.upper()}"] = err["energy_mae_meV_per_atom"]
            row[f"F vs {level.upper()}"] = err["forces_mae_meV_per_A"]
        rows.append(row)
    return rows


def exported_agrees(model_path, final_ckpt, frame) -> float:
    """Largest |E| difference (eV) between the exported .pt and the checkpoint, both heads."""
    from metatomic_ase import MetatomicCalculator

    worst = 0.0
    for name in ("pbe", "pbe0"):
        probe = frame.copy()
        probe.calc = MetatomicCalculator(str(model_path), variants={"energy": name},
                                         uncertainty_threshold=None)
        exported = probe.get_potential_energy()
        probe.calc = FineTunableCalculator(final_ckpt, variant=f"energy/{name}",
                                           inherit_from=None)
        worst = max(worst, abs(exported - probe.get_potential_energy()))
    return worst


def run(args: argparse.Namespace) -> dict:
    from ase_petft import demo_checkpoint, label

    checkpoint = pathlib.Path(args.checkpoint) if args.checkpoint else demo_checkpoint()
    workdir = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="petft-pbe0-"))
    levels = {"pbe": PySCFDFT(xc="pbe", basis=args.basis),
              "pbe0": PySCFDFT(xc="pbe0", basis=args.basis), "gfn1": _common.xtb("GFN1-xTB")}
    start = time.perf_counter()
    frames = {"train": sample(args.molecule, args.train, seed=args.seed),
              "test": sample(args.molecule, args.test, seed=args.seed + 100)}
    data = {split: {name: [label(f, calc) for f in frames[split]]
                    for name, calc in levels.items()} for split in frames}
    dft_time = time.perf_counter() - start
    pbe, pbe0 = train_heads(checkpoint, data, args, workdir)
    rows = evaluate({"base": checkpoint, "final": pbe0.checkpoint_path}, data, levels["pbe"])
    worst = exported_agrees(pbe0.model_path, pbe0.checkpoint_path, data["test"]["pbe0"][0])
    return {"rows": rows, "results": (pbe, pbe0), "dft_time_s": dft_time,
            "exported_max_dE_eV": worst, "workdir": workdir, "n_train": args.train,
            "n_test": args.test}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = run(args)
    pbe, pbe0 = out["results"]
    print(f"{args.molecule}: {out['n_train']} training and {out['n_test']} held-out structures, "
          f"PBE and PBE0/{args.basis} labels in {out['dft_time_s']:.0f} s")
    print(f"fine-tuned 'energy/pbe' in {pbe.wall_time_s:.1f} s and 'energy/pbe0' in "
          f"{pbe0.wall_time_s:.1f} s ({args.method}); final checkpoint {pbe0.checkpoint_path}")
    print("\nHeld-out MAE (E meV/atom, F meV/Å; energies of different levels differ by "
          "per-element constants, so zero-shot energy errors are large):\n")
    _common.print_table(out["rows"], ["model", "E vs PBE", "F vs PBE", "E vs PBE0",
                                      "F vs PBE0"])
    print(f"\nexported model {pbe0.model_path}: MetatomicCalculator(path, variants="
          f"{{'energy': 'pbe0'}}) matches the checkpoint to {out['exported_max_dE_eV']:.1e} eV")
    return out


if __name__ == "__main__":
    main()
