"""From a study's [data] section to records, the MLRC split and data loaders."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from harness.config import StudyConfig
from harness.datasets import DatasetSpec, Records, get_dataset, load_records
from harness.errors import ConfigError
from harness.sampler import MLRCPassSampler, SeededMPerClassSampler
from harness.splits import Fold, Split, make_split, query_gallery_indices, sample_indices
from harness.image_cache import ResizedImages, build_or_open, resize_image
from harness.transforms import BatchNormalize, UInt8Crop


@dataclass
class PreparedData:
    spec: DatasetSpec
    records: Records
    split: Split
    resized: ResizedImages | None = None  # decode-once cache (data.cache), else None
    # model.cache_frozen_features: the frozen blocks' output per image, by the blocks' weights
    # (harness/frozen_features.py); filled on first use, in memory only.
    frozen_features: dict[str, torch.Tensor] = field(default_factory=dict, compare=False,
                                                     repr=False)


class UInt8Images(torch.utils.data.Dataset):
    """Images `indices` as uint8 (3, crop, crop) tensors, with int labels.

    The resized image comes from the decode-once cache when there is one, else it is decoded
    and resized on every access (data.cache=false: the slow path, same pixels). The crop runs
    here (in the loader workers); flip and normalisation run on the device (BatchNormalize)."""

    def __init__(self, records: Records, indices: np.ndarray, crop: UInt8Crop,
                 resized: ResizedImages | None, resize: int):
        self.records, self.resized, self.resize, self.crop = records, resized, resize, crop
        self.indices = np.asarray(indices, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        return self.records.labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        i = int(self.indices[j])
        image = self.resized[i] if self.resized is not None else \
            resize_image(self.records.load_image(i), self.resize)
        return self.crop(image), int(self.records.labels[i])


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


def study_records(cfg: StudyConfig) -> Records:
    """The study's data set, as its reader gives it (generated first, for the glyphs)."""
    options = {}
    if cfg.data.dataset == "glyphs":
        options = {"num_classes": cfg.data.glyph_classes, "per_class": cfg.data.glyph_per_class}
    return load_records(cfg.data.dataset, resolve_data_root(cfg),
                        check_counts=cfg.data.check_counts, **options)


def prepare_data(cfg: StudyConfig) -> PreparedData:
    spec = get_dataset(cfg.data.dataset)
    records = study_records(cfg)
    split = make_split(records, spec.split_kind)
    resized = None
    if cfg.data.cache or records.images is not None:  # in-memory data: resizing is free
        resized = build_or_open(records, cfg.data.resize, cfg.data.cache_dir or None)
    return PreparedData(spec=spec, records=records, split=split, resized=resized)


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


def loader_workers(cfg: StudyConfig) -> int:
    """data.num_workers, or with -1 (default) one per CPU core but one, at most 8: cropping
    cached uint8 images costs a worker well under a millisecond per image."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def _loader_kwargs(cfg: StudyConfig, device: torch.device) -> dict:
    workers = loader_workers(cfg)
    return dict(num_workers=workers, pin_memory=device.type == "cuda",
                persistent_workers=workers > 0)


def _dataset(cfg: StudyConfig, data: PreparedData, indices: np.ndarray,
             train: bool) -> UInt8Images:
    crop = UInt8Crop(cfg.data.crop, train=train and cfg.data.random_crop,
                     scale=(cfg.data.scale_min, 1.0))
    return UInt8Images(data.records, indices, crop, data.resized, cfg.data.resize)


def batch_transform(cfg: StudyConfig, device: torch.device, train: bool) -> BatchNormalize:
    """The device-side half of the input pipeline: flip (train), float, trunk normalisation."""
    channels_last = device.type == "cuda" and cfg.train.channels_last
    return BatchNormalize(cfg.model.trunk, train=train,
                          channels_last=channels_last).to(device)


def train_loader(cfg: StudyConfig, data: PreparedData, indices: np.ndarray, seed: int,
                 device: torch.device
                 ) -> tuple[torch.utils.data.DataLoader, torch.utils.data.Sampler]:
    """The training loader of one fold; call `sampler.set_epoch(epoch)` before each epoch."""
    dataset = _dataset(cfg, data, indices, train=True)
    sampler = make_train_sampler(cfg, dataset.labels, seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size,
                                         sampler=sampler, drop_last=True,
                                         **_loader_kwargs(cfg, device))
    return loader, sampler


def make_train_sampler(cfg: StudyConfig, labels: np.ndarray, seed: int):
    """The batch sampler of `train.sampler` over a fold's training labels."""
    t = cfg.train
    if t.sampler == "mlrc":
        return MLRCPassSampler(labels, t.m_per_class, t.batch_size, t.iters_per_epoch, seed)
    return SeededMPerClassSampler(labels, t.m_per_class, t.batch_size,
                                  t.iters_per_epoch * t.batch_size, seed)


def eval_loader(cfg: StudyConfig, data: PreparedData, indices: np.ndarray,
                device: torch.device) -> torch.utils.data.DataLoader:
    dataset = _dataset(cfg, data, indices, train=False)
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


__all__ = ["PreparedData", "UInt8Images", "batch_transform", "loader_workers", "prepare_data",
           "fold_indices", "train_loader", "eval_loader", "dataset_defaults", "resolve_device",
           "resolve_data_root", "query_gallery_indices"]
