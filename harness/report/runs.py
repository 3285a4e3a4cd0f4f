"""Finding the run folders to report and reading them, checked: config.json,
final/test_metrics.csv (per reproduction through harness.aggregate, the final step's own
aggregation), untrained metrics, search summary and provenance. Damaged input is a ReportError
naming the file and line, never a NaN in a table."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness import aggregate
from harness.aggregate import METRICS, MODES
from harness.config import RUNS_DIR  # where harness.run writes by default
from harness.errors import HarnessError
from harness.splits import recorded_data_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = RUNS_DIR / "report"


class ReportError(HarnessError):
    """No run folder to report, or a named folder is not a finished run."""


def is_run(path: Path) -> bool:
    return (path / "final" / "test_metrics.csv").is_file()


def _scan(root: Path, exclude: Path | None) -> tuple[list[Path], list[str]]:
    """Run folders under `root` (not descending into them), and warnings for unfinished ones."""
    found, notes = [], []
    for dirpath, dirnames, _ in os.walk(root):
        here = Path(dirpath)
        if exclude is not None and here.resolve() == exclude:
            dirnames[:] = []
            continue
        if is_run(here):
            found.append(here)
            dirnames[:] = []
        elif (here / "config.json").is_file():
            notes.append(f"skipped {here}: no final/test_metrics.csv (the run has not reached "
                         f"its final step)")
            dirnames[:] = []
        else:
            dirnames.sort()
    return found, notes


def find_run_dirs(paths: list[str | Path] | None = None, runs_dir: Path = RUNS_DIR,
                  exclude: Path | None = None) -> tuple[list[Path], list[str]]:
    """The run folders to report and the warnings of the scan.

    No `paths`: every run folder under `runs_dir`, recursively. Otherwise each path is a run
    folder (it must hold final/test_metrics.csv) or a folder scanned recursively.
    """
    exclude = exclude.resolve() if exclude is not None else None
    found: list[Path] = []
    notes: list[str] = []
    if not paths:
        if not runs_dir.is_dir():
            raise ReportError(f"no run folders found: {runs_dir} does not exist. Run a study "
                              f"first (python -m harness.run --study quickstart) or name run "
                              f"folders: python -m harness.report RUN_DIR ...")
        found, notes = _scan(runs_dir, exclude)
        if not found:
            raise ReportError(f"no run folders found under {runs_dir} (a run folder holds "
                              f"final/test_metrics.csv, written when a run reaches its final "
                              f"step)" + (f"; {len(notes)} unfinished run(s) skipped"
                                          if notes else ""))
    else:
        for p in map(Path, paths):
            if not p.is_dir():
                raise ReportError(f"{p}: no such folder")
            if is_run(p):
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
    data_fingerprint: str | None = None  # split_manifest.json's (None: not recorded)
    data_variant: str = ""  # set when runs of one data set ran on different data

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
    def dataset_name(self) -> str:
        return str(self.config.get("data", {}).get("dataset", "unknown"))

    @property
    def dataset(self) -> str:
        """What the report tables the run under: the data set's name, plus which data when runs
        of that name ran on different data (`separate_unlike_data`)."""
        suffix = f" [data {self.data_variant}]" if self.data_variant else ""
        return self.dataset_name + suffix

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
              provenance=prov if isinstance(prov, list) else [prov], notes=notes,
              data_fingerprint=recorded_data_fingerprint(path / "split_manifest.json"))
    if untrained_note:
        run.notes.append(untrained_note)
    return run


def separate_unlike_data(runs: list[Run]) -> list[str]:
    """Runs of one data set that ran on different data (another version, a subset, other
    glyph pixels: their split manifests' fingerprints differ) get their own table: one table
    of both would rank runs that were not tested on the same images. Returns the notes that
    say so. A run without a recorded fingerprint is tabled with the others when they all agree
    (with a note), or on its own when they do not."""
    notes = []
    for name in sorted({r.dataset_name for r in runs}):
        group = [r for r in runs if r.dataset_name == name]
        known = sorted({r.data_fingerprint for r in group if r.data_fingerprint})
        unknown = [f"{r.study} ({r.path})" for r in group if not r.data_fingerprint]
        if len(known) > 1:
            for r in group:
                r.data_variant = r.data_fingerprint[:8] if r.data_fingerprint else "unrecorded"
            notes.append(f"the runs of {name} ran on {len(known)} different data sets (their "
                         f"split_manifest.json fingerprints differ: another version of the data, "
                         f"a subset, other pixels): each is tabled on its own as "
                         f"'{name} [data <fingerprint>]'"
                         + (f", runs with none recorded as '{name} [data unrecorded]'"
                            if unknown else ""))
        elif known and unknown:
            notes.append(f"{', '.join(unknown)}: no data fingerprint recorded (an older harness);"
                         f" tabled with the other runs of {name} as if on the same data")
    return notes


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
    notes += separate_unlike_data(runs)  # before the labels: they are unique per table
    _assign_labels(runs)
    return runs, notes


def slugify(text: str) -> str:
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
        base = slugify(f"{r.dataset}_{r.label}")
        slug, i = base, 2
        while slug in used:
            slug, i = f"{base}_{i}", i + 1
        used.add(slug)
        r.slug = slug


def _short_path(path: Path) -> str:
    for root in (RUNS_DIR, REPO_ROOT):  # runs/NAME -> NAME, results/NAME -> results/NAME
        try:
            return str(path.resolve().relative_to(root.resolve()))
        except ValueError:
            continue
    return str(path)

