"""Errors every trial would hit (weight file, sampler, validation split) stop the run before the
search creates a trial: one `error:` line, no Optuna traceback, no FAIL trial in study.db."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest
import torch

from harness.config import load_study
from harness.data import prepare_data
from harness.errors import ConfigError, WeightsError
from harness.preflight import preflight
from harness.run import main
from conftest import write_study


def trial_rows(out) -> int:
    db = out / "study.db"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as con:
        try:
            return con.execute("SELECT COUNT(*) FROM trials").fetchone()[0]
        except sqlite3.OperationalError:  # no tables yet
            return 0


@pytest.mark.parametrize("overrides, expected", [
    (["model.pretrained=true", "model.weights=/no/such/weights.pt"], "no such file"),
    (["train.batch_size=4096"], "training classes"),
    (["model.frozen_blocks=5"], "model.frozen_blocks must be between 0"),
])
def test_fails_before_any_trial(tmp_path, capsys, monkeypatch, overrides, expected):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study = write_study(tmp_path, tmp_path / "glyphs")
    out = tmp_path / "run"
    args = ["--study", str(study), "--output", str(out), "--device", "cpu"]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Trial 0 failed" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert trial_rows(out) == 0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    cfg = load_study(str(write_study(folder, folder / "glyphs")))
    return cfg, prepare_data(cfg)


def test_passes_on_a_feasible_study(tiny):
    cfg, data = tiny
    preflight(cfg, data, torch.device("cpu"))


def test_corrupt_weight_file(tiny, tmp_path):
    cfg, data = tiny
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"not a torch file")
    cfg = load_study(str(write_study(tmp_path, data.records.root)),
                     overrides=["model.pretrained=true", f"model.weights={weights}"])
    with pytest.raises(WeightsError, match="w.pt"):
        preflight(cfg, data, torch.device("cpu"))


def test_validation_split_without_pairs(tiny, monkeypatch):
    from harness import preflight as module

    cfg, data = tiny
    real = module.fold_indices

    def one_image_per_val_class(data, fold):  # nothing left to retrieve in validation
        train_idx, val_idx = real(data, fold)
        _, first = np.unique(data.records.labels[val_idx], return_index=True)
        return train_idx, val_idx[first]

    monkeypatch.setattr(module, "fold_indices", one_image_per_val_class)
    with pytest.raises(ConfigError, match="fold 0: the validation classes hold no class"):
        preflight(cfg, data, torch.device("cpu"))
