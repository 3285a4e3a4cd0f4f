"""End-to-end runs of the CLI on tiny embedded data: protocol, resume, kill -9, failure paths."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from conftest import REPO, load, write_study
from harness.run import main

@pytest.mark.slow
def test_whole_protocol_then_resume(tmp_path, glyph_root, monkeypatch):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu"]) == 0

    for name in ("config.json", "provenance.json", "split_manifest.json", "study.db",
                 "search_summary.json", "final/test_metrics.csv", "final/summary.csv",
                 "final/summary.json", "final/untrained_metrics.json"):
        assert (out / name).exists(), name
    manifest = json.loads((out / "split_manifest.json").read_text())
    assert manifest  # written by harness.splits
    frame = pd.read_csv(out / "final" / "test_metrics.csv")
    # MLRC: the best trial's own fold models (reproduction 0) + 1 retraining.
    separated = frame[frame["mode"] == "separated"]
    assert sorted(separated["fold"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert (frame["mode"] == "concatenated").sum() == 2
    assert set(frame[frame["reproduction"] == 0]["source"]) == {"best_trial"}
    assert set(frame[frame["reproduction"] == 1]["source"]) == {"retrained"}
    assert frame[["precision_at_1", "map_at_r", "r_precision"]].notna().all().all()
    trials = load(out).get_trials()
    best = max(trials, key=lambda t: t.value)
    rep0 = separated[separated["reproduction"] == 0].sort_values("fold")
    assert list(rep0["val_map_at_r"]) == pytest.approx(best.user_attrs["fold_map_at_r"])
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert len(t.user_attrs["fold_map_at_r"]) == 4
        assert t.value == pytest.approx(sum(t.user_attrs["fold_map_at_r"]) / 4)
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance[0]["git"]["commit"] and "torch" in provenance[0]["versions"]

    # Same command again: nothing retrained, nothing counted twice.
    before = (out / "final" / "test_metrics.csv").read_text()
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu"]) == 0
    assert len(load(out).get_trials()) == 2
    assert (out / "final" / "test_metrics.csv").read_text() == before
    assert len(json.loads((out / "provenance.json").read_text())) == 2

    # A bigger budget continues the same study: exactly one more trial, the old ones kept.
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu",
                 "--trials", "3", "--stage", "search"]) == 0
    after = load(out).get_trials()
    assert len(after) == 3 and [t.params for t in after[:2]] == [t.params for t in trials]


@pytest.mark.slow
def test_kill_minus_9_mid_trial_then_resume(tmp_path, glyph_root):
    study = write_study(tmp_path, glyph_root, iters=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.run", "--study", str(study), "--output", str(out),
           "--device", "cpu", "--stage", "search"]
    env = {**os.environ, "HARNESS_NO_PROGRESS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    # Wait until trial 0 has finished at least one fold but not all four, then kill -9.
    deadline = time.time() + 240
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if not (out / "study.db").exists():
            continue
        try:
            trials = load(out).get_trials()
        except Exception:  # the study may not be created yet
            continue
        if trials and 1 <= len(trials[0].user_attrs.get("fold_results", {})) < 4:
            killed_after = dict(trials[0].user_attrs["fold_results"])
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=30)
    assert killed_after is not None, proc.stdout.read().decode()[-2000:]
    first = load(out).get_trials()[0]
    assert first.state.name == "RUNNING"  # what a killed process leaves behind
    finished_fold_files = {k: (out / "trials" / "trial_0000" / f"fold_{k}" / "history.json")
                           .stat().st_mtime_ns for k in killed_after}

    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = load(out).get_trials()
    states = [t.state.name for t in trials]
    assert states[0] == "FAIL"  # the killed trial is failed ...
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"  # ... and retried once
    assert retry[0].params == first.params  # with the same parameters
    assert states.count("COMPLETE") == 2  # the budget, exactly
    for k, mtime in finished_fold_files.items():  # finished folds were not trained again
        path = out / "trials" / "trial_0000" / f"fold_{k}" / "history.json"
        assert path.stat().st_mtime_ns == mtime
        assert retry[0].user_attrs["fold_results"][k] == killed_after[k]


def test_cli_errors_are_clear_and_traceback_free(tmp_path, capsys, glyph_root):
    assert main(["--study", "no_such_study"]) == 2
    err = capsys.readouterr().err
    assert "no study named 'no_such_study'" in err and "Traceback" not in err

    study = write_study(tmp_path, glyph_root)
    assert main(["--study", str(study), "--set", "train.lrate=1"]) == 2
    assert "unknown key 'lrate'" in capsys.readouterr().err

    # Registry names are checked with the configuration, before anything runs.
    for key, value in (("model.trunk", "resnet5"), ("data.dataset", "cubb"),
                       ("train.optimizer", "adm")):
        assert main(["--study", str(study), "--set", f"{key}={value}",
                     "--output", str(tmp_path / "never")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {key}={value!r}: expected one of ") and "\n" == err[-1:]
        assert err.count("\n") == 1 and not (tmp_path / "never").exists()

    assert main(["--study", "quickstart", "--set", "data.dataset=cub200", "--set",
                 "data.root=" + str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "Traceback" not in err


@pytest.mark.slow
def test_output_folder_refuses_a_different_configuration(tmp_path, glyph_root, capsys):
    out = tmp_path / "run"
    study = write_study(tmp_path, glyph_root)
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu",
                 "--trials", "1", "--stage", "search"]) == 0
    other = write_study(tmp_path, glyph_root, loss="normalized_softmax", name="tiny")
    assert main(["--study", str(other), "--output", str(out), "--device", "cpu"]) == 2
    assert "different configuration" in capsys.readouterr().err


def test_a_folder_from_before_a_setting_existed_is_not_resumed_under_it(tmp_path):
    """train.tf32 came later, and GPU runs before it used TF32 matmuls: a config.json without
    the key is not the same study (mixing precisions in one search would go unseen), and the
    refusal says why, rather than 'None -> False'."""
    from harness.config import load_study
    from harness.errors import ConfigError
    from harness.run_folder import check_same_study

    cfg = load_study("quickstart")
    old = cfg.to_dict()
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_same_study(tmp_path, cfg)  # the same config: resumable
    del old["train"]["tf32"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"train\.tf32: absent \(written by an older "
                                          r"harness\) -> False\)\. Finish it with the harness "
                                          r"version that wrote it"):
        check_same_study(tmp_path, cfg)


def test_list_shows_the_studies(capsys):
    assert main(["--list"]) == 0
    assert "quickstart" in capsys.readouterr().out


def test_a_folder_with_a_setting_this_harness_lacks_is_not_resumed(tmp_path):
    """A setting removed since the folder was written (or written by a newer harness): the old
    run chose a value this code cannot honour, so it is not the same study."""
    from harness.config import load_study
    from harness.errors import ConfigError
    from harness.run_folder import check_same_study

    cfg = load_study("quickstart")
    old = cfg.to_dict()
    old["train"]["retired_setting"] = 3
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"train\.retired_setting: 3 -> absent \(not a setting "
                                          r"of this harness\)\)\. Finish it with the harness"):
        check_same_study(tmp_path, cfg)


def test_a_loss_parameter_set_only_in_the_folder_is_a_plain_difference(tmp_path):
    """An entry of a dict-valued field (a loss parameter) is 'not set', and the advice is to
    resume with the same settings, not to look for an older harness."""
    from harness.config import load_study
    from harness.errors import ConfigError
    from harness.run_folder import check_same_study

    cfg = load_study("quickstart")
    old = cfg.to_dict()
    old["loss"]["params"]["not_a_default"] = 0.5
    (tmp_path / "config.json").write_text(json.dumps(old))
    with pytest.raises(ConfigError, match=r"loss\.params\.not_a_default: 0\.5 -> not set\)\. "
                                          r"Resume it with the same settings"):
        check_same_study(tmp_path, cfg)
    old = cfg.to_dict()
    old["search"]["trials"] = 999  # a resumable key: growing the budget is allowed
    (tmp_path / "config.json").write_text(json.dumps(old))
    check_same_study(tmp_path, cfg)
