"""benchmarks/search_noise.py: every search trial scored on the test set, checked against the
final step's own score of the best trial; the selection analysis on known numbers."""

from __future__ import annotations

import json
import math
import shutil

import pandas as pd
import pytest

from harness.run import main
from conftest import benchmark_script, write_study

def script():
    return benchmark_script("search_noise")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, glyph_root):
    tmp = tmp_path_factory.mktemp("noise")
    study = write_study(tmp, glyph_root)
    out = tmp / "seed_0" / "tiny_glyphs"
    assert main(["--study", str(study), "--output", str(out), "--device", "cpu"]) == 0
    return out


@pytest.mark.slow
def test_every_trial_is_scored_and_the_best_matches_rep_00(finished_run):
    rows = script().score_study(str(finished_run))
    assert [r["trial"] for r in rows] == [0, 1]
    assert all(0.0 <= r["test_map_at_r"] <= 1.0 for r in rows)
    # score_study raised unless the best trial's score equals final/rep_00/concatenated.json;
    # the other trial's models are different models: another score
    assert rows[0]["test_map_at_r"] != rows[1]["test_map_at_r"]


@pytest.mark.slow
def test_other_models_under_the_best_trials_name_are_caught(finished_run, tmp_path):
    copy = tmp_path / "tiny_glyphs"
    shutil.copytree(finished_run, copy)
    best = json.loads((copy / "final" / "best_trial.json").read_text())["trial"]
    other = 1 - best
    for k in range(4):  # the other trial's models where the best trial's should be
        shutil.copy(copy / "trials" / f"trial_{other:04d}" / f"fold_{k}" / "best.pt",
                    copy / "trials" / f"trial_{best:04d}" / f"fold_{k}" / "best.pt")
    with pytest.raises(SystemExit, match="not the models or the test set"):
        script().score_study(str(copy))


@pytest.mark.slow
def test_missing_trial_checkpoints_are_a_clear_error(finished_run, tmp_path):
    copy = tmp_path / "tiny_glyphs"
    shutil.copytree(finished_run, copy)
    (copy / "trials" / "trial_0001" / "fold_2" / "best.pt").unlink()
    with pytest.raises(SystemExit, match="trial 1 lacks fold checkpoint"):
        script().score_study(str(copy))


def scores(rows: list[tuple[int, str, int, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["seed", "method", "trial", "val_map_at_r",
                                       "test_map_at_r"])


def test_best_of_the_first_k_trials_by_validation_and_by_test():
    s = script()
    trials = scores([(0, "a", 0, 0.1, 0.30), (0, "a", 1, 0.5, 0.20), (0, "a", 2, 0.9, 0.25)])
    assert [s.best_of_first(trials, k, "val_map_at_r") for k in (1, 2, 3)] == [0.30, 0.20, 0.25]
    assert s.best_of_first(trials, 3, "test_map_at_r") == 0.30
    trials.loc[trials.trial == 0, "test_map_at_r"] = float("nan")  # trial 0 diverged
    assert math.isnan(s.best_of_first(trials, 1, "val_map_at_r"))
    assert s.best_of_first(trials, 2, "val_map_at_r") == 0.20


def test_seed_agreement_per_number_of_trials():
    # Three methods. With 1 trial the seeds rank them a > b > c and c > b > a (rho -1); with 2
    # trials validation picks trials that rank them a > b > c in both seeds (rho 1).
    rows = []
    for seed, first, second in [(0, (0.5, 0.4, 0.3), (0.6, 0.5, 0.4)),
                                (1, (0.3, 0.4, 0.5), (0.7, 0.6, 0.5))]:
        for m, method in enumerate("abc"):
            rows += [(seed, method, 0, 0.1, first[m]), (seed, method, 1, 0.2, second[m])]
    table = script().selection_agreement(scores(rows), (0, 1), "val_map_at_r", range(1, 3))
    assert table["Spearman between seeds"].tolist() == [-1.0, 1.0]
    assert table["methods"].tolist() == [3, 3]
    assert table["mean abs gap between seeds"].tolist() == [pytest.approx(0.1333, abs=1e-4),
                                                 pytest.approx(0.1, abs=1e-4)]


def test_a_retried_trial_is_read_from_the_folder_of_the_trial_it_retries(tmp_path):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    (tmp_path / "config.json").write_text(json.dumps({"name": "m_glyphs", "seed": 1}))
    study = optuna.create_study(study_name="m_glyphs", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'study.db'}")
    dist = {"lr": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for number, seed_number in [(0, 0), (1, 1), (2, 1)]:  # trial 2 retried trial 1
        state = optuna.trial.TrialState.FAIL if number == 1 else optuna.trial.TrialState.COMPLETE
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 0.1}, distributions=dist, state=state,
            value=None if number == 1 else 0.5, user_attrs={"seed_number": seed_number}))
    for trial in (0, 1):
        for k in range(4):
            fold = tmp_path / "trials" / f"trial_{trial:04d}" / f"fold_{k}"
            fold.mkdir(parents=True)
            (fold / "best.pt").write_bytes(b"")
    plan = script().plan_study(tmp_path)
    assert [(row["trial"], row["seed"]) for row, _ in plan] == [(0, 1), (2, 1)]  # not the FAIL
    assert {p.parent.parent.name for p in plan[1][1]} == {"trial_0001"}


