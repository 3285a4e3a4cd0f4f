"""The results table of one data set: numbers (CSV), markdown and LaTeX (pandas' Styler)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harness.aggregate import METRICS, MODES
from harness.paper_numbers import PAPER_LABEL, paper_results
from harness.report.runs import Run

TABLE_METRICS = ("precision_at_1", "r_precision", "map_at_r")
LABELS = {"precision_at_1": "P@1", "recall_at_1": "R@1", "recall_at_2": "R@2",
          "recall_at_4": "R@4", "recall_at_8": "R@8", "r_precision": "R-Precision",
          "map_at_r": "MAP@R"}
MODE_LABELS = {"separated": "sep.", "concatenated": "concat."}


def col(mode: str, metric: str, stat: str) -> str:
    return f"{mode}_{metric}_{stat}"


def mean_std(values: np.ndarray) -> tuple[float, float]:
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
                row[col(mode, metric, "mean")], row[col(mode, metric, "std")] = mean_std(
                    r.values(mode, metric))
        rows.append(row)
    rows += _untrained_rows(runs, dataset)
    name = runs[0].dataset_name if runs else dataset  # a table of one data set's variant
    for paper in paper_results(name, {r.loss for r in runs}):
        row = {"dataset": dataset, "group": PAPER_LABEL, "method": paper.method,
               "loss": ", ".join(paper.losses), "source": paper.source,
               "protocol": paper.protocol}
        for metric, value in paper.metrics.items():
            # Published single-model numbers; MLRC sets them beside its concatenated model.
            row[col("concatenated", metric, "mean")] = value / 100.0
            if metric in paper.std:
                row[col("concatenated", metric, "std")] = paper.std[metric] / 100.0
        rows.append(row)
    table = pd.DataFrame(rows)
    for mode in MODES:
        for metric in METRICS:
            for stat in ("mean", "std"):
                if col(mode, metric, stat) not in table:
                    table[col(mode, metric, stat)] = math.nan
            means = table[col(mode, metric, "mean")].astype(float)
            method_means = means[table["group"] == "harness"]
            # Marked only when there is something to compare (two methods with a value).
            best = method_means.max() if method_means.notna().sum() >= 2 else math.nan
            table[col(mode, metric, "best")] = ((table["group"] == "harness") & (means == best))
    for c in ("source", "protocol"):
        if c not in table:
            table[c] = ""
    meta = ["dataset", "group", "method", "study", "loss", "run_dir", "reproductions", "trials",
            "trials_complete", "trials_budget", "max_iterations_per_fold", "mean_best_iteration"]
    for c in meta:
        if c not in table:
            table[c] = math.nan
    values = [col(mode, metric, stat) for mode in MODES for metric in METRICS
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
                row[col(mode, metric, "mean")] = float(u[metric]) if metric in u else math.nan
        rows.append(row)
    return rows


def fmt_value(mean, std, pct: bool = True, pm: str = " ± ") -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    scale = 100.0 if pct else 1.0
    text = f"{scale * mean:.2f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f"{pm}{scale * std:.2f}"
    return text


def fmt_int(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return str(int(value))


HEADER = (["Method", "Loss", "Reps", "Trials", "Iters/fold"] +
          [f"{LABELS[m]} ({MODE_LABELS[mode]})" for mode in MODES for m in TABLE_METRICS])


@dataclass
class DisplayRow:
    """One printed row: its cells (unescaped), which cells hold the best value, and whether it
    opens the untrained rows or the published-number rows (a rule or a separator before it)."""

    cells: list[str]
    best: list[bool]
    first_of: str = ""  # "untrained" | PAPER_LABEL | ""


def display_rows(table: pd.DataFrame, pm: str) -> list[DisplayRow]:
    """The printed table's rows: the columns of HEADER, values in % with `pm` before the std."""
    out: list[DisplayRow] = []
    seen: set[str] = set()
    for _, row in table.iterrows():
        group = row["group"]
        first_of = group if group in ("untrained", PAPER_LABEL) and group not in seen else ""
        seen.add(group)
        loss = row.get("loss")
        cells = [str(row["method"]), loss if isinstance(loss, str) else "",
                 fmt_int(row.get("reproductions")) if group != PAPER_LABEL else "–",
                 fmt_int(row.get("trials")), fmt_int(row.get("max_iterations_per_fold"))]
        best = [False] * len(cells)
        for mode in MODES:
            for metric in TABLE_METRICS:
                cells.append(fmt_value(row[col(mode, metric, "mean")],
                                       row[col(mode, metric, "std")], pm=pm))
                best.append(bool(row[col(mode, metric, "best")]))
        out.append(DisplayRow(cells, best, first_of))
    return out


