"""From a study's [data] section to records, the MLRC split and data loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from harness.config import StudyConfig
from harness.datasets import DatasetSpec, ImageDataset, Records, get_dataset, load_records
from harness.errors import ConfigError
from harness.sampler import SeededMPerClassSampler
from harness.splits import Fold, Split, make_split, query_gallery_indices, sample_indices
from harness.transforms import build_transforms


@dataclass
class PreparedData:
    spec: DatasetSpec
    records: Records
    split: Split


def resolve_data_root(cfg: StudyConfig) -> Path:
    """data.root, else $HARNESS_DATA/<dataset>, else (glyphs only) the glyph cache."""
    if cfg.data.root:
        return Path(cfg.data.root).expanduser()
    if cfg.data.dataset == "glyphs":
        from harness.datasets.glyphs import default_glyphs_root

        return default_glyphs_root()
    env = os.environ.get("HARNESS_DATA")
    if env:
        return Path(env).expanduser() / cfg.data.dataset
    spec = get_dataset(cfg.data.dataset)
    raise ConfigError(
        f"data set {cfg.data.dataset!r} is read from disk, but no location was given: pass "
        f"--data-root PATH (or --set data.root=PATH, or set $HARNESS_DATA to a folder holding "
        f"{cfg.data.dataset}/). Expected layout:\n{spec.layout}\n{spec.download_hint}")


def prepare_data(cfg: StudyConfig) -> PreparedData:
    spec = get_dataset(cfg.data.dataset)
    options = {}
    if cfg.data.dataset == "glyphs":
        options = {"num_classes": cfg.data.glyph_classes, "per_class": cfg.data.glyph_per_class}
    records = load_records(cfg.data.dataset, resolve_data_root(cfg),
                           check_counts=cfg.data.check_counts, **options)
    split = make_split(records, spec.split_kind)
    return PreparedData(spec=spec, records=records, split=split)


def dataset_defaults(cfg: StudyConfig, spec: DatasetSpec) -> tuple[int, int]:
    """(validate every N epochs, patience), from the study or else the data set's MLRC value."""
    every = cfg.train.val_every_epochs or spec.val_every_epochs
    patience = cfg.train.patience if cfg.train.patience >= 0 else spec.patience
    return every, patience


def fold_indices(data: PreparedData, fold: Fold) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices) of one fold; In-Shop folds draw only on its train items."""
    partition = "train" if data.split.kind == "inshop" else None
    return (sample_indices(data.records, fold.train_classes, partition),
            sample_indices(data.records, fold.val_classes, partition))


def _loader_kwargs(cfg: StudyConfig, device: torch.device) -> dict:
    workers = cfg.data.num_workers
    return dict(num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)


def train_loader(cfg: StudyConfig, data: PreparedData, indices: np.ndarray, seed: int,
                 device: torch.device) -> tuple[torch.utils.data.DataLoader, SeededMPerClassSampler]:
    transform = build_transforms(cfg.model.trunk, resize=cfg.data.resize, crop=cfg.data.crop,
                                 train=True, scale=(cfg.data.scale_min, 1.0))
    dataset = ImageDataset(data.records, indices, transform)
    sampler = SeededMPerClassSampler(dataset.labels, cfg.train.m_per_class,
                                     cfg.train.batch_size,
                                     cfg.train.iters_per_epoch * cfg.train.batch_size, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size,
                                         sampler=sampler, drop_last=True,
                                         **_loader_kwargs(cfg, device))
    return loader, sampler


def eval_loader(cfg: StudyConfig, data: PreparedData, indices: np.ndarray,
                device: torch.device) -> torch.utils.data.DataLoader:
    transform = build_transforms(cfg.model.trunk, resize=cfg.data.resize, crop=cfg.data.crop,
                                 train=False)
    dataset = ImageDataset(data.records, indices, transform)
    kwargs = _loader_kwargs(cfg, device)
    kwargs["persistent_workers"] = False  # evaluation loaders are short-lived
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.train.eval_batch_size,
                                       shuffle=False, **kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available here; "
                          f"use --device cpu")
    return device


__all__ = ["PreparedData", "prepare_data", "fold_indices", "train_loader", "eval_loader",
           "dataset_defaults", "resolve_device", "resolve_data_root", "query_gallery_indices"]
