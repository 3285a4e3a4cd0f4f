"""Hyperparameter search on the validation folds only (Optuna).

Objective = suggest, train, report, prune (Optuna's examples):
  * suggest: the loss registry's search space, `train.loss_lr` for losses with parameters, and
    the study's own `search.space` additions, applied to a copy of the config through the same
    type-checked `set_value` as `--set`;
  * train: the full 4-fold CV; after each fold the mean of the folds' best validation MAP@R so
    far is reported as an intermediate value, so a pruner can stop a bad trial after its first
    fold(s). The step is the nominal training-iteration count of the trial (fold k ends at step
    (k+1) x max_epochs x iters_per_epoch), so every trial reports at the same steps and Hyperband
    sees training iterations as its resource. With `search.prune_warmup_folds = 0` every
    validation point inside a fold is reported too (the mean of the finished folds and the
    current fold's best so far), so a pruner may stop a trial inside its first fold;
  * value: the mean over folds of the best validation MAP@R; per-fold values and their standard
    error are stored on the trial (user attrs).

Several workers (processes, machines) may share one storage: the study is created under a file
lock (SQLite) and with retries (any RDB: concurrent table creation fails for all but one), and
the trial budget is kept exact (`_over_budget`). See harness/workers.py.

Resuming: storage is an Optuna RDB (SQLite file in the output folder by default), so re-running
the same command continues the study. Finished trials are kept. A trial left RUNNING by a killed
process is failed and retried with the same parameters (Optuna's heartbeat retry callback); the
folds it had finished are stored on it and are not trained again. Trials count toward the budget
only when COMPLETE or PRUNED, so nothing is counted twice.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from harness.config import StudyConfig, set_value
from harness.data import PreparedData, dataset_defaults
from harness.errors import ConfigError
from harness.progress import bar
from harness.seeds import trial_fold_seed
from harness.storage import (COUNTED, RetryStaleTrial, open_storage_unlocked, retrying, counted_trials,
                             creation_lock, default_storage, fail_dead_local_trials,
                             heartbeat_seconds)
from harness.train import train_fold
from losses.registry import SearchParam, get_loss_spec

# Heartbeats and the retry callback are marked experimental; they are what makes runs resumable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

WAIT_SECONDS = 2.0  # how often an idle worker looks at the study (finished? a trial to retry?)
LOSS_LR_SPACE = SearchParam(kind="float", low=1e-6, high=1.0, log=True)  # MLRC proxy lr range


# --------------------------------------------------------------------------------------------
# Search space
# --------------------------------------------------------------------------------------------
def _as_search_param(key: str, value: Any) -> SearchParam:
    if isinstance(value, SearchParam):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"search.space.{key}: expected a table like "
                          f"{{low = 0.01, high = 100, log = true}} or {{choices = [...]}}")
    value = dict(value)
    kind = value.pop("kind", "categorical" if "choices" in value else
                     ("int" if isinstance(value.get("low"), int) and
                      isinstance(value.get("high"), int) and not value.get("float") else "float"))
    value.pop("float", None)
    allowed = {"low", "high", "log", "choices"}
    unknown = set(value) - allowed
    if unknown:
        raise ConfigError(f"search.space.{key}: unknown fields {sorted(unknown)}; "
                          f"allowed: kind, {', '.join(sorted(allowed))}")
    if "choices" in value:
        value["choices"] = tuple(value["choices"])
    param = SearchParam(kind=kind, **value)
    if param.kind in ("float", "int") and (param.low is None or param.high is None
                                           or param.low > param.high):
        raise ConfigError(f"search.space.{key}: needs low <= high, got {value}")
    return param


def search_space(cfg: StudyConfig) -> dict[str, SearchParam]:
    """Every searched key (dotted config path) and its range."""
    spec = get_loss_spec(cfg.loss.name)
    space: dict[str, SearchParam] = {f"loss.{k}": v for k, v in spec.search_space.items()}
    if spec.has_parameters:
        space["train.loss_lr"] = LOSS_LR_SPACE
    for key, value in cfg.search.space.items():
        if value in ("fixed", None, False):  # `"loss.margin" = "fixed"` removes a dimension
            space.pop(key, None)
        else:
            space[key] = _as_search_param(key, value)
    for key in space:  # fail now, not in trial 37, when a key cannot be set
        set_value(copy.deepcopy(cfg), key, _example_value(space[key]), "search.space")
    return space


def _example_value(p: SearchParam):
    if p.kind == "categorical":
        return p.choices[0]
    return int(p.low) if p.kind == "int" else float(p.low)


def suggest(trial: optuna.Trial, p: SearchParam, name: str):
    if p.kind == "float":
        return trial.suggest_float(name, p.low, p.high, log=p.log)
    if p.kind == "int":
        return trial.suggest_int(name, int(p.low), int(p.high), log=p.log)
    return trial.suggest_categorical(name, list(p.choices))


def config_for_params(cfg: StudyConfig, params: dict[str, Any]) -> StudyConfig:
    trial_cfg = copy.deepcopy(cfg)
    for key, value in params.items():
        set_value(trial_cfg, key, value, "trial parameter")
    return trial_cfg


# --------------------------------------------------------------------------------------------
# Storage and study
# --------------------------------------------------------------------------------------------
def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.search.n_startup_trials,
                                      constant_liar=True)


def fold_steps(cfg: StudyConfig) -> int:
    """Steps (nominal training iterations) of one fold: the unit of intermediate values."""
    return cfg.train.max_epochs * cfg.train.iters_per_epoch


def prune_within_folds(cfg: StudyConfig) -> bool:
    """Report (and prune on) every validation point, not only fold ends."""
    return cfg.search.pruner != "none" and cfg.search.prune_warmup_folds <= 0


def make_pruner(cfg: StudyConfig, val_every_epochs: int = 1) -> optuna.pruners.BasePruner:
    """Median: stop a trial whose running mean is below the median of earlier trials at the same
    step, from `prune_warmup_folds` folds on. Hyperband (multi-fidelity, resource = training
    iterations): rungs from one fold (or, with prune_warmup_folds = 0, from the first validation
    point) up to the whole CV, reduction factor 3."""
    s = cfg.search
    per_fold = fold_steps(cfg)
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, s.trials),
                                           n_warmup_steps=max(0, s.prune_warmup_folds) * per_fold)
    if s.pruner == "hyperband":
        first = min(val_every_epochs, cfg.train.max_epochs) * cfg.train.iters_per_epoch
        min_resource = s.prune_warmup_folds * per_fold if s.prune_warmup_folds > 0 else first
        return optuna.pruners.HyperbandPruner(min_resource=max(1, min_resource),
                                              max_resource=s.folds * per_fold,
                                              reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, storage_url: str, val_every_epochs: int = 1) -> optuna.Study:
    """Create the study, or load it when it exists; safe when many workers do it at once."""
    def make() -> optuna.Study:
        return optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize",
                                   sampler=make_sampler(cfg),
                                   pruner=make_pruner(cfg, val_every_epochs),
                                   load_if_exists=True)

    with creation_lock(storage_url):  # flock is per open file: take it once, not nested
        storage = open_storage_unlocked(storage_url)
        return retrying(make, storage_url)


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def fold_seed(cfg: StudyConfig, trial_number: int, fold: int) -> int:
    return trial_fold_seed(cfg.seed, trial_number, fold)


def _original_trial(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    number = RetryStaleTrial.retried_trial_number(
        study._storage.get_trial(trial._trial_id))
    if number is None:
        return None
    return study.get_trials(deepcopy=False)[number]


def make_objective(cfg: StudyConfig, data: PreparedData, output: Path, device, space):
    per_fold = fold_steps(cfg)
    n_folds = len(data.split.folds[: cfg.search.folds])
    last_step = n_folds * per_fold
    val_every, _ = dataset_defaults(cfg, data.spec)
    within = prune_within_folds(cfg)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: suggest(trial, p, key) for key, p in space.items()}
        trial_cfg = config_for_params(cfg, params)
        original = _original_trial(trial.study, trial)
        # A retried trial keeps the seed and the folds its killed predecessor finished.
        seed_number = original.user_attrs.get("seed_number", original.number) if original else \
            trial.number
        trial.set_user_attr("seed_number", seed_number)
        done = dict(original.user_attrs.get("fold_results", {})) if original else {}
        run_dir = output / "trials" / f"trial_{seed_number:04d}"
        # Steps already reported (a retried trial inherits its predecessor's): Optuna ignores a
        # second report of one step with a warning.
        reported = set(trial.study._storage.get_trial(trial._trial_id).intermediate_values)
        # Training iterations this trial ran ("before": those of its earlier folds).
        spent = {"iterations": 0, "before": 0}

        def report_and_prune(step: int, value: float) -> None:
            if step not in reported:
                trial.report(value, step=step)
                reported.add(step)
            if step < last_step and trial.should_prune():  # at the last step: nothing to save
                trial.set_user_attr("train_iterations", spent["iterations"])
                raise optuna.TrialPruned(f"pruned at step {step} (MAP@R {value:.4f})")

        fold_values: list[float] = []
        for k, fold in enumerate(data.split.folds[: cfg.search.folds]):
            key = str(fold.index)
            if key not in done:
                fold_best = {"value": -math.inf}

                def report(index: int, value: float, k=k, fold_best=fold_best) -> None:
                    # index = validation number in this fold; its epoch follows the schedule.
                    epoch = min((index + 1) * val_every, cfg.train.max_epochs)
                    spent["iterations"] = spent["before"] + epoch * cfg.train.iters_per_epoch
                    fold_best["value"] = max(fold_best["value"], value)
                    if within:
                        report_and_prune(k * per_fold + epoch * cfg.train.iters_per_epoch,
                                         (sum(fold_values) + fold_best["value"]) / (k + 1))

                spent["before"] = spent["iterations"]
                fold_dir = run_dir / f"fold_{fold.index}"
                try:
                    result = train_fold(trial_cfg, data, fold, device,
                                        seed=fold_seed(cfg, seed_number, fold.index),
                                        run_dir=fold_dir, report=report,
                                        desc=f"trial {trial.number} fold {fold.index}")
                except optuna.TrialPruned:
                    (fold_dir / "last.pt").unlink(missing_ok=True)  # never resumed
                    raise
                spent["iterations"] = spent["before"] + \
                    result.epochs_trained * cfg.train.iters_per_epoch
                done[key] = {"map_at_r": result.best_map_at_r, "best_epoch": result.best_epoch,
                             "epochs": result.epochs_trained, "stop": result.stop_reason,
                             "metrics": result.best_metrics}
                (fold_dir / "history.json").write_text(json.dumps(result.history, indent=1))
                trial.set_user_attr("fold_results", done)
                trial.set_user_attr("train_iterations", spent["iterations"])
            fold_values.append(done[key]["map_at_r"])
            report_and_prune((k + 1) * per_fold, statistics.fmean(fold_values))
        mean = statistics.fmean(fold_values)
        sem = statistics.stdev(fold_values) / math.sqrt(len(fold_values)) \
            if len(fold_values) > 1 else 0.0
        trial.set_user_attr("fold_map_at_r", fold_values)
        trial.set_user_attr("map_at_r_sem", sem)
        return mean

    return objective


class SurplusTrial(Exception):
    """Raised when a worker's new trial would exceed the study's trial budget."""


def _over_budget(study: optuna.Study, trial: optuna.Trial, budget: int) -> bool:
    """Trials with a smaller number that are done or still running hold the budget first.

    Optuna numbers trials atomically in the storage, so when two workers start a trial at the
    same moment exactly one of them sees the budget full, and the trial count stays exact.
    """
    ahead = [t for t in study.get_trials(deepcopy=False, states=COUNTED + (TrialState.RUNNING,))
             if t.number < trial.number]
    return len(ahead) >= budget


def run_search(cfg: StudyConfig, data: PreparedData, output: Path, storage_url: str,
               device) -> optuna.Study:
    """Run (or resume) the search until `search.trials` trials are COMPLETE or PRUNED.

    Several processes (workers) may run this on one storage at once; each takes trials until the
    budget is reached, then waits for trials still running in other workers (a dead worker's
    trial is failed by the heartbeat and retried by whoever is still alive).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(cfg)
    study = open_study(cfg, storage_url, dataset_defaults(cfg, data.spec)[0])
    objective = make_objective(cfg, data, output, device, space)

    def guarded(trial: optuna.Trial) -> float:
        if _over_budget(study, trial, cfg.search.trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial()
        return objective(trial)

    progress = bar(total=cfg.search.trials, initial=counted_trials(study), desc="search",
                   unit="trial", leave=True)
    while True:
        # SQLite does not lock a row between reading and failing it: without the file lock two
        # workers could both fail one dead trial and both queue a retry of it.
        with creation_lock(storage_url):
            fail_dead_local_trials(study)  # a worker on this host that died: retry it now
            optuna.storages.fail_stale_trials(study)  # any host: after the grace period
        counted = counted_trials(study)
        progress.n = counted
        progress.refresh()
        if counted >= cfg.search.trials:
            break
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if counted + running >= cfg.search.trials:
            # Other workers hold the rest of the budget: wait, in case one of them dies.
            time.sleep(min(heartbeat_seconds() / 3, WAIT_SECONDS))
            continue
        study.optimize(guarded, n_trials=1, catch=(SurplusTrial,))
    progress.close()
    return study


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ConfigError(f"study {study.study_name!r} has no complete trial to retrain "
                          f"(all pruned or failed); run more trials (--trials)")
    return max(complete, key=lambda t: t.value)


def write_search_summary(study: optuna.Study, path: Path) -> dict:
    best = best_trial(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "params": t.params, "fold_map_at_r": t.user_attrs.get("fold_map_at_r"),
                     "map_at_r_sem": t.user_attrs.get("map_at_r_sem"),
                     "duration_s": t.duration.total_seconds() if t.duration else None})
    summary = {"study": study.study_name, "best_trial": best.number, "best_value": best.value,
               "best_params": best.params, "best_fold_map_at_r": best.user_attrs.get(
                   "fold_map_at_r"), "best_map_at_r_sem": best.user_attrs.get("map_at_r_sem"),
               "trials": rows}
    path.write_text(json.dumps(summary, indent=2))
    return summary
