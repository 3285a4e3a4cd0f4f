"""The MLRC split arithmetic against the counts PROTOCOL.md derives, and its invariants."""

from pathlib import Path

import numpy as np
import pytest

from harness.datasets import Records
from harness.errors import DatasetError
from harness.splits import (inshop_split, make_split, mlrc_split, query_gallery_indices,
                            sample_indices, split_manifest)


def records(labels, partition=None, name="fake"):
    labels = np.asarray(labels)
    return Records(name=name, labels=labels, paths=None,
                   images=np.zeros((len(labels), 2, 2, 3), np.uint8), partition=partition,
                   root=Path("."))


@pytest.mark.parametrize("first,n,n_train,n_val,n_test", [
    (0, 200, 75, 25, 100),      # CUB (0-based as MLRC reads it)
    (1, 196, 74, 24, 98),       # Cars196, labels 1-196
    (1, 22634, 8488, 2829, 11317),  # SOP: MLRC's test half has 11,317 classes
])
def test_fold_sizes_match_protocol(first, n, n_train, n_val, n_test):
    split = mlrc_split(np.arange(first, first + n))
    assert len(split.test_classes) == n_test
    assert split.test_classes[0] == first + n - n_test and split.test_classes[-1] == first + n - 1
    for fold in split.folds:
        assert len(fold.train_classes) == n_train and len(fold.val_classes) == n_val


def test_cub_fold_zero_and_rotation():
    split = mlrc_split(np.repeat(np.arange(200), 3))
    f0 = split.folds[0]
    assert f0.train_classes.tolist() == list(range(75))
    assert f0.val_classes.tolist() == list(range(75, 100))
    # Fold 1 starts at int(1/4 * 100) = 25: train 25..99, val wraps to 0..24.
    assert split.folds[1].train_classes.tolist() == list(range(25, 100))
    assert split.folds[1].val_classes.tolist() == list(range(25))
    assert split.folds[2].val_classes.tolist() == list(range(25, 50))
    assert split.folds[3].val_classes.tolist() == list(range(50, 75))


@pytest.mark.parametrize("n", [16, 37, 100, 196, 200, 513])
def test_invariants(n):
    rng = np.random.default_rng(n)
    labels = rng.permutation(np.repeat(rng.choice(10_000, n, replace=False), 2))
    split = mlrc_split(labels)
    classes = np.unique(labels)
    trainval = np.setdiff1d(classes, split.test_classes)
    assert split.test_classes.min() > trainval.max()  # test = the second half of sorted labels
    seen_in_val = []
    for fold in split.folds:
        assert not np.intersect1d(fold.train_classes, fold.val_classes).size
        assert not np.intersect1d(fold.train_classes, split.test_classes).size
        assert not np.intersect1d(fold.val_classes, split.test_classes).size
        assert np.array_equal(np.union1d(fold.train_classes, fold.val_classes), trainval)
        seen_in_val.extend(fold.val_classes)
    # 4 folds x val = 0.125 N cover all 0.5 N train+val classes when N divides evenly.
    if n % 8 == 0:
        assert sorted(seen_in_val) == trainval.tolist()


def test_no_shuffling_same_split_every_time():
    labels = np.repeat(np.arange(40), 2)
    a, b = mlrc_split(labels), mlrc_split(labels[::-1])
    for fa, fb in zip(a.folds, b.folds):
        assert np.array_equal(fa.train_classes, fb.train_classes)
        assert np.array_equal(fa.val_classes, fb.val_classes)


def test_too_few_classes_is_a_clear_error():
    with pytest.raises(DatasetError, match="at least 16 classes"):
        mlrc_split(np.arange(8))


def test_sample_indices_and_test_set():
    r = records([5, 1, 9, 1, 5, 30] + list(range(100, 130)))
    split = make_split(r, "mlrc")
    query, gallery = query_gallery_indices(r, split)
    assert gallery is None
    assert set(r.labels[query]) == set(split.test_classes)
    assert sample_indices(r, np.array([1, 5])).tolist() == [0, 1, 3, 4]


def test_inshop_uses_standard_partition():
    labels = np.concatenate([np.repeat(np.arange(40), 2), np.repeat(np.arange(40, 50), 2)])
    partition = np.array(["train"] * 80 + ["query", "gallery"] * 10)
    r = records(labels, partition)
    split = inshop_split(r)
    assert split.kind == "inshop"
    for fold in split.folds:
        assert len(fold.val_classes) == 10 and len(fold.train_classes) == 30
        assert set(fold.train_classes) | set(fold.val_classes) == set(range(40))
    query, gallery = query_gallery_indices(r, split)
    assert (partition[query] == "query").all() and len(query) == 10
    assert (partition[gallery] == "gallery").all() and len(gallery) == 10
    with pytest.raises(DatasetError, match="partition"):
        inshop_split(records(labels))


def test_manifest_records_every_fold(tmp_path):
    r = records(np.repeat(np.arange(32), 3))
    split = make_split(r, "mlrc")
    m = split_manifest(r, split)
    assert m["num_images"] == 96 and m["num_classes"] == 32
    assert m["test"]["classes"] == list(range(16, 32)) and m["test"]["query_images"] == 48
    assert [f["val_images"] for f in m["folds"]] == [12] * 4
    assert [f["train_images"] for f in m["folds"]] == [36] * 4
