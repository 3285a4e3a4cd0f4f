"""Turn finished run folders into tables, significance tests and plots.

    python -m harness.report                       # every run folder under results/
    python -m harness.report results/quickstart results/embedded --out /tmp/report

A run folder is one that holds `final/test_metrics.csv` (written by `harness.run`). Named folders
that are not run folders themselves are scanned recursively, as `results/` is by default; in a
scan, a run folder without `final/test_metrics.csv` (an unfinished run) is skipped with a
warning, while naming such a folder explicitly is an error.

What is written to --out (default results/report/), all listed in its README.md:
  * `table_<dataset>.md|csv|tex`: one row per method (run folder), P@1, R-Precision and MAP@R as
    mean ± std over reproductions, "separated" (per reproduction the mean of the fold models'
    scores, then mean ± std over reproductions: MLRC) and "concatenated" (one score per
    reproduction); the CSV also holds R@1/2/4/8, the raw fractions and a `*_best` flag column per
    metric. An "untrained" reference row (final/untrained_metrics.json), and for the real data
    sets the published numbers (harness/paper_numbers.py) below a separator, labelled
    "paper (own protocol, not comparable)".
  * `significance.md|csv`: Welch's t-test between every pair of methods of a data set over the
    reproductions' MAP@R (concatenated and separated), Holm-corrected across the pairs.
  * `plots/`: per data set a bar chart of MAP@R and P@1 (± std); per run the Optuna optimisation
    history and parameter importances (from the run's study.db) and the validation MAP@R curves
    of the final training folds. PNG and PDF.
Files an earlier report wrote there are replaced and stale ones removed: --out/.report-manifest.json
lists what the report wrote, and nothing else in the folder is ever deleted or overwritten (a
file of another origin where the report would write is an error).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import aggregate
from harness.aggregate import METRICS, MODES
from harness.errors import HarnessError
from harness.paper_numbers import PAPER_LABEL, REAL_DATASETS, paper_results

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "results"
DEFAULT_OUT = RESULTS_DIR / "report"

TABLE_METRICS = ("precision_at_1", "r_precision", "map_at_r")
SIGNIFICANCE_METRICS = ("map_at_r",)
LABELS = {"precision_at_1": "P@1", "recall_at_1": "R@1", "recall_at_2": "R@2",
          "recall_at_4": "R@4", "recall_at_8": "R@8", "r_precision": "R-Precision",
          "map_at_r": "MAP@R"}
MODE_LABELS = {"separated": "sep.", "concatenated": "concat."}
ALPHA = 0.05
NEEDS_TWO = "n/a (needs ≥2 reproductions)"
TEST_DESCRIPTION = (
    "Welch's two-sample t-test (unequal variances, two-sided; "
    "`scipy.stats.ttest_ind(a, b, equal_var=False)`) on the per-reproduction values of each "
    "method (concatenated: the 4 fold models' joined embedding, one score per reproduction; "
    "separated: the mean of the fold models' scores in each reproduction). p-values are "
    "Holm-corrected (step-down, family-wise error rate) across all pairs of methods of one data "
    "set, mode and metric; a pair is marked significant when the corrected p < "
    f"{ALPHA}.")


class ReportError(HarnessError):
    """No run folder to report, or a named folder is not a finished run."""


# --------------------------------------------------------------------------------------------
# Finding and reading run folders
# --------------------------------------------------------------------------------------------
def _is_run(path: Path) -> bool:
    return (path / "final" / "test_metrics.csv").is_file()


def _scan(root: Path, exclude: Path | None) -> tuple[list[Path], list[str]]:
    """Run folders under `root` (not descending into them), and warnings for unfinished ones."""
    found, notes = [], []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve() == exclude:
            dirnames[:] = []
            continue
        if _is_run(here):
            found.append(here)
            dirnames[:] = []
        elif (here / "config.json").is_file():
            notes.append(f"skipped {here}: no final/test_metrics.csv (the run has not reached "
                         f"its final step)")
            dirnames[:] = []
        else:
            dirnames.sort()
    return found, notes


def find_run_dirs(paths: list[str | Path] | None = None, results_dir: Path = RESULTS_DIR,
                  exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """The run folders to report and the warnings of the scan.

    No `paths`: every run folder under `results_dir`, recursively. Otherwise each path is a run
    folder (it must hold final/test_metrics.csv) or a folder scanned recursively.
    """
    exclude = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    notes: list[str] = []
    if not paths:
        if not results_dir.is_dir():
            raise ReportError(f"no run folders found: {results_dir} does not exist. Run a study "
                              f"first (python -m harness.run --study quickstart) or name run "
                              f"folders: python -m harness.report RUN_DIR ...")
        found, notes = _scan(results_dir, exclude)
        if not found:
            raise ReportError(f"no run folders found under {results_dir} (a run folder holds "
                              f"final/test_metrics.csv, written when a run reaches its final "
                              f"step)" + (f"; {len(notes)} unfinished run(s) skipped"
                                          if notes else ""))
    else:
        for p in map(Path, paths):
            if not p.is_dir():
                raise ReportError(f"{p}: no such folder")
            if _is_run(p):
                found.append(p)
            elif (p / "config.json").is_file():
                raise ReportError(f"{p} lacks final/test_metrics.csv: the run has not reached "
                                  f"its final step (resume it with the same harness.run "
                                  f"command)")
            else:
                sub, sub_notes = _scan(p, exclude)
                if not sub:
                    raise ReportError(f"{p} is not a run folder (no final/test_metrics.csv) "
                                      f"and holds no run folder below it")
                found += sub
                notes += sub_notes
    unique: dict[Path, Path] = {}
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values()), notes


@dataclass
class Run:
    path: Path
    config: dict
    per_rep: pd.DataFrame  # index (mode, reproduction), one column per metric (fractions)
    fold_rows: pd.DataFrame  # the separated rows of the complete reproductions
    untrained: dict | None
    search: dict | None
    provenance: list[dict]
    notes: list[str] = field(default_factory=list)
    label: str = ""
    slug: str = ""

    @property
    def study(self) -> str:
        return str(self.config.get("name", self.path.name))

    @property
    def profile(self) -> str:
        """The --profile of the run's first invocation (config.json does not record it)."""
        for p in self.provenance:
            words = str(p.get("command", "")).split() if isinstance(p, dict) else []
            for i, w in enumerate(words):
                if w == "--profile" and i + 1 < len(words):
                    return Path(words[i + 1]).stem
                if w.startswith("--profile="):
                    return Path(w.split("=", 1)[1]).stem
        return ""

    @property
    def dataset(self) -> str:
        return str(self.config.get("data", {}).get("dataset", "unknown"))

    @property
    def loss(self) -> str:
        return str(self.config.get("loss", {}).get("name", ""))

    def values(self, mode: str, metric: str) -> np.ndarray:
        if mode not in self.per_rep.index.get_level_values(0) or metric not in self.per_rep:
            return np.array([], dtype=float)
        return self.per_rep.loc[mode, metric].to_numpy(dtype=float)

    @property
    def reproductions(self) -> int:
        return len(self.values("concatenated", "map_at_r"))

    @property
    def trials_counted(self) -> int | None:
        if not self.search:
            return None
        return sum(t.get("state") in ("COMPLETE", "PRUNED") for t in self.search.get("trials", []))

    @property
    def trials_complete(self) -> int | None:
        if not self.search:
            return None
        return sum(t.get("state") == "COMPLETE" for t in self.search.get("trials", []))

    @property
    def max_iterations(self) -> int | None:
        t = self.config.get("train", {})
        try:
            return int(t["iters_per_epoch"]) * int(t["max_epochs"])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def mean_best_iteration(self) -> float | None:
        t = self.config.get("train", {})
        if "best_epoch" not in self.fold_rows or not isinstance(t.get("iters_per_epoch"), int):
            return None
        return float(self.fold_rows["best_epoch"].mean() * t["iters_per_epoch"])


