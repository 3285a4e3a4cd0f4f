"""benchmarks/seed_replication.py: the seeds' noise, and the Spearman a model of it leaves."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import benchmark_script
from scipy import stats


def script():
    return benchmark_script("seed_replication")


def write_seed(folder, seed: int, scores: dict[str, float], ci95: float = 0.002,
               runs: int = 11) -> None:
    folder.mkdir()
    table = [{"study": f"{m}_glyphs", "concatenated_map_at_r": v, "ci95": ci95, "runs": runs}
             for m, v in scores.items()]
    (folder / "comparison.json").write_text(json.dumps({"seed": seed, "table": table}))


def test_rank_correlations_are_spearmans_rho_row_by_row():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 12)), rng.normal(size=(5, 12))
    expected = [stats.spearmanr(a, b).statistic for a, b in zip(x, y)]
    assert script().rank_correlations(x, y) == pytest.approx(expected)


def test_noise_components_follow_their_formulas():
    scores = pd.DataFrame({0: [0.50, 0.40, 0.30, 0.20], 1: [0.52, 0.40, 0.29, 0.21]})
    ci95 = pd.DataFrame({0: [0.004] * 4, 1: [0.002] * 4})
    runs = pd.DataFrame({0: [11] * 4, 1: [11] * 4})
    noise = script().noise_components(scores, ci95, runs)
    between = np.mean([0.02 ** 2 / 2, 0.0, 0.01 ** 2 / 2, 0.01 ** 2 / 2])
    t = stats.t.ppf(0.975, 10)
    retraining = ((0.004 / t) ** 2 + (0.002 / t) ** 2) / 2
    means = scores.mean(axis=1)
    assert noise["between"] == pytest.approx(math.sqrt(between))
    assert noise["retraining"] == pytest.approx(math.sqrt(retraining))
    assert noise["search"] == pytest.approx(math.sqrt(between - retraining))
    assert noise["spread"] == pytest.approx(math.sqrt(means.var(ddof=1) - between / 2))


def test_true_scores_keep_the_order_and_take_the_spread():
    scores = pd.DataFrame({0: [0.5, 0.3, 0.45, 0.1], 1: [0.52, 0.31, 0.40, 0.12]})
    true = script().true_scores(scores, 0.05)
    assert list(np.argsort(true)) == list(np.argsort(scores.mean(axis=1).to_numpy()))
    assert true.std(ddof=1) == pytest.approx(0.05)
    assert true.mean() == pytest.approx(scores.to_numpy().mean())


def test_residuals_have_the_seeds_variance():
    """Deviations from a 2-seed mean are half the difference; scaled by sqrt(2) their mean
    square is the pooled between-seed variance."""
    scores = pd.DataFrame({0: [0.5, 0.3, 0.2], 1: [0.52, 0.29, 0.2]})
    pool = script().residuals(scores)
    assert np.mean(pool ** 2) == pytest.approx(scores.var(axis=1, ddof=1).mean())


def test_simulated_agreement_is_perfect_without_noise_and_absent_without_spread():
    rs = script()
    true = np.linspace(0.3, 0.4, 20)
    assert (rs.simulated_rhos(true, 0.0, 500, 0) == 1).all()
    flat = rs.simulated_rhos(np.full(20, 0.35), 0.005, 4000, 0)
    assert abs(flat.mean()) < 0.03
    pool = np.array([0.004, -0.001, 0.02])
    assert abs(rs.simulated_rhos(np.full(20, 0.35), 0.005, 4000, 0, pool).mean()) < 0.03


def test_more_noise_leaves_less_agreement():
    rs = script()
    true = np.linspace(0.3, 0.4, 20)
    means = [rs.simulated_rhos(true, s, 2000, 0).mean() for s in (0.002, 0.006, 0.02)]
    assert means[0] > means[1] > means[2]


def test_noise_needed_is_the_largest_that_reaches_the_goal():
    rs = script()
    true = np.linspace(0.3, 0.4, 20)
    needed = rs.noise_needed(true, 0.02, 0.8, 2000, 0)
    assert 0 < needed < 0.02
    assert (rs.simulated_rhos(true, needed, 2000, 0) >= 0.8).mean() >= rs.ENOUGH
    above = needed + 0.02 / 40
    assert (rs.simulated_rhos(true, above, 2000, 0) >= 0.8).mean() < rs.ENOUGH
    assert rs.noise_needed(np.full(20, 0.35), 0.02, 0.8, 500, 0) == 0.0


def test_report_of_three_seeds_compares_every_pair(tmp_path):
    methods = [f"m{i}" for i in range(8)]
    base = dict(zip(methods, np.linspace(0.40, 0.30, 8)))
    write_seed(tmp_path / "s0", 0, base)
    write_seed(tmp_path / "s1", 1, {m: v + (0.03 if m == "m7" else 0.0) for m, v in base.items()})
    write_seed(tmp_path / "s2", 2, {m: v - 0.001 for m, v in base.items()})
    assert script().main([str(tmp_path / s) for s in ("s0", "s1", "s2")] + ["--sims", "200"]) == 0
    text = (tmp_path / "replication.md").read_text()  # beside the first run by default
    assert "seeds 0, 1, 2" in text and "8 methods in all" in text
    for pair in ("0 vs 1", "0 vs 2", "1 vs 2"):
        assert f"| {pair} |" in text
    assert "| 0 vs 2 | 1.0" in text  # the same order
    assert "| m7 |" in text  # method names, not study folders


def test_bad_inputs_are_clear_refusals(tmp_path):
    rs = script()
    write_seed(tmp_path / "s0", 0, {"a": 0.3, "b": 0.2, "c": 0.1})
    write_seed(tmp_path / "again", 0, {"a": 0.3, "b": 0.2, "c": 0.1})
    write_seed(tmp_path / "two", 1, {"a": 0.3, "b": 0.2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="seed 0 again"):
        rs.main([str(tmp_path / "s0"), str(tmp_path / "again")])
    with pytest.raises(SystemExit, match="empty/comparison.json is not a comparison record"):
        rs.main([str(tmp_path / "s0"), str(tmp_path / "empty")])
    with pytest.raises(SystemExit, match="2 methods common to the runs"):
        rs.main([str(tmp_path / "s0"), str(tmp_path / "two")])
    with pytest.raises(SystemExit):  # argparse: one folder is no replication
        rs.main([str(tmp_path / "s0")])


def test_tables_without_intervals_leave_the_split_unrecorded(tmp_path):
    for seed in (0, 1):
        folder = tmp_path / f"s{seed}"
        folder.mkdir()
        table = [{"study": m, "concatenated_map_at_r": v + seed * 0.001}
                 for m, v in {"a": 0.3, "b": 0.2, "c": 0.1}.items()]
        (folder / "comparison.json").write_text(json.dumps({"seed": seed, "table": table}))
    assert script().main([str(tmp_path / "s0"), str(tmp_path / "s1"), "--sims", "200"]) == 0
    text = (tmp_path / "replication.md").read_text()
    assert "retrainings explain: not recorded" in text and "nan" not in text


def write_final_runs(study_dir, vals: list[float], tests: list[float]) -> None:
    """final/test_metrics.csv as the final step writes it: per run, 4 separated rows (their
    validation MAP@R) and a concatenated one (its test MAP@R)."""
    rows = []
    for rep, (val, test) in enumerate(zip(vals, tests)):
        for fold, shift in enumerate((-0.01, 0.0, 0.0, 0.01)):  # mean over folds = val
            rows.append({"reproduction": rep, "mode": "separated", "fold": fold,
                         "val_map_at_r": val + shift, "map_at_r": 0.3})
        rows.append({"reproduction": rep, "mode": "concatenated", "fold": -1,
                     "val_map_at_r": float("nan"), "map_at_r": test})
    (study_dir / "final").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(study_dir / "final" / "test_metrics.csv", index=False)


def test_winners_validation_follows_differences_over_methods_and_seeds(tmp_path):
    rs = script()
    val = {(0, "a"): 0.50, (1, "a"): 0.51, (0, "b"): 0.48, (1, "b"): 0.47,
           (0, "c"): 0.45, (1, "c"): 0.46}
    test = {(0, "a"): 0.36, (1, "a"): 0.37, (0, "b"): 0.34, (1, "b"): 0.33,
            (0, "c"): 0.31, (1, "c"): 0.30}
    for seed in (0, 1):
        for m in "abc":
            write_final_runs(tmp_path / f"s{seed}" / f"{m}_glyphs",
                             [val[seed, m] - 0.002, val[seed, m] + 0.002],
                             [test[seed, m]] * 2)
    lines = "\n".join(rs.winners_validation({0: tmp_path / "s0", 1: tmp_path / "s1"},
                                             ["a_glyphs", "b_glyphs", "c_glyphs"]))
    dval, dtest = [-0.01, 0.01, -0.01], [-0.01, 0.01, 0.01]  # c: the other sign
    assert f"**{np.corrcoef(dval, dtest)[0, 1]:.3f}** over the 3 pairs" in lines
    assert "the same sign in 2" in lines
    assert f"with sd **{np.std([-0.002, 0.002], ddof=1):.4f}**" in lines
    # Spearman of the methods by mean validation: seed 0 a > b > c, seed 1 a > b > c
    assert "1.000 (0 vs 1)" in lines


def test_winners_validation_is_left_out_without_final_runs_and_refuses_torn_ones(tmp_path):
    rs = script()
    (tmp_path / "s0" / "a_glyphs").mkdir(parents=True)
    assert rs.winners_validation({0: tmp_path / "s0", 1: tmp_path / "s0"}, ["a_glyphs"]) == []
    write_final_runs(tmp_path / "s1" / "a_glyphs", [0.5, 0.5], [0.3, 0.3])
    table = tmp_path / "s1" / "a_glyphs" / "final" / "test_metrics.csv"
    table.write_text(table.read_text().replace("concatenated", "concat"))  # no test rows
    with pytest.raises(SystemExit, match="test_metrics.csv: a run lacks its validation or"):
        rs.winners_validation({1: tmp_path / "s1"}, ["a_glyphs"])
    table.write_text("reproduction,mode\n0,separated\n")  # torn: no metric columns
    with pytest.raises(SystemExit, match="test_metrics.csv: not a final table this harness"):
        rs.winners_validation({1: tmp_path / "s1"}, ["a_glyphs"])