def test_trials_come_from_the_study_database_not_a_stale_summary(tmp_path):
    """A search grown with --stage search leaves search_summary.json as the final step wrote
    it: the database holds the new trials."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    (tmp_path / "config.json").write_text(json.dumps({"name": "m_glyphs", "seed": 0}))
    (tmp_path / "search_summary.json").write_text(json.dumps({"trials": [{"number": 0}]}))
    study = optuna.create_study(study_name="m_glyphs", direction="maximize",
                                storage=f"sqlite:///{tmp_path / 'study.db'}")
    dist = {"lr": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for number in range(3):
        study.add_trial(optuna.trial.create_trial(params={"lr": 0.1}, distributions=dist,
                                                  value=0.5, user_attrs={"diverged": True}))
    assert [row["trial"] for row, _ in script().plan_study(tmp_path)] == [0, 1, 2]


@pytest.mark.slow
def test_two_seed_folders_give_the_scores_and_the_report(finished_run, tmp_path):
    for seed in (0, 1):  # the same run under two seed folders (the seed as config.json says)
        copy = tmp_path / f"seed_{seed}" / "tiny_glyphs"
        shutil.copytree(finished_run, copy)
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "seed": seed}))
    out = tmp_path / "noise.md"
    assert script().main([str(tmp_path / "seed_0"), str(tmp_path / "seed_1"), "--jobs", "1",
                          "--out", str(out)]) == 0
    scores = pd.read_csv(out.with_suffix(".csv"))
    assert sorted(scores["seed"]) == [0, 0, 1, 1]
    assert scores.groupby("trial")["test_map_at_r"].nunique().eq(1).all()  # same models
    text = out.read_text()
    assert "| trials searched (k) |" in text and "For scale: retraining" in text


def test_gap_between_seeds_per_method_and_k():
    rows = [(0, "a", 0, 0.1, 0.30), (0, "a", 1, 0.2, 0.40), (1, "a", 0, 0.1, 0.35),
            (1, "a", 1, 0.3, 0.38), (0, "b", 0, 0.5, 0.20), (0, "b", 1, 0.1, 0.90),
            (1, "b", 0, 0.5, 0.25), (1, "b", 1, 0.9, 0.21)]
    gaps = script().gaps_by_method(scores(rows), (0, 1), [1, 2]).set_index("method")
    assert gaps.loc["a"].tolist() == [pytest.approx(0.05), pytest.approx(0.02)]
    assert gaps.loc["b"].tolist() == [pytest.approx(0.05), pytest.approx(0.01)]
