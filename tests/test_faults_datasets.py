"""A file or folder the user may not read is reported as a permission problem naming it, not as
a corrupt, malformed or missing file. Tests run as root, where chmod 000 has no effect, so the
denial is simulated where the file is opened."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from fake_datasets import make_fake_cars, make_fake_cub
from harness.datasets import load_records
from harness.errors import DatasetError

MISLEADING = ("corrupt", "not an image", "missing", "MATLAB file", "not a UTF-8")


def deny(monkeypatch, target: Path) -> None:
    """Opening `target` raises PermissionError, as it would for a non-root user."""
    real_open = open

    def guarded_open(file, *args, **kwargs):
        if not isinstance(file, int) and os.fspath(file) == str(target):
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)


def assert_permission_message(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert "permission" in message.lower() and str(path) in message, message
    assert not any(word in message for word in MISLEADING), message


def test_unreadable_image(tmp_path, monkeypatch):
    records = load_records("cub200", make_fake_cub(tmp_path / "cub"), check_counts=False)
    deny(monkeypatch, records.paths[1])
    with pytest.raises(DatasetError) as e:
        records.load_image(1)
    assert_permission_message(e, records.paths[1])


@pytest.mark.parametrize("dataset, make, listing", [
    ("cub200", make_fake_cub, "images.txt"),  # a .txt listing
    ("cars196", make_fake_cars, "cars_annos.mat"),  # a .mat annotation file
])
def test_unreadable_listing_file(tmp_path, monkeypatch, dataset, make, listing):
    root = make(tmp_path / dataset)
    deny(monkeypatch, root / listing)
    with pytest.raises(DatasetError) as e:
        load_records(dataset, root, check_counts=False)
    assert_permission_message(e, root / listing)


def test_unlistable_image_folder_is_not_reported_missing(tmp_path, monkeypatch):
    root = make_fake_cub(tmp_path / "cub")
    folder = next((root / "images").iterdir())
    real_listdir = os.listdir

    def guarded_listdir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", guarded_listdir)
    with pytest.raises(DatasetError) as e:
        load_records("cub200", root, check_counts=False)
    assert_permission_message(e, folder)
