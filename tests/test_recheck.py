"""The recheck opt-in (harness/recheck.py, not MLRC): which trials it retrains, with which seeds,
what it chooses, what it reuses, and the config's refusals. Training is replaced by a table of
scores, so the choice can be checked against the scores written out by hand."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import optuna
import pytest

import harness.recheck as recheck
from harness.config import StudyConfig, set_value, validate
from harness.errors import ConfigError
from harness.search import best_trial, ranked_trials
from harness.seeds import recheck_fold_seed, reproduction_fold_seed, trial_fold_seed
from harness.train import FoldResult

FOLDS = SimpleNamespace(split=SimpleNamespace(folds=[SimpleNamespace(index=i) for i in range(4)]))


def study_with(values: list[float | None], diverged: tuple[int, ...] = ()) -> optuna.Study:
    """Trials with train.lr = 1e-3 * (number + 1) and these validation values (None: failed)."""
    study = optuna.create_study(direction="maximize")
    dist = optuna.distributions.FloatDistribution(1e-4, 1.0, log=True)
    for number, value in enumerate(values):
        state = optuna.trial.TrialState.FAIL if value is None else \
            optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            params={"train.lr": 1e-3 * (number + 1)}, distributions={"train.lr": dist},
            value=value, state=state,
            user_attrs={"diverged": True} if number in diverged else {}))
    return study


class FakeTraining:
    """train_fold stand-in: a fold's best validation MAP@R is `score(lr, seed)`."""

    def __init__(self, score, diverge=lambda lr, seed: False):
        self.score, self.diverge, self.calls = score, diverge, []

    def __call__(self, cfg, data, fold, device, seed, run_dir, report=None, desc=""):
        lr = cfg.train.lr
        self.calls.append((lr, seed, fold.index))
        (run_dir / "best.pt").write_bytes(b"weights")
        if self.diverge(lr, seed):
            return FoldResult(fold.index, -1.0, {}, 0, 1, stop_reason="diverged")
        return FoldResult(fold.index, self.score(lr, seed), {}, 2, 4, stop_reason="patience",
                          checkpoint=str(run_dir / "best.pt"))


def config(top: int, runs: int) -> StudyConfig:
    cfg = StudyConfig(name="t")
    set_value(cfg, "final.recheck_top", top)
    set_value(cfg, "final.recheck_runs", runs)
    return cfg


def test_ranked_trials_best_first_without_diverged_or_failed_and_ties_in_search_order():
    study = study_with([0.40, 0.50, None, 0.45, 0.50, 0.90], diverged=(5,))
    assert [t.number for t in ranked_trials(study)] == [1, 4, 3, 0]
    assert best_trial(study).number == 1  # the earliest of the tied best


def test_mlrc_rule_trains_nothing_and_tests_the_search_best(tmp_path, monkeypatch):
    fake = FakeTraining(lambda lr, seed: 0.5)
    monkeypatch.setattr(recheck, "train_fold", fake)
    chosen, record = recheck.choose_trial(config(0, 2), FOLDS, tmp_path, "cpu",
                                          study_with([0.4, 0.6, 0.5]))
    assert (chosen.number, record, fake.calls) == (1, None, [])
    assert not (tmp_path / "recheck").exists()


def test_the_top_trials_are_retrained_with_fresh_common_seeds_and_the_best_mean_wins(
        tmp_path, monkeypatch):
    # trial 1 is the search's best by its one run; trials 3 and 0 follow. On fresh runs trial 3
    # is best: 0.52 on every fold vs 0.47 (trial 1) and 0.50 (trial 0).
    fresh = {2e-3: 0.47, 4e-3: 0.52, 1e-3: 0.50}
    fake = FakeTraining(lambda lr, seed: fresh[round(lr, 6)])
    monkeypatch.setattr(recheck, "train_fold", fake)
    cfg = config(3, 2)
    chosen, record = recheck.choose_trial(cfg, FOLDS, tmp_path, "cpu",
                                          study_with([0.55, 0.60, 0.10, 0.58]))
    assert chosen.number == 3
    assert (record["search_best_trial"], record["chosen_trial"]) == (1, 3)
    assert [r["trial"] for r in record["candidates"]] == [1, 3, 0]  # trial 2 is not a candidate
    assert [r["recheck_mean"] for r in record["candidates"]] == pytest.approx([0.47, 0.52, 0.50])
    # 3 candidates x 2 runs x 4 folds, each run's fold on the same seed for every candidate,
    # none of them a seed of the search or of the final step
    assert len(fake.calls) == 24
    seeds = {(lr, fold): set() for lr, _, fold in fake.calls}
    for lr, seed, fold in fake.calls:
        seeds[(lr, fold)].add(seed)
    expected = {fold: {recheck_fold_seed(0, run, fold) for run in (1, 2)} for fold in range(4)}
    assert all(s == expected[fold] for (lr, fold), s in seeds.items())
    others = {trial_fold_seed(0, n, f) for n in range(4) for f in range(4)} | \
        {reproduction_fold_seed(0, r, f) for r in range(12) for f in range(4)}
    assert not set().union(*expected.values()) & others
    assert json.loads((tmp_path / "recheck" / "choice.json").read_text()) == json.loads(
        json.dumps(record))
    assert not list((tmp_path / "recheck").rglob("*.pt"))  # checkpoints are not kept


