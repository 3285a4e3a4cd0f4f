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

from harness.config import StudyConfig, get_value, set_value
from harness.data import PreparedData, dataset_defaults
from harness.errors import ConfigError
from harness.gp_warm_start import GPWarmStart
from harness.progress import bar
from harness.seeds import SEARCH_STAGE, hash_seed, trial_fold_seed
from harness.run_folder import claim_fold_dir, fingerprint, write_json_atomic
from harness.storage import (COUNTED, RetryStaleTrial, counted_trials, creation_lock,
                             fail_dead_local_trials, heartbeat_seconds, open_storage_unlocked,
                             retry_callback, retrying)
from harness.train import train_fold
from losses.registry import SearchParam, get_loss_spec

# Heartbeats and the retry callback are marked experimental; they are what makes runs resumable.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

WAIT_SECONDS = 2.0  # how often an idle worker looks at the study (finished? a trial to retry?)
# MLRC: the loss-parameter RMSprop lr is searched log-uniformly in [1e-6, 1]
# (powerful-benchmarker v0.9.33 configs/config_optimizers/with_metric_loss_optimizer_bayes_opt.yaml:
# `lr~LOG_BAYESIAN~: [0.000001, 1]`).
LOSS_LR_SPACE = SearchParam(kind="float", low=1e-6, high=1.0, log=True)
# Ax's default number of Sobol trials before GP-EI: max(5, number of parameters) (ax-platform
# 0.1.13 ax/modelbridge/dispatch_utils.py, choose_generation_strategy; MLRC's setup.py does not
# pin Ax, 0.1.13 is the release of MLRC's v0.9.33 tag date, 2020-09).
AX_MIN_SOBOL_TRIALS = 5
TPE_STARTUP_TRIALS = 10  # Optuna's TPESampler default


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
    """Every searched key (dotted config path) and its range: the loss's space for this data
    set (losses/registry.py), the loss-parameter lr, the study's [search.space] additions, less
    the keys fixed by a value (`search.fixed`, filled by load_study) or marked "fixed"."""
    spec = get_loss_spec(cfg.loss.name)
    space: dict[str, SearchParam] = {f"loss.{k}": v for k, v in
                                     spec.space_for(cfg.data.dataset).items()}
    if spec.has_parameters:
        space["train.loss_lr"] = LOSS_LR_SPACE
    for key, value in cfg.search.space.items():
        if value in ("fixed", None, False):  # `"loss.margin" = "fixed"` removes a dimension
            space.pop(key, None)
        else:
            space[key] = _as_search_param(key, value)
    for key in cfg.search.fixed:  # a value the user gave is used, never searched over
        space.pop(key, None)
    for key in space:  # fail now, not in trial 37, when a key cannot be set
        set_value(copy.deepcopy(cfg), key, _example_value(space[key]), "search.space")
    return space


def _example_value(p: SearchParam):
    if p.kind == "categorical":
        return p.choices[0]
    return int(p.low) if p.kind == "int" else float(p.low)


def distribution(p: SearchParam) -> optuna.distributions.BaseDistribution:
    if p.kind == "float":
        return optuna.distributions.FloatDistribution(p.low, p.high, log=p.log)
    if p.kind == "int":
        return optuna.distributions.IntDistribution(int(p.low), int(p.high), log=p.log)
    return optuna.distributions.CategoricalDistribution(list(p.choices))


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
def startup_trials(cfg: StudyConfig, n_dims: int) -> int:
    """Quasi-random (gp) or random (tpe) trials before the model: search.n_startup_trials, or
    with -1 Ax's rule for gp and Optuna's default for tpe."""
    if cfg.search.n_startup_trials >= 0:
        return cfg.search.n_startup_trials
    if cfg.search.sampler == "gp":
        return max(AX_MIN_SOBOL_TRIALS, n_dims)
    return TPE_STARTUP_TRIALS


def make_sampler(cfg: StudyConfig, space: dict[str, SearchParam]) -> optuna.samplers.BaseSampler:
    """MLRC's search (default, "gp"): Ax's AxClient default generation strategy, Sobol trials
    then GP-EI (powerful-benchmarker v0.9.33 runners/bayes_opt_runner.py `AxClient()`), here as
    Optuna's scrambled-Sobol QMCSampler for the first trials, then Optuna's GPSampler (a GP with
    log-EI). "tpe" and "random" are faster opt-ins. Every trial's random draws are seeded from
    (seed, trial number): reproducible, and parallel workers never draw the same point."""
    n_startup = startup_trials(cfg, len(space))
    if cfg.search.sampler == "random":
        return TrialSeededSampler(optuna.samplers.RandomSampler(seed=cfg.seed), cfg.seed)
    if cfg.search.sampler == "tpe":
        return TrialSeededSampler(optuna.samplers.TPESampler(
            seed=cfg.seed, n_startup_trials=n_startup, constant_liar=True), cfg.seed)
    return SobolThenGPSampler(cfg.seed, n_startup, {k: distribution(p) for k, p in space.items()})


