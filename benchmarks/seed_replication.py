"""Can the embedded comparison's ranking replicate? Its seeds' noise, and the Spearman it leaves.

    python benchmarks/seed_replication.py results/embedded/seed_0 results/embedded/seed_1 \
        [/work/runs/seed_2 ...] [--goal 0.8] [--sims 4000] [--out FILE]

Each folder is one seed of `embedded_comparison.py run` (its comparison.json), all run under
one protocol (checked as `embedded_comparison.py spearman` checks two). The script writes (OUT,
default replication.md beside the first folder):

  * Spearman's rho of every pair of seeds (the issue's measure of agreement);
  * a method's score in every seed, ordered by the mean;
  * the noise: the pooled between-seed variance of a method's concatenated test MAP@R, split
    into the part the retrainings explain (each seed's 95% half-width over its runs, turned
    back into the variance of their mean) and the rest, the search's (which trials a seed's
    search tried and kept); and the spread of the methods' true scores (the variance of their
    means less the noise left in a mean);
  * what that noise leaves: the distribution of Spearman between two simulated seeds whose
    methods have true scores spread as measured and each seed adds its noise, (a) normal with
    the pooled variance, (b) drawn from the seeds' own residuals with random signs (the heavy
    tail of a search that misses, e.g. one method 14 ranks apart); and the largest noise at
    which two seeds reach the goal in 90% of simulated pairs, i.e. how far the search's
    variance must fall before the goal is more than a draw.

The simulation takes the methods' order and spread as measured (their means shrunk toward the
grand mean so that their variance is the estimated true spread), and every method the same
noise; it is a model of the seeds, stated so that its assumptions can be checked, not a
measurement. Seeds are needed in the plural: with two, each method's variance rests on one
difference.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.embedded_comparison import (  # noqa: E402
    check_seeds_alike,
    markdown,
    method_name,
    read_record,
    seed_agreement,
)

ENOUGH = 0.9  # "reaches the goal": in at least this share of simulated pairs of seeds


def seed_tables(runs: list[Path]) -> dict[int, pd.DataFrame]:
    """seed -> its comparison table (index: study), for each folder; a seed given twice, or a
    folder without a record this script can read, is refused."""
    tables: dict[int, pd.DataFrame] = {}
    for run in runs:
        seed, table = read_record(run / "comparison.json", lambda record: (
            int(record["seed"]), pd.DataFrame(record["table"]).set_index("study")))
        if seed in tables:
            raise SystemExit(f"{run}: seed {seed} again; replication needs different seeds "
                             "(compare runs of one seed with embedded_comparison.py spearman "
                             "--differ-in)")
        if "concatenated_map_at_r" not in table.columns:
            raise SystemExit(f"{run}/comparison.json has no concatenated_map_at_r column")
        tables[seed] = table
    return tables


def score_frame(tables: dict[int, pd.DataFrame], column: str) -> pd.DataFrame:
    """`column` of the methods every seed has: rows methods, columns seeds."""
    common = sorted(set.intersection(*(set(t.index) for t in tables.values())))
    return pd.DataFrame({seed: t.loc[common, column] for seed, t in tables.items()},
                        index=common)


def noise_components(scores: pd.DataFrame, ci95: pd.DataFrame | None,
                     runs: pd.DataFrame | None) -> dict[str, float]:
    """Standard deviations (MAP@R) of a method's score from seed to seed ("between", pooled over
    methods), of its part the retrainings explain ("retraining": the variance of a seed's mean
    over its runs, from its 95% half-width), of the rest ("search"), and of the methods' true
    scores ("spread": the variance of the method means less what noise is left in them)."""
    from scipy import stats

    n_seeds = scores.shape[1]
    between = float(scores.var(axis=1, ddof=1).mean())
    retraining = math.nan
    if ci95 is not None and runs is not None:
        t = stats.t.ppf(0.975, runs.to_numpy(float) - 1)
        retraining = float(np.mean((ci95.to_numpy(float) / t) ** 2))
    spread = float(scores.mean(axis=1).var(ddof=1)) - between / n_seeds
    search = math.nan if math.isnan(retraining) else math.sqrt(max(between - retraining, 0.0))
    return {"between": math.sqrt(between), "retraining": math.sqrt(retraining), "search": search,
            "spread": math.sqrt(max(spread, 0.0))}


def true_scores(scores: pd.DataFrame, spread: float) -> np.ndarray:
    """The methods' mean scores shrunk toward their grand mean until their standard deviation
    is `spread` (a mean still holds 1/S of the seeds' noise): the simulation's true scores."""
    means = scores.mean(axis=1).to_numpy(float)
    sd = means.std(ddof=1)
    return means.mean() + (means - means.mean()) * (spread / sd if sd > 0 else 0.0)


def residuals(scores: pd.DataFrame) -> np.ndarray:
    """Every method's deviation from its own mean in every seed, scaled by sqrt(S/(S-1)) so
    that each has the seeds' variance (a deviation from an S-seed mean is smaller)."""
    values = scores.to_numpy(float)
    n_seeds = values.shape[1]
    return ((values - values.mean(axis=1, keepdims=True)) * math.sqrt(n_seeds / (n_seeds - 1))
            ).ravel()


def rank_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho of each row of x with the same row of y (no ties: continuous draws)."""
    rx = x.argsort(axis=1).argsort(axis=1).astype(float)
    ry = y.argsort(axis=1).argsort(axis=1).astype(float)
    n = x.shape[1]
    return 1 - 6 * ((rx - ry) ** 2).sum(axis=1) / (n * (n * n - 1))


def simulated_rhos(true: np.ndarray, sigma: float, sims: int, seed: int,
                   pool: np.ndarray | None = None) -> np.ndarray:
    """Spearman between two simulated seeds, `sims` times: each adds to the true scores noise,
    normal with standard deviation `sigma`, or (with `pool`) drawn from `pool` with random signs
    and scaled to `sigma` (the pool's own RMS is the measured noise)."""
    rng = np.random.default_rng(seed)

    def noise() -> np.ndarray:
        if pool is None:
            return rng.normal(0.0, sigma, (sims, true.size))
        rms = math.sqrt(float(np.mean(pool ** 2)))
        draws = rng.choice(pool, (sims, true.size)) * rng.choice([-1.0, 1.0], (sims, true.size))
        return draws * (sigma / rms if rms > 0 else 0.0)

    return rank_correlations(true + noise(), true + noise())


def goal_row(label: str, rhos: np.ndarray, goal: float) -> dict:
    return {"noise": label, "mean rho": round(float(rhos.mean()), 3),
            "5-95%": f"{np.quantile(rhos, 0.05):.3f} to {np.quantile(rhos, 0.95):.3f}",
            f"P(rho >= {goal})": round(float((rhos >= goal).mean()), 3)}


def noise_needed(true: np.ndarray, sigma: float, goal: float, sims: int, seed: int,
                 pool: np.ndarray | None = None) -> float:
    """The largest noise (a grid of 1/40 of the measured `sigma`) at which simulated pairs of
    seeds reach `goal` in at least ENOUGH of draws; 0 if none does."""
    for step in range(40, 0, -1):
        s = sigma * step / 40
        if (simulated_rhos(true, s, sims, seed, pool) >= goal).mean() >= ENOUGH:
            return s
    return 0.0


def search_needed(noise: dict[str, float], needed: float) -> str:
    """What `needed` (a between-seed sd) asks of the search, the retrainings' part unchanged."""
    left = needed ** 2 - noise["retraining"] ** 2
    if math.isnan(left) or not noise["search"] > 0:
        return ""
    if left <= 0:
        return ("The retrainings alone leave more noise than that: more retrainings, not only a "
                "steadier search, would be needed.")
    return (f"With the retrainings' part as it is, the search's variance must fall to "
            f"{left / noise['search'] ** 2:.0%} of today's (its sd from {noise['search']:.4f} "
            f"to {math.sqrt(left):.4f}) for the goal to be more than a draw.")


def pairwise(scores: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for a, b in itertools.combinations(scores.columns, 2):
        agree = seed_agreement(scores[a], scores[b])
        rows.append({"seeds": f"{a} vs {b}", "Spearman": round(agree["rho"], 3),
                     "p": f"{agree['p']:.2g}",
                     "pairs in the same order": f"{agree['same_order']} of {agree['pairs']}",
                     "mean gap": round(agree["mean_abs_gap"], 4)})
    return pd.DataFrame(rows)


def per_method(scores: pd.DataFrame) -> pd.DataFrame:
    ranks = scores.rank(ascending=False).astype(int)
    table = pd.DataFrame(index=scores.index)
    for seed in scores.columns:
        table[f"seed {seed}"] = scores[seed].map("{:.4f}".format)
        table[f"rank {seed}"] = ranks[seed]
    table["mean"] = scores.mean(axis=1).round(4)
    table["sd over seeds"] = scores.std(axis=1, ddof=1).round(4)
    table.index = pd.Index([method_name(s) for s in table.index], name="method")
    return table.sort_values("mean", ascending=False)


def winner_runs(study_dir: Path) -> pd.DataFrame:
    """The final runs of a study's search winner, from final/test_metrics.csv (the final step's
    table of its result files): each run's validation MAP@R (the mean over its folds, as the
    search scores a trial) and its concatenated test MAP@R. Empty when the folder has no final
    table; a torn one is a clear refusal naming it."""
    path = study_dir / "final" / "test_metrics.csv"
    if not path.exists():
        return pd.DataFrame(columns=["val", "test"])
    try:
        frame = pd.read_csv(path)
        val = frame[frame["mode"] == "separated"].groupby("reproduction")["val_map_at_r"].mean()
        test = frame[frame["mode"] == "concatenated"].groupby("reproduction")["map_at_r"].first()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path}: not a final table this harness wrote ({e!r})") from None
    runs = pd.DataFrame({"val": val, "test": test})  # aligned on the run: a gap is a NaN
    if runs.isna().any().any():
        raise SystemExit(f"{path}: a run lacks its validation or concatenated test row")
    return runs


def winners_validation(folders: dict[int, Path], methods: list[str]) -> list[str]:
    """Do the validation folds see what sets the seeds' winners apart on the test? Each
    winner's validation and test MAP@R averaged over its final runs (11: retraining noise
    mostly gone), and, over every method and pair of seeds, how the difference in the one
    follows the difference in the other. Also a single run's noise in the search's score."""
    means, run_sd = {}, []
    for seed, run in folders.items():
        for study in methods:
            runs = winner_runs(run / study)
            if len(runs) < 2 or runs["val"].isna().any():
                return []
            means[study, seed] = runs.mean()
            run_sd.append(runs["val"].std(ddof=1))
    dval, dtest = [], []
    for study in methods:
        for a, b in itertools.combinations(folders, 2):
            dval.append(means[study, a]["val"] - means[study, b]["val"])
            dtest.append(means[study, a]["test"] - means[study, b]["test"])
    dval, dtest = np.array(dval), np.array(dtest)
    same = int((np.sign(dval) == np.sign(dtest)).sum())
    rhos = []
    for a, b in itertools.combinations(folders, 2):
        va = pd.Series({m: means[m, a]["val"] for m in methods})
        vb = pd.Series({m: means[m, b]["val"] for m in methods})
        rhos.append(f"{seed_agreement(va, vb)['rho']:.3f} ({a} vs {b})")
    return [
        "## Do the validation folds see what sets the seeds' winners apart?", "",
        "Each seed's winner of each method, its validation MAP@R (the mean over the 4 folds, "
        "as the search scores a trial) and test MAP@R averaged over its final runs:", "",
        f"- a winner's difference between two seeds in validation follows its difference in "
        f"test: correlation **{np.corrcoef(dval, dtest)[0, 1]:.3f}** over the {len(dval)} "
        f"pairs (methods x pairs of seeds), the same sign in {same}; sd of the differences "
        f"{dval.std():.4f} (validation) and {dtest.std():.4f} (test);",
        f"- one run's validation score, the search's measure of a trial, varies from run to "
        f"run of the same configuration with sd **{math.sqrt(np.mean(np.square(run_sd))):.4f}**;",
        f"- Spearman between seeds of the methods ranked by their winners' mean validation: "
        f"{', '.join(rhos)}.", ""]


def sd(value: float) -> str:
    return "not recorded (no ci95 and runs in the tables)" if math.isnan(value) else f"{value:.4f}"


def report(runs: list[Path], goal: float, sims: int) -> str:
    tables = seed_tables(runs)
    scores = score_frame(tables, "concatenated_map_at_r")
    if len(scores) < 3:
        raise SystemExit(f"{len(scores)} methods common to the runs: a ranking needs 3 or more")
    check_seeds_alike(runs, list(scores.index))
    has_ci = all({"ci95", "runs"} <= set(t.columns) for t in tables.values())
    noise = noise_components(scores, score_frame(tables, "ci95") if has_ci else None,
                             score_frame(tables, "runs") if has_ci else None)
    true = true_scores(scores, noise["spread"])
    pool = residuals(scores)
    sigma = noise["between"]
    normal = simulated_rhos(true, sigma, sims, 0)
    drawn = simulated_rhos(true, sigma, sims, 1, pool)
    need_normal = noise_needed(true, sigma, goal, sims, 2)
    need_drawn = noise_needed(true, sigma, goal, sims, 3, pool)
    seeds = ", ".join(str(s) for s in scores.columns)
    lines = [
        "# Can the ranking replicate? The seeds' noise and the Spearman it leaves", "",
        f"Runs: {', '.join(str(r) for r in runs)} (seeds {seeds}); {len(scores)} methods in "
        f"all. Made by `python benchmarks/seed_replication.py {' '.join(str(r) for r in runs)}"
        f" --goal {goal} --sims {sims}`.", "",
        "## Spearman between every pair of seeds", "", markdown(pairwise(scores)), "",
        "## Concatenated test MAP@R per seed, ordered by the mean", "",
        markdown(per_method(scores), index=True), "",
        "## The noise (standard deviations, MAP@R)", "",
        f"- between seeds, a method's score: **{sigma:.4f}** (pooled over methods)",
        f"- of which the retrainings explain: {sd(noise['retraining'])} (a seed's mean over "
        "its runs, from its 95% half-width)",
        f"- the rest, the search's (which trials each seed tried and kept): "
        f"**{sd(noise['search'])}**",
        f"- the methods' true scores spread by: {noise['spread']:.4f}", "",
        f"## What that noise leaves: Spearman between two simulated seeds ({sims} pairs)", "",
        "The methods' true scores are their mean scores shrunk to the spread above; each seed "
        "adds its noise to every method.", "",
        markdown(pd.DataFrame([
            goal_row(f"normal, sd {sigma:.4f} (measured)", normal, goal),
            goal_row(f"the seeds' residuals (RMS {sigma:.4f}), random signs", drawn, goal)])),
        "",
        f"Noise at which two seeds reach rho >= {goal} in {ENOUGH:.0%} of simulated pairs: "
        f"**{need_normal:.4f}** (normal), **{need_drawn:.4f}** (the residuals' shape), against "
        f"{sigma:.4f} measured. {search_needed(noise, need_normal)}", "",
        *winners_validation(dict(zip(tables, runs)), list(scores.index))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="two or more seed folders of embedded_comparison.py")
    p.add_argument("--goal", type=float, default=0.8, help="the Spearman to reach (#12: 0.8)")
    p.add_argument("--sims", type=int, default=4000, help="simulated pairs of seeds")
    p.add_argument("--out", default="", help="default: replication.md beside the first run")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give two or more seed folders")
    if not -1 < args.goal < 1 or args.sims < 100:
        p.error("--goal must lie in (-1, 1) and --sims be at least 100")
    runs = [Path(r) for r in args.runs]
    text = report(runs, args.goal, args.sims)
    out = Path(args.out) if args.out else runs[0].parent / "replication.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
