"""A learner's work directory: one folder per refit, a decision in each, a pointer.

::

    workdir/gen-0000/model.ckpt     the starting weights (incl. a newly created variant)
    workdir/gen-NNNN/               refit number NNNN (finetune()'s generation directory)
        model.ckpt  config.json  metrics.json
        model.pt                    the verified metatomic export: accepted refits only
        refused.ckpt                a refused candidate whose energy offset alone was
                                    swapped in (model.ckpt then holds that fall-back)
        decision.json               accepted?, held-out errors of old and new model
        review.json                 an accepted generation judged against the one it
                                    replaced on the labels collected while it ran
                                    (``passed: false``: retracted, never run again)
    workdir/current.json            the generation the calculator runs (after a swap)
    workdir/history.jsonl           the learner's event log, one JSON object per line
    workdir/walkers/NAME.json       a campaign walker's last snapshot (structure, step)
    workdir/uncertainty/gen-NNNN.npz  the posterior uncertainty a campaign fitted for
                                    generation NNNN (its walkers load it)

Generation numbers count refits; a rejected refit keeps its folder and its number is
never given to a running model.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Dict, List

from ..finetune.generation import (CHECKPOINT_NAME, json_default, read_json, remove_leftovers,
                                   write_json)

__all__ = ["DECISION", "CURRENT", "HISTORY", "gen_dir", "checkpoint_of", "decisions",
           "last_number", "append_history", "read_history", "read_json", "write_json",
           "clean", "walker_state_path", "uncertainty_path"]

DECISION = "decision.json"
#: written into a refit's folder when its learner closed without it: a thread cannot be
#: stopped, so the refit may still finish and write an accepted decision there later
ABANDONED = "abandoned.json"
CURRENT = "current.json"
HISTORY = "history.jsonl"


def gen_dir(workdir: pathlib.Path, generation: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f"gen-{generation:04d}"


def checkpoint_of(workdir: pathlib.Path, generation: int) -> pathlib.Path:
    return gen_dir(workdir, generation) / CHECKPOINT_NAME


def walker_state_path(workdir: pathlib.Path, name: str) -> pathlib.Path:
    return pathlib.Path(workdir) / "walkers" / f"{name}.json"


def uncertainty_path(workdir: pathlib.Path, generation: int) -> pathlib.Path:
    return pathlib.Path(workdir) / "uncertainty" / f"gen-{generation:04d}.npz"


def decisions(workdir: pathlib.Path) -> List[Dict[str, Any]]:
    """Every finished refit's decision, oldest first (unfinished and abandoned folders
    skipped)."""
    found = []
    for folder in sorted(pathlib.Path(workdir).glob("gen-[0-9][0-9][0-9][0-9]")):
        if (folder / ABANDONED).is_file():
            continue
        data = read_json(folder / DECISION)
        if data is not None:
            found.append(data)
    return found


def clean(workdir: pathlib.Path) -> None:
    """Remove what killed refits left in the generation folders (the caller holds the
    work directory's lock, so no refit of another learner is running there)."""
    for folder in pathlib.Path(workdir).glob("gen-[0-9][0-9][0-9][0-9]"):
        remove_leftovers(folder)


def last_number(workdir: pathlib.Path) -> int:
    numbers = [int(p.name[4:]) for p in pathlib.Path(workdir).glob("gen-[0-9][0-9][0-9][0-9]")]
    return max(numbers, default=0)


def append_history(workdir: pathlib.Path, row: Dict[str, Any]) -> None:
    with open(pathlib.Path(workdir) / HISTORY, "a") as handle:
        handle.write(json.dumps(row, default=json_default) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_history(workdir: pathlib.Path) -> List[Dict[str, Any]]:
    path = pathlib.Path(workdir) / HISTORY
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line torn by a crash: skip it
            continue
    return rows
