"""A resumed MLRC search (Sobol, then the GP) proposes exactly what an uninterrupted one does:
a new process, as after an interrupt or `--trials` grown, replays the GP's chained kernel fits
from the study's storage (harness/gp_warm_start.py), and after a trial interrupted mid-way
(retried under a new number) the later trials keep their place in the search
(harness.search.search_ordinal)."""

from __future__ import annotations

import math

import optuna
import pytest

from harness import search as search_mod
from harness import train as train_mod
from harness.gp_warm_start import GPWarmStart, gp_proposed
from harness.run import main
from harness.search import SobolThenGPSampler, requeue_interrupted, search_ordinal
from conftest import load, write_study

SEED, STARTUP, TRIALS = 3, 4, 9
SPACE = {"lr": optuna.distributions.FloatDistribution(1e-6, 1e-1, log=True),
         "margin": optuna.distributions.FloatDistribution(0.0, 1.0),
         "weight_decay": optuna.distributions.FloatDistribution(1e-6, 1e-2, log=True)}


def objective(trial: optuna.Trial) -> float:
    """A smooth validation-score stand-in with its optimum inside the space."""
    p = {name: trial.suggest_float(name, d.low, d.high, log=d.log) for name, d in SPACE.items()}
    return -(math.log10(p["lr"]) + 3.3) ** 2 - 2 * (p["margin"] - 0.37) ** 2 \
        - 0.1 * (math.log10(p["weight_decay"]) + 4) ** 2


def search(storage: str, trials: int) -> SobolThenGPSampler:
    """One process's share of the search: a new sampler on the (possibly resumed) study."""
    sampler = SobolThenGPSampler(SEED, STARTUP, dict(SPACE))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                sampler=sampler, load_if_exists=True)
    study.optimize(objective, n_trials=trials)
    return sampler


def proposals(storage: str) -> list[dict]:
    return [t.params for t in optuna.load_study(study_name="s", storage=storage).trials]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('once') / 'study.db'}"
    sampler = search(storage, TRIALS)
    return storage, sampler


def test_an_uninterrupted_search_refits_nothing(uninterrupted):
    storage, sampler = uninterrupted
    trials = optuna.load_study(study_name="s", storage=storage).trials
    assert [gp_proposed(t) for t in trials] == [False] * STARTUP + [True] * (TRIALS - STARTUP)
    assert sampler.warm_start.replayed == 0


@pytest.mark.parametrize("first", [STARTUP - 1, STARTUP + 1, TRIALS - 2])
def test_a_resumed_search_proposes_exactly_the_uninterrupted_trials(uninterrupted, tmp_path,
                                                                    first):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search(storage, first)
    resumed = search(storage, TRIALS - first)
    assert proposals(storage) == proposals(uninterrupted[0])  # every digit
    # the new process refitted each GP trial of the first one, once
    assert resumed.warm_start.replayed == max(0, first - STARTUP)


def test_without_the_replay_a_resumed_gp_proposes_otherwise(uninterrupted, tmp_path,
                                                            monkeypatch):
    """The control: Optuna's GPSampler keeps its warm start in memory, so without the replay a
    resumed search differs (if Optuna makes the sampler stateless, this fails and the replay
    can go)."""
    monkeypatch.setattr(GPWarmStart, "before_fit", lambda self, study, trial, space: None)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    search(storage, STARTUP + 2)
    search(storage, TRIALS - STARTUP - 2)
    resumed, once = proposals(storage), proposals(uninterrupted[0])
    assert resumed[:STARTUP + 2] == once[:STARTUP + 2]
    assert resumed[STARTUP + 2] != once[STARTUP + 2]  # its first fit started cold


def interrupted_search(storage: str, at: int) -> None:
    """Trials 0..at-1, then trial `at` interrupted by Ctrl-C mid-way and queued for its retry
    (as harness.search does); a new process runs the retry and the rest of the budget."""
    sampler = SobolThenGPSampler(SEED, STARTUP, dict(SPACE))
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize",
                                sampler=sampler)
    study.optimize(objective, n_trials=at)

    def interrupted(trial):
        objective(trial)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        study.optimize(interrupted, n_trials=1)
    requeue_interrupted(study, [study.trials[-1]._trial_id])
    search(storage, TRIALS - at)


