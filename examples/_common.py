"""Set-up shared by the examples: the model, the structures and two levels of theory.

Two systems, chosen with ``--system``:

``molecule`` (default)
    the shipped demo PET (``ase_petft.demo_checkpoint()``, pretrained on GFN1-xTB) on a
    small organic molecule; the *old* level is GFN1-xTB, the *new* level GFN2-xTB
    (both from ``tblite``: ``pip install 'ase-petft[xtb]'``).
``cuni``
    a Cu/Ni PET you trained on EMT labels (pass ``--checkpoint``) on a periodic CuNi
    cell; the old level is ASE's EMT, the new level a stiffer re-parameterised EMT.
    Fast: the examples' tests use it when the demo model is not built.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable, Dict, List

# one torch/OpenMP thread per process, and no busy-waiting: see DESIGN.md (thread trap)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
from ase import Atoms, units  # noqa: E402
from ase.calculators.emt import EMT  # noqa: E402

DEFAULT_MOLECULE = "CH3CONH2"  # acetamide: held out from the demo model's training


class StiffEMT(EMT):
    """EMT with a 35 % stiffer pair repulsion and shifted E0: a related level of theory."""

    name = "stiff-emt"

    def initialize(self, atoms):
        super().initialize(atoms)
        self.par["V0"] = self.par["V0"] * 1.35
        self.par["neghalfv0overgamma2"] = self.par["neghalfv0overgamma2"] * 1.35
        self.par["E0"] = self.par["E0"] + np.where(self.par["Z"] == 29, 0.3, -0.2)


def xtb(method: str):
    try:
        from tblite.ase import TBLite
    except ImportError as exc:
        raise SystemExit("this example needs tblite: pip install 'ase-petft[xtb]'") from exc
    return TBLite(method=method, verbosity=0)


@dataclasses.dataclass(frozen=True)
class Setup:
    """A model, a starting structure and two levels of theory (old = pretrained)."""

    checkpoint: pathlib.Path
    start: Callable[[], Atoms]
    old_level: Callable[[], object]
    new_level: Callable[[], object]
    old_name: str
    new_name: str
    variant: str               # the new head fine-tuned to the new level
    temperature_K: float
    timestep_fs: float
    threshold_eV_per_atom: float  # a sensible uncertainty trigger for this model


def add_arguments(parser) -> None:
    parser.add_argument("--system", choices=["molecule", "cuni"], default="molecule",
                        help="demo model + xTB (default), or a Cu/Ni model + EMT")
    parser.add_argument("--checkpoint", default=None,
                        help="PET checkpoint (default: the shipped demo model)")
    parser.add_argument("--molecule", default=None,
                        help=f"ase.build.molecule name (default {DEFAULT_MOLECULE})")
    parser.add_argument("--seed", type=int, default=0)


def parse(parser, argv, quick_defaults: Dict[str, object]):
    """Parse ``argv``; with ``--quick`` the defaults become ``quick_defaults`` (options
    given explicitly still win)."""
    parser.add_argument("--quick", action="store_true", help="a short run (smoke test)")
    known, _ = parser.parse_known_args(argv)
    if known.quick:
        parser.set_defaults(**quick_defaults)
    return parser.parse_args(argv)


def setup_from_args(args) -> Setup:
    if args.system == "cuni":
        if args.checkpoint is None:
            raise SystemExit("--system cuni needs --checkpoint: a Cu/Ni PET trained on EMT")
        return Setup(checkpoint=pathlib.Path(args.checkpoint), start=_cuni_cell,
                     old_level=EMT, new_level=StiffEMT, old_name="EMT",
                     new_name="stiff EMT", variant="energy/stiff", temperature_K=300.0,
                     timestep_fs=1.0, threshold_eV_per_atom=0.002)
    from ase.build import molecule

    from ase_petft import demo_checkpoint

    checkpoint = pathlib.Path(args.checkpoint) if args.checkpoint else demo_checkpoint()
    name = args.molecule or DEFAULT_MOLECULE
    return Setup(checkpoint=checkpoint, start=lambda: molecule(name),
                 old_level=lambda: xtb("GFN1-xTB"), new_level=lambda: xtb("GFN2-xTB"),
                 old_name="GFN1-xTB", new_name="GFN2-xTB", variant="energy/gfn2",
                 temperature_K=400.0, timestep_fs=0.5, threshold_eV_per_atom=0.01)


def _cuni_cell() -> Atoms:
    from ase.build import bulk

    rng = np.random.default_rng(7)
    atoms = bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 2, 2))
    atoms.symbols = rng.choice(["Cu", "Ni"], size=len(atoms))
    atoms.positions += rng.normal(scale=0.05, size=atoms.positions.shape)
    return atoms


def thermalize(atoms: Atoms, temperature_K: float, rng) -> None:
    """Maxwell-Boltzmann momenta (ASE >= 3.29 renamed the function)."""
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)


def langevin(atoms: Atoms, setup: Setup, seed: int):
    from ase.md.langevin import Langevin

    rng = np.random.default_rng(seed)
    thermalize(atoms, setup.temperature_K, rng)
    return Langevin(atoms, setup.timestep_fs * units.fs, temperature_K=setup.temperature_K,
                    friction=0.02, rng=rng, fixcm=False)


def sample_structures(setup: Setup, n: int, *, seed: int, stride: int = 10) -> List[Atoms]:
    """``n`` structures from an MD driven by the *new* level itself (independent of any
    model), one every ``stride`` steps after a short equilibration."""
    atoms = setup.start()
    atoms.calc = setup.new_level()
    dyn = langevin(atoms, setup, seed)
    dyn.run(2 * stride)
    frames = []
    for _ in range(n):
        dyn.run(stride)
        frame = atoms.copy()
        frame.calc = None
        frames.append(frame)
    return frames


def label_all(frames: List[Atoms], reference) -> List[Atoms]:
    """Labelled copies (stress too for periodic cells: ``label`` skips it otherwise)."""
    from ase_petft import label

    return [label(frame, reference, properties=("energy", "forces", "stress"))
            for frame in frames]


def errors(calc, labelled: List[Atoms]) -> Dict[str, float]:
    """Energy (meV/atom) and force (meV/Å) MAE of ``calc`` against labelled frames."""
    from ase_petft.metrics import calculator_errors

    return calculator_errors(labelled, calc)


HEADERS = {"energy_mae_meV_per_atom": "E MAE (meV/atom)",
           "forces_mae_meV_per_A": "F MAE (meV/Å)"}


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    """A small Markdown table (floats with one decimal; known keys get unit headers)."""
    def cell(value):
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    heads = [HEADERS.get(c, c) for c in columns]
    widths = [max(len(h), *(len(cell(r.get(c, ""))) for r in rows))
              for c, h in zip(columns, heads)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(heads, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(cell(row.get(c, "")).ljust(w)
                                for c, w in zip(columns, widths)) + " |")
