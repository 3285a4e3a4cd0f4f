"""Test results per reproduction and over reproductions: the one aggregation that the final step
(`final/summary.csv`) and the report (`harness.report` tables and tests) both use.

`final/test_metrics.csv` holds, per reproduction, one "separated" row per fold model (fold =
0..3) and one "concatenated" row (fold = -1). MLRC (powerful-benchmarker v0.9.33
`create_accuracy_report`) gives each reproduction one value per mode: separated = the mean of
its fold models' scores, concatenated = the score of the joined embedding. Mean, std (ddof 1)
and the 95% Student-t half-width are then taken over reproductions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.errors import HarnessError

# The test metrics, in table order: harness.metrics.retrieval_metrics with its default
# ks = (1, 2, 4, 8). test_metrics.csv, summary.csv and the report's tables use these names.
METRICS = ("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8",
           "r_precision", "map_at_r")
MODES = ("separated", "concatenated")
KEYS = ["reproduction", "mode", "fold"]  # one row per fold model (or concatenation) each


@dataclass
class PerReproduction:
    values: pd.DataFrame  # index (mode, reproduction), one column per metric present
    fold_rows: pd.DataFrame  # the separated rows of the complete reproductions
    incomplete: list[int]  # reproductions left out: a fold row or the concatenated row missing
    folds: int  # fold rows a complete reproduction holds


def present_metrics(frame: pd.DataFrame) -> list[str]:
    return [m for m in METRICS if m in frame.columns]


def check_one_row_per_fold_model(frame: pd.DataFrame) -> None:
    """HarnessError when two rows describe one fold model: never average two results of one."""
    duplicated = frame[frame.duplicated(KEYS, keep=False)]
    if not duplicated.empty:
        raise HarnessError(f"test results hold {len(duplicated)} rows for the same (reproduction, "
                           f"mode, fold): {duplicated[KEYS].drop_duplicates().to_dict('records')}")


def per_reproduction(frame: pd.DataFrame, folds: int | None = None) -> PerReproduction:
    """One value per (mode, reproduction) of every metric, from test_metrics.csv rows.

    Only complete reproductions count: `folds` separated rows (default: the most any
    reproduction has) and the concatenated row. Duplicated rows are a HarnessError."""
    check_one_row_per_fold_model(frame)
    metrics = present_metrics(frame)
    sep = frame[frame["mode"] == "separated"]
    conc = frame[frame["mode"] == "concatenated"]
    fold_counts = sep.groupby("reproduction")["fold"].nunique()
    n_folds = folds or (int(fold_counts.max()) if len(fold_counts) else 0)
    reps = sorted(set(frame["reproduction"]))
    complete = [r for r in reps if fold_counts.get(r, 0) >= n_folds and
                (conc["reproduction"] == r).any()]
    sep = sep[sep["reproduction"].isin(complete)]
    conc = conc[conc["reproduction"].isin(complete)]
    parts = {"separated": sep.groupby("reproduction")[metrics].mean(),
             "concatenated": conc.set_index("reproduction")[metrics]}
    values = pd.concat(parts, names=["mode", "reproduction"]).sort_index()
    return PerReproduction(values=values, fold_rows=sep,
                           incomplete=[r for r in reps if r not in complete], folds=n_folds)


def summarize(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and 95% Student-t half-width per mode and metric over reproductions (columns
    mode, metric, mean, std, ci95, n). Every reproduction must be complete: the final step
    summarises only what it has finished, so a missing row is an error, not left out."""
    from scipy import stats

    per_rep = per_reproduction(frame)
    if per_rep.incomplete:
        raise HarnessError(f"test results of reproduction(s) {per_rep.incomplete} are incomplete "
                           f"(fewer than {per_rep.folds} fold rows or no concatenated row)")
    rows = []
    for mode, group in per_rep.values.groupby(level="mode"):
        for metric in per_rep.values.columns:
            values = group[metric].to_numpy(dtype=float)
            n = len(values)
            std = float(values.std(ddof=1)) if n > 1 else float("nan")
            half = float(stats.t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
            rows.append({"mode": mode, "metric": metric, "mean": float(values.mean()),
                         "std": std, "ci95": half, "n": n})
    return pd.DataFrame(rows)