class TrialSeededSampler(optuna.samplers.BaseSampler):
    """Wraps a sampler so that the random draws of the search's N-th new trial (its
    `search_ordinal`) come from a RandomState seeded with (seed, N). Optuna seeds a sampler once
    per process: every worker process (and every rerun after an interrupt) would otherwise start
    from the same state and draw the same configurations. Optuna has no public per-trial
    seeding, so this reseeds the wrapped samplers' `_rng` (LazyRandomState);
    tests/test_protocol_faults.py and tests/test_search_resume.py pin that it works."""

    def __init__(self, inner: optuna.samplers.BaseSampler, seed: int):
        self.inner = inner
        self.seed = seed
        self.ordinals: dict[int, int] = {}  # trial number -> search_ordinal

    def ordinal(self, trial) -> int:
        return self.ordinals.get(trial.number, trial.number)

    def before_trial(self, study, trial) -> None:
        self.ordinals[trial.number] = ordinal = search_ordinal(study, trial.number)
        _reseed(self.inner, hash_seed(self.seed, SEARCH_STAGE, 7, ordinal))
        self.inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self.inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:  # Optuna calls this in n_jobs > 1 threads; seeds stay ours
        pass


class SobolThenGPSampler(TrialSeededSampler):
    """The first `n_startup` new trials (search_ordinal) take the next point of one scrambled
    Sobol sequence (QMCSampler, seeded with the study seed so that every worker walks the same
    sequence; Optuna hands out its indices through the storage), later ones the GP's proposal.
    GPSampler alone would draw its start uniformly at random, not from a Sobol sequence."""

    def __init__(self, seed: int, n_startup: int, distributions: dict):
        gp = optuna.samplers.GPSampler(seed=seed, n_startup_trials=n_startup,
                                       deterministic_objective=False)
        super().__init__(gp, seed)
        self.sobol = optuna.samplers.QMCSampler(qmc_type="sobol", scramble=True, seed=seed,
                                                warn_independent_sampling=False)
        self.n_startup = n_startup
        # QMCSampler learns the space from a finished trial, so its trial 0 would be random;
        # the harness knows the space up front.
        self.distributions = distributions
        # The GP's warm start from the study's storage: a resumed search continues exactly.
        self.warm_start = GPWarmStart(gp)

    def infer_relative_search_space(self, study, trial):
        if self.ordinal(trial) < self.n_startup:
            return dict(self.distributions)
        return self.inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        if self.ordinal(trial) < self.n_startup:
            with warnings.catch_warnings():  # scipy: Sobol balance needs 2^k points (Ax: same)
                warnings.simplefilter("ignore", UserWarning)
                return self.sobol.sample_relative(study, trial, search_space)
        self.warm_start.before_fit(study, trial, search_space)
        params = self.inner.sample_relative(study, trial, search_space)
        self.warm_start.after_fit(proposed=bool(params))
        return params


def _reseed(sampler, seed: int) -> None:
    """Seed `sampler` and the samplers it holds (TPE's random sampler, GP's independent one)."""
    rng = getattr(sampler, "_rng", None)
    if rng is not None and hasattr(rng, "rng"):
        rng.rng.seed(seed)
    for name in ("_random_sampler", "_independent_sampler"):
        inner = getattr(sampler, name, None)
        if inner is not None:
            _reseed(inner, hash_seed(seed, 1))


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
    space = search_space(cfg)
    def make() -> optuna.Study:
        return optuna.create_study(storage=storage, study_name=cfg.name, direction="maximize",
                                   sampler=make_sampler(cfg, space),
                                   pruner=make_pruner(cfg, val_every_epochs),
                                   load_if_exists=True)

    with creation_lock(storage_url):  # flock is per open file: take it once, not nested
        storage = open_storage_unlocked(storage_url)
        return retrying(make, storage_url)


