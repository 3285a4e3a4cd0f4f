"""Turn finished run folders into tables, significance tests and plots.

    python -m harness.report                       # every run folder under runs/
    python -m harness.report results/quickstart results/embedded --out /tmp/report

A run folder is one that holds `final/test_metrics.csv` (written by `harness.run`). Named folders
that are not run folders themselves are scanned recursively, as `runs/` is by default; in a
scan, a run folder without `final/test_metrics.csv` (an unfinished run) is skipped with a
warning, while naming such a folder explicitly is an error.

What is written to --out (default runs/report/), all listed in its README.md:
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

Modules: `runs` (finding and reading run folders, checked), `tables` (the table of a data set:
CSV, markdown, LaTeX), `significance` (Welch's t-tests, Holm-corrected), `plots`, `build`
(build_report and the output folder's manifest), `cli` (python -m harness.report).
"""

from harness.report.build import MANIFEST, Report, build_report
from harness.report.cli import main
from harness.report.runs import ReportError, find_run_dirs, load_run, load_runs
from harness.report.significance import NEEDS_TWO, holm, significance
from harness.report.tables import dataset_table, table_latex, table_markdown

__all__ = ["MANIFEST", "NEEDS_TWO", "Report", "ReportError", "build_report", "dataset_table",
           "find_run_dirs", "holm", "load_run", "load_runs", "main", "significance",
           "table_latex", "table_markdown"]