def _unreadable(path: Path, e: Exception) -> ReportError:
    """The error for a file that cannot be read: a permission problem is named as one."""
    if isinstance(e, PermissionError):
        return ReportError(f"{path}: permission denied: this user may not read it (a "
                           f"permission problem; the file itself may be intact); fix its "
                           f"permissions, e.g. chmod a+r {path}")
    if isinstance(e, UnicodeDecodeError):
        return ReportError(f"{path}: not a text file ({e.reason} at byte {e.start}); it is "
                           f"damaged or was replaced")
    return ReportError(f"{path}: unreadable ({e})")


def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(path, e) from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: unreadable JSON ({e})") from None


def read_test_metrics(csv: Path) -> tuple[pd.DataFrame, list[str]]:
    """final/test_metrics.csv, checked, and notes on rows left out.

    Every metric must be a finite number, reproduction and fold integers, mode separated or
    concatenated. A row with empty fields (cut short: a run killed while appending it) is left
    out with a note naming the line; a value that is not a number, or a damaged or binary file,
    is a ReportError naming the file and the line. Never NaN in a table."""
    try:
        raw = pd.read_csv(csv, dtype=str, keep_default_na=False, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise _unreadable(csv, e) from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise ReportError(f"{csv}: not a readable CSV table ({str(e).strip()[:200]})") from None
    missing = [c for c in ("reproduction", "mode", "fold") if c not in raw.columns]
    if missing:
        raise ReportError(f"{csv} lacks the columns {missing} (columns found: "
                          f"{', '.join(map(str, raw.columns[:10]))}); is it a test_metrics.csv "
                          f"written by harness.run?")
    checked = ["reproduction", "mode", "fold"] + [m for m in METRICS if m in raw.columns]
    empty = (raw[checked] == "").any(axis=1)
    notes = [f"{csv} line {i + 2}: empty {', '.join(c for c in checked if raw.at[i, c] == '')} "
             f"(the row is incomplete, cut short by a killed run?): left out"
             for i in raw.index[empty]]
    raw = raw[~empty]
    frame = raw.copy()
    for column in raw.columns:  # informative columns (val_map_at_r, best_epoch): best effort
        if column not in checked and column != "stop":
            frame[column] = pd.to_numeric(raw[column].replace("", "nan"), errors="coerce")
    for column in checked:
        if column == "mode":
            ok = raw["mode"].isin(MODES).to_numpy()
        else:
            values = pd.to_numeric(raw[column], errors="coerce")
            ok = np.isfinite(values.to_numpy(dtype=float))
            if column in ("reproduction", "fold"):
                ok &= values.fillna(0.5).to_numpy() % 1 == 0
        if not ok.all():
            i = raw.index[int(np.flatnonzero(~ok)[0])]
            expected = " or ".join(MODES) if column == "mode" else \
                "an integer" if column in ("reproduction", "fold") else "a finite number"
            raise ReportError(f"{csv} line {i + 2}: column {column} holds "
                              f"{raw.at[i, column][:40]!r}, expected {expected}; the file is "
                              f"damaged. Fix or delete that line, or move the file away and "
                              f"re-run the final stage (harness.run --stage final)")
        if column != "mode":
            frame[column] = values.astype(int) if column in ("reproduction", "fold") else values
    return frame, notes


def per_reproduction(frame: pd.DataFrame, csv: Path, folds: int | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """harness.aggregate.per_reproduction (the final step's own aggregation) of a run's rows:
    its values, the separated rows counted, and a note on incomplete reproductions left out.
    Two rows for one fold model are a ReportError naming the file."""
    try:
        per_rep = aggregate.per_reproduction(frame, folds)
    except HarnessError as e:
        raise ReportError(f"{csv}: {e}; the file is damaged. Move it away and re-run the final "
                          f"stage (harness.run --stage final) to regenerate it") from None
    notes = []
    if per_rep.incomplete:
        notes.append(f"reproduction(s) {per_rep.incomplete} incomplete (fewer than "
                     f"{per_rep.folds} fold rows or no concatenated row): left out")
    return per_rep.values, per_rep.fold_rows, notes


def load_run(path: Path) -> Run:
    path = Path(path)
    config = _read_json(path / "config.json")
    if config is None:
        raise ReportError(f"{path} lacks config.json (not written by harness.run?)")
    _check_config(path / "config.json", config)
    csv = path / "final" / "test_metrics.csv"
    frame, csv_notes = read_test_metrics(csv)
    folds = config.get("search", {}).get("folds")
    per_rep, fold_rows, notes = per_reproduction(frame, csv,
                                                 folds if isinstance(folds, int) else None)
    notes = csv_notes + notes
    if per_rep.empty:
        raise ReportError(f"{csv} holds no complete reproduction yet")
    prov = _read_json(path / "provenance.json", [])
    untrained, untrained_note = _checked_untrained(path / "final" / "untrained_metrics.json")
    search = _read_json(path / "search_summary.json")
    if search is not None and not (isinstance(search, dict) and
                                   isinstance(search.get("trials", []), list) and
                                   all(isinstance(t, dict) for t in search.get("trials", []))):
        notes.append(f"{path / 'search_summary.json'} is not a search summary (expected an "
                     f"object with a list of trials): trial counts left out")
        search = None
    run = Run(path=path, config=config, per_rep=per_rep, fold_rows=fold_rows,
              untrained=untrained, search=search,
              provenance=prov if isinstance(prov, list) else [prov], notes=notes)
    if untrained_note:
        run.notes.append(untrained_note)
    return run


def _check_config(path: Path, config) -> None:
    """config.json must be an object whose sections are objects (the tables read from it)."""
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a JSON object (the study configuration), got "
                          f"{type(config).__name__}")
    for section in ("data", "loss", "train", "search", "final"):
        if not isinstance(config.get(section, {}), dict):
            raise ReportError(f"{path}: [{section}] is not an object; the file is damaged")


def _checked_untrained(path: Path) -> tuple[dict | None, str]:
    """untrained_metrics.json when its metrics are finite numbers, else (None, why)."""
    untrained = _read_json(path)
    if untrained is None:
        return None, f"no {path.relative_to(path.parent.parent)}: no untrained row from this run"
    if isinstance(untrained, dict):
        bad = [m for m in METRICS if m in untrained and not (
            isinstance(untrained[m], (int, float)) and not isinstance(untrained[m], bool)
            and math.isfinite(untrained[m]))]
        if not bad:
            return untrained, ""
        return None, f"{path}: {bad[0]}={untrained[bad[0]]!r} is not a finite number: no " \
                     f"untrained row from this run"
    return None, f"{path}: expected a JSON object of metrics: no untrained row from this run"


def load_runs(paths: list[Path], strict: set[Path] | None = None) -> tuple[list[Run], list[str]]:
    """Load every run; a run that cannot be read is an error when it was named explicitly
    (`strict`), otherwise it is skipped with a warning."""
    runs, notes = [], []
    strict = strict or set()
    for p in paths:
        try:
            runs.append(load_run(p))
        except ReportError as e:
            if p.resolve() in strict:
                raise
            notes.append(f"skipped {p}: {e}")
    if not runs:
        raise ReportError("no run folders found: none of the folders found could be read "
                          "(" + "; ".join(notes) + ")")
    _assign_labels(runs)
    return runs, notes


def _slugify(text: str) -> str:
    # No "." kept: file names are built with Path.with_suffix, which would cut at a dot.
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "run"


def _assign_labels(runs: list[Run]) -> None:
    """Method label = study name (+ [profile]), disambiguated by the folder when a data set has
    two runs of one study; slug = a unique file-name stem."""
    by_key: dict[tuple[str, str], list[Run]] = {}
    for r in runs:
        name = f"{r.study} [{r.profile}]" if r.profile else r.study
        by_key.setdefault((r.dataset, name), []).append(r)
    for (_, name), group in by_key.items():
        for r in group:
            r.label = name if len(group) == 1 else f"{name} ({_short_path(r.path)})"
    used: set[str] = set()
    for r in runs:
        base = _slugify(f"{r.dataset}_{r.label}")
        slug, i = base, 2
        while slug in used:
            slug, i = f"{base}_{i}", i + 1
        used.add(slug)
        r.slug = slug


def _short_path(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(RESULTS_DIR.resolve()))
    except ValueError:
        return str(path)


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------
def _col(mode: str, metric: str, stat: str) -> str:
    return f"{mode}_{metric}_{stat}"


def _mean_std(values: np.ndarray) -> tuple[float, float]:
    if len(values) == 0:
        return math.nan, math.nan
    std = float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
    return float(np.mean(values)), std


def dataset_table(runs: list[Run], dataset: str) -> pd.DataFrame:
    """The numeric table of one data set (fractions): method rows, untrained rows, paper rows.

    Columns: group (harness | untrained | PAPER_LABEL), method, study, loss, run_dir,
    reproductions, trials (counted), trials_complete, trials_budget, max_iterations_per_fold,
    mean_best_iteration, then per mode and metric `<mode>_<metric>_mean`, `_std`, `_best`, and
    source / protocol for the paper rows.
    """
    runs = [r for r in runs if r.dataset == dataset]
    rows = []
    for r in runs:
        row = {"dataset": dataset, "group": "harness", "method": r.label, "study": r.study,
               "loss": r.loss, "run_dir": str(r.path), "reproductions": r.reproductions,
               "trials": r.trials_counted, "trials_complete": r.trials_complete,
               "trials_budget": r.config.get("search", {}).get("trials"),
               "max_iterations_per_fold": r.max_iterations,
               "mean_best_iteration": r.mean_best_iteration}
        for mode in MODES:
            for metric in METRICS:
                row[_col(mode, metric, "mean")], row[_col(mode, metric, "std")] = _mean_std(
                    r.values(mode, metric))
        rows.append(row)
    rows += _untrained_rows(runs, dataset)
    for paper in paper_results(dataset, {r.loss for r in runs}):
        row = {"dataset": dataset, "group": PAPER_LABEL, "method": paper.method,
               "loss": ", ".join(paper.losses), "source": paper.source,
               "protocol": paper.protocol}
        for metric, value in paper.metrics.items():
            # Published single-model numbers; MLRC sets them beside its concatenated model.
            row[_col("concatenated", metric, "mean")] = value / 100.0
            if metric in paper.std:
                row[_col("concatenated", metric, "std")] = paper.std[metric] / 100.0
        rows.append(row)
    table = pd.DataFrame(rows)
    for mode in MODES:
        for metric in METRICS:
            for stat in ("mean", "std"):
                if _col(mode, metric, stat) not in table:
                    table[_col(mode, metric, stat)] = math.nan
            means = table[_col(mode, metric, "mean")].astype(float)
            method_means = means[table["group"] == "harness"]
            # Marked only when there is something to compare (two methods with a value).
            best = method_means.max() if method_means.notna().sum() >= 2 else math.nan
            table[_col(mode, metric, "best")] = ((table["group"] == "harness") & (means == best))
    for c in ("source", "protocol"):
        if c not in table:
            table[c] = ""
    meta = ["dataset", "group", "method", "study", "loss", "run_dir", "reproductions", "trials",
            "trials_complete", "trials_budget", "max_iterations_per_fold", "mean_best_iteration"]
    for c in meta:
        if c not in table:
            table[c] = math.nan
    values = [_col(mode, metric, stat) for mode in MODES for metric in METRICS
              for stat in ("mean", "std", "best")]
    return table[meta + values + ["source", "protocol"]]


def _untrained_rows(runs: list[Run], dataset: str) -> list[dict]:
    """One row per distinct untrained result (runs of one model architecture and seed share it)."""
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        if r.untrained:
            key = tuple(f"{float(r.untrained.get(m, math.nan)):.10g}" for m in METRICS)
            groups.setdefault(key, []).append(r)
    rows = []
    for members in groups.values():
        u = members[0].untrained
        name = "untrained" if len(groups) == 1 else \
            f"untrained ({', '.join(m.label for m in members)})"
        row = {"dataset": dataset, "group": "untrained", "method": name,
               "study": ", ".join(m.study for m in members),
               "run_dir": ", ".join(str(m.path) for m in members)}
        for mode in MODES:  # one model: 4 copies of it concatenated rank the same way
            for metric in METRICS:
                row[_col(mode, metric, "mean")] = float(u[metric]) if metric in u else math.nan
        rows.append(row)
    return rows


def _fmt_value(mean, std, pct: bool = True, pm: str = " ± ") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale = 100.0 if pct else 1.0
    text = f"{scale * mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f"{pm}{scale * std:.2f}"
    return text


def _fmt_int(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(int(value))


HEADER = (["Method", "Loss", "Reps", "Trials", "Iters/fold"] +
          [f"{LABELS[m]} ({MODE_LABELS[mode]})" for mode in MODES for m in TABLE_METRICS])


def _display_rows(table: pd.DataFrame, bold, pm: str, escape) -> list[list[str] | str]:
    """Cells of the printed table, with the markers "UNTRAINED" (before the first untrained
    row) and "SEPARATOR" (before the first paper row)."""
    out: list[list[str] | str] = []
    marked: set[str] = set()
    for _, row in table.iterrows():
        group = row["group"]
        for marker, g in (("UNTRAINED", "untrained"), ("SEPARATOR", PAPER_LABEL)):
            if group == g and marker not in marked:
                out.append(marker)
                marked.add(marker)
        loss = row.get("loss")
        cells = [escape(str(row["method"])), escape(loss if isinstance(loss, str) else ""),
                 _fmt_int(row.get("reproductions")) if group != PAPER_LABEL else "–",
                 _fmt_int(row.get("trials")), _fmt_int(row.get("max_iterations_per_fold"))]
        for mode in MODES:
            for metric in TABLE_METRICS:
                text = _fmt_value(row[_col(mode, metric, "mean")], row[_col(mode, metric, "std")],
                                  pm=pm)
                cells.append(bold(text) if bool(row[_col(mode, metric, "best")]) else text)
        out.append(cells)
    return out


def table_markdown(table: pd.DataFrame, dataset: str) -> str:
    lines = [f"### {dataset}", "",
             "Test metrics in %, mean ± std over reproductions (MLRC protocol). "
             "sep. = each fold model alone, averaged over the folds per reproduction; "
             "concat. = the fold models' embeddings joined. Best harness value per column in "
             "bold. Reps = complete reproductions; Trials = search trials completed or pruned; "
             "Iters/fold = maximum training iterations per fold.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for cells in _display_rows(table, lambda s: f"**{s}**", " ± ", _md_escape):
        if cells == "SEPARATOR":
            lines.append(f"| ***{PAPER_LABEL}*** |" + " |" * (len(HEADER) - 1))
        elif cells != "UNTRAINED":
            lines.append("| " + " | ".join(cells) + " |")
    papers = table[table["group"] == PAPER_LABEL]
    if len(papers):
        lines += ["", f"Rows under *{PAPER_LABEL}*: published numbers (R@1 = P@1), each under "
                      f"its authors' own protocol, shown under the concatenated columns as MLRC "
                      f"does; they cannot be compared with the rows above."]
        for _, row in papers.iterrows():
            lines.append(f"- {row['method']}: {row['source']}; {row['protocol']}.")
    return "\n".join(lines) + "\n"


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("_", "\\_")


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
                "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}",
                "^": r"\textasciicircum{}", "±": r"$\pm$", "–": "--", "≥": r"$\geq$"}


def _tex_escape(text: str) -> str:
    return "".join(_TEX_ESCAPES.get(c, c) for c in text)


def table_latex(table: pd.DataFrame, dataset: str) -> str:
    """A booktabs tabular (written by hand: pandas' to_latex needs jinja2)."""
    n = len(HEADER)
    head = [_tex_escape(h) for h in HEADER]
    lines = [f"% {dataset}: test metrics in %, mean $\\pm$ std over reproductions; needs "
             f"\\usepackage{{booktabs}}",
             r"\begin{tabular}{ll" + "r" * (n - 2) + "}", r"\toprule",
             " & ".join(head) + r" \\", r"\midrule"]
    for cells in _display_rows(table, lambda s: f"\\textbf{{{s}}}", r" $\pm$ ", _tex_escape):
        if cells == "UNTRAINED":
            lines.append(r"\midrule")
        elif cells == "SEPARATOR":
            lines += [r"\midrule",
                      rf"\multicolumn{{{n}}}{{l}}{{\textit{{{_tex_escape(PAPER_LABEL)}}}}} \\",
                      r"\midrule"]
        else:
            lines.append(" & ".join("--" if c == "–" else c for c in cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Significance
# --------------------------------------------------------------------------------------------
def holm(pvalues) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values; NaN entries stay NaN and do not count in the family."""
    p = np.asarray(pvalues, dtype=float)
    adjusted = np.full_like(p, np.nan)
    valid = np.flatnonzero(~np.isnan(p))
    m = len(valid)
    if m == 0:
        return adjusted
    order = valid[np.argsort(p[valid], kind="stable")]
    running = 0.0
    for i, idx in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[idx]))
        adjusted[idx] = running
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
                           "n_b": len(vb), "mean_a": _mean_std(va)[0],
                           "mean_b": _mean_std(vb)[0], "t": math.nan, "p": math.nan,
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
                r["mode"], LABELS[r["metric"]], _md_escape(r["method_a"]),
                _md_escape(r["method_b"]), str(r["n_a"]), str(r["n_b"]),
                _fmt_value(r["mean_a"], None), _fmt_value(r["mean_b"], None),
                _fmt_value(r["diff"], None), t, p, ph, sig]) + " |")
        lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, stem: Path) -> list[Path]:
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = [stem.with_suffix(".png"), stem.with_suffix(".pdf")]
    fig.savefig(paths[0], dpi=150, bbox_inches="tight")
    fig.savefig(paths[1], bbox_inches="tight")
    _pyplot().close(fig)
    return paths


def plot_bars(table: pd.DataFrame, dataset: str, stem: Path) -> list[Path]:
    """MAP@R and P@1 (%) per method, separated and concatenated, with ± std error bars."""
    plt = _pyplot()
    methods = table[table["group"] == "harness"]
    untrained = table[table["group"] == "untrained"]
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.3 * len(methods) + 4), 4.2))
    x = np.arange(len(methods))
    width = 0.38
    for ax, metric in zip(axes, ("map_at_r", "precision_at_1")):
        for i, mode in enumerate(MODES):
            means = 100 * methods[_col(mode, metric, "mean")].astype(float).to_numpy()
            stds = 100 * methods[_col(mode, metric, "std")].astype(float).fillna(0).to_numpy()
            ax.bar(x + (i - 0.5) * width, means, width, yerr=stds, capsize=3, label=mode)
        for j, (_, u) in enumerate(untrained.iterrows()):
            ax.axhline(100 * float(u[_col("separated", metric, "mean")]), color="grey",
                       linestyle="--", linewidth=1,
                       label="untrained" if j == 0 else None)
        ax.set_xticks(x, methods["method"].tolist(), rotation=30, ha="right")
        ax.set_ylabel(f"{LABELS[metric]} (%)")
        ax.set_title(f"{dataset}: test {LABELS[metric]}")
        ax.legend(fontsize=8)
    fig.suptitle("mean ± std over reproductions", fontsize=9)
    fig.tight_layout()
    return _save(fig, stem)


def plot_training_curves(run: Run, stem: Path) -> list[Path]:
    """Validation MAP@R vs iteration of every final training fold, one panel per fold."""
    histories: dict[int, dict[int, list[dict]]] = {}
    for path in sorted((run.path / "final").glob("rep_*/fold_*/history.json")):
        try:
            rep = int(path.parent.parent.name.split("_")[1])
            fold = int(path.parent.name.split("_")[1])
            history = json.loads(path.read_text())
        except (ValueError, IndexError, OSError, json.JSONDecodeError):
            continue
        if history:
            histories.setdefault(fold, {})[rep] = history
    if not histories:
        raise ReportError("no final/rep_*/fold_*/history.json")
    plt = _pyplot()
    folds = sorted(histories)
    fig, axes = plt.subplots(1, len(folds), figsize=(3.2 * len(folds), 3.0), sharey=True,
                             squeeze=False)
    for ax, fold in zip(axes[0], folds):
        for rep, history in sorted(histories[fold].items()):
            its = [h.get("iteration", h.get("epoch")) for h in history]
            ax.plot(its, [100 * h["map_at_r"] for h in history], marker=".", label=f"rep {rep}")
        ax.set_title(f"fold {fold}")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("validation MAP@R (%)")
    if sum(len(h) for h in histories.values()) <= 12:
        axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{run.label} ({run.dataset}): final training, validation MAP@R", fontsize=10)
    fig.tight_layout()
    return _save(fig, stem)


def load_optuna_study(run: Run):
    """The run's Optuna study from its study.db (read from the run folder only)."""
    db = run.path / "study.db"
    if not db.is_file():
        storages = {p.get("storage") for p in run.provenance if isinstance(p, dict)}
        storages.discard(None)
        hint = f" (it was stored at {', '.join(sorted(storages))})" if storages else ""
        raise ReportError(f"no study.db in the run folder{hint}")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = (run.search or {}).get("study") or run.study
    return optuna.load_study(study_name=name, storage=f"sqlite:///{db.resolve()}")


def plot_optuna(run: Run, out_dir: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Optimisation history and parameter importances; failures become notes."""
    files: dict[str, list[Path]] = {}
    notes: list[str] = []
    try:
        study = load_optuna_study(run)
    except Exception as e:  # a missing/locked/foreign database must not stop the report
        return files, [f"{run.label}: Optuna plots skipped: {e}"]
    import optuna
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as ovm

    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ax = ovm.plot_optimization_history(study)
            ax.set_title(f"{run.label}: optimisation history (validation MAP@R)")
            files["optimisation history"] = _save(ax.figure, out_dir /
                                                  f"optuna_history_{run.slug}")
        except Exception as e:
            plt.close("all")
            notes.append(f"{run.label}: optimisation history failed: {e}")
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if len(complete) < 2:
            notes.append(f"{run.label}: parameter importances need ≥2 complete trials "
                         f"(the study has {len(complete)})")
        else:
            try:
                evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
                ax = ovm.plot_param_importances(study, evaluator=evaluator)
                ax.set_title(f"{run.label}: parameter importances (fANOVA)", loc="left")
                files["parameter importances"] = _save(ax.figure, out_dir /
                                                       f"optuna_importances_{run.slug}")
            except Exception as e:
                plt.close("all")
                notes.append(f"{run.label}: parameter importances failed: "
                             f"{type(e).__name__}: {e}")
    return files, notes


# --------------------------------------------------------------------------------------------
# Index and provenance
# --------------------------------------------------------------------------------------------
def _commits(run: Run) -> str:
    seen = []
    for p in run.provenance:
        git = p.get("git", {}) if isinstance(p, dict) else {}
        text = str(git.get("commit", "unknown"))[:12] + ("+dirty" if git.get("dirty") else "")
        if text not in seen:
            seen.append(text)
    return ", ".join(seen) or "unknown"


def _hardware(run: Run) -> str:
    seen = []
    for p in run.provenance:
        hw = p.get("hardware", {}) if isinstance(p, dict) else {}
        if not hw:
            continue
        device = hw.get("device_name") or hw.get("device") or ""
        text = f"{device} ({hw.get('cpu_count', '?')} CPUs, {hw.get('platform', '?')})".strip()
        if text not in seen:
            seen.append(text)
    return "; ".join(seen) or "unknown"


def _times(run: Run) -> str:
    times = sorted(str(p.get("time_utc")) for p in run.provenance
                   if isinstance(p, dict) and p.get("time_utc"))
    if not times:
        return "unknown"
    return times[0] if len(times) == 1 else f"{times[0]} … {times[-1]} ({len(times)} invocations)"


def _report_commit() -> str:
    """The harness's own commit, as harness.provenance records it for runs."""
    from harness.provenance import git_commit

    info = git_commit()
    return info["commit"][:12] + ("+dirty" if info["dirty"] else "")


@dataclass
class Report:
    out: Path
    runs: list[Run]
    tables: dict[str, pd.DataFrame]
    significance: pd.DataFrame
    files: list[tuple[Path, str]]
    notes: list[str]


def build_report(run_dirs: list[str | Path] | None = None, out: str | Path | None = None,
                 results_dir: Path = RESULTS_DIR, command: str | None = None,
                 plots: bool = True) -> Report:
    out = Path(out) if out is not None else results_dir / "report"
    found, notes = find_run_dirs(run_dirs, results_dir=results_dir, exclude=out)
    strict = {Path(p).resolve() for p in (run_dirs or []) if _is_run(Path(p))}
    runs, load_notes = load_runs(found, strict=strict)
    notes += load_notes
    for r in runs:
        notes += [f"{r.label} ({r.path}): {n}" for n in r.notes]
    datasets = sorted({r.dataset for r in runs})
    out.mkdir(parents=True, exist_ok=True)
    planned = _planned_outputs(out, runs, datasets, plots)
    previous, manifest_notes = _previous_outputs(out)
    notes += manifest_notes
    _refuse_foreign_files(out, planned, previous)
    # Write-ahead: should this report stop half-way, the next one still knows these files.
    _write_manifest(out, planned | previous)
    _remove_previous_output(previous)
    files: list[tuple[Path, str]] = []
    tables: dict[str, pd.DataFrame] = {}
    markdown_tables = []
    for dataset in datasets:
        table = dataset_table(runs, dataset)
        tables[dataset] = table
        stem = out / f"table_{_slugify(dataset)}"
        table.to_csv(stem.with_suffix(".csv"), index=False)
        md = table_markdown(table, dataset)
        markdown_tables.append(md)
        stem.with_suffix(".md").write_text(md)
        stem.with_suffix(".tex").write_text(table_latex(table, dataset))
        files += [(stem.with_suffix(".md"), f"{dataset}: results table (markdown)"),
                  (stem.with_suffix(".csv"), f"{dataset}: results table with R@1/2/4/8, raw "
                                             f"fractions and best flags (CSV)"),
                  (stem.with_suffix(".tex"), f"{dataset}: results table (LaTeX, booktabs)")]
    sig = significance(runs)
    sig.to_csv(out / "significance.csv", index=False)
    (out / "significance.md").write_text(significance_markdown(sig, runs))
    files += [(out / "significance.md", "Welch's t-tests between methods, Holm-corrected"),
              (out / "significance.csv", "the same, as CSV")]
    if plots:
        plot_dir = out / "plots"
        for dataset in datasets:
            if (tables[dataset]["group"] == "harness").any():
                for p in plot_bars(tables[dataset], dataset,
                                   plot_dir / f"bars_{_slugify(dataset)}"):
                    files.append((p, f"{dataset}: MAP@R and P@1 per method, ± std"))
        for r in runs:
            try:
                for p in plot_training_curves(r, plot_dir / f"curves_{r.slug}"):
                    files.append((p, f"{r.label} ({r.dataset}): validation MAP@R vs iteration "
                                     f"per final fold"))
            except ReportError as e:
                notes.append(f"{r.label}: training curves skipped: {e}")
            optuna_files, optuna_notes = plot_optuna(r, plot_dir)
            notes += optuna_notes
            for what, paths in optuna_files.items():
                files += [(p, f"{r.label} ({r.dataset}): Optuna {what}") for p in paths]
    index = out / "README.md"
    files.insert(0, (index, "this index"))
    command = command or " ".join([Path(sys.executable).name, "-m", "harness.report",
                                   *sys.argv[1:]])
    index.write_text(_index_markdown(out, runs, files, notes, markdown_tables, command))
    _write_manifest(out, {path for path, _ in files})
    return Report(out=out, runs=runs, tables=tables, significance=sig, files=files, notes=notes)


MANIFEST = ".report-manifest.json"  # the files this module wrote to --out, relative to it


def _planned_outputs(out: Path, runs: list[Run], datasets: list[str], plots: bool) -> set[Path]:
    """Every file this report may write (a superset: some plots may be skipped)."""
    names = ["README.md", "significance.md", "significance.csv"]
    for dataset in datasets:
        names += [f"table_{_slugify(dataset)}.{ext}" for ext in ("md", "csv", "tex")]
    if plots:
        stems = [f"bars_{_slugify(d)}" for d in datasets]
        for r in runs:
            stems += [f"curves_{r.slug}", f"optuna_history_{r.slug}",
                      f"optuna_importances_{r.slug}"]
        names += [f"plots/{stem}.{ext}" for stem in stems for ext in ("png", "pdf")]
    return {out / name for name in names}


def _inside(out: Path, entry) -> Path | None:
    """out/entry when `entry` is a relative path that stays inside `out`, else None."""
    if not isinstance(entry, str) or not entry or "\\" in entry:
        return None
    rel = Path(entry)
    if rel.is_absolute() or ".." in rel.parts or rel.name == MANIFEST:
        return None
    path = out / rel
    try:
        path.resolve().relative_to(out.resolve())  # a symlinked folder may lead elsewhere
    except ValueError:
        return None
    return path


def _previous_outputs(out: Path) -> tuple[set[Path], list[str]]:
    """Files an earlier report wrote to `out`, from its manifest (or, for a report folder from
    before the manifest, from the file table of its README.md index), and notes on entries
    ignored. The folder may be shared: every entry must be a relative path inside `out`."""
    path = out / MANIFEST
    if path.is_file():
        try:
            entries = json.loads(path.read_text()).get("files")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
            return set(), [f"{path} is unreadable ({e}): no file of an earlier report was "
                           f"removed"]
        if not isinstance(entries, list):
            return set(), [f"{path} holds no file list: no file of an earlier report was "
                           f"removed"]
    else:
        entries = _legacy_index_entries(out / "README.md")
    previous, bad = set(), []
    for entry in entries:
        inside = _inside(out, entry)
        if inside is None:
            bad.append(repr(entry)[:80])
        else:
            previous.add(inside)
    notes = [f"{path}: ignored {len(bad)} entr{'y' if len(bad) == 1 else 'ies'} that are not "
             f"relative paths inside {out} ({', '.join(bad[:3])})"] if bad else []
    return previous, notes


def _legacy_index_entries(index: Path) -> list[str]:
    """The files listed by a README.md that an earlier version of this module wrote."""
    try:
        text = index.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    if not text.startswith("# Benchmark report\n"):
        return []  # not an index this module wrote: nothing in the folder is ours
    return re.findall(r"^\| \[([^\]\n]+)\]\(", text, flags=re.MULTILINE)


def _refuse_foreign_files(out: Path, planned: set[Path], previous: set[Path]) -> None:
    """ReportError when a file this report would write exists but no earlier report wrote it
    (a user's README.md, say): never overwrite what is not ours."""
    foreign = sorted(p for p in planned if (p.exists() or p.is_symlink()) and p not in previous)
    if foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:5])
        raise ReportError(f"{out} already holds {len(foreign)} file(s) that harness.report would "
                          f"write but did not write itself ({shown}); they are left alone. "
                          f"Choose another --out, or move those files away")


def _write_manifest(out: Path, paths: set[Path]) -> None:
    entries = sorted(p.relative_to(out).as_posix() for p in paths)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"written_by": "harness.report", "files": entries}, indent=1))
    os.replace(tmp, out / MANIFEST)


