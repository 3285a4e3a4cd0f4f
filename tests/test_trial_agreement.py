"""benchmarks/trial_agreement.py: two runs compared trial by trial, by trial number."""

from __future__ import annotations

from pathlib import Path

import optuna
from conftest import benchmark_script


def script():
    return benchmark_script("trial_agreement")


def write_study(folder: Path, trials: list[tuple[float, float, bool]]) -> None:
    folder.mkdir(parents=True)
    study = optuna.create_study(study_name="s", storage=f"sqlite:///{folder / 'study.db'}",
                                direction="maximize")
    dist = {"lr": optuna.distributions.FloatDistribution(0.0, 1.0)}
    for lr, value, diverged in trials:
        study.add_trial(optuna.trial.create_trial(
            params={"lr": lr}, distributions=dist, value=value,
            user_attrs={"diverged": True} if diverged else {}))


def test_same_parameters_are_compared_and_divergences_listed(tmp_path):
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    write_study(tmp_path / "a" / "m_glyphs", [(0.1, 0.40, False), (0.2, 0.0, True),
                                              (0.3, 0.50, False), (0.4, 0.30, False)])
    write_study(tmp_path / "b" / "m_glyphs", [(0.1, 0.43, False), (0.2, 0.45, False),
                                              (0.9, 0.50, False)])
    write_study(tmp_path / "a" / "only_in_a_glyphs", [(0.1, 0.4, False)])
    result = script().compare(tmp_path / "a", tmp_path / "b")
    assert result["other_params"] == 1  # trial 2: another draw; trial 3: not in b
    assert result["diverged"] == [("m_glyphs", 1, True, False)]
    assert [round(g, 6) for g in result["same_params"]] == [0.03]