@pytest.mark.parametrize("at", [STARTUP - 2, STARTUP + 1])  # a Sobol trial, a GP trial
def test_a_trial_interrupted_mid_way_leaves_the_search_unchanged(uninterrupted, tmp_path, at):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    interrupted_search(storage, at)
    study = optuna.load_study(study_name="s", storage=storage)
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE"] * at + ["FAIL"] + ["COMPLETE"] * (TRIALS - at)
    complete = [t.params for t in study.trials if t.state.name == "COMPLETE"]
    assert complete == proposals(uninterrupted[0])  # the retry in its place, then the rest
    # the trial after the retry is the search's (at+1)-th new trial, not its (at+2)-th
    new = [t for t in study.trials if "failed_trial" not in t.system_attrs]
    assert [search_ordinal(study, t.number) for t in new] == list(range(TRIALS))


def _trial(seed_number: int, **system_attrs) -> optuna.trial.FrozenTrial:
    return optuna.trial.create_trial(params={}, distributions={}, value=0.0,
                                     user_attrs={"seed_number": seed_number},
                                     system_attrs=system_attrs)


def test_search_ordinal_counts_new_trials_and_never_reuses_a_seed_number():
    study = optuna.create_study()
    study.add_trial(_trial(0))
    study.add_trial(_trial(1))
    study.add_trial(_trial(1, failed_trial=1, retry_history=[1]))  # the retry of trial 1
    assert search_ordinal(study, 3) == 2
    # an older harness numbered a trial after a retry by its Optuna number (3, not 2)
    study.add_trial(_trial(3))
    assert search_ordinal(study, 4) == 4


@pytest.mark.slow
@pytest.mark.parametrize("where", ["between_folds", "mid_fold"])
def test_a_run_interrupted_mid_trial_ends_as_the_uninterrupted_run(tmp_path, glyph_root,
                                                                   monkeypatch, where):
    """harness.run end to end (tiny glyph study: one Sobol trial, then the GP; 4 folds of 2
    epochs, validated after each): Ctrl-C in the third trial, before its second fold or in that
    fold's second epoch (resumed from its epoch-1 checkpoint), then the same command again,
    gives the uninterrupted search's trials, values, seeds and trial folders."""
    monkeypatch.setenv("HARNESS_NO_PROGRESS", "1")
    study = write_study(tmp_path, glyph_root)

    def run(out):
        return main(["--study", str(study), "--output", str(out), "--device", "cpu",
                     "--stage", "search", "--trials", "4"])

    assert run(tmp_path / "once") == 0
    module, name, at = (search_mod, "train_fold", 4 * 2 + 2) if where == "between_folds" else \
        (train_mod, "validate", 2 * (4 * 2 + 2))
    real, calls = getattr(module, name), []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, interrupted)
    assert run(tmp_path / "twice") == 130
    if where == "mid_fold":
        assert (tmp_path / "twice" / "trials" / "trial_0002" / "fold_1" / "last.pt").exists()
    monkeypatch.setattr(module, name, real)
    assert run(tmp_path / "twice") == 0

    def trials(out):
        done = [t for t in load(out).trials if t.state.name == "COMPLETE"]
        return [(t.params, t.value, t.user_attrs["seed_number"], t.user_attrs["fold_map_at_r"])
                for t in done]

    assert [t.state.name for t in load(tmp_path / "twice").trials].count("FAIL") == 1
    assert trials(tmp_path / "twice") == trials(tmp_path / "once")
    assert sorted(p.name for p in (tmp_path / "twice" / "trials").iterdir()) == \
        [f"trial_{k:04d}" for k in range(4)]


def test_a_trial_takes_its_ordinal_from_its_sampler_and_the_study_is_read_once(
        tmp_path, glyph_root, monkeypatch):
    """The sampler's draws and the trial's seeds and folder follow one count: the objective
    uses the ordinal its sampler computed (search_ordinal once per trial), and it is the
    trial's seed number and folder."""
    counted = []

    def counting(study, number):
        counted.append(number)
        return search_ordinal(study, number)

    monkeypatch.setattr(search_mod, "search_ordinal", counting)
    monkeypatch.setattr(train_mod, "MIN_CHECKPOINT_SECONDS", 0.0, raising=False)
    out = tmp_path / "run"
    assert main(["--study", str(write_study(tmp_path, glyph_root)), "--output", str(out),
                 "--device", "cpu", "--trials", "3", "--stage", "search"]) == 0
    assert counted == [0, 1, 2]
    trials = load(out).trials
    assert [t.user_attrs["seed_number"] for t in trials] == [0, 1, 2]
    assert sorted(p.name for p in (out / "trials").iterdir()) == \
        ["trial_0000", "trial_0001", "trial_0002"]
