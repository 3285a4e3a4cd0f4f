"""The m-per-class sampler of MLRC (batch 32 = 8 classes x 4 images), seedable.

pml's MPerClassSampler does the sampling. Two things are added here, which is why it is wrapped:
it draws from numpy's *global* random state (so a run could not be resumed reproducibly), and it
reports bad settings with bare asserts. This wrapper gives each epoch its own RandomState and
turns the asserts into errors that say what to change.
"""

from __future__ import annotations

import numpy as np
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
