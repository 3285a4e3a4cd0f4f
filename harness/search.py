"""Hyperparameter search on the validation folds only (Optuna).

Objective = suggest, train, report, prune (Optuna's examples):
  * suggest: the loss registry's search space, `train.loss_lr` for losses with parameters, and
    the study's own `search.space` additions, applied to a copy of the config through the same
    type-checked `set_value` as `--set`;
  * train: the full 4-fold CV; each fold's best validation MAP@R is reported as an intermediate
    value (step = fold index), so a pruner can stop a bad trial after its first fold(s);
  * value: the mean over folds of the best validation MAP@R; per-fold values and their standard
    error are stored on the trial (user attrs).

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
from pathlib import Path
from typing import Any

import warnings

import numpy as np
import optuna
from optuna.storages import RDBStorage
# Optuna renamed RetryFailedTrialCallback (deprecated since 4.9, removed in 6.0); same behaviour.
from optuna.storages import RetryHeartbeatStaleTrialCallback as RetryStaleTrial
from optuna.trial import TrialState

from harness.config import StudyConfig, set_value
from harness.data import PreparedData
from harness.errors import ConfigError
from harness.progress import bar
from harness.train import train_fold
from losses.registry import SearchParam, get_loss_spec

# Heartbeats and the retry callback are marked experimental; they are what makes runs resumable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

HEARTBEAT_SECONDS = 30  # a worker's trial is declared stale after GRACE without a heartbeat
GRACE_SECONDS = 120
MAX_RETRIES = 3  # a trial killed this often is given up (it probably crashes the process)
LOSS_LR_SPACE = SearchParam(kind="float", low=1e-6, high=1.0, log=True)  # MLRC proxy lr range
COUNTED = (TrialState.COMPLETE, TrialState.PRUNED)


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
def default_storage(output: Path) -> str:
    return f"sqlite:///{(output / 'study.db').resolve()}"


def open_storage(url: str) -> RDBStorage:
    try:
        return RDBStorage(url, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                          heartbeat_stale_trial_callback=RetryStaleTrial(
                              max_retry=MAX_RETRIES, inherit_intermediate_values=True),
                          engine_kwargs=_engine_kwargs(url))
    except Exception as e:  # SQLAlchemy raises many types; the user needs the URL and the reason
        raise ConfigError(f"--storage {url!r}: cannot open the Optuna storage: {e}") from None


def _engine_kwargs(url: str) -> dict:
    if url.startswith("sqlite"):
        # Several workers on one SQLite file: wait for the lock instead of failing at once.
        return {"connect_args": {"timeout": 60}}
    return {"pool_pre_ping": True}


def make_sampler(cfg: StudyConfig) -> optuna.samplers.BaseSampler:
    if cfg.search.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.search.n_startup_trials,
                                      constant_liar=True)


def make_pruner(cfg: StudyConfig) -> optuna.pruners.BasePruner:
    s = cfg.search
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=min(5, s.trials),
                                           n_warmup_steps=s.prune_warmup_folds)
    if s.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=s.folds)
    return optuna.pruners.NopPruner()


def open_study(cfg: StudyConfig, storage_url: str) -> optuna.Study:
    storage = open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize",
                                sampler=make_sampler(cfg), pruner=make_pruner(cfg),
                                load_if_exists=True)
    return study


def fail_dead_local_trials(study: optuna.Study) -> list[int]:
    """Fail RUNNING trials whose worker ran on this host and is no longer alive.

    The heartbeat finds stale trials from any machine, but only after the grace period; a user
    who kills a run and restarts it at once should not wait for that. Returns the trial numbers
    failed (each is then retried by the storage's retry callback).
    """
    failed = []
    host = socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") != host or _pid_alive(t.user_attrs.get("pid", -1)):
            continue
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        RetryStaleTrial(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(
            study, study._storage.get_trial(t._trial_id))
        failed.append(t.number)
    return failed


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def counted_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=COUNTED))


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def fold_seed(cfg: StudyConfig, trial_number: int, fold: int) -> int:
    return hash_seed(cfg.seed, 1, trial_number, fold)


def hash_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _original_trial(study: optuna.Study, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    number = RetryStaleTrial.retried_trial_number(
        study._storage.get_trial(trial._trial_id))
    if number is None:
        return None
    return study.get_trials(deepcopy=False)[number]


def make_objective(cfg: StudyConfig, data: PreparedData, output: Path, device, space):
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
        fold_values = []
        for fold in data.split.folds[: cfg.search.folds]:
            key = str(fold.index)
            if key not in done:
                def report(step: int, value: float) -> None:  # noqa: ARG001 (step: validation no.)
                    pass  # within-fold pruning is not used: folds differ in difficulty

                result = train_fold(trial_cfg, data, fold, device,
                                    seed=fold_seed(cfg, seed_number, fold.index),
                                    run_dir=run_dir / f"fold_{fold.index}", report=report,
                                    desc=f"trial {trial.number} fold {fold.index}")
                done[key] = {"map_at_r": result.best_map_at_r, "best_epoch": result.best_epoch,
                             "epochs": result.epochs_trained, "stop": result.stop_reason,
                             "metrics": result.best_metrics}
                (run_dir / f"fold_{fold.index}" / "history.json").write_text(
                    json.dumps(result.history, indent=1))
                trial.set_user_attr("fold_results", done)
            fold_values.append(done[key]["map_at_r"])
            trial.report(statistics.fmean(fold_values), step=len(fold_values) - 1)
            if trial.should_prune():
                raise optuna.TrialPruned()
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
    study = open_study(cfg, storage_url)
    fail_dead_local_trials(study)
    objective = make_objective(cfg, data, output, device, space)

    def guarded(trial: optuna.Trial) -> float:
        if _over_budget(study, trial, cfg.search.trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial()
        return objective(trial)

    progress = bar(total=cfg.search.trials, initial=counted_trials(study), desc="search",
                   unit="trial", leave=True)
    while True:
        optuna.storages.fail_stale_trials(study)
        counted = counted_trials(study)
        progress.n = counted
        progress.refresh()
        if counted >= cfg.search.trials:
            break
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        if counted + running >= cfg.search.trials:
            time.sleep(HEARTBEAT_SECONDS / 3)  # other workers hold the rest of the budget
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
