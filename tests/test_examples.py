"""The examples run as written (`python examples/X.py --quick`), in a fresh process each.

They use the shipped demo model with xTB references when it is built; otherwise the
tiny Cu/Ni EMT model of conftest (``--system cuni``). pbe_to_pbe0 needs PySCF, tblite
and the demo model (H, C, N, O) and is skipped without them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _demo_model_built() -> bool:
    from ase_petft import CheckpointError, demo_checkpoint

    try:
        demo_checkpoint()
    except CheckpointError:
        return False
    return (demo_checkpoint().parent / "demo_card.json").is_file()


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def system_args(request):
    """Options selecting the model: the demo model + xTB, or the EMT model + EMT."""
    if _demo_model_built() and _has("tblite"):
        return ["--system", "molecule"]
    checkpoint = request.getfixturevalue("emt_checkpoint")
    return ["--system", "cuni", "--checkpoint", str(checkpoint)]


def run_example(name: str, *args, cwd: pathlib.Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def table_rows(text: str) -> list:
    """Rows of the Markdown tables printed by an example (header and rule dropped)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines
            if not line.startswith("| method") and not line.startswith("| model")
            and not line.startswith("| step")]


def test_md_with_refits(tmp_path, system_args):
    out = run_example("md_with_refits.py", "--quick", "--workdir", tmp_path / "run",
                      *system_args, cwd=tmp_path)
    rows = table_rows(out)
    assert [r[0] for r in rows][1].startswith("generation 0")
    history = [json.loads(line) for line in
               (tmp_path / "run" / "learner" / "history.jsonl").read_text().splitlines()]
    # with a handful of real labels the gate may rightly refuse every refit (the swap
    # mechanics are tested in test_learner.py): a refit must have been decided, with a
    # reason, and the final row must show the generation the calculator really ran
    decided = [row for row in history if row["event"] in ("swap", "refit_rejected")]
    assert decided and all(row.get("reason") for row in decided)
    swaps = [row["generation"] for row in history if row["event"] == "swap"]
    final = f"generation {swaps[-1] if swaps else 0} (after the run)"
    assert rows[-1][0] == final and float(rows[-1][2]) > 0
    assert f"petft report {tmp_path / 'run' / 'learner'}" in out


def test_active_learning_with_budget_and_report(tmp_path, system_args):
    # max_gap 5 alone asks for 8 labels in the 40 quick steps: the budget must bind
    out = run_example("active_learning.py", "--quick", "--max-labels", "6", "--max-gap", "5",
                      "--workdir", tmp_path / "run", "--report", tmp_path / "report",
                      *system_args, cwd=tmp_path)
    assert "budget 6 labels: 6" in out
    label_rows = [line for line in out.splitlines() if line.startswith("| ")
                  and line.split("|")[1].strip().isdigit()]
    assert len(label_rows) == 6
    assert "uncertain" in out or "max_gap" in out
    for name in ("errors.png", "trajectory.png", "refit_times.png", "summary.txt"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_many_walkers_and_their_report(tmp_path, system_args):
    out = run_example("many_walkers.py", "--quick", "--workdir", tmp_path / "run",
                      *system_args, cwd=tmp_path)
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["walkers"] == 2 and set(summary["generation_per_walker"]) == {"T300", "T400"}
    assert summary["reference_calls"] == summary["labels"] == 8  # the quick budget, no repeat
    assert summary["wall_time_s"] > 0
    from ase_petft import LabelBuffer

    with LabelBuffer(tmp_path / "run" / "labels.h5", mode="r") as buffer:
        asked = [a.info["walker"] for a in buffer]
    report = subprocess.run([sys.executable, "-m", "ase_petft.cli", "report",
                             str(tmp_path / "run" / "campaign"), "-o", str(tmp_path / "report")],
                            capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stderr[-2000:]
    text = (tmp_path / "report" / "summary.txt").read_text()
    for name in ("T300", "T400"):  # the walker table: labels each walker asked for
        line = next(line for line in text.splitlines() if line.startswith(name))
        assert int(line.split()[1]) == asked.count(name)
    assert (tmp_path / "report" / "walkers.png").stat().st_size > 0


def test_heads_vs_full(tmp_path, system_args):
    out = run_example("heads_vs_full.py", "--quick", "--workdir", tmp_path / "run",
                      *system_args, cwd=tmp_path)
    rows = {r[0]: r[1:] for r in table_rows(out)}
    assert set(rows) == {"zero-shot (copy of 'energy')", "heads (linear solver)",
                         "heads (SGD)", "full", "full + replay", "lora"}
    time_s, new_e, new_f, old_f = rows["heads (linear solver)"]
    assert float(time_s) > 0 and float(new_f) > 0
    assert old_f == rows["zero-shot (copy of 'energy')"][3]  # heads: old head untouched


@pytest.mark.skipif(not (_has("pyscf") and _has("tblite")), reason="needs pyscf and tblite")
def test_pbe_to_pbe0(tmp_path):
    if not _demo_model_built():
        pytest.skip("the demo model (H, C, N, O) is not built yet")
    out = run_example("pbe_to_pbe0.py", "--quick", "--workdir", tmp_path / "run",
                      cwd=tmp_path)
    rows = {r[0]: r[1:] for r in table_rows(out)}
    pbe, pbe0 = rows["'energy/pbe' (fine-tuned)"], rows["'energy/pbe0' (fine-tuned)"]
    assert float(pbe[0]) < float(pbe0[0])   # the PBE head fits PBE energies better ...
    assert float(pbe0[2]) < float(pbe[2])   # ... and the PBE0 head PBE0 energies
    assert "matches the checkpoint" in out
    assert (tmp_path / "run" / "2-pbe0" / "model.pt").is_file()