# --------------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------------
def search_ordinal(study: optuna.Study, number: int) -> int:
    """The place of new trial `number` in the search: how many new trials (not retries of an
    interrupted one) the study holds before it. Its sampler draws, its phase (Sobol or GP) and
    its fold seeds follow it, not Optuna's trial number: a retry takes the next number, so after
    an interrupt the numbers of later trials move on by one, while their ordinals (and so their
    configurations and results) stay those of the uninterrupted search. In a search never
    interrupted the two are equal. Never below 1 + a seed number already used, so that folders
    of older harness versions (which used the number) keep their trial folders apart."""
    earlier = [t for t in study.get_trials(deepcopy=False) if t.number < number]
    new = [t for t in earlier if RetryStaleTrial.retried_trial_number(t) is None]
    used = [t.user_attrs["seed_number"] for t in earlier if "seed_number" in t.user_attrs]
    return max(len(new), 1 + max(used, default=-1))


def trial_ordinal(trial: optuna.Trial) -> int:
    """The trial's search_ordinal as its sampler took it in `before_trial` (same process), so
    that the sampler's draws and the trial's seeds and folder follow one count by construction,
    and the study's trials are read once per trial, not twice; computed here for a sampler that
    is not one of ours."""
    sampler = trial.study.sampler
    if isinstance(sampler, TrialSeededSampler) and trial.number in sampler.ordinals:
        return sampler.ordinals[trial.number]
    return search_ordinal(trial.study, trial.number)


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
    within = prune_within_folds(cfg)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {key: suggest(trial, p, key) for key, p in space.items()}
        trial_cfg = config_for_params(cfg, params)
        original = _original_trial(trial.study, trial)
        # A retried trial keeps the seed and the folds its killed predecessor finished.
        seed_number = original.user_attrs.get("seed_number", original.number) if original else \
            trial_ordinal(trial)
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

                def report(iteration: int, value: float, k=k, fold_best=fold_best) -> None:
                    spent["iterations"] = spent["before"] + iteration
                    fold_best["value"] = max(fold_best["value"], value)
                    if within:
                        report_and_prune(k * per_fold + iteration,
                                         (sum(fold_values) + fold_best["value"]) / (k + 1))

                spent["before"] = spent["iterations"]
                fold_dir = run_dir / f"fold_{fold.index}"
                seed = fold_seed(cfg, seed_number, fold.index)
                claim_fold_dir(fold_dir, fingerprint(trial_cfg, seed), cfg.name)
                result = train_fold(trial_cfg, data, fold, device, seed=seed, run_dir=fold_dir,
                                    report=report, desc=f"trial {trial.number} fold {fold.index}")
                spent["iterations"] = spent["before"] + \
                    result.epochs_trained * cfg.train.iters_per_epoch
                done[key] = {"map_at_r": result.best_map_at_r, "best_epoch": result.best_epoch,
                             "epochs": result.epochs_trained, "stop": result.stop_reason,
                             "metrics": result.best_metrics}
                trial.set_user_attr("fold_results", done)
                trial.set_user_attr("train_iterations", spent["iterations"])
            if done[key]["stop"] == "diverged":
                # MLRC scores a trial whose loss became NaN 0 and stops it (powerful-benchmarker
                # v0.9.33 api_parsers/base_api_parser.py run_train_or_eval: "NaN" -> mean 0).
                # It is never chosen as best while a finite trial exists (best_trial).
                trial.set_user_attr("diverged", True)
                trial.set_user_attr("fold_map_at_r", fold_values + [0.0])
                print(f"[{cfg.name}] trial {trial.number}: the loss diverged (not finite) in "
                      f"fold {fold.index}; trial scored 0 as in MLRC, params {params}",
                      flush=True)
                return 0.0
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


def check_trial_inputs(study: optuna.Study, inputs: dict | None) -> None:
    """Refuse to go on with a study whose trials recorded other inputs (user attribute
    "inputs": the data's fingerprint and the trunk's tensors' hash, `harness.run`). Machines
    that share a database but not a run folder each check their own split manifest only; this
    is what ties their trials to one data set and one trunk. A value recorded as None (no
    pretrained trunk) or not recorded (an older harness) is not compared."""
    if not inputs:
        return
    other: dict[str, list[int]] = {}
    for trial in study.get_trials(deepcopy=False):
        recorded = trial.user_attrs.get("inputs")
        if not isinstance(recorded, dict):
            continue
        for key, value in inputs.items():
            if value and recorded.get(key) and recorded[key] != value:
                other.setdefault(key, []).append(trial.number)
    if other:
        what = "; ".join(f"{key}: trials {', '.join(map(str, numbers[:8]))}"
                         f"{' ...' if len(numbers) > 8 else ''} recorded another"
                         for key, numbers in other.items())
        raise ConfigError(f"study {study.study_name!r} holds trials run on other inputs than "
                          f"this machine's ({what}; this machine: "
                          f"{', '.join(f'{k} {str(v)[:12]}...' for k, v in inputs.items() if v)})."
                          f" Give every machine the same data and trunk weights, or use another "
                          f"study (--output / storage).")


