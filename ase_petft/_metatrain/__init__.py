"""THE adapter to metatrain: the only code that imports metatrain or knows PET internals.

The rest of ase_petft uses the functions listed in ``__all__`` below and nothing else;
no module outside this folder imports its submodules (a test checks it). A metatrain
upgrade therefore touches this folder only.

================  ===============================================================
submodule         what it knows
================  ===============================================================
``_state``        process-wide state metatrain touches (logger class, warning noise)
``checkpoints``   reading/writing metatrain checkpoints (trusted pickles)
``heads``         energy variants: heads, last layers, composition and scale
``inference``     export for metatomic, in-place hot swap, fresh models, .pt export
``predict``       predictions of one variant without a calculator
``training``      in-memory datasets, trainer hypers, metatrain's PET trainer
``linear``        the closed-form last-layer (heads) refit
``llpr``          metatrain's LLPR uncertainty
================  ===============================================================

Only load checkpoints you trust: they are Python pickles (``torch.load`` with
``weights_only=False`` is required by metatrain's checkpoint format).
"""

from __future__ import annotations

from ._state import install_warning_filters, preserved_logger_class
from .checkpoints import (checkpoint_dict, checkpoint_path, copy_model, load_model,
                          model_from_checkpoint, output_file, read_checkpoint,
                          save_checkpoint, thaw)
from .heads import (add_variant, atomic_types, composition_weights, copy_variant_weights,
                    energy_target_info, energy_variants, interaction_cutoff, scale_weights,
                    set_composition_weights, variant_description)
from .inference import (check_swap_compatible, export_model, new_pet_model,
                        prepare_for_inference, swap_weights)
from .linear import (apply_heads_update, backbone_fingerprint, energy_features, heads_rows,
                     last_layer_parameters, last_layer_vector)
from .llpr import LLPR
from .predict import predict
from .training import (SgdRun, default_pet_hypers, import_metatrain, merge_lora, routed_logs,
                       seeded, train_sgd)

__all__ = [
    # process state
    "install_warning_filters", "preserved_logger_class", "import_metatrain", "routed_logs",
    "seeded",
    # checkpoints
    "read_checkpoint", "checkpoint_path", "output_file", "model_from_checkpoint", "load_model", "copy_model", "thaw",
    "checkpoint_dict", "save_checkpoint",
    # variants, heads, composition, scale
    "energy_variants", "atomic_types", "interaction_cutoff", "energy_target_info",
    "variant_description",
    "add_variant", "copy_variant_weights", "composition_weights",
    "set_composition_weights", "scale_weights",
    # inference, swap, export, fresh models
    "prepare_for_inference", "check_swap_compatible", "swap_weights", "export_model",
    "default_pet_hypers", "new_pet_model", "predict",
    # training
    "SgdRun", "train_sgd", "merge_lora", "heads_rows", "apply_heads_update",
    "last_layer_parameters", "last_layer_vector", "backbone_fingerprint", "energy_features",
    # uncertainty
    "LLPR",
]

install_warning_filters()
