"""model.cache_frozen_features: the frozen trunk blocks' output, computed once per image.

With model.frozen_blocks = N, the first N blocks keep their pretrained weights and BatchNorm
statistics for the whole fold (harness/models.py, SmallCNN), and with a deterministic input
(data.random_crop = false and no flips: the embedded glyphs) an image's output of those blocks
is the same at every step, in every fold and trial of a study. This module computes it once
per process, for every image of the data set, and trains and validates the rest of the model
on it: a step skips the frozen blocks' forward and the image pipeline.

Not bit-identical to running the whole trunk at every step: the frozen blocks see batches of
train.eval_batch_size images instead of the training batch, and convolution kernels may sum in
another order for another batch size. That is why it is a config key (a run folder records it,
and resume does not mix the two), and why the test images are still embedded from pixels by the
whole trunk (harness/final.py): the reported test numbers never go through this cache.

The cache is keyed by the frozen blocks' exact weights and statistics (and device and autocast),
so a fold resumed from a checkpoint whose frozen blocks differ from the pretrained ones gets its
own features instead of another model's. It lives in memory only (PreparedData), never on disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
import torch
from torch import nn

from harness.config import StudyConfig
from harness.data import PreparedData, batch_transform, eval_loader
from harness.progress import bar


class FromFrozenFeatures(nn.Module):
    """The fold's EmbeddingModel fed its frozen blocks' cached output instead of images: the
    same parameters, modes and embeddings (the wrapped model is its only child)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        # Report the model's mode as its own: compute_embeddings puts back the mode of the
        # module it is given, so a wrapper left in nn.Module's default (train) would switch
        # an eval-mode model to train mode after validating it.
        self.train(model.training)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model.head(self.model.trunk.trainable_suffix(features))


def _frozen_state_key(model: nn.Module, device: torch.device, amp: bool) -> str:
    """sha256 of the frozen blocks' parameters and buffers, with the device and autocast."""
    digest = hashlib.sha256(f"{device}|amp={amp}".encode())
    for name, tensor in model.trunk.frozen_part().state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def frozen_features(cfg: StudyConfig, model: nn.Module, data: PreparedData,
                    device: torch.device, amp: bool) -> torch.Tensor:
    """(number of images, C, H, W) on `device`: the frozen blocks' output for every image of the
    data set (row i = record i), from the cache when these frozen weights made it."""
    key = _frozen_state_key(model, device, amp)
    cached = data.frozen_features.get(key)
    if cached is not None:
        return cached
    data.frozen_features.clear()  # one set of frozen weights per study: keep one entry
    everything = np.arange(len(data.records.labels))
    loader = eval_loader(cfg, data, everything, device)
    to_input = batch_transform(cfg, device, train=False)  # = the training input (no crop, flip)
    trunk, outputs = model.trunk, []
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for images, _ in bar(loader, desc="frozen blocks, once per image", unit="batch"):
            outputs.append(trunk.frozen_prefix(to_input(images.to(device))).float())
    data.frozen_features[key] = torch.cat(outputs)
    return data.frozen_features[key]


class TrainBatches:
    """The training batches of one fold as (frozen-block outputs on the device, data-set class
    ids): the sampler's batches exactly as the image DataLoader draws them (batch_size images
    of the sampler's order, the last incomplete batch dropped)."""

    def __init__(self, features: torch.Tensor, indices: np.ndarray, labels: np.ndarray,
                 sampler: torch.utils.data.Sampler, batch_size: int):
        self.features, self.indices = features, np.asarray(indices, dtype=np.int64)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.sampler, self.batch_size = sampler, batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # The epoch's positions at once, then cut into batches (BatchSampler with drop_last, as
        # the image DataLoader): per batch, one slice instead of converting a list of indices.
        positions = np.fromiter(iter(self.sampler), dtype=np.int64)
        positions = positions[: len(positions) // self.batch_size * self.batch_size]
        rows = torch.as_tensor(self.indices[positions], device=self.features.device)
        labels = torch.as_tensor(self.labels[positions])
        for start in range(0, len(positions), self.batch_size):
            end = start + self.batch_size
            yield self.features[rows[start:end]], labels[start:end]


def eval_batches(features: torch.Tensor, indices: np.ndarray, labels: np.ndarray,
                 batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Images `indices` in order, batch_size at a time, as (frozen-block outputs, labels): what
    harness.metrics.compute_embeddings takes in place of an image loader."""
    indices = np.asarray(indices, dtype=np.int64)
    rows = torch.as_tensor(indices, device=features.device)
    labels = torch.as_tensor(np.asarray(labels, dtype=np.int64)[indices])
    return [(features[rows[i:i + batch_size]], labels[i:i + batch_size])
            for i in range(0, len(indices), batch_size)]


__all__ = ["FromFrozenFeatures", "TrainBatches", "eval_batches", "frozen_features"]
