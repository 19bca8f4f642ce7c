"""Training data of one run: labels of the variant, replay labels of other variants."""

from __future__ import annotations

import os
import pathlib
from typing import Dict, List, Mapping, Optional, Sequence

from ..errors import ConfigError, LabelBufferError, TrainingDataError
from ..labels import Label, labels_from_frames
from ..variants import validate_variant

__all__ = ["group_by_variant", "check_frame_variants"]


def _frames_of(source, variant: Optional[str]):
    """Frames of a list, of a LabelBuffer-like object (``.frames(variant=...)``), or of a
    path: a label buffer (HDF5) or any file ``ase.io.read`` reads."""
    if isinstance(source, (str, os.PathLike)):
        return _frames_of_path(pathlib.Path(source), variant)
    if hasattr(source, "frames") and callable(source.frames):
        return list(source.frames(variant=variant))
    try:
        return list(source)
    except TypeError:
        raise TrainingDataError(
            f"frames must be labelled ase.Atoms (a list), a LabelBuffer or the path of a "
            f"label buffer or labelled structure file, not {type(source).__name__}") from None


def _frames_of_path(path: pathlib.Path, variant: Optional[str]) -> list:
    from ..buffer.sources import read_labels

    try:
        return read_labels(path, variant)
    except LabelBufferError as exc:
        raise TrainingDataError(str(exc)) from exc


def check_frame_variants(frames: Sequence, variant: str, *, what: str = "frame") -> None:
    """Refuse frames tagged with another variant (``atoms.info['variant']``, as buffer
    frames and the learner's labels are): a head must not learn another level of theory."""
    other = {}
    for i, atoms in enumerate(frames):
        name = getattr(atoms, "info", {}).get("variant")
        if name is not None and str(name) != variant:
            other.setdefault(str(name), []).append(i)
    if other:
        found = "; ".join(f"{len(ix)} of {name!r} ({what}s {ix[:5]}{'...' if len(ix) > 5 else ''})"
                          for name, ix in other.items())
        raise TrainingDataError(
            f"labels of another level of theory given for {variant!r}: {found}. Pass frames of "
            f"{variant!r} only (a buffer's frames(variant=...)), give the others as replay=, or "
            "pass ignore_frame_variants=True to train this head on them anyway.")


def group_by_variant(
    frames, *, variant: str, replay=None, ignore_frame_variants: bool = False
) -> Dict[str, List[Label]]:
    """``{variant: labels}`` of the training data of one run.

    ``frames`` are labels of ``variant`` (a list, or a buffer whose
    ``frames(variant=variant)`` is used). ``replay`` is either a mapping
    ``{other_variant: frames or buffer}``, or a sequence/buffer of frames that carry
    ``atoms.info["variant"]`` (frames of ``variant`` itself found there are added
    to its labels).
    """
    main = _frames_of(frames, variant)
    if not ignore_frame_variants:
        check_frame_variants(main, variant)
    groups: Dict[str, List[Label]] = {variant: labels_from_frames(main)}
    if replay is None:
        return groups
    if isinstance(replay, Mapping):
        if variant in replay:
            raise ConfigError(
                f"replay names {variant!r}, the variant being trained: its labels would "
                "count twice (and land in training and validation alike); pass them in "
                "frames, and in replay only the other variants to keep")
        items = [(validate_variant(v), _frames_of(f, v)) for v, f in replay.items()]
    else:
        items = _split_by_info(_frames_of(replay, None))
    for name, members in items:
        if not ignore_frame_variants:
            check_frame_variants(members, name, what=f"replay {name} frame")
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