def _remove_previous_output(previous: set[Path]) -> None:
    """Delete the files an earlier report wrote (and only those), so that no table or plot of
    a run no longer reported is left behind."""
    for path in previous:
        if path.is_file() or path.is_symlink():
            path.unlink()


def _index_markdown(out: Path, runs: list[Run], files, notes, markdown_tables,
                    command: str) -> str:
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    lines = ["# Benchmark report", "",
             f"- generated: {now}",
             f"- command: `{command}`",
             f"- harness commit: {_report_commit()}",
             f"- run folders: {len(runs)}; data sets: "
             f"{', '.join(sorted({r.dataset for r in runs}))}", "",
             "Numbers are test metrics under the MLRC protocol (mean ± std over reproductions). "
             "Glyph runs (quickstart, the embedded profile) are smoke tests of the protocol, "
             "not comparable with real-data results. Published numbers appear only for the real "
             f"data sets ({', '.join(REAL_DATASETS)}), labelled *{PAPER_LABEL}*.", "",
             "## Files", "", "| file | content |", "|---|---|"]
    for path, what in files:
        lines.append(f"| [{path.relative_to(out)}]({path.relative_to(out)}) | {what} |")
    lines += ["", "## Source runs", "",
              "| method | data set | loss | folder | reproductions | trials | git commit(s) | "
              "hardware | invoked (UTC) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append("| " + " | ".join([
            _md_escape(r.label), r.dataset, _md_escape(r.loss), f"`{r.path}`",
            str(r.reproductions), _fmt_int(r.trials_counted), _commits(r), _hardware(r),
            _times(r)]) + " |")
    lines += ["", "## Tables", ""] + markdown_tables
    lines += ["", "Significance tests: see [significance.md](significance.md).", ""]
    if notes:
        lines += ["## Notes and warnings", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run folders (or folders to scan); default: every run folder under "
                        f"{RESULTS_DIR}")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="tables and tests only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args.run_dirs or None, args.out or DEFAULT_OUT,
                              plots=not args.no_plots)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"report of {len(report.runs)} run(s) written to {report.out} "
          f"(index: {report.out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
