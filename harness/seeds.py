"""Every seed of a study derives from `cfg.seed` here, and only here.

Search trial folds, final reproductions and the untrained baseline each get their own stream,
keyed by (base seed, stage, ...): changing one stage's count never shifts another stage's seeds.
"""

from __future__ import annotations

import numpy as np

SEARCH_STAGE, FINAL_STAGE, RECHECK_STAGE, UNTRAINED_STAGE = 1, 2, 3, 99


def hash_seed(*parts: int) -> int:
    """A 32-bit seed from integer parts (numpy's SeedSequence: well mixed, platform-stable)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def trial_fold_seed(base: int, trial_seed_number: int, fold: int) -> int:
    return hash_seed(base, SEARCH_STAGE, trial_seed_number, fold)


def reproduction_fold_seed(base: int, reproduction: int, fold: int) -> int:
    return hash_seed(base, FINAL_STAGE, reproduction, fold)


def recheck_fold_seed(base: int, run: int, fold: int) -> int:
    """The same seeds for every rechecked trial (common random numbers: the candidates'
    difference is then less of the seeds' doing), none shared with the search or the final."""
    return hash_seed(base, RECHECK_STAGE, run, fold)
