"""Exceptions the harness raises for bad input.

Every error a user can cause (a bad config key, a missing data file, a corrupt image) is one of
these, with a message that says what was wrong, what was expected, and where. The CLI prints the
message without a traceback.
"""


class HarnessError(Exception):
    """Base class: an error caused by the user's input, not by a bug."""


class ConfigError(HarnessError):
    """A study file, a --set override or a CLI flag is invalid."""


class DatasetError(HarnessError):
    """A dataset on disk is missing, incomplete or unreadable."""


class WeightsError(HarnessError):
    """Pretrained weights are missing or do not fit the architecture."""
