"""Energy *variants*: one head of a PET model per level of theory.

A variant is named like metatomic outputs: ``"energy"`` (the base output) or
``"energy/<name>"`` where ``<name>`` is a short identifier of the level of theory
(``"energy/pbe0"``, ``"energy/gfn2"``).
"""

from __future__ import annotations

import difflib
import re
from typing import Iterable, Optional

from .errors import VariantError

__all__ = ["BASE", "validate_variant", "variant_suffix", "closest_variant", "is_one_typo_away",
           "missing_variant_message", "require_variant", "new_variant_description"]

BASE = "energy"
_SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.+]*$")


def validate_variant(variant: object) -> str:
    """Return ``variant`` if it is a valid energy variant name, else raise VariantError."""
    if not isinstance(variant, str):
        raise VariantError(
            f"an energy variant must be a string like 'energy' or 'energy/pbe0', "
            f"got {type(variant).__name__} {variant!r}"
        )
    if variant == BASE:
        return variant
    prefix, sep, suffix = variant.partition("/")
    if prefix != BASE or not sep or not _SUFFIX.match(suffix):
        raise VariantError(
            f"invalid energy variant {variant!r}: expected 'energy' or "
            "'energy/<name>' where <name> starts with a letter or digit and uses only "
            "letters, digits and '_-.+' (for example 'energy/pbe0')"
        )
    return variant


def variant_suffix(variant: str) -> Optional[str]:
    """``"energy/pbe0"`` -> ``"pbe0"``; ``"energy"`` -> ``None`` (metatomic's convention)."""
    validate_variant(variant)
    return None if variant == BASE else variant.split("/", 1)[1]


def closest_variant(variant: str, available: Iterable[str]) -> Optional[str]:
    """The available variant name closest to ``variant``, or None if nothing is close."""
    matches = difflib.get_close_matches(variant, sorted(available), n=1, cutoff=0.6)
    return matches[0] if matches else None


def is_one_typo_away(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` differ by one edit (insert, delete, substitute, swap)."""
    if a == b or abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        diff = [i for i, (x, y) in enumerate(zip(a, b)) if x != y]
        if len(diff) == 1:
            return True
        return (
            len(diff) == 2
            and diff[1] == diff[0] + 1
            and a[diff[0]] == b[diff[1]]
            and a[diff[1]] == b[diff[0]]
        )
    short, long_ = (a, b) if len(a) < len(b) else (b, a)
    return any(long_[:i] + long_[i + 1 :] == short for i in range(len(long_)))


def missing_variant_message(variant: str, available: Iterable[str], *,
                            where: str = "this model", fix: str = "") -> str:
    """THE message for a variant that is not there: what was asked, what exists, the
    closest name, and how to fix it."""
    available = sorted(available)
    close = closest_variant(variant, available)
    hint = f"; did you mean {close!r}?" if close else ""
    return f"unknown variant {variant!r}: {where} has {available}{hint}" + (
        f" {fix}" if fix else "")


def require_variant(variant: str, available: Iterable[str], *, where: str = "this model",
                    fix: str = "", error: type = VariantError) -> str:
    """Return ``variant`` if it is in ``available``, else raise ``error`` (VariantError)
    with :func:`missing_variant_message`."""
    available = list(available)
    if variant not in available:
        raise error(missing_variant_message(variant, available, where=where, fix=fix))
    return variant


def new_variant_description(variant: str, inherit_from: str) -> str:
    """The description of a variant ase_petft creates. It must never drift: metatrain
    refuses to restart a checkpoint whose target description changed."""
    return f"{variant} (ase_petft variant, initialised from {inherit_from})"
