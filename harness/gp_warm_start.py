"""GP kernel warm starts that a resumed search reproduces exactly.

Optuna's GPSampler (MLRC's search here: harness.search.SobolThenGPSampler) fits the GP's kernel
parameters for every new trial by L-BFGS starting from the previous fit's parameters, which it
keeps in the sampler object (`_gprs_cache_list`; Optuna 5.1 marks it "TODO: make GPSampler
stateless"). A process that resumes a study (after an interrupt, or `--trials` grown) starts
without that cache, so its fits start from Optuna's defaults, converge elsewhere, and from the
first resumed GP trial on the search proposes other configurations than an uninterrupted run
would: the resumed study is valid but is not the one the same command gives in one go.

Here the warm start is a function of the study's storage, not of the process's history: the
fit for trial n starts from the canonical fit of the GP-proposed trial before it, where the
canonical fit of a GP-proposed trial u is the fit on the complete trials numbered below u,
itself started from the canonical fit of the GP-proposed trial before u. In one uninterrupted
single-worker search this is exactly the chain Optuna builds in memory (every trial below u was
complete when u was proposed), so nothing changes there and nothing is refitted; a fresh process
replays the missing fits (kernel fits only, no acquisition optimisation: about a tenth of a
second each at these sizes) and continues bit for bit. With parallel workers each process's
in-memory chain depended on timing; the canonical chain is one deterministic choice for all.

Why not Optuna: it has no public hook for the warm start; this reuses its own fitting function
(`optuna._gp.gp.fit_kernel_params`) with the sampler's prior and noise floor, and the same
normalisation and standardisation as `GPSampler._sample_relative_impl` (Optuna 5.x), which
tests/test_search_resume.py checks against uninterrupted searches.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import optuna
from optuna.study import StudyDirection
from optuna.trial import FrozenTrial, TrialState

from harness.storage import RetryStaleTrial

# Optuna's GPSampler marks the trials it proposed (the params it shares with other processes).
GP_PROPOSED_KEY = "gp:relative_params"
_ROOT_KEY = b"gp-warm-start-v1"


def gp_proposed(trial: FrozenTrial) -> bool:
    """Did the GP (not the Sobol phase) fit and propose this trial? A retry of an interrupted
    trial copies its system attributes, the GP's mark included, but reuses its parameters."""
    return RetryStaleTrial.retried_trial_number(trial) is None and \
        any(key.startswith(GP_PROPOSED_KEY) for key in trial.system_attrs)


def _fit_key(previous: bytes, fit_set: list[FrozenTrial]) -> bytes:
    """Identity of a chained fit: the fit before it and the exact data it is fitted on."""
    data = [[t.number, t.params, [float(v).hex() for v in t.values]] for t in fit_set]
    return hashlib.sha256(previous + json.dumps(data, sort_keys=True).encode()).digest()


class GPWarmStart:
    """Holds the last canonical fit; `before_fit` sets the GPSampler's cache for a new trial,
    `after_fit` records the fit the sampler made for it."""

    def __init__(self, gp_sampler: optuna.samplers.GPSampler):
        self.gp = gp_sampler
        self.known: tuple[bytes, list] | None = None  # (key, the GPSampler's cache list)
        self.pending: bytes | None = None
        self.replayed = 0  # fits recomputed (tests: 0 in an uninterrupted search)

    def before_fit(self, study: optuna.Study, trial: FrozenTrial, search_space: dict) -> None:
        trials = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        proposed = [t for t in trials if t.number < trial.number and gp_proposed(t)]
        fit_sets = [[t for t in complete if t.number < u.number] for u in proposed]
        keys, key = [], _ROOT_KEY
        for fit_set in fit_sets:
            key = _fit_key(key, fit_set)
            keys.append(key)
        start = len(keys)  # the chain's fits from `start` on are not in memory
        while start > 0 and not (self.known and self.known[0] == keys[start - 1]):
            start -= 1
        cache = self.known[1] if start > 0 else None
        for fit_set, key in zip(fit_sets[start:], keys[start:]):
            cache = self._fit(fit_set, study, search_space, cache)
            self.replayed += 1
            self.known = (key, cache)
        self.gp._gprs_cache_list = cache
        self.pending = _fit_key(keys[-1] if keys else _ROOT_KEY,
                                [t for t in complete if t.number < trial.number])

    def after_fit(self, proposed: bool) -> None:
        """`proposed`: the GP fitted and proposed (with too few complete trials it does not)."""
        if proposed and self.pending is not None and self.gp._gprs_cache_list is not None:
            self.known = (self.pending, self.gp._gprs_cache_list)
        self.pending = None

    def _fit(self, fit_set: list[FrozenTrial], study: optuna.Study, search_space: dict,
             cache: list | None) -> list:
        """The kernel fit GPSampler._sample_relative_impl makes on `fit_set` (Optuna 5.x)."""
        import torch
        from optuna._gp import gp
        from optuna._gp import search_space as gp_search_space
        from optuna.samplers._gp.sampler import _standardize_values

        space = gp_search_space.SearchSpace(search_space)
        if cache is not None and len(cache[0].inverse_squared_lengthscales) != space.dim:
            cache = None
        sign = np.array([-1.0 if d == StudyDirection.MINIMIZE else 1.0 for d in study.directions])
        scores, _, _ = _standardize_values(sign * np.array([t.values for t in fit_set]))
        with torch.device("cpu"):
            x = space.get_normalized_params(fit_set)
            return [gp.fit_kernel_params(X=x, Y=scores[:, i], is_categorical=space.is_categorical,
                                         log_prior=self.gp._log_prior,
                                         minimum_noise=self.gp._minimum_noise,
                                         gpr_cache=cache[i] if cache is not None else None,
                                         deterministic_objective=self.gp._deterministic)
                    for i in range(scores.shape[-1])]


__all__ = ["GPWarmStart", "gp_proposed"]
