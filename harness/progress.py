"""Progress bars (tqdm) that a user or a test can silence with HARNESS_NO_PROGRESS=1."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def progress_disabled() -> bool:
    return os.environ.get("HARNESS_NO_PROGRESS", "") not in ("", "0")


def bar(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar; `leave=False` by default so nested bars do not flood the terminal."""
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=progress_disabled() or kwargs.pop("disable", False), **kwargs)
