"""Plots and tables of an on-the-fly learning run, read back from its work directory.

:func:`write_report` reads what an :class:`~ase_petft.learner.OnTheFlyLearner` left
in its ``workdir`` (``history.jsonl``, ``gen-*/decision.json``, ``gen-*/metrics.json``)
and, when given the label buffer, evaluates the accepted generations on the held-out
labels. It writes PNG figures, ``summary.txt`` and ``report.json`` (the tables behind
the figures) and returns the same data as a :class:`LearnerReport`::

    from ase_petft.report import write_report

    report = write_report("run1/learner", "run1/report", buffer="run1/labels.h5")
    report.generations      # one row per finished refit
    report.files            # {"errors": Path("run1/report/errors.png"), ...}

Figures: ``errors.png`` (held-out force/energy error of the running model and of
each refit, accepted or not), ``trajectory.png`` (uncertainty at labelled steps,
reference calls and swaps along the run), ``refit_times.png`` and, with the buffer,
``parity.png`` (predicted vs reference forces on held-out labels); for a
:class:`~ase_petft.Campaign`'s workdir also ``walkers.png`` (each walker's labels,
failed calls and swaps against wall time) and a walker table. Needs matplotlib
(``pip install 'ase-petft[plots]'``); nothing global is changed (no pyplot, no
backend switch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import re
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..errors import InputError
from ..learner import workdir as gens
from ..learner.gate import evaluate_generation
from ..learner.review import REVIEW

logger = logging.getLogger(__name__)

__all__ = ["LearnerReport", "generation_table", "label_table", "walker_table", "parity_data",
           "load_run", "write_report"]

SUMMARY_NAME = "summary.txt"
DATA_NAME = "report.json"


@dataclasses.dataclass(frozen=True)
class LearnerReport:
    """What :func:`write_report` found and wrote.

    :ivar generations: one dict per finished refit (see :func:`generation_table`).
    :ivar labels: one dict per reference call (see :func:`label_table`).
    :ivar swaps: history rows of the swaps (``step``, ``generation``, ...).
    :ivar walkers: one dict per walker of a campaign (see :func:`walker_table`).
    :ivar parity: ``{generation: {"reference", "predicted" (N x 3 arrays, eV/Å),
        "forces_mae_meV_per_A", "energy_mae_meV_per_atom", "n_frames"}}``.
    :ivar summary: the text of ``summary.txt``.
    :ivar files: ``{name: path}`` of the files written.
    """

    workdir: pathlib.Path
    variant: Optional[str]
    generations: List[Dict[str, Any]]
    labels: List[Dict[str, Any]]
    swaps: List[Dict[str, Any]]
    parity: Dict[int, Dict[str, Any]]
    walkers: List[Dict[str, Any]]
    summary: str
    files: Dict[str, pathlib.Path]


# ---------------------------------------------------------------------- reading
def load_run(workdir) -> Dict[str, Any]:
    """History, decisions, per-generation metrics and pointer of a learner workdir."""
    workdir = pathlib.Path(workdir)
    if not workdir.exists():
        raise FileNotFoundError(2, "learner work directory does not exist", str(workdir))
    if not workdir.is_dir():
        raise NotADirectoryError(20, "not a learner work directory", str(workdir))
    history = continuous_steps(gens.read_history(workdir))
    folders = sorted(workdir.glob("gen-[0-9][0-9][0-9][0-9]"))
    if not history and not folders:
        raise InputError(f"{str(workdir)!r} is not a learner work directory (no "
                         f"{gens.HISTORY} and no gen-NNNN folders); pass the workdir= "
                         "given to OnTheFlyLearner")
    metrics = {int(p.name[4:]): gens.read_json(p / "metrics.json") for p in folders}
    reviews = {int(p.name[4:]): gens.read_json(p / REVIEW) for p in folders}
    return {"workdir": workdir, "history": history, "decisions": gens.decisions(workdir),
            "metrics": {g: m for g, m in metrics.items() if m is not None},
            "reviews": {g: r for g, r in reviews.items() if r is not None},
            "current": gens.read_json(workdir / gens.CURRENT),
            "n_attempts": len([p for p in folders if int(p.name[4:]) > 0])}


def continuous_steps(history: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """History rows whose steps never go back: runs written before restarts continued
    the step count started again at 0; their steps are shifted past the earlier ones.
    Rows of a campaign's walkers keep their steps (each walker counts its own, and
    continues it when the campaign resumes)."""
    out, offset, last = [], 0, 0
    for row in history:
        step = row.get("step")
        if row.get("walker") is not None:  # a campaign walker's own steps: they continue
            out.append(row)
            continue
        if isinstance(step, (int, float)):
            if step + offset < last:
                offset = last
            row = {**row, "step": step + offset}
            last = max(last, row["step"])
        out.append(row)
    return out


def thresholds(history: Sequence[Dict[str, Any]]) -> List[float]:
    """Uncertainty thresholds (eV/atom) of the selection policies the runs used."""
    found = []
    for row in _events(history, "start"):
        for value in re.findall(r"uncertainty_above\(([^)]+)\)", str(row.get("policy", ""))):
            try:
                found.append(float(value))
            except ValueError:
                continue
    return sorted(set(found))


def _events(history: Sequence[Dict[str, Any]], *names: str) -> List[Dict[str, Any]]:
    return [row for row in history if row.get("event") in names]


def generation_table(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per finished refit: decision, held-out errors, times, steps."""
    started = {row.get("generation"): row.get("step")
               for row in _events(run["history"], "refit_start")}
    applied = {row.get("generation"): row.get("step")
               for row in _events(run["history"], "swap", "refit_rejected")}
    rows = []
    for decision in run["decisions"]:
        g = int(decision["generation"])
        old, new = decision.get("old") or {}, decision.get("new") or {}
        fit = decision.get("fit_metrics") or {}
        fit_s, total_s = decision.get("fit_wall_time_s"), decision.get("wall_time_s")
        rows.append({
            "generation": g, "source_generation": decision.get("source_generation"),
            "accepted": bool(decision.get("accepted")), "reason": decision.get("reason"),
            "n_train": decision.get("n_train"), "n_holdout": decision.get("n_holdout"),
            "n_labels_total": decision.get("n_labels_total"),
            "old_forces_mae_meV_per_A": old.get("forces_mae_meV_per_A"),
            "new_forces_mae_meV_per_A": new.get("forces_mae_meV_per_A"),
            "old_energy_mae_meV_per_atom": old.get("energy_mae_meV_per_atom"),
            "new_energy_mae_meV_per_atom": new.get("energy_mae_meV_per_atom"),
            "fit_wall_time_s": fit_s, "refit_wall_time_s": total_s,
            "gate_wall_time_s": None if fit_s is None or total_s is None else total_s - fit_s,
            "method": fit.get("method"), "solver": fit.get("solver"),
            "variant": fit.get("variant") or (run["metrics"].get(g) or {}).get("variant"),
            "step_started": started.get(g), "step_applied": applied.get(g),
            "review": _review_verdict(run.get("reviews", {}).get(g)),
        })
    return rows


