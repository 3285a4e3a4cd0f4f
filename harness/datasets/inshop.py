"""DeepFashion In-shop Clothes Retrieval (Liu et al. 2016): 52,712 images of 7,982 items.

list_eval_partition.txt: line 1 the image count, line 2 the header
`image_name item_id evaluation_status`, then one row per image; status is train, query or
gallery. Item ids (id_00000001, ...) become int labels 0, 1, ... in order of first appearance in
the file. In-Shop is not part of MLRC: its standard split is kept (train items for the folds,
query against gallery for the test), so `Records.partition` carries the status.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.datasets.base import (CountCheck, Records, absolute_root, check_images_exist,
                                   layout_error, parse_columns, parse_int, read_lines,
                                   verify_standard_counts)
from harness.errors import DatasetError

TITLE = "In-Shop Clothes Retrieval"
LISTING = "list_eval_partition.txt"
COLUMNS = ("image_name", "item_id", "evaluation_status")
STATUSES = ("train", "query", "gallery")

LAYOUT = """\
<root>/
  list_eval_partition.txt      line 1: image count; line 2: "image_name item_id evaluation_status";
                               then "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train"
                               (status train, query or gallery), 52,712 rows
  img/WOMEN/... img/MEN/...    the 52,712 JPEG files named by image_name
(The archive's own layout, <root>/Eval/list_eval_partition.txt with <root>/Img/img/..., is
accepted as well.)"""

DOWNLOAD_HINT = ("Get img.zip (Img/) and list_eval_partition.txt (Eval/) of the DeepFashion "
                 "'In-shop Clothes Retrieval Benchmark' (mmlab.ie.cuhk.edu.hk/projects/"
                 "DeepFashion/InShopRetrieval.html) and extract img.zip into the root.")

STANDARD_IMAGES = 52_712
STANDARD_ITEMS = 7_982
STANDARD_TRAIN_ITEMS = 3_997
STANDARD_PER_STATUS = {"train": 25_882, "query": 14_218, "gallery": 12_612}


def find_listing(root: Path) -> tuple[Path, Path]:
    """(listing file, folder that image_name paths are relative to)."""
    for listing, image_base in ((root / LISTING, root), (root / "Eval" / LISTING, root / "Img")):
        if listing.is_file():
            return listing, image_base
    raise layout_error(TITLE, root, f"found neither {root / LISTING} nor "
                       f"{root / 'Eval' / LISTING}", LAYOUT, DOWNLOAD_HINT)


def parse_listing(path: Path) -> tuple[int, list[list[str]]]:
    """(image count stated on line 1, rows) of list_eval_partition.txt."""
    lines = read_lines(path, TITLE)
    if len(lines) < 2 or lines[1].split() != list(COLUMNS):
        found = repr(lines[1]) if len(lines) > 1 else "fewer than two lines"
        raise DatasetError(f"{TITLE}: {path}: expected an image count on line 1 and the header "
                           f"{' '.join(COLUMNS)!r} on line 2; found {found}")
    stated = parse_int(lines[0].strip(), path, TITLE, "the image count on line 1")
    rows = parse_columns(lines[2:], path, TITLE, COLUMNS, first_line_number=3)
    bad = next((row for row in rows if row[2] not in STATUSES), None)
    if bad is not None:
        raise DatasetError(f"{TITLE}: {path}: evaluation_status {bad[2]!r} (image {bad[0]}) is "
                           f"not one of {', '.join(STATUSES)}")
    return stated, rows


def item_labels(item_ids: list[str]) -> np.ndarray:
    """Int label per image: items numbered 0, 1, ... in order of first appearance."""
    index: dict[str, int] = {}
    return np.array([index.setdefault(item, len(index)) for item in item_ids], dtype=np.int64)


def load_inshop(root: Path, check_counts: bool = True) -> Records:
    """Read In-Shop under root; `partition` holds each image's evaluation_status."""
    root = absolute_root(root)
    listing, image_base = find_listing(root)
    stated, rows = parse_listing(listing)
    labels = item_labels([row[1] for row in rows])
    partition = np.array([row[2] for row in rows], dtype=str)
    paths = [image_base / row[0] for row in rows]
    if check_counts:
        train_items = len(np.unique(labels[partition == "train"]))
        verify_standard_counts(TITLE, root, [
            CountCheck("images (rows)", STANDARD_IMAGES, len(rows)),
            CountCheck("images (count on line 1)", STANDARD_IMAGES, stated),
            CountCheck("items", STANDARD_ITEMS, len(np.unique(labels))),
            CountCheck("train items", STANDARD_TRAIN_ITEMS, train_items),
            *(CountCheck(f"{status} images", count, int((partition == status).sum()))
              for status, count in STANDARD_PER_STATUS.items()),
        ])
    check_images_exist(TITLE, image_base, paths)
    return Records(name="inshop", labels=labels, paths=paths, images=None, partition=partition,
                   root=root)
