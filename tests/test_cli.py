"""The `petft` command: every subcommand on small data, exit codes, the report's data."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.calculators.singlepoint import SinglePointCalculator
from ase.md.langevin import Langevin

from ase_petft import (CheckpointError, FineTunableCalculator, FineTuneConfig,
                       FineTuneError, LabelBuffer)
from ase_petft.cli import build_parser, main
from ase_petft.cli.finetune import config_from_args
from ase_petft.errors import (ConfigError, LabelBufferError, LabellingError, TrainingDataError,
                              UsageError, exit_code)
from ase_petft.learner import OnTheFlyLearner, every
from ase_petft.learner.gate import GateConfig
from ase_petft.report import write_report

from conftest import emt_frames

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _petft(*args, cwd):
    """`petft ARGS` in a fresh process (the installed entry point's main)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "ase_petft.cli", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def labels_xyz(tmp_path_factory):
    """8 labelled CuNi cells (energy, forces, stress) as extended XYZ."""
    path = tmp_path_factory.mktemp("labels") / "labels.xyz"
    ase.io.write(path, emt_frames(8, seed=3), format="extxyz")
    return path


@pytest.fixture(scope="module")
def learner_run(emt_checkpoint, tmp_path_factory):
    """A short OnTheFlyLearner run (EMT reference, inline refits): (workdir, buffer)."""
    work = tmp_path_factory.mktemp("learner")
    atoms = emt_frames(1, seed=5)[0]
    calc = FineTunableCalculator(emt_checkpoint, variant="energy/emt")
    atoms.calc = calc
    with LabelBuffer(work / "labels.h5", mode="w-") as buffer:
        learner = OnTheFlyLearner(calc, EMT(), buffer, select=every(2), refit_every=4,
                                  background=False, workdir=work / "learner",
                                  holdout_fraction=0.25,
                                  # refits that change the head and reach the held-out
                                  # comparison: the report is under test, not the gate
                                  config=FineTuneConfig(seed=0, keep_parent_unless_better=False),
                                  gate=GateConfig(probe_steps=0, harm_factor=1e9))
        dyn = Langevin(atoms, 1 * units.fs, temperature_K=300, friction=0.02,
                       rng=np.random.default_rng(0), fixcm=False)
        dyn.attach(learner, interval=1)
        dyn.run(16)
        learner.close()
    return work / "learner", work / "labels.h5"


# ---------------------------------------------------------------------- usage
def test_help_of_every_command(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for command in ("demo", "finetune", "buffer", "export", "report"):
        assert command in text
    for command in (["finetune"], ["buffer"], ["buffer", "info"], ["buffer", "export"],
                    ["buffer", "import"], ["export"], ["report"], ["demo"]):
        assert main([*command, "--help"]) == 0
        assert "usage: petft " + " ".join(command) in capsys.readouterr().out


def test_bad_usage_is_exit_code_2(capsys):
    assert main(["bogus"]) == 2
    assert main(["finetune", "only-one-arg"]) == 2
    assert main(["buffer"]) == 2
    capsys.readouterr()


@pytest.mark.parametrize("args", [
    ["finetune", "missing.ckpt", "missing.xyz", "--variant", "energy/x", "-o", "out"],
    ["buffer", "info", "missing.h5"],
    ["export", "missing.ckpt", "-o", "model.pt"],
    ["report", "missing-workdir", "-o", "report"],
])
def test_missing_file_is_one_line_and_exit_code_2(tmp_path, args):
    proc = _petft(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "missing" in lines[0] and lines[0].startswith("petft ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "model.pt").exists()


def test_usage_error_is_one_line_pointing_to_help(capsys):
    assert main(["finetune", "only-one-arg"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "usage:" not in lines[0]
    assert lines[0].startswith("petft finetune: error: the following arguments are required")
    assert "petft finetune --help" in lines[0]
    assert main(["buffer", "info", "--bogus"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petft buffer info: error: ")


def test_exit_codes_follow_the_error_tree():
    for error in (UsageError("bad option"), ConfigError("lr"), CheckpointError("unreadable"),
                  TrainingDataError("too few labels")):
        assert exit_code(error) == 2
    for error in (FineTuneError("diverged"), LabellingError("SCF failed"),
                  RuntimeError("boom"), ValueError("not one of ours")):
        assert exit_code(error) == 1
    caused = FineTuneError("diverged")  # the class decides, not what caused it
    caused.__cause__ = CheckpointError("unreadable")
    assert exit_code(caused) == 1


def test_finetune_passes_only_the_options_given():
    base = ["finetune", "model.ckpt", "labels.xyz", "--variant", "energy/x", "-o", "out"]
    assert config_from_args(build_parser().parse_args(base)) == FineTuneConfig()
    args = build_parser().parse_args([*base, "--method", "full", "--epochs", "3",
                                      "--inherit-from", "none"])
    assert args.lr is None and args.batch_size is None and args.solver is None
    assert config_from_args(args) == FineTuneConfig(method="full", num_epochs=3,
                                                    inherit_from=None)


# ---------------------------------------------------------------------- buffer
def test_buffer_import_info_export_round_trip(tmp_path, labels_xyz, capsys):
    buffer = tmp_path / "labels.h5"
    assert main(["buffer", "import", str(labels_xyz), str(labels_xyz), "-o", str(buffer),
                 "--variant", "energy/emt"]) == 0
    out = capsys.readouterr().out  # the second copy adds nothing (same structures)
    assert "imported 8 labels" in out and "imported 0 labels" in out and ": 8 labels" in out
    assert main(["buffer", "import", str(labels_xyz), "-o", str(buffer), "--variant",
                 "energy/emt", "--keep-duplicates"]) == 0
    assert ": 16 labels" in capsys.readouterr().out

    assert main(["buffer", "info", str(buffer)]) == 0
    text = capsys.readouterr().out
    assert "energy/emt" in text and "Cu" in text and "Ni" in text
    assert "imported from labels.xyz (16)" in text and "failures: 0" in text
    assert main(["buffer", "info", str(buffer), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    info = summary["variants"]["energy/emt"]
    assert info["n_labels"] == info["with_forces"] == info["with_stress"] == 16
    assert info["atoms_per_frame"] == {"min": 32, "median": 32.0, "max": 32}
    assert summary["elements"] == ["Ni", "Cu"] and summary["failures"]["n_failures"] == 0

    out = tmp_path / "out.xyz"
    assert main(["buffer", "export", str(buffer), "-o", str(out)]) == 0
    back, original = ase.io.read(out, ":"), ase.io.read(labels_xyz, ":") * 2
    assert len(back) == 16
    for a, b in zip(back, original):
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy(), abs=1e-12)
        assert np.allclose(a.get_forces(), b.get_forces(), atol=1e-12)
    assert main(["buffer", "export", str(buffer), "-o", str(out), "--variant",
                 "energy/nope"]) == 2
    assert "energy/emt" in capsys.readouterr().err
    for command in ("export", "recover"):  # an output under a regular file: bad input
        assert main(["buffer", command, str(buffer), "-o", str(out / "x")]) == 2
        assert "its folder cannot be created" in capsys.readouterr().err


def test_buffer_import_validates_every_input_first(tmp_path, labels_xyz, capsys):
    bad = emt_frames(2, seed=4)
    bad[1].calc = SinglePointCalculator(bad[1], energy=math.nan,
                                        forces=bad[1].get_forces())
    ase.io.write(tmp_path / "bad.xyz", bad, format="extxyz")
    buffer = tmp_path / "labels.h5"
    code = main(["buffer", "import", str(labels_xyz), str(tmp_path / "bad.xyz"),
                 "-o", str(buffer), "--variant", "energy/emt"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not buffer.exists()  # the good first file was not imported either


def test_index_selects_labels_from_a_buffer_as_from_a_file(tmp_path):
    """`petft finetune --index` was ignored for a buffer (all its labels trained)."""
    from ase_petft.buffer.sources import read_labels

    path = tmp_path / "labels.h5"
    frames = emt_frames(5, seed=3)
    with LabelBuffer(path, mode="w-") as buffer:
        buffer.extend(frames[:2], variant="energy/other")
        buffer.extend(frames, variant="energy/emt")
    keys = [a.positions.tobytes() for a in frames]
    for index, want in ((":", keys), ("1:3", keys[1:3]), ("-1", keys[-1:]), ("0", keys[:1])):
        got = read_labels(path, "energy/emt", index=index)
        assert [a.positions.tobytes() for a in got] == want, index
    with pytest.raises(LabelBufferError, match="index '9' does not select"):
        read_labels(path, "energy/emt", index="9")


# ---------------------------------------------------------------------- finetune
def test_finetune_heads_from_extxyz(emt_checkpoint, labels_xyz, tmp_path, capsys):
    out = tmp_path / "gen-0001"
    assert main(["finetune", str(emt_checkpoint), str(labels_xyz), "--variant",
                 "energy/new", "-o", str(out), "-q"]) == 0
    text = capsys.readouterr().out
    assert "validation errors of 'energy/new'" in text and "forces MAE" in text
    for name in ("model.ckpt", "model.pt", "metrics.json", "config.json"):
        assert (out / name).is_file()
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert f"{metrics['after']['forces_mae_meV_per_A']:.2f}" in text
    calc = FineTunableCalculator(out / "model.ckpt", variant="energy/new", inherit_from=None)
    assert calc.variants == ["energy", "energy/new"]
    # a generation directory is never overwritten
    assert main(["finetune", str(emt_checkpoint), str(labels_xyz), "--variant",
                 "energy/new", "-o", str(out), "-q"]) == 2
    assert "already holds a model.ckpt" in capsys.readouterr().err


def test_finetune_sgd_with_replay_keeps_the_old_head(emt_checkpoint, labels_xyz, tmp_path,
                                                     capsys):
    replay = tmp_path / "replay.h5"
    with LabelBuffer(replay, mode="w-") as buffer:
        buffer.extend(emt_frames(4, seed=9), variant="energy")
    out = tmp_path / "full"
    assert main(["finetune", str(emt_checkpoint), str(labels_xyz), "--variant",
                 "energy/new", "--method", "full", "--epochs", "2", "--lr", "1e-4",
                 "--replay", str(replay), "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "epochs" in captured.err  # the per-epoch progress bar
    assert "replayed 'energy'" in captured.out and "no longer has" not in captured.out
    calc = FineTunableCalculator(out / "model.ckpt", variant="energy", inherit_from=None)
    assert calc.variants == ["energy", "energy/new"]


@pytest.mark.parametrize("extra, message", [
    (["--variant", "energy/new", "--inherit-from", "none"], "did you mean"),
    (["--variant", "pbe0"], "invalid energy variant"),
    (["--variant", "energy/new", "--lr", "0"], "learning_rate"),
    (["--variant", "energy/new", "--index", "0"], "at least 2"),
    (["--variant", "energy/new", "--replay-variant", "energy/other", "--replay", "LABELS"],
     "unknown variant 'energy/other': the checkpoint has"),
])
def test_finetune_bad_input_is_exit_code_2(emt_checkpoint, labels_xyz, tmp_path, capsys,
                                           extra, message):
    extra = [str(labels_xyz) if e == "LABELS" else e for e in extra]
    code = main(["finetune", str(emt_checkpoint), str(labels_xyz), "-o",
                 str(tmp_path / "out"), "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out" / "model.ckpt").exists()


# ---------------------------------------------------------------------- export
def test_export_gives_a_metatomic_model_with_every_variant(learner_run, tmp_path, capsys):
    from metatomic_ase import MetatomicCalculator

    workdir, _ = learner_run
    checkpoint = workdir / "gen-0001" / "model.ckpt"
    out = tmp_path / "exported" / "model.pt"
    assert main(["export", str(checkpoint), "--variant", "energy/emt", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "variants={'energy': 'emt'}" in text and "variant emt" in text
    atoms = emt_frames(1, seed=11)[0]
    for variant, suffix in (("energy", None), ("energy/emt", "emt")):
        probe = atoms.copy()
        probe.calc = MetatomicCalculator(str(out), variants={"energy": suffix},
                                         uncertainty_threshold=None)
        exported = probe.get_potential_energy()
        probe.calc = FineTunableCalculator(checkpoint, variant=variant, inherit_from=None)
        assert exported == pytest.approx(probe.get_potential_energy(), abs=1e-4)

    assert main(["export", str(checkpoint), "--variant", "energy/emx", "-o",
                 str(tmp_path / "x.pt")]) == 2
    assert "did you mean 'energy/emt'" in capsys.readouterr().err
    assert main(["export", str(out), "-o", str(tmp_path / "y.pt")]) == 2  # a .pt, not .ckpt
    assert "exported metatomic model" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


# ---------------------------------------------------------------------- report
def test_report_writes_figures_and_returns_their_data(learner_run, tmp_path, capsys):
    workdir, buffer = learner_run
    out = tmp_path / "report"
    assert main(["report", str(workdir), "-o", str(out), "--buffer", str(buffer)]) == 0
    assert "refits:" in capsys.readouterr().out
    for name in ("errors", "trajectory", "refit_times", "parity"):
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 5000
    assert (out / "summary.txt").read_text().startswith("learner run:")

    report = write_report(workdir, tmp_path / "again", buffer=buffer)
    refits = sorted(p for p in workdir.glob("gen-*") if p.name != "gen-0000")
    assert len(report.generations) == len(refits) >= 2
    assert [g["generation"] for g in report.generations] == [int(p.name[4:]) for p in refits]
    for row, folder in zip(report.generations, refits):
        decision = json.loads((folder / "decision.json").read_text())
        assert row["accepted"] == decision["accepted"]
        assert row["new_forces_mae_meV_per_A"] == decision["new"]["forces_mae_meV_per_A"]
    with LabelBuffer(buffer, mode="r") as labels:
        n_holdout = sum(bool(a.info.get("holdout")) for a in labels)
        # 8 labelled steps, and rattled copies of the 1st and 5th (RattleConfig)
        assert len(report.labels) == len(labels) == 10
    accepted = [g["generation"] for g in report.generations if g["accepted"]]
    assert list(report.parity) == [0, *accepted]  # <= 4 generations: all of them
    for data in report.parity.values():
        assert data["reference"].shape == data["predicted"].shape == (32 * n_holdout, 3)
    saved = json.loads((tmp_path / "again" / "report.json").read_text())
    assert saved["generations"] == json.loads(json.dumps(report.generations))


def test_report_of_a_run_without_refits(tmp_path):
    workdir = tmp_path / "learner"
    workdir.mkdir()
    rows = [{"step": s, "event": "label", "generation": 0, "n_labels": i + 1, "time": 0.0,
             "holdout": False, "uncertainty": None} for i, s in enumerate((3, 6))]
    (workdir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(workdir, tmp_path / "report")
    assert report.generations == [] and len(report.labels) == 2 and report.parity == {}
    assert "refits: 0 finished" in report.summary
    assert all(p.stat().st_size > 0 for p in report.files.values())


def test_report_of_a_folder_that_is_not_a_learner_workdir(tmp_path, capsys):
    assert main(["report", str(tmp_path), "-o", str(tmp_path / "r")]) == 2
    assert "not a learner work directory" in capsys.readouterr().err


def test_report_into_an_existing_file_is_exit_code_2(tmp_path, capsys):
    workdir = tmp_path / "learner"
    workdir.mkdir()
    row = {"step": 3, "event": "label", "generation": 0, "n_labels": 1, "time": 0.0,
           "holdout": False, "uncertainty": None}
    (workdir / "history.jsonl").write_text(json.dumps(row) + "\n")
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    assert main(["report", str(workdir), "-o", str(taken)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("petft report: error: ")
    assert "exists and is not a directory" in lines[0]
    assert taken.read_text() == "mine"


def test_report_of_a_restarted_run_with_failures_and_a_threshold(tmp_path):
    from ase_petft.report import continuous_steps, thresholds

    workdir = tmp_path / "learner"
    workdir.mkdir()
    rows = [{"step": 0, "event": "start", "policy": "uncertainty_above(0.02) | max_gap(50)"},
            *({"step": s, "event": "label", "generation": 0, "holdout": False,
               "uncertainty": 0.03} for s in (3, 9)),
            {"step": 12, "event": "label_failed", "generation": 0, "error": "SCF"},
            {"step": 30, "event": "close"},
            # a run written before step numbers continued across restarts
            {"step": 0, "event": "start", "policy": "uncertainty_above(0.01)"},
            {"step": 4, "event": "label", "generation": 0, "holdout": True,
             "uncertainty": 0.05}]
    (workdir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps = [row["step"] for row in continuous_steps(rows)]
    assert steps == sorted(steps) and steps[-1] == 34  # 30 + 4, no line back to 0
    assert thresholds(rows) == [0.01, 0.02]
    report = write_report(workdir, tmp_path / "report")
    assert [r["ok"] for r in report.labels] == [True, True, False, True]
    assert "observer steps: 34" in report.summary
    assert "3 ok, 1 failed" in report.summary
    assert report.files["trajectory"].stat().st_size > 5000
