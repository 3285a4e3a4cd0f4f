"""Optional step between search and final test (not MLRC): score the search's best trials again.

MLRC tests the trial whose one run (all folds) scored best on validation. On the embedded
glyphs one run's validation MAP@R varies by about 0.005 between seeds for one configuration,
which is as much as the search's best trials differ (docs/embedded.md), so which of them is
tested is largely the seeds' doing. With `final.recheck_top = K` (K >= 2; 0 = MLRC) the K best
trials are each trained `final.recheck_runs` more times, all folds, and the final step tests the
one whose fresh runs have the best mean validation MAP@R. The search's own run is left out of
that mean: it is what put the trial among the K, so it is biased up (most for the search's
best); the fresh runs are not. Every candidate gets the same fresh seeds
(`seeds.recheck_fold_seed`), so their difference is less the seeds' doing. The test classes are
never looked at.

Resumable: each fold's result is its own JSON file, recheck/trial_NNNN/run_R/fold_F/result.json,
tagged with the fingerprint of what it trains; a torn or foreign one is trained again. The
choice and every candidate's scores go to recheck/choice.json. A fold whose loss diverges scores
0, as a diverged trial does in the search (MLRC). Checkpoints are deleted once a fold's result is
written: the final step retrains the chosen trial as MLRC does.
"""

from __future__ import annotations

import math
from pathlib import Path

import optuna

from harness.config import StudyConfig
from harness.data import PreparedData
from harness.progress import bar
from harness.run_folder import claim_fold_dir, fingerprint, read_json, write_json_atomic
from harness.search import best_trial, config_for_params, ranked_trials
from harness.seeds import recheck_fold_seed
from harness.train import train_fold


def choose_trial(cfg: StudyConfig, data: PreparedData, output: Path, device,
                 study: optuna.Study) -> tuple[optuna.trial.FrozenTrial, dict | None]:
    """The trial the final step tests, and the recheck's record (None under MLRC's rule: the
    search's best trial)."""
    best = best_trial(study)  # also the clear refusal when no trial can be retrained
    top, runs = cfg.final.recheck_top, cfg.final.recheck_runs
    if top == 0:
        return best, None
    candidates = ranked_trials(study)[:top]
    folds = data.split.folds[: cfg.search.folds]
    with bar(total=len(candidates) * runs * len(folds), desc="recheck", unit="fold",
             leave=True) as jobs:
        rows = [candidate_scores(cfg, data, output, device, trial, folds, jobs)
                for trial in candidates]
    chosen = max(rows, key=lambda r: r["recheck_mean"])  # ties: the search's order
    record = {"top": top, "runs": runs, "search_best_trial": best.number,
              "chosen_trial": chosen["trial"], "candidates": rows}
    write_json_atomic(output / "recheck" / "choice.json", record)
    print(f"[{cfg.name}] recheck of the {len(rows)} best trials, {runs} fresh runs each: "
          + ", ".join(f"trial {r['trial']} {r['search_value']:.4f} -> {r['recheck_mean']:.4f}"
                      for r in rows)
          + f"; trial {chosen['trial']} is tested", flush=True)
    return next(t for t in candidates if t.number == chosen["trial"]), record


def candidate_scores(cfg: StudyConfig, data: PreparedData, output: Path, device,
                     trial: optuna.trial.FrozenTrial, folds, jobs) -> dict:
    """A candidate's fresh runs: each the mean of its folds' best validation MAP@R, as the
    search scores a trial (0 if a fold diverged, and the run's later folds are not trained)."""
    trial_cfg = config_for_params(cfg, trial.params)
    seed_number = trial.user_attrs.get("seed_number", trial.number)
    run_scores = []
    for run in range(1, cfg.final.recheck_runs + 1):
        fold_scores = []
        for done, fold in enumerate(folds, start=1):
            fold_dir = (output / "recheck" / f"trial_{seed_number:04d}" / f"run_{run}"
                        / f"fold_{fold.index}")
            score = recheck_fold(trial_cfg, data, fold, device,
                                 recheck_fold_seed(cfg.seed, run, fold.index), fold_dir,
                                 f"trial {trial.number} run {run}")
            jobs.update(1)
            if score is None:
                fold_scores = [0.0]
                jobs.update(len(folds) - done)
                break
            fold_scores.append(score)
        run_scores.append(sum(fold_scores) / len(fold_scores))
    return {"trial": trial.number, "seed_number": seed_number, "params": trial.params,
            "search_value": trial.value, "recheck_values": run_scores,
            "recheck_mean": sum(run_scores) / len(run_scores)}


def recheck_fold(cfg: StudyConfig, data: PreparedData, fold, device, seed: int,
                 fold_dir: Path, desc: str) -> float | None:
    """One fresh fold run's best validation MAP@R, stored or trained; None if its loss
    diverged."""
    print_ = fingerprint(cfg, seed)
    row = read_json(fold_dir / "result.json")
    if isinstance(row, dict) and row.get("fingerprint") == print_:
        if row.get("stop") == "diverged":
            return None
        stored = _score(row)
        if stored is not None:
            return stored
    claim_fold_dir(fold_dir, print_, "recheck")
    result = train_fold(cfg, data, fold, device, seed=seed, run_dir=fold_dir,
                        desc=f"recheck {desc} fold {fold.index}")
    value = result.best_map_at_r
    diverged = result.stop_reason == "diverged" or not math.isfinite(value) or value < 0
    write_json_atomic(fold_dir / "result.json", {
        "fold": fold.index, "seed": seed, "val_map_at_r": None if diverged else float(value),
        "best_epoch": result.best_epoch, "stop": "diverged" if diverged else result.stop_reason,
        "fingerprint": print_})
    for name in ("best.pt", "last.pt"):  # the final step retrains the chosen trial
        (fold_dir / name).unlink(missing_ok=True)
    return None if diverged else float(value)


def _score(row: dict) -> float | None:
    """A stored fold result's score when it is a finite number in [0, 1], else None."""
    value = row.get("val_map_at_r")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= 1 else None
