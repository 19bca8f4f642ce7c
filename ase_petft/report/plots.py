"""The figures of :mod:`ase_petft.report` (matplotlib ``Figure`` objects, Agg, no pyplot)."""

from __future__ import annotations

import pathlib
from typing import Any, Dict, List, Sequence

import numpy as np

from ..errors import InputError

ACCEPTED, REJECTED, RUNNING = "#2a9d4b", "#d1495b", "#6c757d"
SWAP = "#3b6fb6"


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise InputError("the report needs matplotlib: pip install 'ase-petft[plots]'") from exc


def _figure(rows: int, cols: int = 1, *, size=(7.0, 4.0), **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def _save(fig, path: pathlib.Path, dpi: int) -> pathlib.Path:
    fig.savefig(path, dpi=dpi)
    return path


def _empty(ax, text: str, *, keep_x: bool = False) -> None:
    """A panel that only says why it is empty (``keep_x``: x ticks shared with others)."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
            color=RUNNING, fontsize=11)
    ax.set_yticks([])
    if not keep_x:
        ax.set_xticks([])


def _values(rows, key) -> np.ndarray:
    return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)


# ---------------------------------------------------------------------- errors
def errors_figure(generations: List[Dict[str, Any]], path, *, dpi: int) -> pathlib.Path:
    """Held-out errors of the running model (before) and of each refit (after)."""
    panels = (("forces", "forces_mae_meV_per_A", "force MAE (meV/Å)"),
              ("energy", "energy_mae_meV_per_atom", "energy MAE (meV/atom)"))
    if not any(r.get("old_forces_mae_meV_per_A") is not None
               or r.get("old_energy_mae_meV_per_atom") is not None for r in generations):
        fig, axes = _figure(1, size=(7.0, 3.0))
        _empty(axes[0, 0], "no refit judged on held-out labels yet")
        fig.suptitle("Held-out error per refit")
        return _save(fig, path, dpi)
    fig, axes = _figure(2, size=(7.0, 5.5), sharex=True)
    g = np.array([r["generation"] for r in generations])
    ok = np.array([r["accepted"] for r in generations], dtype=bool)
    for ax, (_, key, label) in zip(axes[:, 0], panels):
        old, new = _values(generations, "old_" + key), _values(generations, "new_" + key)
        ax.plot(g, old, "s--", color=RUNNING, ms=5, lw=1, label="running model (before)")
        if ok.any():
            ax.plot(g[ok], new[ok], "o", color=ACCEPTED, ms=8, label="refit, accepted")
        if (~ok).any():
            ax.plot(g[~ok], new[~ok], "X", color=REJECTED, ms=9, label="refit, rejected")
        for x, a, b in zip(g, old, new):
            ax.annotate("", (x, b), (x, a), arrowprops={"arrowstyle": "->", "color": "0.7"})
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        top = np.nanmax(np.concatenate([old, new, [0.0]]))
        ax.set_ylim(0, 1.12 * top if top > 0 else 1.0)
        ax.set_xlim(g.min() - 0.5, g.max() + 0.5)
    axes[0, 0].legend(fontsize=8, loc="best")
    axes[1, 0].set_xlabel("refit (generation number)")
    axes[1, 0].set_xticks(g)
    fig.suptitle("Held-out error per refit (validation gate: accept if not worse)")
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- trajectory
def trajectory_figure(labels: List[Dict[str, Any]], swaps: List[Dict[str, Any]],
                      rejected: List[Dict[str, Any]], path, *, dpi: int,
                      thresholds: Sequence[float] = (), x_label: str = "MD step") -> pathlib.Path:
    """Uncertainty at labelled steps (with the policy's threshold), labels and failed
    reference calls along the run, swaps and rejections."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(2, size=(7.0, 5.5), sharex=True)
    top, bottom = axes[0, 0], axes[1, 0]
    ok = [r for r in labels if r["ok"]]
    steps = np.array([r["step"] for r in ok], dtype=float)
    failed = np.array([r["step"] for r in labels if not r["ok"]], dtype=float)
    sigma = _values(ok, "uncertainty_meV_per_atom")
    held = np.array([r["holdout"] for r in ok], dtype=bool)
    if np.isfinite(sigma).any():
        top.plot(steps[~held], sigma[~held], "o", color=SWAP, ms=5, label="training label")
        if held.any():
            top.plot(steps[held], sigma[held], "D", mfc="none", color=RUNNING, ms=6,
                     label="held-out label")
        for i, threshold in enumerate(thresholds):
            top.axhline(1e3 * threshold, color="black", ls="--", lw=1,
                        label="uncertainty_above threshold" if i == 0 else None)
        top.set_yscale("log")
        top.grid(alpha=0.3)
        top.legend(fontsize=8)
    else:
        _empty(top, "no uncertainty recorded\n(the selection policy did not use it)",
               keep_x=True)
    top.set_ylabel("energy σ at labelled step\n(meV/atom)")
    if len(steps):
        bottom.step(np.concatenate([[0], steps]), np.arange(len(steps) + 1), where="post",
                    color="black", lw=1.5, label="labels")
    if len(failed):
        bottom.plot(failed, np.zeros_like(failed), "x", color=REJECTED, ms=7, clip_on=False,
                    label=f"failed reference call ({len(failed)})")
    top_of = max(len(steps), 1)
    for events, color, name in ((swaps, ACCEPTED, "swap"), (rejected, REJECTED, "rejected")):
        for i, event in enumerate(events):
            for ax in (top, bottom):
                ax.axvline(event["step"], color=color, ls=":", lw=1.2,
                           label=f"{name} (gen N)" if (i == 0 and ax is bottom) else None)
    _generation_marks(bottom, swaps, rejected, top_of)
    every_step = [*steps.tolist(), *failed.tolist(), *(float(w["step"]) for w in swaps + rejected)]
    last = max([0.0, *every_step])
    bottom.set_xlim(0, 1.06 * last if last > 0 else 1.0)
    bottom.set_xlabel(x_label)
    bottom.set_ylabel("labels")
    bottom.set_ylim(bottom=0)
    bottom.yaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.grid(alpha=0.3)
    if len(steps) or len(failed) or swaps or rejected:
        bottom.legend(fontsize=8, loc="lower right")
    fig.suptitle("Labelling along the trajectory")
    return _save(fig, path, dpi)


def _generation_marks(ax, swaps, rejected, height: int) -> None:
    """'gen N' next to each swap/rejection line, on staggered rows so that neighbours
    do not print over each other."""
    events = sorted([(e["step"], e["generation"], ACCEPTED) for e in swaps]
                    + [(e["step"], e["generation"], REJECTED) for e in rejected])
    rows = 4
    for i, (step, generation, color) in enumerate(events):
        y = height * (0.95 - 0.12 * (i % rows))
        ax.annotate(f"gen {generation}", (step, y), xytext=(2, 0), textcoords="offset points",
                    fontsize=7, color=color, va="top")


# ---------------------------------------------------------------------- walkers
def walkers_figure(history: List[Dict[str, Any]], path, *, dpi: int) -> pathlib.Path:
    """A campaign's walkers against wall time: one row each, with the labels it asked
    for (held out: open), its failed reference calls and the generations it swapped in."""
    names = list(dict.fromkeys(r["walker"] for r in history if r.get("walker")))
    t0 = min((r["time"] for r in history if "time" in r), default=0.0)
    fig, axes = _figure(1, size=(7.0, 1.2 + 0.5 * len(names)))
    ax = axes[0, 0]
    marks = {"label": ("o", SWAP), "label_failed": ("x", REJECTED),
             "walker_swap": ("|", ACCEPTED), "unphysical": ("*", REJECTED)}
    shown = set()
    for y, name in enumerate(names):
        for r in history:
            kind = r.get("event")
            if r.get("walker") != name or kind not in marks:
                continue
            marker, color = marks[kind]
            held = kind == "label" and r.get("holdout")
            ax.plot(r["time"] - t0, y, marker, color=color, ms=9 if marker == "|" else 6,
                    mfc="none" if held else color,
                    label=kind.replace("_", " ") if kind not in shown else None)
            shown.add(kind)
            if kind == "walker_swap":
                ax.annotate(f"{r.get('to_generation')}", (r["time"] - t0, y),
                            xytext=(0, 7), textcoords="offset points", fontsize=7,
                            color=color, ha="center")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names)
    ax.set_ylim(-0.6, len(names) - 0.4)
    ax.set_xlabel("wall time since the first event (s)")
    ax.grid(alpha=0.3, axis="x")
    if shown:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("Walkers: labels asked for, failed calls and swaps (generation above)")
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- refit times
def refit_times_figure(generations: List[Dict[str, Any]], path, *, dpi: int) -> pathlib.Path:
    fig, axes = _figure(1, size=(7.0, 3.6))
    ax = axes[0, 0]
    if not generations:
        _empty(ax, "no finished refit")
        return _save(fig, path, dpi)
    g = np.array([r["generation"] for r in generations])
    fit = np.nan_to_num(_values(generations, "fit_wall_time_s"))
    gate = np.nan_to_num(_values(generations, "gate_wall_time_s"))
    colors = [ACCEPTED if r["accepted"] else REJECTED for r in generations]
    ax.bar(g, fit, color=colors, label="fine-tune")
    ax.bar(g, gate, bottom=fit, color="0.75", label="held-out evaluation")
    ax.set_xticks(g)
    ax.set_xlabel("refit (generation number; green accepted, red rejected)")
    ax.set_ylabel("wall time (s)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title("Refit times")
    return _save(fig, path, dpi)


# ---------------------------------------------------------------------- parity
def parity_figure(parity: Dict[int, Dict[str, Any]], variant: str, path, *,
                  dpi: int) -> pathlib.Path:
    """Predicted vs reference force components on held-out labels, one panel per generation."""
    n = len(parity)
    fig, axes = _figure(1, n, size=(3.3 * n + 0.4, 3.7), sharex=True, sharey=True)
    everything = np.concatenate([np.concatenate([d["reference"].ravel(), d["predicted"].ravel()])
                                 for d in parity.values()])
    lim = float(np.max(np.abs(everything))) * 1.05 or 1.0
    for ax, (g, data) in zip(axes[0], sorted(parity.items())):
        ax.plot([-lim, lim], [-lim, lim], color="0.6", lw=1)
        ax.plot(data["reference"].ravel(), data["predicted"].ravel(), ".", ms=3, alpha=0.6,
                color=SWAP if g else RUNNING)
        ax.set_title(f"generation {g}\nMAE {data['forces_mae_meV_per_A']:.0f} meV/Å",
                     fontsize=10)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xlabel("reference force (eV/Å)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("predicted force (eV/Å)")
    n_frames = next(iter(parity.values()))["n_frames"]
    fig.suptitle(f"{variant}: force components on {n_frames} held-out labels")
    return _save(fig, path, dpi)
