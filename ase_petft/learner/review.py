"""The review of a swapped-in generation on the labels collected while it ran.

The gate decides on the held-out labels there are when a refit finishes: for the first
refits, one or two structures. A wrong decision there (a candidate that fits the few
labels and is worse next to them) steered the rest of a run. The labels the simulation
collects *while a generation runs* are the independent data the gate lacked: neither
that generation nor the one it replaced trained on them, and they come from the
simulation as that generation drives it (where a hole in its potential energy surface
takes it).

So before the next refit starts from the running generation, the generation is
compared with the one it replaced on those labels (each label counts, held out or not:
neither model saw any of them). It stays when its error (:func:`ase_petft.metrics.score`)
is at most ``(1 + tolerance)`` × the replaced generation's; otherwise it is *retracted*:
the learner rolls back to the replaced generation and the next refit starts from there.
Every generation is reviewed once, when enough labels are there (``MIN_LABELS`` from
``MIN_STRUCTURES`` structures that are not rattled copies of each other); a refit that
is due before then waits for them (unless no more labels can come: the end-of-run
refit, a spent label budget), so that no refit builds on a generation no independent
label has judged. A refit that only moved the energy offset (forces bit-identical)
needs no review. The result goes to ``review.json`` in the generation's folder;
retracted generations are never run again (``rollback()``, restarts).
"""

from __future__ import annotations

import logging
import pathlib
import time
from typing import Any, Dict, List, Optional

from ..metrics import score
from . import workdir as wd
from .gate import evaluate_generation

logger = logging.getLogger(__name__)

__all__ = ["REVIEW", "MIN_LABELS", "MIN_STRUCTURES", "needs_review", "labelled_under",
           "enough", "review", "retracted"]

REVIEW = "review.json"
MIN_LABELS = 3
MIN_STRUCTURES = 2


def needs_review(workdir: pathlib.Path, generation: int) -> Optional[Dict[str, Any]]:
    """The decision of ``generation`` if it is a swapped-in refit that changed forces
    and has no review yet, else None."""
    if generation <= 0 or (wd.gen_dir(workdir, generation) / REVIEW).is_file():
        return None
    decision = wd.read_json(wd.gen_dir(workdir, generation) / wd.DECISION)
    if not decision or not decision.get("accepted"):
        return None
    checks = decision.get("checks") or {}
    if "changed" in checks or decision.get("fallback"):  # the energy offset alone
        return None
    return decision


def labelled_under(frames: List, generation: int) -> List:
    """The labels collected while ``generation`` ran (the buffer's ``generation``)."""
    return [a for a in frames if a.info.get("generation") == generation]


def enough(frames: List) -> bool:
    """Whether ``frames`` can judge a generation: ``MIN_LABELS`` labels from
    ``MIN_STRUCTURES`` structures that are not rattled copies of another."""
    structures = sum(not a.info.get("rattled") for a in frames)
    return len(frames) >= MIN_LABELS and structures >= MIN_STRUCTURES


def review(workdir: pathlib.Path, generation: int, decision: Dict[str, Any], frames: List,
           *, model, variant: str, tolerance: float,
           replaced_model=None) -> Dict[str, Any]:
    """Compare ``model`` (generation ``generation``, running) with the generation it
    replaced on ``frames`` (``replaced_model``: its weights when in memory, else read
    from its checkpoint); write and return the record (``passed``, both errors)."""
    start = time.perf_counter()
    source = int(decision["source_generation"])
    new, _ = evaluate_generation(model, list(frames), variant)
    old, _ = evaluate_generation(
        replaced_model if replaced_model is not None else wd.checkpoint_of(workdir, source),
        list(frames), variant)
    passed = score(new) <= (1.0 + tolerance) * score(old) * (1.0 + 1e-9)
    record = {"generation": generation, "source_generation": source, "passed": bool(passed),
              "n_labels": len(frames), "old": old, "new": new,
              "wall_time_s": time.perf_counter() - start,  # on the simulation's thread
              "detail": (f"on {len(frames)} labels collected while generation {generation} "
                         f"ran: score {score(new):.4g} vs {score(old):.4g} of generation "
                         f"{source} (tolerance {tolerance:.0%})")}
    wd.write_json(wd.gen_dir(workdir, generation) / REVIEW, record)
    return record


def retracted(workdir: pathlib.Path) -> set:
    """Generations whose review failed (never to be run again)."""
    out = set()
    for path in pathlib.Path(workdir).glob(f"gen-[0-9][0-9][0-9][0-9]/{REVIEW}"):
        data = wd.read_json(path)
        if data is not None and not data.get("passed", True):
            out.add(int(data["generation"]))
    return out
