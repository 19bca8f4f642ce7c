"""Validators of settings (keyword-only dataclasses and arguments): each raises
:class:`~ase_petft.errors.ConfigError` naming the setting, the value and what is valid."""

from __future__ import annotations

import math
from typing import Any, Optional, Tuple

from .errors import ConfigError

__all__ = ["choice", "is_int", "positive_int", "non_negative_int", "real", "positive_float",
           "non_negative_float", "optional_positive_float"]


def choice(name: str, value: Any, valid: Tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{name}={value!r} is not valid; expected one of {list(valid)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def non_negative_int(name: str, value: Any) -> None:
    if not is_int(value) or value < 0:
        raise ConfigError(f"{name} must be an integer >= 0, got {value!r}")


def real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def positive_float(name: str, value: Any) -> None:
    if not real(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def non_negative_float(name: str, value: Any) -> None:
    if not real(value) or value < 0:
        raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")


def optional_positive_float(name: str, value: Any) -> None:
    if value is not None:
        positive_float(name, value)
