"""Fault injection on the search and final stages: nothing silently wrong, nothing lost.

Each test reproduces a case that used to end silently wrong (exit 0, wrong numbers) or lost work,
on tiny embedded runs (tests/test_run.py's study): a grown budget keeping the old best's test
numbers, parallel workers drawing the same configurations, two final stages racing, Ctrl-C
discarding a trial's finished folds, `--set` of a searched key ignored, diverged trials picked as
best, an emptied study database, torn result files, stale checkpoints of another configuration.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest

from harness import search as search_mod
from harness.config import load_study
from harness.errors import ConfigError, HarnessError
from harness.aggregate import summarize
from harness.final import final_stage_lock
from harness.run import main
from harness.run_folder import claim_fold_dir, fingerprint
from harness.search import best_trial, make_sampler, search_space, suggest
from harness.train import FoldResult
from conftest import REPO, load, write_study

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")


def run(study: Path, out: Path, *extra: str) -> int:
    return main(["--study", str(study), "--output", str(out), "--device", "cpu", *extra])


# --------------------------------------------------------------------------------------------
# 1. A grown budget whose new best differs: the final results are retested, the old kept aside
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_new_best_after_growing_the_budget_is_retested(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--trials", "1") == 0
    old = pd.read_csv(out / "final" / "test_metrics.csv")
    assert set(old["reproduction"]) == {0, 1}
    budget = json.loads((out / "final" / "summary.json").read_text())["budget"]
    assert budget == {"trials": 1, "reproductions": 1, "recheck_top": 0,  # what --grow reads
                      "recheck_runs": 0}
    # A second trial becomes the best (added with a value above any real one).
    st = load(out)
    first = st.trials[0]
    st.add_trial(optuna.trial.create_trial(
        params=first.params, distributions=first.distributions, value=first.value + 1.0,
        user_attrs={"seed_number": 1, "fold_map_at_r": [first.value + 1.0] * 4}))
    capsys.readouterr()
    assert run(study, out, "--trials", "2", "--stage", "final") == 0
    printed = capsys.readouterr().out
    assert "best trial is now 1" in printed
    best = json.loads((out / "final" / "best_trial.json").read_text())
    assert best["trial"] == 1
    kept = out / "superseded" / "final_trial_0000" / "test_metrics.csv"
    assert pd.read_csv(kept).equals(old)  # nothing lost
    new = pd.read_csv(out / "final" / "test_metrics.csv")
    # Trial 1 has no checkpoints in trials/ (it was added by hand): it is retrained with its own
    # seeds, and says so; the retrained reproduction is trained anew for the new best.
    assert set(new[new["reproduction"] == 0]["source"]) == {"best_trial_retrained"}
    summary = json.loads((out / "final" / "summary.json").read_text())
    assert summary["best_trial"] == 1
    assert summary["budget"] == {"trials": 2, "reproductions": 1, "recheck_top": 0,
                                 "recheck_runs": 0}


# --------------------------------------------------------------------------------------------
# 2. Parallel workers never draw the same configuration; a trial number always draws the same
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["gp", "tpe", "random"])
def test_workers_draw_distinct_reproducible_configurations(tmp_path, sampler):
    cfg = load_study("proxy_anchor_cub", overrides=[f"search.sampler={sampler}"])
    space = search_space(cfg)
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    def worker_study():  # each worker process builds its own sampler with the same seed
        return optuna.create_study(study_name="s", storage=storage, direction="maximize",
                                   sampler=make_sampler(cfg, space), load_if_exists=True)

    workers = [worker_study(), worker_study()]
    drawn = []
    for k in range(6):  # interleaved, as two workers on one storage
        trial = workers[k % 2].ask()
        drawn.append({name: suggest(trial, p, name) for name, p in space.items()})
        workers[k % 2].tell(trial, float(k % 3))
    assert len({json.dumps(d, sort_keys=True) for d in drawn}) == 6

    again = optuna.create_study(storage=f"sqlite:///{tmp_path / 'again.db'}",
                                direction="maximize", sampler=make_sampler(cfg, space))
    trial = again.ask()
    assert {name: suggest(trial, p, name) for name, p in space.items()} == drawn[0]


# --------------------------------------------------------------------------------------------
# 3. Two final stages on one folder: the second is refused; duplicates are never averaged
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_second_final_stage_on_one_folder_is_refused(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--trials", "1", "--stage", "search") == 0
    capsys.readouterr()
    with final_stage_lock(out):  # another process holds the final stage
        assert run(study, out, "--trials", "1", "--stage", "final") == 2
    err = capsys.readouterr().err
    assert "another process is running the final stage" in err and "Traceback" not in err
    assert not (out / "final" / "test_metrics.csv").exists()


def test_duplicate_results_are_never_averaged():
    rows = [{"reproduction": 0, "mode": "separated", "fold": 0, "map_at_r": 0.2},
            {"reproduction": 0, "mode": "separated", "fold": 0, "map_at_r": 0.4}]
    with pytest.raises(HarnessError, match="same \\(reproduction, mode, fold\\)"):
        summarize(pd.DataFrame(rows))


# --------------------------------------------------------------------------------------------
# 4. Ctrl-C keeps the interrupted trial's finished folds and retries it with the same params
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_requeues_the_trial_like_kill_9(tmp_path, glyph_root):
    study = write_study(tmp_path, glyph_root, iters=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.run", "--study", str(study), "--output", str(out),
           "--device", "cpu", "--stage", "search", "--trials", "1"]
    env = {**os.environ, "HARNESS_NO_PROGRESS": "1"}
    # Ctrl-C in a terminal meets SIGINT's default disposition. A test run started in the
    # background by a non-interactive shell inherits SIGINT *ignored*, and Python then never
    # raises KeyboardInterrupt: restore the default in the child, as a terminal has it.
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline, finished = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            trials = load(out).get_trials()
        except Exception:  # not created yet
            continue
        # Early in the trial (1-2 of 4 folds done): a late signal could miss the only trial.
        if trials and 1 <= len(trials[0].user_attrs.get("fold_results", {})) <= 2:
            finished = dict(trials[0].user_attrs["fold_results"])
            os.kill(proc.pid, signal.SIGINT)
            break
    output = proc.communicate(timeout=60)[0].decode()
    assert finished is not None, output[-2000:]
    assert proc.returncode == 130, output[-2000:]
    assert "re-run the same command to resume" in output
    trials = load(out).get_trials()
    assert trials[0].state.name == "FAIL"
    waiting = [t for t in trials if t.state.name == "WAITING"]
    assert len(waiting) == 1 and waiting[0].params == trials[0].params  # queued for retry
    mtimes = {k: (out / "trials" / "trial_0000" / f"fold_{k}" / "history.json").stat().st_mtime_ns
              for k in finished}

    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    trials = load(out).get_trials()
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].state.name == "COMPLETE"
    assert [t.state.name for t in trials].count("COMPLETE") == 1  # the budget, exactly
    for k, mtime in mtimes.items():  # finished folds were not trained again
        path = out / "trials" / "trial_0000" / f"fold_{k}" / "history.json"
        assert path.stat().st_mtime_ns == mtime
        assert retry[0].user_attrs["fold_results"][k] == finished[k]


# --------------------------------------------------------------------------------------------
# 5. --set of a searched key fixes it (never silently overridden by the search)
# --------------------------------------------------------------------------------------------
def test_set_of_a_searched_key_fixes_it():
    cfg = load_study("proxy_anchor_cub", overrides=["loss.margin=0.2", "train.loss_lr=1e-2"])
    assert cfg.search.fixed == ["loss.margin", "train.loss_lr"]
    space = search_space(cfg)
    assert "loss.margin" not in space and "train.loss_lr" not in space
    assert "loss.alpha" in space
    assert cfg.loss.params["margin"] == 0.2 and cfg.train.loss_lr == 1e-2


def test_study_value_of_a_searched_key_fixes_it_too():
    # The Proxy Synthesis paper recipe sets ps_alpha / ps_mu: they must not be searched.
    cfg = load_study("proxy_synthesis_cars_paper")
    space = search_space(cfg)
    assert "loss.ps_alpha" not in space and "loss.ps_mu" not in space
    assert {"loss.ps_alpha", "loss.ps_mu"} <= set(cfg.search.fixed)


def test_value_and_range_for_one_key_is_refused(tmp_path):
    path = tmp_path / "both.toml"
    path.write_text('[loss]\nname = "proxy_anchor"\nmargin = 0.2\n'
                    '[search.space]\n"loss.margin" = {low = 0.0, high = 0.4}\n')
    with pytest.raises(ConfigError, match="given a value AND a search range"):
        load_study(str(path))


@pytest.mark.slow
def test_fixed_key_is_used_by_every_trial(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--stage", "search", "--set", "loss.margin=0.25") == 0
    assert "not searched (given a value): loss.margin=0.25" in capsys.readouterr().out
    for t in load(out).get_trials():
        assert "loss.margin" not in t.params
    assert json.loads((out / "config.json").read_text())["search"]["fixed"] == ["loss.margin"]


# --------------------------------------------------------------------------------------------
# 6. Diverged trials: scored 0 (MLRC), flagged, never the best while a finite trial exists
# --------------------------------------------------------------------------------------------
def _trial(value, **attrs):
    dist = optuna.distributions.FloatDistribution(0, 1)
    return optuna.trial.create_trial(params={"x": 0.5}, distributions={"x": dist}, value=value,
                                     user_attrs=attrs)


def test_diverged_trial_is_never_best_while_a_finite_one_exists():
    study = optuna.create_study(direction="maximize")
    study.add_trial(_trial(0.0, diverged=True))
    study.add_trial(_trial(0.0))
    study.add_trial(_trial(0.0, diverged=True))
    assert best_trial(study).number == 1
    only = optuna.create_study(direction="maximize")
    only.add_trial(_trial(0.0, diverged=True))
    with pytest.raises(ConfigError, match="every complete trial diverged"):
        best_trial(only)


def test_diverged_fold_scores_the_trial_zero(tmp_path, glyph_root, monkeypatch, capsys):
    study = write_study(tmp_path, glyph_root)
    cfg = load_study(str(study))
    calls = []

    def diverging(cfg, data, fold, device, seed, run_dir, report=None, desc=""):
        calls.append(fold.index)
        stop = "diverged" if fold.index == 1 else "patience"
        return FoldResult(fold=fold.index, best_map_at_r=0.5, best_metrics={}, best_epoch=1,
                          epochs_trained=1, stop_reason=stop)

    monkeypatch.setattr(search_mod, "train_fold", diverging)
    from harness.data import prepare_data
    data = prepare_data(cfg)
    st = optuna.create_study(direction="maximize")
    objective = search_mod.make_objective(cfg, data, tmp_path, "cpu", search_space(cfg))
    st.optimize(objective, n_trials=1)
    trial = st.trials[0]
    assert trial.value == 0.0 and trial.user_attrs["diverged"] is True
    assert calls == [0, 1]  # MLRC stops the trial at the NaN: folds 2, 3 are not trained
    assert "diverged" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# 8. A damaged study database or result file is detected, never silently restarted or averaged
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_empty_or_missing_study_database_is_refused(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--trials", "1", "--stage", "search") == 0
    (out / "study.db").write_bytes(b"")
    capsys.readouterr()
    assert run(study, out, "--trials", "1") == 2
    assert "study.db is empty (0 bytes)" in capsys.readouterr().err
    (out / "study.db").unlink()
    assert run(study, out, "--trials", "1") == 2
    assert "holds search trials (trials/) but no study database" in capsys.readouterr().err


@pytest.mark.slow
def test_torn_or_foreign_result_is_redone(tmp_path, glyph_root):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--trials", "1") == 0
    good = pd.read_csv(out / "final" / "test_metrics.csv")
    result = out / "final" / "rep_01" / "fold_2" / "result.json"
    result.write_text(result.read_text()[:40])  # torn mid-write
    row = json.loads((out / "final" / "rep_01" / "fold_3" / "result.json").read_text())
    row["fingerprint"] = "another configuration"
    (out / "final" / "rep_01" / "fold_3" / "result.json").write_text(json.dumps(row))
    assert run(study, out, "--trials", "1") == 0
    again = pd.read_csv(out / "final" / "test_metrics.csv")
    assert len(again) == len(good) == 10
    assert again[["precision_at_1", "map_at_r"]].notna().all().all()
    assert again.equals(good)  # the same seeds on the same machine give the same numbers


# --------------------------------------------------------------------------------------------
# Failure paths that used to end in tracebacks or misleading messages
# --------------------------------------------------------------------------------------------
def test_final_stage_before_any_search_says_so(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    assert run(study, tmp_path / "run", "--stage", "final") == 2
    err = capsys.readouterr().err
    assert "no search has run" in err and "--stage search" in err and "Traceback" not in err


def test_output_that_is_a_file_is_refused(tmp_path, glyph_root, capsys):
    study = write_study(tmp_path, glyph_root)
    target = tmp_path / "afile"
    target.write_text("x")
    assert run(study, target) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_read_only_output_is_refused(tmp_path, glyph_root, capsys, monkeypatch):
    import harness.run_folder as rf
    study = write_study(tmp_path, glyph_root)
    monkeypatch.setattr(rf.os, "access", lambda path, mode: False)  # root ignores chmod
    assert run(study, tmp_path / "ro" / "run") == 2
    assert "is not writable" in capsys.readouterr().err


@pytest.mark.slow
def test_zero_reproductions_reports_the_best_trial_alone(tmp_path, glyph_root):
    study = write_study(tmp_path, glyph_root)
    out = tmp_path / "run"
    assert run(study, out, "--trials", "1", "--reproductions", "0") == 0
    frame = pd.read_csv(out / "final" / "test_metrics.csv")
    assert set(frame["reproduction"]) == {0} and set(frame["source"]) == {"best_trial"}
    summary = pd.read_csv(out / "final" / "summary.csv")
    assert set(summary["n"]) == {1}


def test_stale_checkpoint_of_another_configuration_is_not_resumed(tmp_path, glyph_root,
                                                                  capsys):
    cfg = load_study(str(write_study(tmp_path, glyph_root)))
    fold_dir = tmp_path / "trials" / "trial_0000" / "fold_0"
    fold_dir.mkdir(parents=True)
    (fold_dir / "last.pt").write_bytes(b"from another study")
    claim_fold_dir(fold_dir, fingerprint(cfg, 1), "t")
    assert not (fold_dir / "last.pt").exists()
    assert "belong to another configuration" in capsys.readouterr().out
    (fold_dir / "last.pt").write_bytes(b"ours")  # the same fold run: resumed, not discarded
    claim_fold_dir(fold_dir, fingerprint(cfg, 1), "t")
    assert (fold_dir / "last.pt").exists()
    claim_fold_dir(fold_dir, fingerprint(cfg, 2), "t")  # another seed
    assert not (fold_dir / "last.pt").exists()


def test_nan_embeddings_at_validation_are_a_diverged_fold(tmp_path, glyph_root, monkeypatch):
    """A finite loss with non-finite gradients leaves NaN weights; validation then sees NaN
    embeddings. That fold diverged (the trial scores 0): it must not crash the search."""
    import harness.train as train_mod
    from harness.data import prepare_data
    from harness.metrics import NonFiniteEmbeddings

    cfg = load_study(str(write_study(tmp_path, glyph_root)))
    data = prepare_data(cfg)

    def nan_validation(*args, **kwargs):
        raise NonFiniteEmbeddings("query embeddings contain NaN or inf (a diverged model?)")

    monkeypatch.setattr(train_mod, "validate", nan_validation)
    result = train_mod.train_fold(cfg, data, data.split.folds[0], __import__("torch").device(
        "cpu"), seed=1, run_dir=tmp_path / "fold")
    assert result.stop_reason == "diverged" and result.checkpoint == ""


@pytest.mark.parametrize("tf32", [False, True])
def test_float32_stays_float32_on_cuda_unless_tf32_is_asked_for(tmp_path, glyph_root, tf32):
    """PROTOCOL.md: MLRC trains in float32 throughout. PyTorch lets cuDNN use TF32 for float32
    convolutions by default (and the harness once asked for TF32 matmuls in harness.run alone,
    so workers differed): training, validation and the test embedding must each set both flags
    from the config, whatever the process had before. The flags are process-wide and settable
    without a GPU, so this runs on the CPU."""
    import torch

    from harness.data import fold_indices, prepare_data
    from harness.final import embed_test_set
    from harness.train import load_best_model, train_fold, validate

    cfg = load_study(str(write_study(tmp_path, glyph_root)),
                     overrides=[f"train.tf32={'true' if tf32 else 'false'}"])
    data = prepare_data(cfg)
    cpu, fold = torch.device("cpu"), data.split.folds[0]
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    before = (matmul.allow_tf32, cudnn.allow_tf32)

    def flip_then(step):
        matmul.allow_tf32 = cudnn.allow_tf32 = not tf32
        out = step()
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (tf32, tf32)
        return out

    try:
        result = flip_then(lambda: train_fold(cfg, data, fold, cpu, seed=1,
                                              run_dir=tmp_path / "fold"))
        model = load_best_model(cfg, result.checkpoint, cpu)
        flip_then(lambda: validate(cfg, model, data, fold_indices(data, fold)[1], cpu))
        flip_then(lambda: embed_test_set(cfg, model, data, cpu))
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = before


def test_tf32_is_off_by_default_in_every_study():
    """The opt-in stays an opt-in: no cell, recipe, profile or study file turns it on."""
    from harness.benchmark import cell_name, cells

    for cell in cells():
        assert load_study(cell_name(cell)).train.tf32 is False, cell_name(cell)
        assert load_study(cell_name(cell), profile="embedded").train.tf32 is False
    for path in (Path(__file__).resolve().parents[1] / "studies").glob("*.toml"):
        assert load_study(path.stem).train.tf32 is False, path


def test_a_fold_stopped_by_its_caller_is_never_resumed(tmp_path, glyph_root):
    """A pruned fold (the callback raises) keeps its history but leaves no last.pt; the callback
    sees training iterations, the unit of the pruner's steps."""
    import torch

    from harness.data import prepare_data
    from harness.train import train_fold

    cfg = load_study(str(write_study(tmp_path, glyph_root)))
    data = prepare_data(cfg)
    seen = []

    def prune_at_first_validation(iteration, value):
        seen.append(iteration)
        raise optuna.TrialPruned()

    with pytest.raises(optuna.TrialPruned):
        train_fold(cfg, data, data.split.folds[0], torch.device("cpu"), seed=1,
                   run_dir=tmp_path / "fold", report=prune_at_first_validation)
    assert seen == [cfg.train.iters_per_epoch]  # validation every epoch in the tiny study
    assert not (tmp_path / "fold" / "last.pt").exists()
    assert len(json.loads((tmp_path / "fold" / "history.json").read_text())) == 1