def test_stored_results_are_reused_and_foreign_or_torn_ones_retrained(tmp_path, monkeypatch):
    fake = FakeTraining(lambda lr, seed: 0.5 + lr)
    monkeypatch.setattr(recheck, "train_fold", fake)
    study = study_with([0.6, 0.5])
    first = recheck.choose_trial(config(2, 1), FOLDS, tmp_path, "cpu", study)[1]
    assert len(fake.calls) == 8
    fake.calls.clear()
    assert recheck.choose_trial(config(2, 1), FOLDS, tmp_path, "cpu", study)[1] == first
    assert fake.calls == []  # all stored

    fold = tmp_path / "recheck" / "trial_0000" / "run_1"
    (fold / "fold_0" / "result.json").write_text('{"val_map_at_r": 0.9')  # torn
    row = json.loads((fold / "fold_1" / "result.json").read_text())
    (fold / "fold_1" / "result.json").write_text(json.dumps({**row, "fingerprint": "other"}))
    row = json.loads((fold / "fold_2" / "result.json").read_text())
    (fold / "fold_2" / "result.json").write_text(json.dumps({**row, "val_map_at_r": math.inf}))
    again = recheck.choose_trial(config(2, 1), FOLDS, tmp_path, "cpu", study)[1]
    assert sorted(f for _, _, f in fake.calls) == [0, 1, 2] and again == first


def test_a_run_whose_loss_diverges_scores_zero(tmp_path, monkeypatch):
    # trial 0 (the search's best) diverges in fold 1 of fresh run 2: that run scores 0 and its
    # later folds are not trained; its mean is (0.6 + 0) / 2 = 0.3 < trial 1's 0.4
    bad = recheck_fold_seed(0, 2, 1)
    fake = FakeTraining(lambda lr, seed: 0.6 if lr == 1e-3 else 0.4,
                        diverge=lambda lr, seed: lr == 1e-3 and seed == bad)
    monkeypatch.setattr(recheck, "train_fold", fake)
    chosen, record = recheck.choose_trial(config(2, 2), FOLDS, tmp_path, "cpu",
                                          study_with([0.7, 0.6]))
    assert chosen.number == 1
    assert record["candidates"][0]["recheck_values"] == pytest.approx([0.6, 0.0])
    assert len(fake.calls) == 4 + 2 + 8  # trial 0: run 1's 4 folds, run 2's first 2; trial 1
    stored = json.loads((tmp_path / "recheck" / "trial_0000" / "run_2" / "fold_1" /
                         "result.json").read_text())
    assert stored["stop"] == "diverged" and stored["val_map_at_r"] is None
    fake.calls.clear()  # the divergence is stored: resuming does not train it again
    assert recheck.choose_trial(config(2, 2), FOLDS, tmp_path, "cpu",
                                study_with([0.7, 0.6]))[0].number == 1
    assert fake.calls == []


@pytest.mark.parametrize("key,value,message", [
    ("final.recheck_top", 1, "cannot change what is tested"),
    ("final.recheck_top", -1, "final.recheck_top=-1"),
    ("final.recheck_runs", 0, "final.recheck_runs=0"),
])
def test_recheck_settings_out_of_range_are_refused(key, value, message):
    cfg = StudyConfig(name="t")
    set_value(cfg, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg)


# -------------------------------------------------------------------------------------------
# End to end (harness.run on the tiny glyph study)
# -------------------------------------------------------------------------------------------
def no_training(*args, **kwargs):
    raise AssertionError("a stored result was trained again")


@pytest.mark.slow
def test_recheck_on_a_finished_folder_then_resume_without_test_embeddings(
        tmp_path, glyph_root, monkeypatch):
    import harness.final as final
    from conftest import write_study
    from harness.run import main

    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study, out = write_study(tmp_path, glyph_root), tmp_path / "run"
    run = ["--study", str(study), "--output", str(out), "--device", "cpu", "--trials", "3"]
    assert main(run) == 0
    plain = json.loads((out / "final" / "summary.json").read_text())
    assert plain["recheck"] is None and plain["best_trial"] == plain["search_best_trial"]
    assert plain["budget"] == {"trials": 3, "reproductions": 1, "recheck_top": 0,
                               "recheck_runs": 0}

    # the opt-in on the finished folder: the search is kept, two trials are rechecked
    rechecked = run + ["--set", "final.recheck_top=2", "--set", "final.recheck_runs=1"]
    assert main(rechecked) == 0
    summary = json.loads((out / "final" / "summary.json").read_text())
    choice = json.loads((out / "recheck" / "choice.json").read_text())
    assert summary["recheck"] == choice and summary["budget"]["recheck_top"] == 2
    means = {}
    for row in choice["candidates"]:
        folds = [json.loads((out / "recheck" / f"trial_{row['seed_number']:04d}" / "run_1" /
                             f"fold_{k}" / "result.json").read_text())["val_map_at_r"]
                 for k in range(4)]
        means[row["trial"]] = sum(folds) / 4
        assert row["recheck_mean"] == pytest.approx(means[row["trial"]])
    assert choice["chosen_trial"] == max(means, key=means.get)
    assert summary["best_trial"] == choice["chosen_trial"] == \
        json.loads((out / "final" / "best_trial.json").read_text())["trial"]
    assert summary["search_best_trial"] == plain["best_trial"]
    moved = list((out / "superseded").glob("final_trial_*"))
    assert bool(moved) == (choice["chosen_trial"] != plain["best_trial"])

    # test embeddings are not committed (.gitignore): a folder without them resumes as it is
    for path in out.glob("final/rep_*/fold_*/test_embeddings.npz"):
        path.unlink()
    before = (out / "final" / "test_metrics.csv").read_text()
    monkeypatch.setattr(final, "train_fold", no_training)
    monkeypatch.setattr(final, "load_best_model", no_training)
    monkeypatch.setattr(recheck, "train_fold", no_training)
    assert main(rechecked) == 0
    assert (out / "final" / "test_metrics.csv").read_text() == before
