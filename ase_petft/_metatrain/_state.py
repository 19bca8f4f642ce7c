"""Process-wide state that metatrain touches: the logger class and warning noise.

Importing ``metatrain.pet`` replaces the logger class of the whole process; a library
must not do that to its host, so every import of metatrain happens inside
:func:`preserved_logger_class`. The known noisy warnings of metatrain and the libraries
under it (OmegaConf resolver deprecations, torch.jit deprecations) are silenced by ONE
set of targeted filters, installed once (:func:`install_warning_filters`) — never by
``warnings.catch_warnings`` blocks, which are not thread-safe: a refit in a background
thread would save and restore the filters of the simulation's thread.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from typing import Iterator

ARCHITECTURE = "pet"  # the only metatrain architecture ase_petft fine-tunes

# (message regex, category): each one a known, harmless message of a dependency
KNOWN_NOISE = (
    (r"register_new_resolver\(\) is deprecated", UserWarning),  # omegaconf via metatrain
    (r"`torch\.jit\.\w+` is deprecated", DeprecationWarning),  # metatomic/metatrain export
    (r".*TorchScript.*deprecated", DeprecationWarning),
    (r"This system's positions or cell requires grad, but the neighbors", UserWarning),
    (r"GRADIENT WARNING: element 0 of tensors does not require grad", RuntimeWarning),
)

_lock = threading.Lock()


def install_warning_filters() -> None:
    """Make sure the targeted filters of :data:`KNOWN_NOISE` are in place.

    Added once; added again only if something (a test runner's or the host's own
    ``catch_warnings``) has since dropped them. Nothing else in the filter list changes.
    """
    with _lock:
        present = {(f[1].pattern if f[1] is not None else None, f[2])
                   for f in warnings.filters if f[0] == "ignore"}
        for message, category in KNOWN_NOISE:
            if (message, category) not in present:
                warnings.filterwarnings("ignore", message=message, category=category)


@contextlib.contextmanager
def preserved_logger_class() -> Iterator[None]:
    """Restore the process's logger class, which importing metatrain replaces."""
    install_warning_filters()
    logger_class = logging.getLoggerClass()
    try:
        yield
    finally:
        logging.setLoggerClass(logger_class)


def pet_class():
    """metatrain's PET class (importing it registers the TorchScript classes that
    checkpoints pickle)."""
    with preserved_logger_class():
        from metatrain.pet import PET
    return PET


def model_device(model):
    """The device of a PET module's parameters."""
    return next(model.parameters()).device


@contextlib.contextmanager
def differentiable_attention(device) -> Iterator[None]:
    """Attention kernels that support second derivatives: on CUDA, PET's double
    backward fails with the efficient SDPA kernels and works with the MATH one."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield
