"""Run folders may sit on shared disks: a planted pickle in a checkpoint must not run, and no
password may be written into them."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from harness.config import load_study
from harness.data import prepare_data
from harness.provenance import provenance, redact_word
from harness.run import main
from harness.train import CheckpointError, load_best_model, train_fold
from losses.registry import LOSSES, build_loss
from conftest import write_study

CPU = torch.device("cpu")


class Payload:
    """Unpickling this creates `marker`: the proof that loading ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    cfg = load_study(str(write_study(folder, folder / "glyphs", iters=2)))
    return cfg, prepare_data(cfg)


def plant(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": Payload(marker), "state": {}}, path)


def test_planted_last_pt_is_not_executed_and_the_error_is_clear(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    cfg, data = tiny
    marker = tmp_path / "pwned"
    plant(tmp_path / "fold" / "last.pt", marker)
    with pytest.raises(CheckpointError) as e:
        train_fold(cfg, data, data.split.folds[0], CPU, seed=0, run_dir=tmp_path / "fold")
    assert not marker.exists()
    message = str(e.value)
    assert str(tmp_path / "fold" / "last.pt") in message and "Delete" in message
    assert "nothing in it was executed" in message


def test_planted_best_pt_is_not_executed(tmp_path, tiny):
    cfg, _ = tiny
    marker = tmp_path / "pwned"
    plant(tmp_path / "best.pt", marker)
    with pytest.raises(CheckpointError, match="best.pt"):
        load_best_model(cfg, tmp_path / "best.pt", CPU)
    assert not marker.exists()


def test_damaged_checkpoint_is_a_clear_error(tmp_path, tiny):
    cfg, _ = tiny
    (tmp_path / "best.pt").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="not a loadable checkpoint"):
        load_best_model(cfg, tmp_path / "best.pt", CPU)


def test_planted_checkpoint_through_the_cli_is_one_error_line(tmp_path, capsys, monkeypatch):
    """A fold folder holding a planted last.pt that claims to be that fold's own (owner.json
    matches): the run stops with `error:`, exit 2, and the payload never runs. (A last.pt in a
    folder owned by another configuration is discarded without being read: run_folder.)"""
    import optuna

    from harness.config import load_study
    from harness.run_folder import OWNER_FILE, fingerprint, write_json_atomic
    from harness.search import config_for_params
    from harness.seeds import reproduction_fold_seed

    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study = write_study(tmp_path, tmp_path / "glyphs", iters=2)
    out = tmp_path / "run"
    args = ["--study", str(study), "--output", str(out), "--device", "cpu", "--trials", "1"]
    assert main(args) == 0
    cfg = load_study(str(study), overrides=["search.trials=1", "train.device=cpu"])
    best = optuna.load_study(study_name=cfg.name,
                             storage=f"sqlite:///{out / 'study.db'}").best_trial
    fold_dir = out / "final" / "rep_01" / "fold_0"
    marker = tmp_path / "pwned"
    (fold_dir / "result.json").unlink()  # the fold is to be (re)done: it resumes from last.pt
    plant(fold_dir / "last.pt", marker)
    write_json_atomic(fold_dir / OWNER_FILE, {"fingerprint": fingerprint(
        config_for_params(cfg, best.params), reproduction_fold_seed(cfg.seed, 1, 0))})
    capsys.readouterr()
    assert main(args + ["--stage", "final"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "last.pt" in err and "Traceback" not in err
    assert not marker.exists()


def test_interrupted_fold_resumes_from_a_weights_only_checkpoint(tmp_path, tiny, monkeypatch):
    """What train_fold saves (models, optimizers, history with metrics) loads weights-only."""
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    cfg, data = tiny
    fold = data.split.folds[0]

    class Stop(BaseException):  # an interrupt (not a pruning stop, which discards last.pt)
        pass

    def stop_after_first_validation(step, value):
        raise Stop

    with pytest.raises(Stop):
        train_fold(cfg, data, fold, CPU, seed=1, run_dir=tmp_path,
                   report=stop_after_first_validation)
    torch.load(tmp_path / "last.pt", weights_only=True)
    torch.load(tmp_path / "best.pt", weights_only=True)
    result = train_fold(cfg, data, fold, CPU, seed=1, run_dir=tmp_path)
    assert result.epochs_trained == cfg.train.max_epochs and len(result.history) == 2
    load_best_model(cfg, Path(result.checkpoint), CPU)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_and_optimizer_state_loads_weights_only(name):
    from harness.train import make_optimizer

    loss = build_loss(name, num_classes=8, embedding_size=16)
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(1000)  # Proxy-ISA: memory and filter on
    params = [p for p in loss.parameters() if p.requires_grad]
    opts = [make_optimizer(kind, params, 1e-3, 1e-4, 0.9, 1e-8)
            for kind in ("rmsprop", "adam", "adamw", "sgd")] if params else []
    x, y = torch.randn(16, 16, requires_grad=True), torch.arange(16) % 8
    for _ in range(2):
        loss(x, y).backward()
        for opt in opts:
            opt.step()
    buffer = io.BytesIO()
    torch.save({"loss": loss.state_dict(), "opts": [o.state_dict() for o in opts]}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    build_loss(name, num_classes=8, embedding_size=16).load_state_dict(state["loss"])


# ----------------------------------------------------------------------------------- case E
def test_no_password_in_provenance(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    url = "postgresql://alice:s3cr3t-pw@127.0.0.1:1/harness"
    out = tmp_path / "run"
    argv = ["--study", "quickstart", "--output", str(out), "--device", "cpu",
            "--storage", url, "--trials", "1", "--set", "train.max_epochs=1"]
    monkeypatch.setattr(sys, "argv", ["harness.run"] + argv)
    try:
        main(argv)  # the database is unreachable: whatever happens next, provenance is written
    except Exception:  # noqa: BLE001 (storage errors belong to harness.storage)
        pass
    text = (out / "provenance.json").read_text()
    assert "s3cr3t-pw" not in text
    record = json.loads(text)[0]
    assert record["storage"] == "postgresql://alice:***@127.0.0.1:1/harness"
    assert "postgresql://alice:***@127.0.0.1:1/harness" in record["command"]
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".log", ".txt"):
            assert "s3cr3t-pw" not in path.read_text(errors="replace"), path


def test_redaction_of_command_words(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["x", "--storage=postgresql+psycopg://u:pw1@h/db",
                                      "mysql://u:pw2@h/db", "sqlite:////tmp/a.db"])
    record = provenance(None, storage="postgresql://u:pw3@h/db", nested={"urls": [
        "postgresql://u:pw4@h/db"]})
    text = json.dumps(record)
    assert not any(f"pw{i}" in text for i in range(1, 5))
    assert "sqlite:////tmp/a.db" in text
    assert redact_word("plain-word") == "plain-word"
