"""benchmarks/recheck_effect.py: both rules' results read from rechecked seed folders, the
between-seed spread and Spearman written out by hand, and its refusals."""

from __future__ import annotations

import json
import math

import pytest
from conftest import benchmark_script


def effect():
    return benchmark_script("recheck_effect")


def summary(trial: int, score: float, recheck=None) -> dict:
    return {"best_trial": trial, "recheck": recheck, "summary": [
        {"mode": "separated", "metric": "map_at_r", "mean": score - 0.05},
        {"mode": "concatenated", "metric": "map_at_r", "mean": score}]}


def write_study(seed_dir, method: str, search_best: int, chosen: int, mlrc: float,
                recheck: float) -> None:
    study = seed_dir / f"{method}_glyphs"
    (study / "recheck").mkdir(parents=True)
    (study / "final").mkdir()
    choice = {"top": 2, "runs": 1, "search_best_trial": search_best, "chosen_trial": chosen,
              "candidates": [{"trial": search_best, "recheck_mean": 0.40},
                             {"trial": 9, "recheck_mean": 0.41 if chosen == 9 else 0.39}]}
    (study / "recheck" / "choice.json").write_text(json.dumps(choice))
    (study / "final" / "summary.json").write_text(json.dumps(summary(chosen, recheck, choice)))
    if chosen != search_best:
        old = study / "superseded" / f"final_trial_{search_best:04d}"
        old.mkdir(parents=True)
        (old / "summary.json").write_text(json.dumps(summary(search_best, mlrc)))


def seed_folder(tmp_path, seed: int, studies: dict) -> object:
    folder = tmp_path / f"seed_{seed}"
    folder.mkdir()
    for method, (search_best, chosen, mlrc, recheck) in studies.items():
        write_study(folder, method, search_best, chosen, mlrc, recheck)
    (folder / "comparison.json").write_text(json.dumps(
        {"seed": seed, "table": [{"study": f"{m}_glyphs"} for m in studies]}))
    return folder


def two_seeds(tmp_path):
    # a: the recheck changed seed 0's trial (0.30 -> 0.33); b, c: unchanged in both seeds;
    # seed 1's a changed too (0.36 -> 0.34)
    s0 = seed_folder(tmp_path, 0, {"a": (1, 9, 0.30, 0.33), "b": (2, 2, 0.32, 0.32),
                                   "c": (3, 3, 0.31, 0.31)})
    s1 = seed_folder(tmp_path, 1, {"a": (4, 9, 0.36, 0.34), "b": (5, 5, 0.31, 0.31),
                                   "c": (6, 6, 0.30, 0.30)})
    return s0, s1


def test_both_rules_per_method_and_seed_and_their_spread(tmp_path):
    s0, s1 = two_seeds(tmp_path)
    assert effect().main([str(s0), str(s1)]) == 0
    text = (tmp_path / "recheck_effect.md").read_text()
    assert "another trial in 2 of 6 searches" in text
    assert "averaged +0.0017 (mean |change| 0.0083)" in text  # (+0.03 - 0.02) / 6, 0.05 / 6
    # sd of two values is |x - y| / sqrt 2; a: 0.06 -> 0.01 (recheck), b: 0.01, c: 0.01
    mlrc = math.sqrt((0.06 ** 2 + 0.01 ** 2 + 0.01 ** 2) / 2 / 3)
    recheck = math.sqrt((0.01 ** 2 + 0.01 ** 2 + 0.01 ** 2) / 2 / 3)
    assert f"MLRC's rule {mlrc:.4f}, recheck {recheck:.4f}" in text
    # MLRC: seed 0 ranks b > c > a, seed 1 a > b > c: rho = 1 - 6 * (4 + 1 + 1) / 24 = -0.5;
    # recheck: seed 0 a > b > c, seed 1 the same: rho 1
    assert "| 0-1 | -0.5000 | 1.0000 |" in text


def test_a_folder_not_rechecked_is_refused(tmp_path):
    s0, s1 = two_seeds(tmp_path)
    (s1 / "b_glyphs" / "recheck" / "choice.json").unlink()
    with pytest.raises(SystemExit, match="no recheck/choice.json.*--recheck-top"):
        effect().main([str(s0), str(s1)])


def test_mlrc_results_missing_are_refused(tmp_path):
    s0, s1 = two_seeds(tmp_path)
    old = s0 / "a_glyphs" / "superseded" / "final_trial_0001" / "summary.json"
    old.write_text(json.dumps(summary(7, 0.30)))  # another trial's results
    with pytest.raises(SystemExit, match="MLRC's final results for trial 1"):
        effect().main([str(s0), str(s1)])


def test_a_final_step_that_is_not_the_choices_is_refused(tmp_path):
    s0, s1 = two_seeds(tmp_path)
    path = s1 / "c_glyphs" / "final" / "summary.json"
    path.write_text(json.dumps(summary(6, 0.30, None)))  # MLRC's final, recheck not finished
    with pytest.raises(SystemExit, match="not those of the recheck's choice"):
        effect().main([str(s0), str(s1)])


def test_a_seed_given_twice_is_refused(tmp_path):
    s0, _ = two_seeds(tmp_path)
    with pytest.raises(SystemExit, match="given twice"):
        effect().main([str(s0), str(s0)])
