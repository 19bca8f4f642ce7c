"""FineTunableCalculator: an ASE calculator around a PET checkpoint, one energy variant.

The calculator keeps the live PET module and evaluates it through metatomic's own ASE
calculator (same neighbour lists, same autograd path), so its predictions are those of
``metatomic_ase.MetatomicCalculator`` on the same weights. The module is evaluated
through a TorchScript copy that shares its parameters (what ``mtt export`` would save;
less per-call overhead on small systems). Hot swaps copy new weights into the live
module in place, under a lock, so a swap never lands in the middle of a force
evaluation and ``atoms.calc`` stays the same object; only when the composition or
scale maps change is the compiled copy rebuilt (about a second).

Only load checkpoints you trust: metatrain checkpoints are Python pickles.
"""

from __future__ import annotations

import logging
import os
import pathlib
import threading
from typing import Any, Dict, List, Optional

import numpy as np
from ase.calculators.calculator import (
    Calculator,
    PropertyNotImplementedError,
    all_changes,
)

from . import _metatrain
from .errors import CheckpointError, ConfigError, ModelSwapError, UnsupportedSystemError
from .labels import check_elements, same_structure
from .devices import resolve_device
from .systems import StructureCheck
from .uncertainty import EnergyUncertainty
from .variants import (is_one_typo_away, new_variant_description, require_variant,
                       validate_variant)

logger = logging.getLogger(__name__)

__all__ = ["FineTunableCalculator", "StressUnavailableError"]

_DTYPES = {"float32": "float32", "float64": "float64"}


class StressUnavailableError(UnsupportedSystemError, PropertyNotImplementedError):
    """Stress was requested for a cell that is not periodic in all directions."""


