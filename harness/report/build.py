"""build_report: every table, test and plot of the run folders, written to --out with an index
(README.md). The output folder may be shared: only files this module wrote (listed in
--out/.report-manifest.json) are ever replaced or removed."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.paper_numbers import PAPER_LABEL, REAL_DATASETS
from harness.report.plots import plot_bars, plot_optuna, plot_training_curves
from harness.report.runs import (RUNS_DIR, ReportError, Run, find_run_dirs, is_run,
                                 load_runs, slugify)
from harness.report.significance import significance, significance_markdown
from harness.report.tables import (dataset_table, fmt_int, md_escape, table_latex,
                                   table_markdown)


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
                 runs_dir: Path = RUNS_DIR, command: str | None = None,
                 plots: bool = True) -> Report:
    out = Path(out) if out is not None else runs_dir / "report"
    found, notes = find_run_dirs(run_dirs, runs_dir=runs_dir, exclude=out)
    strict = {Path(p).resolve() for p in (run_dirs or []) if is_run(Path(p))}
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
        stem = out / f"table_{slugify(dataset)}"
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
                                   plot_dir / f"bars_{slugify(dataset)}"):
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
        names += [f"table_{slugify(dataset)}.{ext}" for ext in ("md", "csv", "tex")]
    if plots:
        stems = [f"bars_{slugify(d)}" for d in datasets]
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
            md_escape(r.label), r.dataset, md_escape(r.loss), f"`{r.path}`",
            str(r.reproductions), fmt_int(r.trials_counted), _commits(r), _hardware(r),
            _times(r)]) + " |")
    lines += ["", "## Tables", ""] + markdown_tables
    lines += ["", "Significance tests: see [significance.md](significance.md).", ""]
    if notes:
        lines += ["## Notes and warnings", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)

