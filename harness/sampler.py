"""The m-per-class sampler of MLRC (batch 32 = 8 classes x 4 images), seedable.

pml's MPerClassSampler does the sampling. Two things are added here, which is why it is wrapped:
it draws from numpy's *global* random state (so a run could not be resumed reproducibly), and it
reports bad settings with bare asserts. This wrapper gives each epoch its own RandomState and
turns the asserts into errors that say what to change.
"""

from __future__ import annotations

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler
from pytorch_metric_learning.utils import common_functions as pml_common

from harness.errors import ConfigError


class SeededMPerClassSampler(MPerClassSampler):
    """pml's MPerClassSampler with an explicit seed; call `set_epoch` before each epoch."""

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, length: int, seed: int):
        labels = np.asarray(labels)
        num_classes = len(np.unique(labels))
        if batch_size % m:
            raise ConfigError(f"train.batch_size={batch_size} is not a multiple of "
                              f"train.m_per_class={m}")
        if num_classes * m < batch_size:
            raise ConfigError(f"the m-per-class sampler needs at least batch_size/m = "
                              f"{batch_size // m} training classes, but this fold has "
                              f"{num_classes}; lower train.batch_size or use more classes")
        if length < batch_size:
            raise ConfigError(f"an epoch of {length} samples is shorter than one batch "
                              f"({batch_size})")
        super().__init__(labels, m, batch_size=batch_size, length_before_new_iter=length)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # pml reads pml_common.NUMPY_RANDOM at call time: swap in a private, epoch-seeded state
        # for the duration of the (eager) index-list construction, then put the global back.
        saved = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = np.random.RandomState(
            np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0])
        try:
            return super().__iter__()
        finally:
            pml_common.NUMPY_RANDOM = saved


# MLRC's sampler list length: pml's MPerClassSampler default length_before_new_iter, which MLRC
# did not change (powerful-benchmarker v0.9.33 configs/config_loss_and_miners/default.yaml:
# `MPerClassSampler: m: 4`, no batch_size, no length).
MLRC_LIST_LENGTH = 100_000


class MLRCPassSampler(torch.utils.data.Sampler):
    """MLRC's batches, epoch by epoch and resumable.

    MLRC gives pml's MPerClassSampler no batch_size: each list it makes is a whole number of
    passes (MLRC_LIST_LENGTH rounded down to a multiple of the pass length), and each pass
    shuffles ALL classes and takes m images of each, so every class appears once per pass of
    C*m/batch batches. A DataLoader (batch 32, drop_last) reads the list in order; its iterator
    lives across epochs and a new list is made when one is used up (pml v0.9.92
    trainers/base_trainer.py: `initialize_dataloader` once per `train()`, `get_batch` ->
    `try_next_on_generator`). So batches straddle pass boundaries, and a class can appear in two
    neighbouring batches.

    Here the batch stream is the same, but list k is drawn from its own seed (seed, k), so any
    epoch can be produced alone: epoch e (1-based) yields batches (e-1)*B .. e*B-1 of the
    stream (B = iterations per epoch), which is what resuming a fold needs. pml's sampler
    draws the lists (its global NumPy state swapped for the list's own, as in
    SeededMPerClassSampler); what it lacks is a seed and the cross-epoch stream.
    """

    def __init__(self, labels: np.ndarray, m: int, batch_size: int, batches_per_epoch: int,
                 seed: int, list_length: int = MLRC_LIST_LENGTH):
        labels = np.asarray(labels)
        classes = np.unique(labels)
        if batch_size % m:
            raise ConfigError(f"train.batch_size={batch_size} is not a multiple of "
                              f"train.m_per_class={m}")
        if len(classes) * m < batch_size:
            raise ConfigError(f"the m-per-class sampler needs at least batch_size/m = "
                              f"{batch_size // m} training classes, but this fold has "
                              f"{len(classes)}; lower train.batch_size or use more classes")
        self.pml = MPerClassSampler(labels, m, batch_size=None, length_before_new_iter=list_length)
        self.class_order = sorted(self.pml.labels)  # reset before every list: deterministic
        self.batch_size = batch_size
        self.batches_per_epoch = batches_per_epoch
        self.batches_per_list = len(self.pml) // batch_size  # DataLoader drop_last
        if self.batches_per_list < 1:
            raise ConfigError(f"a sampler list of {len(self.pml)} samples is shorter than one "
                              f"batch ({batch_size})")
        # pml's sampler set to one pass of all classes: _drawn draws a list pass by pass
        self.one_pass = MPerClassSampler(labels, m, batch_size=None,
                                         length_before_new_iter=self.pml.length_of_single_pass)
        self.seed = seed
        self.epoch = 1
        self._drawing: tuple[int, np.random.RandomState, list[int]] | None = None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size

    def sampler_list(self, k: int) -> list[int]:
        """List k of the stream (what pml's sampler returns when the loader restarts k times)."""
        return list(self._drawn(k, len(self.pml)))

    def _drawn(self, k: int, end: int) -> list[int]:
        """List k drawn at least to index `end` (the list itself, not a copy), pass by pass.

        A fold early-stopped after a few hundred batches reads a few percent of a 100,000-index
        list, and drawing the whole list cost about a tenth of an embedded fold's time. pml
        draws a list as one pass after another from one NumPy state (shuffle the classes, then
        m images of each), so pml's sampler set to one pass, called again and again on list k's
        state, draws list k's passes in order: the same indices (tests/test_conformance.py)."""
        if self._drawing is None or self._drawing[0] != k:
            seed = np.random.SeedSequence([self.seed, k]).generate_state(1)[0]
            self._drawing = (k, np.random.RandomState(seed), [])
            self.one_pass.labels = list(self.class_order)
            if self.pml.length_of_single_pass >= len(self.pml):
                # one pass longer than the list: pml truncates it, so draw it as pml does
                self.pml.labels = list(self.class_order)
                self._draw(self.pml, k)
        _, _, drawn = self._drawing
        while len(drawn) < min(end, len(self.pml)):
            self._draw(self.one_pass, k)
        return drawn

    def _draw(self, sampler: MPerClassSampler, k: int) -> None:
        """Append what `sampler` draws from list k's NumPy state (pml reads its global one)."""
        _, rng, drawn = self._drawing
        saved = pml_common.NUMPY_RANDOM
        pml_common.NUMPY_RANDOM = rng
        try:
            drawn += [int(i) for i in sampler.__iter__()]
        finally:
            pml_common.NUMPY_RANDOM = saved

    def __iter__(self):
        first = (self.epoch - 1) * self.batches_per_epoch
        indices: list[int] = []
        for g in range(first, first + self.batches_per_epoch):
            k, b = divmod(g, self.batches_per_list)
            end = (b + 1) * self.batch_size
            indices += self._drawn(k, end)[end - self.batch_size:end]
        return iter(indices)
