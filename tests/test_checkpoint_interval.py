"""A fold writes its resume checkpoint at most every CHECKPOINT_SECONDS (harness/train.py): a
short fold writes none, and its best.pt, history and result are those of a fold that writes one
at every validation; an interrupt before the first one restarts the fold, to the same result."""

from __future__ import annotations

import pytest
import torch

from harness import train as train_mod
from harness.config import load_study
from harness.data import prepare_data
from harness.errors import HarnessError
from harness.train import checkpoint_seconds, train_fold
from conftest import write_study

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    cfg = load_study(str(write_study(folder, folder / "glyphs", iters=2)),
                     overrides=["train.max_epochs=4", "train.patience=1"])
    return cfg, prepare_data(cfg)


def fold_run(tiny, run_dir, monkeypatch, seconds: str, saved: list | None = None, report=None):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    monkeypatch.setenv("HARNESS_CHECKPOINT_SECONDS", seconds)
    if saved is not None:
        real = train_mod._atomic_save
        monkeypatch.setattr(train_mod, "_atomic_save",
                            lambda obj, path: (saved.append(path.name), real(obj, path)))
    cfg, data = tiny
    return train_fold(cfg, data, data.split.folds[0], CPU, seed=3, run_dir=run_dir,
                      report=report)


def same_weights(a, b) -> bool:
    a, b = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return a["epoch"] == b["epoch"] and all(
        torch.equal(a[part][k], b[part][k]) for part in ("model", "loss") for k in a[part])


def test_a_short_fold_writes_best_pt_once_and_the_same_results(tiny, tmp_path, monkeypatch):
    every, default = [], []
    each = fold_run(tiny, tmp_path / "each", monkeypatch, "0", every)
    once = fold_run(tiny, tmp_path / "default", monkeypatch, "", default)
    assert "last.pt" in every and every.count("best.pt") >= 2  # improved more than once
    assert default == ["best.pt"]  # at the end, no resume checkpoint
    assert (once.history, once.best_map_at_r, once.best_epoch, once.stop_reason) == \
        (each.history, each.best_map_at_r, each.best_epoch, each.stop_reason)
    assert same_weights(tmp_path / "each" / "best.pt", tmp_path / "default" / "best.pt")
    assert not (tmp_path / "default" / "last.pt").exists()


def test_an_interrupt_before_the_first_checkpoint_restarts_the_fold(tiny, tmp_path,
                                                                    monkeypatch):
    class Interrupt(BaseException):  # as KeyboardInterrupt: not a pruning stop
        pass

    seen = []

    def interrupt_at_the_second_validation(step, value):
        seen.append(step)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        fold_run(tiny, tmp_path / "fold", monkeypatch, "",
                 report=interrupt_at_the_second_validation)
    assert not (tmp_path / "fold" / "last.pt").exists()
    resumed = fold_run(tiny, tmp_path / "fold", monkeypatch, "")
    whole = fold_run(tiny, tmp_path / "whole", monkeypatch, "")
    assert resumed.history == whole.history
    assert same_weights(tmp_path / "fold" / "best.pt", tmp_path / "whole" / "best.pt")


def test_a_pruned_fold_keeps_its_best_model(tiny, tmp_path, monkeypatch):
    seen = []

    def prune_at_the_second_validation(step, value):
        seen.append(step)
        if len(seen) == 2:
            raise RuntimeError("pruned")

    with pytest.raises(RuntimeError, match="pruned"):
        fold_run(tiny, tmp_path / "fold", monkeypatch, "",
                 report=prune_at_the_second_validation)
    fold = tmp_path / "fold"
    assert (fold / "best.pt").exists() and (fold / "history.json").exists()
    assert not (fold / "last.pt").exists()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_interval_is_refused_clearly(monkeypatch, value):
    monkeypatch.setenv("HARNESS_CHECKPOINT_SECONDS", value)
    with pytest.raises(HarnessError, match="HARNESS_CHECKPOINT_SECONDS.*seconds >= 0"):
        checkpoint_seconds()
