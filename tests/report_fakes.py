"""Fake run folders for tests/test_report.py: the files harness.run writes, with chosen numbers.

Only `final/test_metrics.csv` (and `config.json`) matter for the tables; the study.db, history
and provenance files are written on request for the plot and index tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from harness.splits import FINGERPRINT_VERSION

# Each metric of a row = MAP@R value * factor, so tests can derive every metric from MAP@R.
FACTORS = {"precision_at_1": 2.0, "recall_at_1": 2.0, "recall_at_2": 2.4, "recall_at_4": 2.7,
           "recall_at_8": 2.9, "r_precision": 1.5, "map_at_r": 1.0}


def make_run(root: Path, name: str, *, dataset: str = "glyphs", loss: str = "proxy_anchor",
             sep=((0.2, 0.2, 0.2, 0.2),), conc=(0.3,), untrained: float | None = 0.05,
             p_at_1: dict | None = None, history: bool = False, study_trials: int = 0,
             trials: int = 3, extra_rows: list[dict] | None = None,
             data_fingerprint: str | None = None) -> Path:
    """A finished run folder `root/name`.

    sep: per reproduction, the separated MAP@R of each fold model; conc: per reproduction the
    concatenated MAP@R. Other metrics are MAP@R x FACTORS, except P@1 / R@1 when `p_at_1` gives
    {"separated": [[...]], "concatenated": [...]} explicitly.
    """
    run = Path(root) / name
    (run / "final").mkdir(parents=True, exist_ok=True)
    config = {"name": name, "description": "fake", "seed": 0,
              "data": {"dataset": dataset},
              "model": {"trunk": "small_cnn", "embedding_size": 16},
              "loss": {"name": loss, "params": {}},
              "train": {"iters_per_epoch": 10, "max_epochs": 4},
              "search": {"trials": trials, "folds": len(sep[0])},
              "final": {"reproductions": len(conc)}}
    (run / "config.json").write_text(json.dumps(config))
    if data_fingerprint:
        (run / "split_manifest.json").write_text(json.dumps(
            {"dataset": dataset, "data_fingerprint": data_fingerprint,
             "data_fingerprint_version": FINGERPRINT_VERSION}))
    rows = []
    for rep, (folds, c) in enumerate(zip(sep, conc)):
        for k, v in enumerate(folds):
            row = {"reproduction": rep, "mode": "separated", "fold": k, "val_map_at_r": v,
                   "best_epoch": 2, "stop": "max_epochs", **_metrics(v)}
            if p_at_1:
                row["precision_at_1"] = row["recall_at_1"] = p_at_1["separated"][rep][k]
            rows.append(row)
        row = {"reproduction": rep, "mode": "concatenated", "fold": -1,
               "val_map_at_r": float("nan"), "best_epoch": -1, "stop": "", **_metrics(c)}
        if p_at_1:
            row["precision_at_1"] = row["recall_at_1"] = p_at_1["concatenated"][rep]
        rows.append(row)
    rows += extra_rows or []
    pd.DataFrame(rows).to_csv(run / "final" / "test_metrics.csv", index=False)
    if untrained is not None:
        (run / "final" / "untrained_metrics.json").write_text(
            json.dumps({**_metrics(untrained), "num_queries": 100}))
    (run / "search_summary.json").write_text(json.dumps({
        "study": name, "best_trial": 0, "best_value": 0.1,
        "trials": [{"number": i, "state": "COMPLETE", "value": 0.1} for i in range(trials)]}))
    (run / "provenance.json").write_text(json.dumps([{
        "time_utc": "2026-01-01T00:00:00+00:00", "command": "python -m harness.run (fake)",
        "git": {"commit": "0123456789abcdef0123", "dirty": True},
        "hardware": {"platform": "test", "cpu_count": 2, "device": "cpu"},
        "storage": f"sqlite:///{run / 'study.db'}"}]))
    if history:
        for rep in range(len(conc)):
            for k in range(len(sep[0])):
                d = run / "final" / f"rep_{rep:02d}" / f"fold_{k}"
                d.mkdir(parents=True, exist_ok=True)
                d.joinpath("history.json").write_text(json.dumps(
                    [{"epoch": e, "iteration": 10 * e, "loss": 1.0 / e, **_metrics(0.01 * e)}
                     for e in (1, 2, 3, 4)]))
    if study_trials:
        make_study(run / "study.db", name, study_trials)
    return run


def make_study(db: Path, name: str, complete: int) -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{db}",
                                direction="maximize")
    rng = np.random.default_rng(0)
    for _ in range(complete):
        a, b = float(rng.uniform(0, 1)), float(rng.uniform(1e-4, 1))
        study.add_trial(optuna.trial.create_trial(
            params={"loss.margin": a, "train.loss_lr": b},
            distributions={"loss.margin": optuna.distributions.FloatDistribution(0, 1),
                           "train.loss_lr": optuna.distributions.FloatDistribution(
                               1e-4, 1, log=True)},
            value=a - 0.1 * b))


def _metrics(map_at_r: float) -> dict:
    return {k: f * map_at_r for k, f in FACTORS.items()}
