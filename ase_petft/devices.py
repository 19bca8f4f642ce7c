"""Torch devices of calculators and refits: validated names (``"cpu"``, ``"cuda:N"``)."""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

__all__ = ["resolve_device"]


def resolve_device(device: Any) -> str:
    """``device`` as a torch device string; ConfigError for one this machine lacks."""
    import torch

    if device is None:
        return "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from exc
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} was requested but this torch has no CUDA device "
            f"(torch {torch.__version__}); use device='cpu' or install a CUDA build of torch"
        )
    if parsed.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    return str(parsed)
