"""Welch's t-tests between the methods of a data set, Holm-corrected across the pairs."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pandas as pd

from harness.report.runs import Run
from harness.report.tables import LABELS, fmt_value, md_escape, mean_std

SIGNIFICANCE_METRICS = ("map_at_r",)
ALPHA = 0.05
NEEDS_TWO = "n/a (needs ≥2 reproductions)"
TEST_DESCRIPTION = (
    "Welch's two-sample t-test (unequal variances, two-sided; "
    "`scipy.stats.ttest_ind(a, b, equal_var=False)`) on the per-reproduction values of each "
    "method (concatenated: the 4 fold models' joined embedding, one score per reproduction; "
    "separated: the mean of the fold models' scores in each reproduction). p-values are "
    "Holm-corrected (step-down, family-wise error rate) across all pairs of methods of one data "
    "set, mode and metric; a pair is marked significant when the corrected p < "
    f"{ALPHA}. Scope: the reproductions retrain each method's best trial, so these tests see "
    "the retraining variance only, given each search's winner. The search's own variance (a "
    "search with another seed may pick another configuration) is not in them; at small search "
    "budgets compare whole runs of the protocol across seeds (docs/embedded.md).")


def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (statsmodels' multipletests); NaN entries (a pair that
    could not be tested) stay NaN and do not count in the family."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = ~np.isnan(p)
    if valid.any():
        adjusted[valid] = multipletests(p[valid], method="holm")[1]
    return adjusted


def welch(a, b) -> tuple[float, float]:
    from scipy import stats

    result = stats.ttest_ind(np.asarray(a, float), np.asarray(b, float), equal_var=False)
    return float(result.statistic), float(result.pvalue)


def significance(runs: list[Run]) -> pd.DataFrame:
    rows = []
    datasets = sorted({r.dataset for r in runs})
    for dataset in datasets:
        group = [r for r in runs if r.dataset == dataset]
        for mode in ("concatenated", "separated"):
            for metric in SIGNIFICANCE_METRICS:
                family = []
                for a, b in itertools.combinations(group, 2):
                    va, vb = a.values(mode, metric), b.values(mode, metric)
                    row = {"dataset": dataset, "mode": mode, "metric": metric,
                           "method_a": a.label, "method_b": b.label, "n_a": len(va),
                           "n_b": len(vb), "mean_a": mean_std(va)[0],
                           "mean_b": mean_std(vb)[0], "t": math.nan, "p": math.nan,
                           "note": ""}
                    row["diff"] = row["mean_a"] - row["mean_b"]
                    if len(va) < 2 or len(vb) < 2:
                        row["note"] = NEEDS_TWO
                    else:
                        with warnings.catch_warnings():
                            warnings.simplefilter("ignore", RuntimeWarning)
                            row["t"], row["p"] = welch(va, vb)
                        if math.isnan(row["p"]):
                            row["note"] = "n/a (no variance in either method)"
                    family.append(row)
                adjusted = holm([r["p"] for r in family])
                for row, p_holm in zip(family, adjusted):
                    row["p_holm"] = float(p_holm)
                    row["significant"] = bool(p_holm < ALPHA) if not math.isnan(p_holm) else None
                    row["family_size"] = int(np.sum(~np.isnan(adjusted)))
                rows += family
    columns = ["dataset", "mode", "metric", "method_a", "method_b", "n_a", "n_b", "mean_a",
               "mean_b", "diff", "t", "p", "p_holm", "family_size", "significant", "note"]
    return pd.DataFrame(rows, columns=columns)


def significance_markdown(frame: pd.DataFrame, runs: list[Run]) -> str:
    lines = ["# Significance of the differences between methods", "",
             f"Test: {TEST_DESCRIPTION}", "",
             "With few reproductions these tests have little power: a non-significant "
             "difference is not evidence of equality. Pairs where a method has fewer than 2 "
             f"complete reproductions are reported as \"{NEEDS_TWO}\".", ""]
    for dataset in sorted({r.dataset for r in runs}):
        lines.append(f"## {dataset}")
        lines.append("")
        sub = frame[frame["dataset"] == dataset]
        if sub.empty:
            lines += ["Only one method on this data set: nothing to compare.", ""]
            continue
        lines += ["| mode | metric | A | B | n A | n B | mean A (%) | mean B (%) | A − B (%) | "
                  "t | p | p (Holm) | significant |", "|" + "---|" * 13]
        for _, r in sub.iterrows():
            if r["note"]:
                t = p = ph = "–"
                sig = r["note"]
            else:
                t, p, ph = f"{r['t']:.3f}", f"{r['p']:.4g}", f"{r['p_holm']:.4g}"
                sig = "yes" if r["significant"] else "no"
            lines.append("| " + " | ".join([
                r["mode"], LABELS[r["metric"]], md_escape(r["method_a"]),
                md_escape(r["method_b"]), str(r["n_a"]), str(r["n_b"]),
                fmt_value(r["mean_a"], None), fmt_value(r["mean_b"], None),
                fmt_value(r["diff"], None), t, p, ph, sig]) + " |")
        lines.append("")
    return "\n".join(lines)

