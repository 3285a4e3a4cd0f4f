"""Why do two seeds of the embedded comparison rank the methods differently? A diagnosis.

    python benchmarks/search_noise.py results/embedded/seed_0 results/embedded/seed_1 \
        [--jobs 2] [--out results/embedded/search_noise.md]

The seeds differ in the search's random draws and in the training seeds. The final table ranks
each method by the test MAP@R of its search winner; a search of 10 trials can pick a better or a
worse winner in each seed. To see how much of the disagreement that is, this script scores
EVERY finished search trial on the test set after the fact: it embeds the glyph test classes
with the trial's own 4 fold models (trials/trial_NNNN/fold_K/best.pt) and computes the
concatenated test MAP@R: one run, as reproduction 0 is for the best trial. These scores are a
diagnosis of the protocol's noise and nothing else: no result table uses them, and choosing a
trial by its test score would be test-set selection.

Check: the score computed here of the trial the final step tested (final/best_trial.json) must
equal its final/rep_00/concatenated.json (the same models and the same test), or the script
stops with an error.

Needs the trial checkpoints, which are not committed (`embedded_comparison.py run` writes them;
see results/README.md). Writes the per-trial scores (OUT with .csv) and OUT (markdown):
  * per method and seed, the rank correlation of validation and test MAP@R over its trials;
  * Spearman between the seeds' rankings of the methods when each seed keeps the best (by
    validation) of its first k trials, k = 1..10 (one run per method, so noisier than the final
    table's 11 runs; k = 10 is the protocol's winner);
  * the same with each seed's best trial by test score: an oracle search, the agreement a
    perfect search would leave (retraining noise and the seeds' different trials remain).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.embedded_comparison import markdown, seed_agreement  # noqa: E402
from benchmarks.retrain_trial import record, recorded_config  # noqa: E402
from benchmarks.trial_agreement import complete_trials  # noqa: E402
from harness.splits import NUM_FOLDS  # noqa: E402
# A run's recorded score (rep_00's here, any run's in past_the_cap.py) was computed by the same
# code from the same models; float32 embedding and metric code that is deterministic on one
# machine: an exact match is expected, the tolerance only absorbs a different BLAS summation
# order on another machine.
REP0_TOLERANCE = 1e-6


def trial_checkpoints(run_dir: Path, number: int, folder_number: int) -> list[Path]:
    paths = [run_dir / "trials" / f"trial_{folder_number:04d}" / f"fold_{k}" / "best.pt"
             for k in range(NUM_FOLDS)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"{run_dir}: trial {number} lacks fold checkpoint(s) {missing[:2]}: "
                         f"this diagnosis needs every search trial's checkpoints, which a run "
                         f"of embedded_comparison.py writes but the repository does not hold")
    return paths


def plan_study(folder: Path) -> list[tuple[dict, list[Path] | None]]:
    """(row, fold checkpoints) for every finished trial of one study; checkpoints None for a
    diverged trial (no models: its value, 0, is what the search saw). A trial retried after an
    interruption keeps its models in the folder of the trial it retries, whose number it records
    as `seed_number` (harness/search.py). Stops with an error when a trial's checkpoints are
    missing, before any model is embedded."""
    # the trials of the study database, the record of the search: search_summary.json is written
    # by the final step, so after a search grown with --stage search it is stale
    config = json.loads((folder / "config.json").read_text())
    plan = []
    for trial in complete_trials(folder).values():
        value = trial.value
        if value is None or not math.isfinite(value):
            continue
        row = {"seed": config["seed"], "study": folder.name, "trial": trial.number,
               "diverged": bool(trial.user_attrs.get("diverged", False)), "val_map_at_r": value}
        folder_number = int(trial.user_attrs.get("seed_number", trial.number))
        paths = None if row["diverged"] else \
            trial_checkpoints(folder, trial.number, folder_number)
        plan.append((row, paths))
    return plan


def score_study(run_dir: str) -> list[dict]:
    """Test MAP@R (concatenated, and the mean of the separated fold models) of every finished
    trial of one study, with its validation MAP@R; checked against final/rep_00."""
    import torch

    from harness.data import prepare_data
    from harness.final import concatenate, embed_test_set, test_metrics
    from harness.train import load_best_model

    torch.set_num_threads(1)
    folder = Path(run_dir)
    cfg, _ = recorded_config(folder, [])
    data = prepare_data(cfg)
    cpu = torch.device("cpu")
    rows = []
    for row, paths in plan_study(folder):
        if paths is None:
            rows.append({**row, "test_map_at_r": math.nan, "test_separated_map_at_r": math.nan})
            continue
        embeddings = [embed_test_set(cfg, load_best_model(cfg, path, cpu), data, cpu)
                      for path in paths]
        separated = [test_metrics(e, cpu)["map_at_r"] for e in embeddings]
        rows.append({**row,
                     "test_map_at_r": test_metrics(concatenate(embeddings), cpu)["map_at_r"],
                     "test_separated_map_at_r": float(np.mean(separated))})
    # the trial the final step tested (after a grown search, the search's best may be newer)
    tested = record(folder / "final" / "best_trial.json", "trial")["trial"]
    mine = [r["test_map_at_r"] for r in rows if r["trial"] == tested]
    check_recorded_score(folder, 0, mine[0] if mine else None, f"trial {tested}")
    return rows


def check_recorded_score(folder: Path, rep: int, score: float | None, what: str) -> None:
    """Refuse unless `score`, computed here, is run `rep`'s recorded concatenated test MAP@R
    (final/rep_RR/concatenated.json): otherwise what was scored are not that run's models, or
    not its test set. `what` names what was scored, for the message."""
    name = f"final/rep_{rep:02d}/concatenated.json"
    recorded = record(folder / name, "map_at_r")["map_at_r"]
    if score is None or abs(score - recorded) > REP0_TOLERANCE:
        raise SystemExit(f"{folder}: {what} scores {score} here but {recorded} in {name}: "
                         f"these are not the models or the test set that the final step used")


def study_folders(seed_dir: Path) -> list[Path]:
    """The studies of a seed folder that reached their final step (they have a rep_00)."""
    return sorted(p for p in seed_dir.iterdir()
                  if (p / "study.db").is_file() and (p / "final" / "best_trial.json").is_file())


def best_of_first(trials: pd.DataFrame, k: int, by: str) -> float:
    """Test MAP@R of the trial with the highest `by` among the first k (in trial order) that
    did not diverge; NaN when all k diverged."""
    first = trials.sort_values("trial").head(k)
    first = first[first["test_map_at_r"].notna()]
    return float(first.loc[first[by].idxmax(), "test_map_at_r"]) if len(first) else math.nan


def picked(scores: pd.DataFrame, seeds: tuple[int, int], k: int, by: str
           ) -> tuple[pd.Series, pd.Series]:
    """Per method, each seed's test MAP@R of the best of its first k trials by `by`."""
    a, b = (scores[scores.seed == s].groupby("method").apply(
        best_of_first, k=k, by=by, include_groups=False) for s in seeds)
    return a.align(b, join="inner")