class FineTunableCalculator(Calculator):
    """ASE calculator predicting one energy variant of a PET checkpoint.

    :param checkpoint: path of a metatrain PET checkpoint (``.ckpt``; trusted pickle).
    :param variant: ``"energy"`` or ``"energy/<name>"``.
    :param inherit_from: head a missing ``variant`` is created from (predictions then
        start equal to it); ``None`` makes a missing variant an error.
    :param device: torch device (``"cpu"``, ``"cuda"``); default: CPU.
    :param dtype: ``"float32"`` or ``"float64"`` (or a torch dtype); default: the
        checkpoint's own dtype.
    :param workdir: where :meth:`finetune` writes its generation directories
        (``gen-0001``, ...); default: a new temporary directory per fine-tune.
    :param uncertainty: ``"posterior"`` (Bayesian last-layer posterior, the default) or
        ``"llpr"`` (metatrain's LLPR): how :meth:`get_energy_uncertainty` estimates σ.
    :param generation: the generation number of ``checkpoint`` (a learner's walkers
        start from the generation the campaign runs); default 0.
    """

    implemented_properties = ["energy", "free_energy", "energies", "forces", "stress"]
    # labels must never come from a model: LabelBuffer refuses calculators with this
    _ase_petft_model_prediction = True

    def __init__(
        self,
        checkpoint: os.PathLike | str,
        *,
        variant: str = "energy",
        inherit_from: Optional[str] = "energy",
        device: Optional[str] = None,
        dtype: Any = None,
        workdir: Optional[os.PathLike | str] = None,
        uncertainty: str = "posterior",
        generation: int = 0,
    ) -> None:
        super().__init__()
        self._configure(checkpoint, variant=variant, inherit_from=inherit_from, device=device,
                        workdir=workdir, generation=generation)
        self._start(_metatrain.load_model(self._checkpoint_path), dtype, uncertainty)

    @classmethod
    def _running(cls, model, *, checkpoint: os.PathLike | str, variant: str,
                 device: Optional[str] = None) -> "FineTunableCalculator":
        """A calculator whose live model is ``model`` itself: the PET module that was
        written as ``checkpoint``, already in memory (an in-process refit's candidate,
        probed by the gate without reading the file back)."""
        calc = cls.__new__(cls)
        Calculator.__init__(calc)
        calc._configure(checkpoint, variant=variant, inherit_from=None, device=device,
                        workdir=None, generation=0)
        calc._start(model, None, "posterior")
        return calc

    def _configure(self, checkpoint, *, variant, inherit_from, device, workdir,
                   generation) -> None:
        self._variant = validate_variant(variant)
        self._inherit_from = None if inherit_from is None else validate_variant(inherit_from)
        self._checkpoint_path = _metatrain.checkpoint_path(checkpoint).resolve()
        self._workdir = None if workdir is None else pathlib.Path(workdir)
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise ConfigError(f"generation must be a non-negative integer, got {generation!r}")
        self._generation = generation
        self._lock = threading.RLock()
        self._device_name = resolve_device(device)

    def _start(self, model, dtype, uncertainty: str) -> None:
        self._model = model
        self._dtype = _resolve_dtype(dtype, self._model)
        self._created_variant = self._ensure_variant(self._model)
        self._variants = _metatrain.energy_variants(self._model)
        self._atomic_types = set(_metatrain.atomic_types(self._model))
        self._inner = self._build_inner()
        self._structure_check = StructureCheck(
            _metatrain.interaction_cutoff(self._model), float32=str(self._dtype) == "torch.float32")
        self._uncertainty = EnergyUncertainty(self, method=uncertainty)
        self._last_layers = None  # this variant's last-layer parameters (φ's order)
        self._features = None  # (generation, structure, φ's parts) of the last evaluation
        self.parameters = self.todict()

    # ------------------------------------------------------------------ properties
    @property
    def variant(self) -> str:
        """The energy variant this calculator predicts."""
        return self._variant

    @property
    def variants(self) -> List[str]:
        """Every energy variant the current model can predict."""
        return list(self._variants)

    @property
    def generation(self) -> int:
        """0 after load, +1 per successful :meth:`swap_model`."""
        return self._generation

    @property
    def checkpoint_path(self) -> pathlib.Path:
        """The checkpoint the current weights came from."""
        return self._checkpoint_path

    @property
    def atomic_types(self) -> List[int]:
        return sorted(self._atomic_types)

    @property
    def dtype(self) -> str:
        return str(self._dtype).replace("torch.", "")

    @property
    def device(self) -> str:
        return self._device_name

    # ------------------------------------------------------------------ setup
    def _ensure_variant(self, model) -> bool:
        available = _metatrain.energy_variants(model)
        if self._variant in available:
            return False
        if self._inherit_from is None:
            require_variant(self._variant, available, fix=(
                "Pass inherit_from='energy' (or another variant) to create it as a new head"))
        require_variant(self._inherit_from, available, fix=(
            f"(inherit_from must name an existing head to create {self._variant!r})"))
        for name in available:
            if is_one_typo_away(self._variant, name):
                logger.warning(
                    "creating new variant %r, one typo away from existing %r: "
                    "is this intended?", self._variant, name
                )
        _metatrain.add_variant(
            model,
            self._variant,
            inherit_from=self._inherit_from,
            description=new_variant_description(self._variant, self._inherit_from),
        )
        return True

    def _build_inner(self):
        import metatomic_ase
        import torch

        exported = _metatrain.prepare_for_inference(
            self._model, dtype=self._dtype, device=torch.device(self._device_name),
            script=True,
        )
        suffix = None if self._variant == "energy" else self._variant.split("/", 1)[1]
        return metatomic_ase.MetatomicCalculator(
            exported,
            variants={"energy": suffix},
            device=self._device_name,
            uncertainty_threshold=None,
            # we add gradients ourselves: metatomic's own policy also computes a
            # stress for molecules without a cell (division by a zero volume)
            do_gradients_with_energy=False,
        )

    @property
    def model(self):
        """The live PET module (read-only use: never train it in place)."""
        return self._model

    # ------------------------------------------------------------------ ASE contract
    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        with self._lock:
            Calculator.calculate(self, atoms, properties, system_changes)
            self._check_atoms(self.atoms, properties)
            inner = self._inner
            params = self._feature_params() if self._uncertainty.wants_features else ()
            # the compiled copy runs unoptimised: as fast here, and no fused kernels
            # whose rounding would differ from the eager module and between variants
            with _unoptimised_torchscript(), _collect_gradients(params) as grads:
                inner.calculate(self.atoms, _with_gradients(properties, self.atoms),
                                system_changes)
            self._features = (self._generation, self.atoms, grads) if grads else None
            results = dict(inner.results)
            results["free_energy"] = results["energy"]
            if "stress" in results and not self.atoms.pbc.all():
                del results["stress"]
            self.results = results

    def _model_lock(self):
        """The lock under which the live module runs: the calculator's passes and its
        uncertainty's own (they change which parameters require grad for their
        duration, so two must never overlap)."""
        return self._lock

    def _feature_params(self):
        """The last-layer parameters of this variant (the same tensor objects for the
        calculator's life: swaps copy into them in place)."""
        if self._last_layers is None:
            self._last_layers = tuple(p for _, p in
                                      _metatrain.last_layer_parameters(self._model, self._variant))
        return self._last_layers

    def _last_features(self, atoms) -> Optional[np.ndarray]:
        """The energy's gradient with respect to the variant's last-layer parameters
        (φ, in :func:`~ase_petft._metatrain.energy_features`' order) of ``atoms``, when
        it is the structure this calculator last evaluated, with the current weights,
        while the posterior uncertainty was fitted: the force pass's backward gave it
        for free. None otherwise."""
        held = self._features
        if held is None:
            return None
        generation, snapshot, grads = held
        if generation != self._generation or not same_structure(snapshot, atoms):
            return None
        return np.concatenate([g.detach().double().reshape(-1).cpu().numpy() for g in grads])

    def _check_atoms(self, atoms, properties) -> None:
        self._structure_check(atoms)
        check_elements(atoms, self._atomic_types, what="the structure",
                       fix="use a checkpoint that covers these elements",
                       error=UnsupportedSystemError)
        if "stress" in properties and not atoms.pbc.all():
            raise StressUnavailableError(
                f"stress needs a cell periodic in all directions, got pbc="
                f"{atoms.pbc.tolist()}; set atoms.pbc = True with a proper cell, or "
                "do not ask for stress"
            )

    def todict(self) -> Dict[str, Any]:
        """JSON-safe description of this calculator (never raises)."""
        try:
            return {
                "checkpoint": str(self._checkpoint_path),
                "variant": self._variant,
                "inherit_from": self._inherit_from,
                "device": self._device_name,
                "dtype": self.dtype,
                "generation": int(self._generation),
            }
        except Exception:  # todict must never break trajectory writing
            return {"variant": str(getattr(self, "_variant", "?"))}

    # ------------------------------------------------------------------ hot swap
    def swap_model(self, checkpoint: os.PathLike | str, *, model=None,
                   generation: Optional[int] = None) -> int:
        """Replace the weights in place from a checkpoint of the same architecture.

        The calculator object stays the same, cached results are dropped and
        :attr:`generation` increases by one (or becomes ``generation`` when given,
        e.g. when a learner resumes or rolls back). Returns the new generation. On any
        mismatch a :class:`ModelSwapError` is raised and the old model keeps working.

        :param checkpoint: the metatrain checkpoint of the new weights (recorded as
            :attr:`checkpoint_path`; read unless ``model`` is given).
        :param model: the PET module ``checkpoint`` was written from, when the caller
            has it in memory (an in-process refit): its weights are copied directly.
        """
        try:
            path = _metatrain.checkpoint_path(checkpoint).resolve()
        except CheckpointError as exc:
            raise ModelSwapError(str(exc)) from exc
        if model is None:
            try:
                model = _metatrain.load_model(path)
            except CheckpointError as exc:
                raise ModelSwapError(f"cannot swap in {str(path)!r}: {exc}") from exc
        return self._swap_weights(model, path, generation)

    def _swap_weights(self, new, path: pathlib.Path, generation: Optional[int]) -> int:
        with self._lock:
            dropped = _metatrain.check_swap_compatible(
                self._model, new, variant=self._variant
            )
            live_variants = set(_metatrain.energy_variants(self._model))
            extra = [v for v in _metatrain.energy_variants(new) if v not in live_variants]
            if _metatrain.swap_weights(self._model, new):
                # composition/scale changed: the compiled copy holds its own maps
                self._inner = self._build_inner()
            self._variants = [v for v in _metatrain.energy_variants(self._model)
                              if v not in dropped]
            self._checkpoint_path = pathlib.Path(path)
            self._features = None
            self._generation = self._generation + 1 if generation is None else int(generation)
            self.reset()
            self._inner.reset()
            self.parameters = self.todict()
        if dropped:
            logger.warning(
                "generation %d has no head for %s (removed by a full/LoRA fine-tune "
                "without replay); those variants are no longer available",
                self._generation, dropped,
            )
        if extra:
            logger.warning(
                "%s also has head(s) %s that the running model lacks; they were not swapped "
                "in (this calculator predicts %r). To use them, build a new "
                "FineTunableCalculator from that checkpoint", path, extra, self._variant)
        logger.info("swapped in %s as generation %d", path, self._generation)
        return self._generation

    def finetune(self, frames, config=None, *, output_dir=None, export: bool = True):
        """Fine-tune this calculator's variant on labelled ``frames`` and hot-swap it.

        Trains from the current generation (in-process, see :func:`ase_petft.finetune`)
        and swaps the result into this same object (``generation`` += 1). Returns the
        :class:`~ase_petft.FineTuneResult`. ``export=False`` skips the verified metatomic
        ``model.pt`` (~0.8 s per refit on one CPU thread; ``petft export`` writes it later
        from the generation's checkpoint).
        """
        from .finetune import finetune_calculator

        return finetune_calculator(self, frames, config, output_dir=output_dir,
                                   export=export)

    @property
    def workdir(self) -> Optional[pathlib.Path]:
        """Where :meth:`finetune` writes its generation directories (None: temporary)."""
        return self._workdir

    @property
    def uncertainty_fitted(self) -> bool:
        """Whether :meth:`get_energy_uncertainty` can answer (fitted on labels)."""
        return self._uncertainty.fitted

    def set(self, **kwargs):
        """ASE's ``Calculator.set``: every setting of this calculator is fixed at
        construction (checkpoint, variant, device, dtype), so any change is refused
        instead of being silently ignored; build a new calculator instead."""
        if kwargs:
            raise ConfigError(
                f"FineTunableCalculator cannot change {sorted(kwargs)} after construction; "
                "create a new FineTunableCalculator(checkpoint, variant=..., device=..., "
                "dtype=...) instead (weights change through swap_model/finetune)"
            )
        return {}

    def fit_uncertainty(self, frames, calibration=None) -> None:
        """Fit the energy uncertainty on labelled ``frames`` of this variant,
        calibrated on held-out ``calibration`` labels (see :mod:`ase_petft.uncertainty`)."""
        self._uncertainty.fit(frames, calibration)

    def uncertainty_state(self) -> Optional[dict]:
        """The fitted posterior uncertainty as plain arrays (None before a fit or for
        LLPR): :meth:`load_uncertainty_state` gives it to a calculator elsewhere."""
        return self._uncertainty.export_state()

    def load_uncertainty_state(self, state: dict) -> None:
        """Use the posterior uncertainty another calculator with the same weights
        fitted (:meth:`uncertainty_state`); it answers while this calculator runs the
        generation it was fitted for."""
        self._uncertainty.load_state(state)

    def get_energy_uncertainty(self, atoms=None) -> float:
        """Calibrated σ of the energy per atom (eV/atom) of ``atoms`` (default: the
        last calculated structure). For the structure last calculated (what MD and
        selection policies ask for) the posterior needs no extra pass: while it is
        fitted, the force evaluation's backward pass also gives the last-layer
        gradient it needs. Any other structure (and LLPR) costs one forward and
        backward pass."""
        atoms = atoms if atoms is not None else self.atoms
        if atoms is None:
            raise UnsupportedSystemError("no atoms given and nothing calculated yet")
        self._check_atoms(atoms, ())
        return self._uncertainty.per_atom([atoms])[0]

    def model_copy(self):
        """A trainable deep copy of the live PET module (all variants, this
        calculator's device), taken under the swap lock: what an in-process refit
        starts from without a round trip through a checkpoint file."""
        with self._lock:
            return _metatrain.copy_model(self._model)

    def save_checkpoint(self, path: os.PathLike | str) -> pathlib.Path:
        """Write the current weights (all variants) as a metatrain checkpoint."""
        with self._lock:
            return _metatrain.save_checkpoint(self._model, path)

    def __repr__(self) -> str:
        return (
            f"FineTunableCalculator({str(self._checkpoint_path)!r}, "
            f"variant={self._variant!r}, generation={self._generation})"
        )


