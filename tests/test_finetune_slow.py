"""Slow accuracy checks of the fine-tuning engine on a two-level toy (issue #4).

The base is ``tests/data/emt-pet-base.ckpt``: a PET (d_pet 32, ~100 k parameters)
trained ~7 minutes by ``mtt train`` on 320 EMT-labelled CuNi cells by
``scripts/train_emt_base.py`` (held-out force MAE on EMT ~13 meV/Å, see
``tests/data/emt-pet-base.json``). The new level is ``ReparamEMT`` (force gap to EMT
~134 meV/Å). A base trained for a minute inside the test (the first version) had
~205 meV/Å on its own level, which bounded every refit from below.

Run alone with ``pytest -m slow tests/test_finetune_slow.py -s`` to see the numbers.
"""

from __future__ import annotations

import pathlib

import pytest

from test_finetune import NEW, ReparamEMT, force_mae, level_frames

pytestmark = pytest.mark.slow

BASE = pathlib.Path(__file__).parent / "data" / "emt-pet-base.ckpt"


@pytest.fixture(scope="module")
def base_checkpoint():
    assert BASE.is_file(), f"{BASE} is missing; run scripts/train_emt_base.py"
    return BASE


def test_two_level_heads_and_full_reduce_new_level_error(base_checkpoint, tmp_path):
    """Issue #4: with 24 labels of the new level, heads cut the held-out force MAE by at
    least 70 % from the zero-shot model, and full goes further (defaults throughout)."""
    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune

    train = level_frames(24, seed=3, calc=ReparamEMT)
    test = level_frames(12, seed=50, calc=ReparamEMT)
    zero = force_mae(base_checkpoint, test, "energy")
    found = {"zero-shot": zero}
    for name, config in {"heads": FineTuneConfig(method="heads"),
                         "full": FineTuneConfig(method="full")}.items():
        result = finetune(base_checkpoint, train, variant=NEW, config=config,
                          output_dir=tmp_path / name)
        found[name] = force_mae(result.checkpoint_path, test, NEW)
    print("held-out force MAE (meV/A):", {k: round(v, 1) for k, v in found.items()},
          {k: f"{1 - v / zero:.0%} drop" for k, v in found.items()})
    assert found["heads"] <= 0.30 * zero
    assert found["full"] < found["heads"]


def test_full_with_replay_keeps_old_level(base_checkpoint, tmp_path):
    """``full`` with 48 replayed EMT frames keeps the EMT head within 25 % of its
    held-out force error (measured 12.6 -> 14.3 meV/Å with torch 2.13 on CPU, 11.7
    with an earlier torch; with 24 replayed frames +38 %: the backbone overfits a small
    replay set; see the README's fine-tuning section)."""
    from ase_petft.config import FineTuneConfig
    from ase_petft.finetune import finetune

    test_old = level_frames(12, seed=50)
    before = force_mae(base_checkpoint, test_old, "energy")
    result = finetune(base_checkpoint, level_frames(24, seed=3, calc=ReparamEMT),
                      variant=NEW, config=FineTuneConfig(method="full"),
                      output_dir=tmp_path / "gen",
                      replay={"energy": level_frames(48, seed=7)})
    after = force_mae(result.checkpoint_path, test_old, "energy")
    print(f"old level force MAE {before:.1f} -> {after:.1f} meV/A with replay")
    assert after < 1.25 * before