def selection_agreement(scores: pd.DataFrame, seeds: tuple[int, int], by: str,
                        ks: range) -> pd.DataFrame:
    rows = []
    for k in ks:
        a, b = picked(scores, seeds, k, by)
        both = a.notna() & b.notna()  # a method whose first k trials all diverged drops out
        agree = seed_agreement(a[both], b[both])
        rows.append({"trials searched (k)": k, "methods": int(both.sum()),
                     "Spearman between seeds": agree["rho"],
                     "mean abs gap between seeds": agree["mean_abs_gap"]})
    return pd.DataFrame(rows)


def gaps_by_method(scores: pd.DataFrame, seeds: tuple[int, int], ks: list[int]) -> pd.DataFrame:
    """|seed a - seed b| of each method's best-of-first-k test MAP@R (by validation), per k."""
    columns = {}
    for k in ks:
        a, b = picked(scores, seeds, k, "val_map_at_r")
        columns[f"k = {k}"] = (a - b).abs()
    return pd.DataFrame(columns).rename_axis("method").reset_index()


def within_method(scores: pd.DataFrame) -> pd.DataFrame:
    from scipy import stats

    rows = []
    for (method, seed), t in scores.groupby(["method", "seed"]):
        t = t[t["test_map_at_r"].notna()]  # diverged trials have no models
        best = t.loc[t["val_map_at_r"].idxmax()]
        rows.append({"method": method, "seed": seed, "trials": len(t),
                     "rho(val, test)": float(stats.spearmanr(t["val_map_at_r"],
                                                             t["test_map_at_r"])[0]),
                     "test of val-best": float(best["test_map_at_r"]),
                     "best test": float(t["test_map_at_r"].max()),
                     "test spread (max - min)": float(t["test_map_at_r"].max()
                                                      - t["test_map_at_r"].min())})
    return pd.DataFrame(rows)