def label_table(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per reference call (``label`` and ``label_failed`` history events)."""
    rows = []
    for row in _events(run["history"], "label", "label_failed"):
        sigma = row.get("uncertainty")
        rows.append({
            "step": row.get("step"), "ok": row["event"] == "label",
            "holdout": bool(row.get("holdout")), "generation": row.get("generation"),
            "uncertainty_meV_per_atom": None if sigma is None else 1e3 * float(sigma),
            "wall_time_s": row.get("wall_time_s"), "walker": row.get("walker"),
            "time": row.get("time"),
        })
    return rows


def walker_table(run: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per walker of a :class:`~ase_petft.Campaign` (empty for a single
    learner): its labels, failed and reused requests, swaps, last step and generation."""
    rows: Dict[str, Dict[str, Any]] = {}

    def row(name: str) -> Dict[str, Any]:
        return rows.setdefault(name, {"walker": name, "labels": 0, "failed": 0, "reused": 0,
                                      "swaps": 0, "unphysical": 0, "last_step": None,
                                      "generation": None, "resumed": 0, "error": None})

    counted = {"label": "labels", "label_failed": "failed", "label_reused": "reused",
               "walker_swap": "swaps", "unphysical": "unphysical"}
    for event in run["history"]:
        name = event.get("walker")
        if name is None:
            continue
        r = row(name)
        kind = event.get("event")
        if kind in counted:
            r[counted[kind]] += 1
        if kind == "walker_launch" and event.get("resumed"):
            r["resumed"] += 1
        if kind == "walker_failed":
            r["error"] = event.get("error")
        if kind in ("walker_swap", "walker_done", "walker_start", "restored"):
            r["generation"] = event.get("to_generation", event.get("generation"))
        if isinstance(event.get("step"), (int, float)) and kind != "label":
            r["last_step"] = max(r["last_step"] or 0, event["step"])
    return list(rows.values())


def _variant_of(run: Dict[str, Any], generations: List[Dict[str, Any]]) -> Optional[str]:
    for row in generations:
        if row.get("variant"):
            return row["variant"]
    for metrics in run["metrics"].values():
        if metrics.get("variant"):
            return metrics["variant"]
    return None


# ---------------------------------------------------------------------- parity
def _pick(generations: List[int], limit: int) -> List[int]:
    if len(generations) <= limit:
        return generations
    picks = np.linspace(0, len(generations) - 1, limit).round().astype(int)
    return [generations[i] for i in sorted(set(picks.tolist()))]


def parity_data(workdir, buffer, variant: str, *, generations: Optional[Sequence[int]] = None,
                max_generations: int = 4) -> Dict[int, Dict[str, Any]]:
    """Predicted vs reference forces of generations on the buffer's held-out labels.

    :param buffer: path of the run's :class:`~ase_petft.LabelBuffer` (read only).
    :param generations: which generations (default: 0 and every accepted one, at most
        ``max_generations`` of them, always including the first and the last).
    """
    from ..buffer import LabelBuffer

    workdir = pathlib.Path(workdir)
    if generations is None:
        accepted = [d["generation"] for d in gens.decisions(workdir) if d.get("accepted")]
        generations = _pick([0] + sorted(accepted), max_generations)
    with LabelBuffer(buffer, mode="r") as labels:
        holdout = [a for a in labels.frames(variant=variant) if a.info.get("holdout")]
    if not holdout:
        logger.info("no held-out labels of %r in %s: no parity data", variant, buffer)
        return {}
    out = {}
    for g in generations:
        checkpoint = gens.checkpoint_of(workdir, g)
        if not checkpoint.is_file():
            logger.warning("generation %d has no model.ckpt; skipped in the parity plot", g)
            continue
        out[int(g)] = _evaluate(checkpoint, variant, holdout)
    return out


def _evaluate(checkpoint: pathlib.Path, variant: str, frames: list) -> Dict[str, Any]:
    errors, predicted = evaluate_generation(checkpoint, frames, variant)
    return {"reference": np.concatenate([frame.get_forces() for frame in frames]),
            "predicted": np.concatenate([p["forces"] for p in predicted]), **errors}


# ---------------------------------------------------------------------- summary
def _ok(row: Dict[str, Any]) -> str:
    """The summary's "ok" column: yes / no, "ret" for an accepted generation that its
    review retracted."""
    if row.get("review") == "retracted":
        return "ret"
    return "yes" if row["accepted"] else "no"


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def _walker_lines(walkers: List[Dict[str, Any]]) -> List[str]:
    if not walkers:
        return []
    lines = ["", f"{'walker':<16} {'labels':>6} {'failed':>6} {'reused':>6} {'swaps':>5} "
                 f"{'gen':>4} {'step':>7}  notes"]
    for w in walkers:
        notes = [f"{w['unphysical']} unphysical" if w["unphysical"] else "",
                 f"resumed {w['resumed']}x" if w["resumed"] else "",
                 f"failed: {w['error']}" if w["error"] else ""]
        lines.append(f"{w['walker']:<16} {w['labels']:>6} {w['failed']:>6} {w['reused']:>6} "
                     f"{w['swaps']:>5} {_fmt(w['generation'], 'd'):>4} "
                     f"{_fmt(w['last_step'], 'd'):>7}  {', '.join(n for n in notes if n)}")
    return lines


def _review_verdict(record: Optional[Dict[str, Any]]) -> Optional[str]:
    """"kept" / "retracted" after the review on the labels a generation met, or None."""
    if record is None:
        return None
    return "kept" if record.get("passed") else "retracted"


def summary_text(run: Dict[str, Any], generations, labels, parity, variant) -> str:
    history = run["history"]
    swaps = _events(history, "swap")
    accepted = [r for r in generations if r["accepted"]]
    steps = max((row.get("step") or 0 for row in history), default=0)  # incl. "close"
    lines = [
        f"learner run: {run['workdir']}",
        f"variant: {variant or 'unknown'}; observer steps: {steps}; reference calls: "
        f"{sum(r['ok'] for r in labels)} ok, {sum(not r['ok'] for r in labels)} failed "
        f"({sum(r['holdout'] for r in labels)} held out); labels reused: "
        f"{len(_events(history, 'label_reused'))}",
        f"refits: {len(generations)} finished ({len(accepted)} accepted, "
        f"{len(generations) - len(accepted)} rejected; "
        f"{sum(r['review'] == 'retracted' for r in generations)} retracted by their review), "
        f"{len(_events(history, 'refit_failed'))} failed; swaps: {len(swaps)}; running "
        f"generation: {(run['current'] or {}).get('generation', 0)}",
    ]
    if generations:
        lines += ["", f"{'gen':>4} {'ok':>3} {'train':>5} {'held':>4} {'F old':>8} "
                      f"{'F new':>8} {'E old':>8} {'E new':>8} {'fit s':>6} {'step':>6}",
                  "     (held-out MAE: F meV/Å, E meV/atom; ok 'ret': accepted, then "
                  "retracted by its review)"]
        for r in generations:
            lines.append(
                f"{r['generation']:>4} {_ok(r):>3} "
                f"{_fmt(r['n_train'], 'd'):>5} {_fmt(r['n_holdout'], 'd'):>4} "
                f"{_fmt(r['old_forces_mae_meV_per_A']):>8} "
                f"{_fmt(r['new_forces_mae_meV_per_A']):>8} "
                f"{_fmt(r['old_energy_mae_meV_per_atom']):>8} "
                f"{_fmt(r['new_energy_mae_meV_per_atom']):>8} "
                f"{_fmt(r['fit_wall_time_s'], '.2f'):>6} {_fmt(r['step_started'], 'd'):>6}")
    lines += _walker_lines(walker_table(run))
    if parity:
        n = next(iter(parity.values()))["n_frames"]
        lines += ["", f"held-out labels ({n} frames), evaluated now:"]
        for g, data in parity.items():
            lines.append(f"  generation {g}: forces MAE {data['forces_mae_meV_per_A']:.1f} "
                         f"meV/Å, energy MAE {data['energy_mae_meV_per_atom']:.1f} meV/atom")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- writing
def write_report(workdir, output_dir, *, buffer=None, variant: Optional[str] = None,
                 max_parity_generations: int = 4, dpi: int = 120) -> LearnerReport:
    """Read a learner workdir, write figures, ``summary.txt``, ``report.json``.

    :param workdir: the learner's ``workdir``.
    :param output_dir: created if needed; existing figures are overwritten.
    :param buffer: the run's label buffer (path) for the parity plot; None: no parity.
    :param variant: the learner's variant (default: read from the refits' metrics).
    """
    from . import plots

    plots.require_matplotlib()
    run = load_run(workdir)
    generations = generation_table(run)
    labels = label_table(run)
    variant = variant or _variant_of(run, generations)
    parity: Dict[int, Dict[str, Any]] = {}
    if buffer is not None:
        if variant is None:
            raise InputError("cannot tell which variant the run trained (no finished "
                             "refit yet): pass variant=")
        parity = parity_data(run["workdir"], buffer, variant,
                             max_generations=max_parity_generations)
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    swaps = _events(run["history"], "swap")
    walkers = walker_table(run)
    origin = min((r["time"] for r in labels if r.get("time") is not None), default=0.0)
    along = ((lambda rows: _on_wall_time(rows, origin)) if walkers  # each walker counts
             else (lambda rows: rows))                             # its own steps
    files = {
        "errors": plots.errors_figure(generations, out / "errors.png", dpi=dpi),
        "trajectory": plots.trajectory_figure(
            along(labels), along(swaps), along(_events(run["history"], "refit_rejected")),
            out / "trajectory.png", dpi=dpi, thresholds=thresholds(run["history"]),
            x_label="wall time since the first label (s)" if walkers else "MD step"),
        "refit_times": plots.refit_times_figure(generations, out / "refit_times.png", dpi=dpi),
    }
    if parity:
        files["parity"] = plots.parity_figure(parity, variant, out / "parity.png", dpi=dpi)
    if walkers:
        files["walkers"] = plots.walkers_figure(run["history"], out / "walkers.png", dpi=dpi)
    summary = summary_text(run, generations, labels, parity, variant)
    files["summary"] = _write_text(out / SUMMARY_NAME, summary)
    files["data"] = _write_text(out / DATA_NAME, json.dumps(
        {"workdir": str(run["workdir"]), "variant": variant, "generations": generations,
         "labels": labels, "swaps": swaps, "walkers": walkers,
         "parity": {str(g): {k: v for k, v in d.items() if k not in ("reference", "predicted")}
                    for g, d in parity.items()}}, indent=2))
    logger.info("wrote the report of %s to %s", run["workdir"], out)
    return LearnerReport(workdir=run["workdir"], variant=variant, generations=generations,
                         labels=labels, swaps=swaps, parity=parity, walkers=walkers,
                         summary=summary,
                         files=files)


def _on_wall_time(rows: List[Dict[str, Any]], origin: float) -> List[Dict[str, Any]]:
    """Copies of history rows whose ``step`` is the wall time (s) since ``origin``: a
    campaign's walkers each count their own steps, so steps do not order its events."""
    return [{**row, "step": row["time"] - origin} for row in rows
            if row.get("time") is not None]


def _write_text(path: pathlib.Path, text: str) -> pathlib.Path:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