def table_markdown(table: pd.DataFrame, dataset: str) -> str:
    lines = [f"### {dataset}", "",
             "Test metrics in %, mean ± std over reproductions (MLRC protocol). "
             "sep. = each fold model alone, averaged over the folds per reproduction; "
             "concat. = the fold models' embeddings joined. Best harness value per column in "
             "bold. Reps = complete reproductions; Trials = search trials completed or pruned; "
             "Iters/fold = maximum training iterations per fold.", "",
             "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    for r in display_rows(table, " ± "):
        if r.first_of == PAPER_LABEL:
            lines.append(f"| ***{PAPER_LABEL}*** |" + " |" * (len(HEADER) - 1))
        cells = [md_escape(c) for c in r.cells[:2]] + r.cells[2:]
        lines.append("| " + " | ".join(f"**{c}**" if best else c
                                       for c, best in zip(cells, r.best)) + " |")
    papers = table[table["group"] == PAPER_LABEL]
    if len(papers):
        lines += ["", f"Rows under *{PAPER_LABEL}*: published numbers (R@1 = P@1), each under "
                      f"its authors' own protocol, shown under the concatenated columns as MLRC "
                      f"does; they cannot be compared with the rows above."]
        for _, row in papers.iterrows():
            lines.append(f"- {row['method']}: {row['source']}; {row['protocol']}.")
    return "\n".join(lines) + "\n"


def md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("_", "\\_")


# What pandas' LaTeX escaping leaves alone but LaTeX without extra packages cannot typeset.
_TEX_SYMBOLS = {"±": r"$\pm$", "–": "--", "≥": r"$\geq$"}


def _tex_symbols(text: str) -> str:
    return "".join(_TEX_SYMBOLS.get(c, c) for c in text)


def table_latex(table: pd.DataFrame, dataset: str) -> str:
    """A booktabs tabular from pandas' Styler.to_latex: method and loss names escaped, the best
    value of a column in bold, a rule before the untrained rows and a labelled separator
    before the published numbers."""
    rows = display_rows(table, r" $\pm$ ")
    cells = pd.DataFrame([r.cells for r in rows], columns=HEADER)
    best = pd.DataFrame([r.best for r in rows], columns=HEADER)
    styler = cells.style.hide(axis="index")
    styler = styler.format(_tex_symbols, escape="latex", subset=HEADER[:2])
    styler = styler.format(_tex_symbols, subset=HEADER[2:])
    styler = styler.format_index(_tex_symbols, escape="latex", axis=1)
    # "textbf: --rwrap" is the Styler's CSS-like spelling of \textbf{cell}.
    styler = styler.apply(lambda _: best.replace({True: "textbf: --rwrap;", False: ""}),
                          axis=None)
    tabular = styler.to_latex(column_format="ll" + "r" * (len(HEADER) - 2), hrules=True)
    return (f"% {dataset}: test metrics in %, mean $\\pm$ std over reproductions; needs "
            f"\\usepackage{{booktabs}}\n" + _insert_group_rules(tabular, rows))


def _insert_group_rules(tabular: str, rows: list[DisplayRow]) -> str:
    """Styler writes one line per row after the header's \\midrule; add a \\midrule before the
    first untrained row and a labelled separator before the first published-number row."""
    lines = tabular.splitlines()
    body = lines.index(r"\midrule") + 1
    paper = rf"\multicolumn{{{len(HEADER)}}}{{l}}{{\textit{{{_tex_symbols(PAPER_LABEL)}}}}} \\"
    for i in reversed(range(len(rows))):  # from the end, so earlier positions stay valid
        if rows[i].first_of == "untrained":
            lines.insert(body + i, r"\midrule")
        elif rows[i].first_of == PAPER_LABEL:
            lines[body + i:body + i] = [r"\midrule", paper, r"\midrule"]
    return "\n".join(lines) + "\n"
