"""The MLRC class-disjoint split: 4 train/val folds over the first half of the classes, the
second half held out for test. In-Shop uses its standard train/query/gallery partition instead.

The arithmetic (PROTOCOL.md, from powerful-benchmarker's mlrc_split_manager): sort the class
labels; with N classes, test = int(N * 0.5) classes (the last ones), val = int(N * 0.125),
train = N - val - test. The first N_tv = N - test classes are cut into 4 folds: fold p starts at
int(p / 4 * N_tv), takes `train` classes from there (wrapping around), then the next `val`.
No shuffling and no seed: every run of every study sees the same folds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from harness.datasets import Records
from harness.errors import DatasetError
from harness.run_folder import read_json  # untrusted: None when unreadable

NUM_FOLDS = 4
# How Records.fingerprint is computed: a new formula gets a new number, and fingerprints of
# different versions are not compared (they would differ for the same data).
FINGERPRINT_VERSION = 1


@dataclass(frozen=True)
class Fold:
    index: int
    train_classes: np.ndarray  # sorted class labels
    val_classes: np.ndarray


@dataclass(frozen=True)
class Split:
    kind: str  # "mlrc" or "inshop"
    folds: tuple[Fold, ...]
    test_classes: np.ndarray  # mlrc: held-out classes; inshop: classes of query+gallery items


def mlrc_split(labels: np.ndarray) -> Split:
    classes = np.unique(np.asarray(labels))
    n = len(classes)
    n_test, n_val = int(n * 0.5), int(n * 0.125)
    n_train = n - n_val - n_test
    if n_train < 2 or n_val < 2:
        raise DatasetError(f"the MLRC split needs at least 16 classes (2 train and 2 val per "
                           f"fold); this dataset has {n}")
    trainval, test = classes[: n - n_test], classes[n - n_test:]
    return Split("mlrc", _rotating_folds(trainval, n_train), test)


def inshop_split(records: Records) -> Split:
    """Folds over the classes of the train items; test = query/gallery (standard split).

    In-Shop is not in MLRC. Its train items play the role of MLRC's train+val half, and the
    same proportions apply: val = a quarter of them (MLRC: 0.125 N of 0.5 N), train the rest."""
    if records.partition is None:
        raise DatasetError(f"{records.name}: the In-Shop split needs the train/query/gallery "
                           f"partition of list_eval_partition.txt")
    train_classes = np.unique(records.labels[records.partition == "train"])
    eval_classes = np.unique(records.labels[records.partition != "train"])
    n_tv = len(train_classes)
    n_val = int(n_tv * 0.25)
    if n_tv - n_val < 2 or n_val < 2:
        raise DatasetError(f"{records.name}: the In-Shop split needs at least 8 train items; "
                           f"found {n_tv}")
    return Split("inshop", _rotating_folds(train_classes, n_tv - n_val), eval_classes)


def _rotating_folds(trainval: np.ndarray, n_train: int) -> tuple[Fold, ...]:
    n_tv = len(trainval)
    folds = []
    for p in range(NUM_FOLDS):
        start = int(p / NUM_FOLDS * n_tv)
        order = np.roll(trainval, -start)  # wrap around the train+val classes
        folds.append(Fold(p, np.sort(order[:n_train]), np.sort(order[n_train:])))
    return tuple(folds)


def make_split(records: Records, kind: str) -> Split:
    if kind == "mlrc":
        return mlrc_split(records.labels)
    if kind == "inshop":
        return inshop_split(records)
    raise ValueError(f"unknown split kind {kind!r}; expected 'mlrc' or 'inshop'")


def sample_indices(records: Records, classes: np.ndarray, partition: str | None = None
                   ) -> np.ndarray:
    """Indices (ascending) of the images whose label is in `classes` (and in `partition`)."""
    mask = np.isin(records.labels, classes)
    if partition is not None:
        mask &= records.partition == partition
    return np.flatnonzero(mask)


def query_gallery_indices(records: Records, split: Split
                          ) -> tuple[np.ndarray, np.ndarray | None]:
    """(query indices, gallery indices); gallery is None for MLRC self-retrieval."""
    if split.kind == "inshop":
        return (np.flatnonzero(records.partition == "query"),
                np.flatnonzero(records.partition == "gallery"))
    return sample_indices(records, split.test_classes), None


def _class_range(classes: np.ndarray) -> str:
    return f"{len(classes)} classes ({classes.min()}..{classes.max()})" if len(classes) else "none"


def split_manifest(records: Records, split: Split) -> dict:
    """The split as JSON data: every class list and image count, so a run can be audited, and
    the data's fingerprint (`Records.fingerprint`), so a resumed run can check that it trains
    on the data its earlier trials did (`manifest_differences`)."""
    query, gallery = query_gallery_indices(records, split)
    partition = "train" if split.kind == "inshop" else None
    manifest = {
        "dataset": records.name,
        "data_fingerprint": records.fingerprint(),
        "data_fingerprint_version": FINGERPRINT_VERSION,
        "kind": split.kind,
        "num_images": len(records),
        "num_classes": int(len(np.unique(records.labels))),
        "test": {"classes": split.test_classes.tolist(),
                 "summary": _class_range(split.test_classes),
                 "query_images": int(len(query)),
                 "gallery_images": None if gallery is None else int(len(gallery))},
        "folds": [{"index": f.index,
                   "train_classes": f.train_classes.tolist(),
                   "val_classes": f.val_classes.tolist(),
                   "train_images": int(len(sample_indices(records, f.train_classes, partition))),
                   "val_images": int(len(sample_indices(records, f.val_classes, partition)))}
                  for f in split.folds],
    }
    return json.loads(json.dumps(manifest, default=int))  # plain JSON data, as read back


def manifest_text(manifest: dict) -> str:
    """The file's text: one line (SOP's class lists would be 100,000 lines indented)."""
    return json.dumps(manifest) + "\n"


def recorded_data_fingerprint(path: Path) -> str | None:
    """The data's fingerprint in a split manifest file (64 hex digits), or None: a manifest
    from before it was recorded or computed another way (another FINGERPRINT_VERSION), none,
    or a damaged one (files in a run folder are untrusted)."""
    manifest = read_json(Path(path))
    if not isinstance(manifest, dict) or \
            manifest.get("data_fingerprint_version") != FINGERPRINT_VERSION:
        return None
    value = manifest.get("data_fingerprint")
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) else None


# Written only since the harness recorded them: a manifest without one is compared on the rest.
LATER_MANIFEST_KEYS = ("data_fingerprint", "data_fingerprint_version")


def manifest_differences(recorded: object, now: dict) -> list[str]:
    """'what: recorded -> now' for each entry of a split manifest that differs; an entry the
    recorded manifest lacks is a difference (a torn or stub file proves nothing), except those
    of LATER_MANIFEST_KEYS. A recorded manifest that is not an object is a difference itself."""
    if not isinstance(recorded, dict):
        return ["the recorded manifest is not a JSON object"]
    if recorded.get("data_fingerprint_version") != now.get("data_fingerprint_version"):
        # computed another way (or before it was recorded): not comparable, the rest is
        now = {k: v for k, v in now.items() if k not in LATER_MANIFEST_KEYS}
    found = []
    for key, value in now.items():
        if key not in recorded:
            if key not in LATER_MANIFEST_KEYS:
                found.append(f"{key}: absent -> {_short(value)}")
            continue
        if recorded[key] == value:
            continue
        if key == "folds" and isinstance(recorded[key], list) and len(recorded[key]) == len(value):
            found += [f"fold {i}: {_changed(a, b)}"
                      for i, (a, b) in enumerate(zip(recorded[key], value)) if a != b]
        elif key == "test" and isinstance(recorded[key], dict):
            found.append(f"test: {_changed(recorded[key], value)}")
        else:
            found.append(f"{key}: {_short(recorded[key])} -> {_short(value)}")
    return found


def _changed(a: object, b: dict) -> str:
    """Which entries of one fold (or of the test set) differ, briefly."""
    if not isinstance(a, dict):
        return "not a JSON object"
    keys = [k for k in b if a.get(k) != b[k]]
    return ", ".join(f"{k} {_short(a.get(k))} -> {_short(b[k])}"
                     + (" (other ones)" if _same_length_lists(a.get(k), b[k]) else "")
                     for k in keys)


def _same_length_lists(a: object, b: object) -> bool:
    return isinstance(a, list) and isinstance(b, list) and len(a) == len(b)


def _short(value: object) -> str:
    """A manifest value for a message: class lists by their length, hashes by 12 digits."""
    if isinstance(value, list):
        return f"[{len(value)} classes]"
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    return json.dumps(value)


__all__ = ["Fold", "Split", "NUM_FOLDS", "mlrc_split", "inshop_split", "make_split",
           "sample_indices", "query_gallery_indices", "split_manifest", "manifest_text",
           "manifest_differences", "recorded_data_fingerprint"]