def _unoptimised_torchscript():
    import torch

    return torch.jit.optimized_execution(False)


class _collect_gradients:
    """Inside the block ``params`` require grad and collect the gradient of the
    backward pass run there (metatomic's force pass); the value is the list of those
    gradients (empty when ``params`` is, or when a pass did not reach them). Their
    ``requires_grad`` is restored after (the live module stays frozen for everything
    else) and no gradient is left on them."""

    def __init__(self, params):
        self.params = params
        self.grads: List = []

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.grad = None
            p.requires_grad_(True)
        return self.grads

    def __exit__(self, *exc):
        grads = [p.grad for p in self.params]
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
            p.grad = None
        if exc[0] is None and grads and all(g is not None for g in grads):
            self.grads.extend(grads)


def _with_gradients(properties, atoms) -> List[str]:
    """Forces (and stress for periodic cells) come with every energy: MD and
    optimisers ask for them next, and one backward pass gives both."""
    wanted = set(properties) | {"energy", "forces"}
    if atoms.pbc.all():
        wanted.add("stress")
    return sorted(wanted)


def _resolve_dtype(dtype: Any, model):
    import torch

    if dtype is None:
        return next(model.parameters()).dtype
    if isinstance(dtype, torch.dtype) and dtype in (torch.float32, torch.float64):
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return getattr(torch, dtype)
    raise ConfigError(
        f"unsupported dtype {dtype!r}; use 'float32' or 'float64' (or None for the "
        "checkpoint's own dtype)"
    )
