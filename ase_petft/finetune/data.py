"""Training data of one run: labels of the variant, replay labels of other variants."""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

from ..errors import TrainingDataError
from ..labels import Label, labels_from_frames
from ..variants import validate_variant

__all__ = ["group_by_variant"]


def _frames_of(source, variant: Optional[str]):
    """Frames of a list, or of a LabelBuffer-like object (``.frames(variant=...)``)."""
    if hasattr(source, "frames") and callable(source.frames):
        return list(source.frames(variant=variant))
    return list(source)


def group_by_variant(
    frames, *, variant: str, replay=None
) -> Dict[str, List[Label]]:
    """``{variant: labels}`` of the training data of one run.

    ``frames`` are labels of ``variant`` (a list, or a buffer whose
    ``frames(variant=variant)`` is used). ``replay`` is either a mapping
    ``{other_variant: frames or buffer}``, or a sequence/buffer of frames that carry
    ``atoms.info["variant"]`` (frames of ``variant`` itself found there are added
    to its labels).
    """
    groups: Dict[str, List[Label]] = {variant: labels_from_frames(_frames_of(frames, variant))}
    if replay is None:
        return groups
    if isinstance(replay, Mapping):
        items = [(validate_variant(v), _frames_of(f, v)) for v, f in replay.items()]
    else:
        items = _split_by_info(_frames_of(replay, None))
    for name, members in items:
        groups.setdefault(name, []).extend(labels_from_frames(members))
    return groups


def _split_by_info(frames: Sequence) -> List:
    found: Dict[str, list] = {}
    for i, atoms in enumerate(frames):
        name = getattr(atoms, "info", {}).get("variant")
        if name is None:
            raise TrainingDataError(
                f"replay frame {i} has no atoms.info['variant']; pass replay as a "
                "mapping {variant: frames} or tag each frame with its variant"
            )
        found.setdefault(validate_variant(name), []).append(atoms)
    return list(found.items())
