"""Plots: per data set MAP@R and P@1 bars; per run the validation curves of the final folds
and Optuna's optimisation history and parameter importances. PNG and PDF."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from harness.aggregate import MODES
from harness.report.runs import ReportError, Run
from harness.report.tables import LABELS, col


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
            means = 100 * methods[col(mode, metric, "mean")].astype(float).to_numpy()
            stds = 100 * methods[col(mode, metric, "std")].astype(float).fillna(0).to_numpy()
            ax.bar(x + (i - 0.5) * width, means, width, yerr=stds, capsize=3, label=mode)
        for j, (_, u) in enumerate(untrained.iterrows()):
            ax.axhline(100 * float(u[col("separated", metric, "mean")]), color="grey",
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

