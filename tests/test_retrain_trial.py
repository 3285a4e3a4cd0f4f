"""benchmarks/retrain_trial.py: a search trial's fold trained again from the study folder gives the
recorded result (same config, parameters and fold seed); settings that would change what is
trained, another data split and unknown trials are refused."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from harness.run import main
from conftest import benchmark_script, write_study


def script():
    return benchmark_script("retrain_trial")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, glyph_root):
    tmp = tmp_path_factory.mktemp("retrain")
    study = write_study(tmp, glyph_root, iters=4)
    out = tmp / "tiny_glyphs"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu",
                 "--stage", "search"]) == 0
    return out


def test_a_fold_trained_again_reproduces_its_recorded_curve(searched, tmp_path):
    rows = script().retrain(searched, 1, [0, 2], [], tmp_path)
    assert [r["fold"] for r in rows] == [0, 2]
    for row in rows:
        assert row["same_curve"] is True
        assert row["same_trunk"] is None  # the tiny study starts from random weights
        assert row["map_at_r"] == row["recorded_map_at_r"]
        assert row["stop"] == row["recorded_stop"] and row["epochs"] == row["recorded_epochs"]
    # It trained in its own folder, not the study's.
    assert (tmp_path / "trial_0001" / "fold_0" / "history.json").is_file()


def test_a_changed_history_is_not_called_the_same(searched, tmp_path):
    history = searched / "trials" / "trial_0000" / "fold_1" / "history.json"
    saved = history.read_text()
    rows = json.loads(saved)
    rows[-1]["map_at_r"] += 1e-6
    history.write_text(json.dumps(rows))
    try:
        (row,) = script().retrain(searched, 0, [1], [], tmp_path)
    finally:
        history.write_text(saved)
    assert row["same_curve"] is False


@pytest.mark.parametrize("override", ["train.lr=0.1", "loss.margin=0.2", "seed=3", "train.tf32"])
def test_settings_that_change_what_is_trained_are_refused(searched, tmp_path, override):
    with pytest.raises(SystemExit, match="settings that change how a fold computes"):
        script().retrain(searched, 0, [0], [override], tmp_path)


def test_another_split_or_trial_or_fold_is_refused(searched, tmp_path):
    with pytest.raises(SystemExit, match="no trial 7"):
        script().retrain(searched, 7, [0], [], tmp_path)
    with pytest.raises(SystemExit, match="the study has folds"):
        script().retrain(searched, 0, [9], [], tmp_path)
    manifest = searched / "split_manifest.json"
    saved = manifest.read_text()
    changed = json.loads(saved)
    changed["folds"][0]["val_classes"] = changed["folds"][0]["val_classes"][::-1]
    manifest.write_text(json.dumps(changed))
    try:
        with pytest.raises(SystemExit, match="splits differently"):
            script().retrain(searched, 0, [0], [], tmp_path)
    finally:
        manifest.write_text(saved)


@pytest.fixture(scope="module")
def searched_soft_triple(tmp_path_factory, glyph_root):
    tmp = tmp_path_factory.mktemp("retrain_st")
    study = write_study(tmp, glyph_root, loss="soft_triple", iters=4)
    out = tmp / "tiny_glyphs"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu",
                 "--stage", "search", "--set", "loss.reg_weight=0.5"]) == 0
    return out


@pytest.mark.parametrize("clamp", ["torch", "harness"])
def test_center_gradients_are_watched_every_step(searched_soft_triple, capsys, clamp):
    diagnose = benchmark_script("softtriple_center_grads")
    assert diagnose.main([str(searched_soft_triple), "0", "1", "--clamp", clamp]) == 0
    out = capsys.readouterr().out
    (row,) = [json.loads(line) for line in out.splitlines() if line.startswith('{"study"')]
    # One regulariser call per training step: 2 epochs of 4 iterations.
    assert row["stop"] == "max_epochs"
    assert re.match(r"steps 8; ", out.strip().splitlines()[-1])
    assert row["same_curve"] is True  # watching changes nothing the fold computes
    # The regulariser is the real one again afterwards.
    from losses.sparse_centers_regularizer import SparseCentersRegularizer
    assert SparseCentersRegularizer.compute_loss.__module__ == "losses.sparse_centers_regularizer"


def test_find_divergence_reports_a_fold_that_trains_to_its_end(searched_soft_triple, capsys):
    import torch

    assert benchmark_script("find_divergence").main([str(searched_soft_triple), "1", "0"]) == 0
    assert "no non-finite gradient" in capsys.readouterr().out
    assert not torch.is_anomaly_enabled()  # scoped to the diagnosis


def test_an_interrupted_output_folder_or_a_damaged_config_is_refused(searched, tmp_path):
    (tmp_path / "trial_0000" / "fold_0").mkdir(parents=True)
    (tmp_path / "trial_0000" / "fold_0" / "last.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="interrupted earlier training"):
        script().retrain(searched, 0, [0], [], tmp_path)
    copy = tmp_path / "copy"
    shutil.copytree(searched, copy)
    for text in ("3", "{", "{\"train\": 3}"):
        (copy / "config.json").write_text(text)
        with pytest.raises(SystemExit, match="config.json: "):
            script().retrain(copy, 0, [0], [], tmp_path / "out")


@pytest.mark.parametrize("text", ["[]", "{}", "[3]", "{"])
def test_a_recorded_history_that_is_not_one_is_not_called_the_same(tmp_path, text):
    (tmp_path / "history.json").write_text(text)
    assert script().same_curve(tmp_path / "history.json", [], extended=True) is None


def test_training_past_the_cap_starts_with_the_recorded_curve(searched, tmp_path):
    (row,) = script().retrain(searched, 1, [3], [], tmp_path, max_epochs=4)
    assert row["max_epochs"] == 4 and row["recorded_max_epochs"] == 2
    assert row["same_curve"] is True  # its first two validations are the recorded ones
    history = json.loads((tmp_path / "trial_0001" / "fold_3" / "history.json").read_text())
    assert [h["epoch"] for h in history][:2] == [1, 2] and len(history) > 2
    with pytest.raises(SystemExit, match="below the study's cap"):
        script().retrain(searched, 1, [3], [], tmp_path, max_epochs=1)


def _older_copy(study, tmp_path, torch_version):
    """A copy of `study` as a harness from before train.center_collapse_gradient wrote it, run
    under `torch_version`."""
    copy = tmp_path / f"older_{torch_version}"
    shutil.copytree(study, copy)
    config = json.loads((copy / "config.json").read_text())
    del config["train"]["center_collapse_gradient"]
    (copy / "config.json").write_text(json.dumps(config))
    invocations = json.loads((copy / "provenance.json").read_text())
    for inv in invocations:
        inv["versions"]["torch"] = torch_version
    (copy / "provenance.json").write_text(json.dumps(invocations))
    return copy


def test_an_older_soft_triple_study_is_read_with_the_gradient_its_torch_gave(
        searched_soft_triple, tmp_path):
    """Before the setting, SoftTriple's regulariser took torch's clamp gradient: 0 in torch
    2.14.1 and later. Under an older or pre-release torch it is unknown: refused, unless --set
    chooses."""
    copy = _older_copy(searched_soft_triple, tmp_path, "2.14.1+cpu")
    cfg, _ = script().recorded_config(copy, [])
    assert cfg.train.center_collapse_gradient == "zero"
    (row,) = script().retrain(copy, 1, [0], [], tmp_path / "out")
    assert row["center_collapse_gradient"] == "zero"
    for version in ("2.11.0", "2.14.0a0+git1234", "2.14"):
        older = _older_copy(searched_soft_triple, tmp_path, version)
        with pytest.raises(SystemExit, match="pass --set train.center_collapse_gradient"):
            script().recorded_config(older, [])
        cfg, _ = script().recorded_config(older, ["train.center_collapse_gradient=mlrc"])
        assert cfg.train.center_collapse_gradient == "mlrc"


def test_the_diagnosis_watches_the_gradient_the_run_chose(tmp_path):
    """softtriple_center_grads --clamp harness runs the regulariser's own clamp: at an exactly
    collapsed pair, non-finite with "mlrc", finite with "zero"."""
    import torch

    from losses.sparse_centers_regularizer import SparseCentersRegularizer

    diagnose = benchmark_script("softtriple_center_grads")
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(2))
    w[0] = w[1] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    for mode, finite in (("mlrc", False), ("zero", True)):
        log: list[dict] = []
        original = diagnose.watch_regulariser(log, "harness")
        try:
            weights = w.clone().requires_grad_()
            SparseCentersRegularizer(3, collapse_gradient=mode)(weights).backward()
        finally:
            SparseCentersRegularizer.compute_loss = original
        assert bool(torch.isfinite(weights.grad).all()) is finite, mode
        assert log[0]["2cos==2"] == 1


def test_an_older_study_without_the_regulariser_needs_no_torch_version(searched, tmp_path):
    cfg, _ = script().recorded_config(_older_copy(searched, tmp_path, "2.11.0"), [])
    assert cfg.train.center_collapse_gradient == "mlrc"  # computes nothing different


def test_rows_say_whether_the_trunk_is_the_recorded_one(tmp_path, capsys):
    import torch

    from harness.config import StudyConfig
    from harness.models import SmallCNN
    from harness.provenance import file_sha256, tensors_sha256

    torch.manual_seed(0)
    weights = tmp_path / "trunk.pt"
    torch.save(SmallCNN().state_dict(), weights)
    cfg = StudyConfig()
    cfg.model.trunk, cfg.model.pretrained, cfg.model.weights = "small_cnn", True, str(weights)
    assert script().same_trunk_as_recorded(tmp_path, cfg) is None  # no provenance
    recorded = {"file": str(weights), "sha256": file_sha256(weights),
                "tensors_sha256": tensors_sha256(weights)}
    (tmp_path / "provenance.json").write_text(json.dumps([{"trunk_weights": recorded}]))
    assert script().same_trunk_as_recorded(tmp_path, cfg) is True
    recorded["tensors_sha256"] = "0" * 64
    (tmp_path / "provenance.json").write_text(json.dumps([{"trunk_weights": recorded}]))
    assert script().same_trunk_as_recorded(tmp_path, cfg) is False
    assert "other trunk weights" in capsys.readouterr().out