def run_search(cfg: StudyConfig, data: PreparedData, output: Path, storage_url: str,
               device, inputs: dict | None = None) -> optuna.Study:
    """Run (or resume) the search until `search.trials` trials are COMPLETE or PRUNED.

    Several processes (workers) may run this on one storage at once; each takes trials until the
    budget is reached, then waits for trials still running in other workers (a dead worker's
    trial is failed by the heartbeat and retried by whoever is still alive). Each trial records
    `inputs` (what it trains on), and trials on other inputs are refused (`check_trial_inputs`).
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(cfg)
    if cfg.search.fixed:
        print(f"[{cfg.name}] not searched (given a value): " + ", ".join(
            f"{k}={get_value(cfg, k)!r}" for k in cfg.search.fixed), flush=True)
    study = open_study(cfg, storage_url, dataset_defaults(cfg, data.spec)[0])
    check_trial_inputs(study, inputs)
    objective = make_objective(cfg, data, output, device, space)
    mine: list[int] = []  # trial ids this process started (to requeue on Ctrl-C)

    def guarded(trial: optuna.Trial) -> float:
        if _over_budget(study, trial, cfg.search.trials):
            trial.set_user_attr("surplus", True)
            raise SurplusTrial()
        mine.append(trial._trial_id)
        if inputs:
            # again per trial: workers that started together on an empty study saw no trials
            # of the others; a retried trial's predecessor (whose folds it keeps) is checked too
            check_trial_inputs(study, inputs)
            trial.set_user_attr("inputs", inputs)
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
        try:
            study.optimize(guarded, n_trials=1, catch=(SurplusTrial,))
        except KeyboardInterrupt:
            requeue_interrupted(study, mine[-1:])
            raise
    progress.close()
    return study


def requeue_interrupted(study: optuna.Study, trial_ids: list[int]) -> None:
    """Ctrl-C: Optuna has failed the running trial. Queue its retry exactly as for a killed
    worker (same parameters, same seed, its finished folds kept), so that an interrupt loses
    nothing and the trial is run again by the next invocation."""
    for trial_id in trial_ids:
        frozen = study._storage.get_trial(trial_id)
        if frozen.state == TrialState.FAIL and not frozen.user_attrs.get("surplus"):
            retry_callback()(study, frozen)


def ranked_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """The complete trials that did not diverge, best validation MAP@R first; ties in the order
    of the search (a retry takes the place of the trial it retries). Empty if there are none."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    finite = [t for t in complete if not t.user_attrs.get("diverged")
              and t.value is not None and math.isfinite(t.value)]
    in_search_order = sorted(finite, key=lambda t: (t.user_attrs.get("seed_number", t.number),
                                                    t.number))
    return sorted(in_search_order, key=lambda t: -t.value)  # stable: ties keep search order


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The complete trial with the highest validation MAP@R; a diverged trial (scored 0) only
    when every complete trial diverged, which is an error: nothing can be retrained."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        raise ConfigError(f"study {study.study_name!r} has no complete trial to retrain "
                          f"(all pruned or failed); run more trials (--trials)")
    ranked = ranked_trials(study)
    if not ranked:
        raise ConfigError(f"study {study.study_name!r}: every complete trial diverged (loss "
                          f"not finite; scored 0 as in MLRC), so there is no configuration to "
                          f"retrain; check the search space and learning rates")
    return ranked[0]


def write_search_summary(study: optuna.Study, path: Path) -> dict:
    best = best_trial(study)
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append({"number": t.number, "state": t.state.name, "value": t.value,
                     "params": t.params, "fold_map_at_r": t.user_attrs.get("fold_map_at_r"),
                     "map_at_r_sem": t.user_attrs.get("map_at_r_sem"),
                     "diverged": bool(t.user_attrs.get("diverged", False)),
                     "duration_s": t.duration.total_seconds() if t.duration else None})
    summary = {"study": study.study_name, "best_trial": best.number, "best_value": best.value,
               "best_params": best.params, "best_fold_map_at_r": best.user_attrs.get(
                   "fold_map_at_r"), "best_map_at_r_sem": best.user_attrs.get("map_at_r_sem"),
               "diverged_trials": [r["number"] for r in rows if r["diverged"]],
               "trials": rows}
    write_json_atomic(path, summary)
    return summary
