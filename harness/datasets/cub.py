"""CUB-200-2011 (Wah et al. 2011): 11,788 bird images, 200 species.

The labels come from image_class_labels.txt (classes 1-200). train_test_split.txt is the
*classification* split and is deliberately not read: metric learning splits by class (MLRC).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.datasets.base import (CountCheck, Records, absolute_root, check_images_exist,
                                   count_in_range, layout_error, parse_columns, parse_int,
                                   read_lines, verify_standard_counts)
from harness.errors import DatasetError

TITLE = "CUB-200-2011"
FOLDER = "CUB_200_2011"  # the archive's top folder; the root may be it or its parent

LAYOUT = """\
<root>/                        the CUB_200_2011 folder (or the folder that contains it)
  images.txt                   "<image_id> <relative path>", one line per image (11,788)
  image_class_labels.txt       "<image_id> <class_id>", class ids 1-200
  images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
  images/...                   the 11,788 JPEG files named in images.txt
(train_test_split.txt, if present, is ignored: it is the classification split.)"""

DOWNLOAD_HINT = ("Get CUB_200_2011.tgz from the Caltech Vision Lab CUB-200-2011 page "
                 "(www.vision.caltech.edu/datasets/cub_200_2011) and extract it.")

STANDARD_IMAGES = 11_788
STANDARD_CLASSES = 200
STANDARD_FIRST_HALF = 5_864  # classes 1-100
STANDARD_SECOND_HALF = 5_924  # classes 101-200


def find_cub_root(root: Path) -> Path:
    """The folder holding images.txt: root itself or root/CUB_200_2011."""
    for candidate in (root, root / FOLDER):
        if (candidate / "images.txt").is_file():
            return candidate
    raise layout_error(TITLE, root, f"found neither {root / 'images.txt'} nor "
                       f"{root / FOLDER / 'images.txt'}", LAYOUT, DOWNLOAD_HINT)


def read_id_table(path: Path, root: Path, value_name: str) -> dict[int, str]:
    """`<image_id> <value>` lines as {image_id: value}; duplicate ids are an error."""
    if not path.is_file():
        raise layout_error(TITLE, root, f"{path} is missing", LAYOUT, DOWNLOAD_HINT)
    rows = parse_columns(read_lines(path, TITLE), path, TITLE, ("image_id", value_name))
    table: dict[int, str] = {}
    for image_id, value in rows:
        key = parse_int(image_id, path, TITLE, "image_id")
        if key in table:
            raise DatasetError(f"{TITLE}: {path} lists image_id {key} twice")
        table[key] = value
    return table


def load_cub(root: Path, check_counts: bool = True) -> Records:
    """Read CUB-200-2011 under root (the CUB_200_2011 folder or its parent)."""
    root = find_cub_root(absolute_root(root))
    paths_by_id = read_id_table(root / "images.txt", root, "path")
    classes_by_id = read_id_table(root / "image_class_labels.txt", root, "class_id")
    if paths_by_id.keys() != classes_by_id.keys():
        only = sorted(paths_by_id.keys() ^ classes_by_id.keys())[:5]
        raise DatasetError(f"{TITLE}: images.txt and image_class_labels.txt in {root} list "
                           f"different image ids (e.g. {only}); the two files must come from "
                           f"the same release")
    ids = sorted(paths_by_id)
    paths = [root / "images" / paths_by_id[i] for i in ids]
    labels = np.array([parse_int(classes_by_id[i], root / "image_class_labels.txt", TITLE,
                                 "class_id") for i in ids], dtype=np.int64)
    if check_counts:
        verify_standard_counts(TITLE, root, [
            CountCheck("images", STANDARD_IMAGES, len(labels)),
            CountCheck("classes", STANDARD_CLASSES, len(np.unique(labels))),
            CountCheck("images in classes 1-100", STANDARD_FIRST_HALF,
                       count_in_range(labels, 1, 100)),
            CountCheck("images in classes 101-200", STANDARD_SECOND_HALF,
                       count_in_range(labels, 101, 200)),
        ])
    check_images_exist(TITLE, root, paths)
    return Records(name="cub200", labels=labels, paths=paths, images=None, partition=None,
                   root=root)