def retraining_noise(runs: list[Path]) -> float:
    """Median over studies of the std of concatenated test MAP@R over a study's final runs (the
    best trial's models and its retrainings: same parameters, other training seeds)."""
    stds = []
    for run in runs:
        for folder in study_folders(run):
            frame = pd.read_csv(folder / "final" / "test_metrics.csv")
            stds.append(frame[frame["mode"] == "concatenated"]["map_at_r"].std())
    return float(np.median(stds))


def report(scores: pd.DataFrame, runs: list[Path]) -> str:
    seeds = tuple(sorted(scores.seed.unique()))
    if len(seeds) != 2:
        raise SystemExit(f"expected two seeds, found {list(seeds)}")
    ks = range(1, int(scores.groupby(["method", "seed"]).size().min()) + 1)
    by_val = selection_agreement(scores, seeds, "val_map_at_r", ks)
    oracle = selection_agreement(scores, seeds, "test_map_at_r", ks[-1:])
    within = within_method(scores)
    sigma = retraining_noise(runs)
    shown_ks = sorted(({1, 3, 5, ks[-1]} | set(range(10, ks[-1] + 1, 5))) & set(ks))
    gaps = gaps_by_method(scores, seeds, shown_ks)
    median_rho = within.groupby("seed")["rho(val, test)"].median()
    lost = (within["best test"] - within["test of val-best"]).mean()
    lines = [
        "# How much of the seeds' disagreement is the search? (diagnosis)", "",
        f"Runs: {', '.join(map(str, runs))}; {scores.method.nunique()} methods, "
        f"{len(scores)} finished search trials ({int(scores.diverged.sum())} diverged: no "
        "models), each other one scored on the test classes with its own "
        "4 fold models, concatenated (one run; the best trial's score equals its "
        "final/rep_00, checked). Made by `python benchmarks/search_noise.py "
        f"{' '.join(map(str, runs))}`. No result table uses these test scores.", "",
        "## Selecting the best of the first k trials by validation MAP@R (the protocol keeps "
        "the best of all its trials)", "",
        markdown(by_val), "",
        f"With an oracle search (each seed's best trial by test score, k = {ks[-1]}): Spearman "
        f"{oracle['Spearman between seeds'].iloc[0]:.3f}, mean abs gap between seeds "
        f"{oracle['mean abs gap between seeds'].iloc[0]:.4f}.", "",
        f"For scale: retraining the same trial with other seeds moves one run's score by "
        f"{sigma:.4f} (median std over each study's final runs), so two runs of the same "
        f"model differ by {2 * sigma / math.sqrt(math.pi):.4f} on average (2 sigma / sqrt(pi)); "
        "a gap between seeds beyond that comes from the different trials each seed's search "
        "tried.", "",
        "Gap between the seeds per method (test MAP@R of the best of the first k trials by "
        "validation, one run each):", "",
        markdown(gaps), "",
        "## Does validation MAP@R pick the trial that tests best?", "",
        f"Median over methods of the rank correlation between a trial's validation and test "
        f"MAP@R: {', '.join(f'seed {s}: {v:.2f}' for s, v in median_rho.items())}. On "
        f"average the validation-best trial tests {lost:.4f} MAP@R below the method's "
        "best-testing trial.", "",
        markdown(within.sort_values(["method", "seed"])), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2, help="two seed folders of embedded_comparison.py run")
    p.add_argument("--jobs", type=int, default=2, help="processes (one torch thread each)")
    p.add_argument("--out", default="", help="markdown file (default: search_noise.md beside "
                                             "the first folder); the scores go to .csv beside it")
    args = p.parse_args(argv)
    runs = [Path(r) for r in args.runs]
    folders = [str(f) for run in runs for f in study_folders(run)]
    if not folders:
        raise SystemExit(f"no finished studies in {args.runs}")
    for folder in folders:  # every checkpoint present, before minutes of embedding
        plan_study(Path(folder))
    if args.jobs == 1:
        per_study = list(map(score_study, folders))
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            per_study = list(pool.map(score_study, folders))
    scores = pd.DataFrame([row for rows in per_study for row in rows])
    scores["method"] = scores["study"].str.removesuffix("_glyphs")
    out = Path(args.out) if args.out else runs[0].parent / "search_noise.md"
    scores.sort_values(["seed", "study", "trial"]).to_csv(out.with_suffix(".csv"), index=False)
    text = report(scores, runs)
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
