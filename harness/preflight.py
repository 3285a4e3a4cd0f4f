"""Checks run once before the search: what every trial would need, tried now.

Without them a missing weight file, a loss that cannot be built or a batch the sampler cannot
fill surfaces only inside trial 0, behind Optuna's traceback, after a FAIL trial was recorded.
`preflight` builds the model once (the weight file is read and checked against the trunk), the
loss for each fold's class count, and the m-per-class sampler on each fold's training classes,
and checks that each validation split can be scored; every failure is a one-line HarnessError.
"""

from __future__ import annotations

import numpy as np
import torch

from harness.config import StudyConfig
from harness.data import PreparedData, fold_indices, make_train_sampler
from harness.errors import ConfigError, HarnessError
from harness.models import build_model
from losses.registry import build_loss


def preflight(cfg: StudyConfig, data: PreparedData, device: torch.device) -> None:
    """Raise a HarnessError (ConfigError, WeightsError, ...) now for anything that would make
    every trial fail. Runs on the CPU: it builds, it does not train. `device` is accepted for
    the callers' symmetry and future device checks."""
    del device  # building on the CPU finds the same errors without taking accelerator memory
    _check_model(cfg)
    for fold in data.split.folds[: cfg.search.folds]:
        train_idx, val_idx = fold_indices(data, fold)
        train_labels = data.records.labels[train_idx]
        where = f"fold {fold.index}"
        _check_loss(cfg, len(np.unique(train_labels)), where)
        _check_sampler(cfg, train_labels, where)
        _check_validation(data.records.labels[val_idx], where)


def _check_model(cfg: StudyConfig) -> None:
    # build_model raises WeightsError / ConfigError with the file and what to do.
    build_model(cfg.model)


def _check_loss(cfg: StudyConfig, num_classes: int, where: str) -> None:
    try:
        build_loss(cfg.loss.name, num_classes=num_classes,
                   embedding_size=cfg.model.embedding_size, dataset=cfg.data.dataset,
                   **cfg.loss.params)
    except HarnessError:
        raise
    except (ValueError, TypeError, AssertionError, RuntimeError) as e:
        raise ConfigError(f"{where}: loss {cfg.loss.name!r} with parameters {cfg.loss.params} "
                          f"cannot be built for {num_classes} classes: {e}") from None


def _check_sampler(cfg: StudyConfig, labels: np.ndarray, where: str) -> None:
    t = cfg.train
    try:
        make_train_sampler(cfg, labels, seed=0)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    except AssertionError as e:  # pml's own checks are bare asserts
        raise ConfigError(f"{where}: the m-per-class sampler rejects train.batch_size="
                          f"{t.batch_size}, train.m_per_class={t.m_per_class} on "
                          f"{len(np.unique(labels))} classes ({e})") from None


def _check_validation(labels: np.ndarray, where: str) -> None:
    """MAP@R counts only queries with another image of their class: at least one is needed."""
    if len(labels) == 0 or np.unique(labels, return_counts=True)[1].max() < 2:
        raise ConfigError(f"{where}: the validation classes hold no class with 2 or more images "
                          f"({len(labels)} images), so validation MAP@R cannot be computed; "
                          f"use a data set with more images per class")


__all__ = ["preflight"]
