"""Stanford Online Products (Oh Song et al. 2016): 120,053 product images, 22,634 products.

The dataset is the union of Ebay_train.txt and Ebay_test.txt (header row, then
`image_id class_id super_class_id path`); labels are class_id. MLRC re-splits the union by
class, which is why both files are read.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from harness.datasets.base import (CountCheck, Records, absolute_root, check_images_exist,
                                   layout_error, parse_columns, parse_int, read_lines,
                                   verify_standard_counts)
from harness.errors import DatasetError

TITLE = "Stanford Online Products"
FOLDER = "Stanford_Online_Products"  # the archive's top folder; the root may be it or its parent
LISTINGS = ("Ebay_train.txt", "Ebay_test.txt")
COLUMNS = ("image_id", "class_id", "super_class_id", "path")

LAYOUT = """\
<root>/                        the Stanford_Online_Products folder (or the folder containing it)
  Ebay_train.txt               header "image_id class_id super_class_id path", 59,551 rows
  Ebay_test.txt                same columns, 60,502 rows
  bicycle_final/111085122871_0.JPG
  ...                          the 12 <category>_final/ folders with the 120,053 images"""

DOWNLOAD_HINT = ("Get Stanford_Online_Products.zip from the Stanford CVGL 'Deep Metric Learning "
                 "via Lifted Structured Feature Embedding' page "
                 "(cvgl.stanford.edu/projects/lifted_struct) and extract it.")

STANDARD_IMAGES = 120_053
STANDARD_CLASSES = 22_634
# Per listing file: (images, classes). The standard split is 11,318 train / 11,316 test classes.
STANDARD_PER_FILE = {"Ebay_train.txt": (59_551, 11_318), "Ebay_test.txt": (60_502, 11_316)}


def find_sop_root(root: Path) -> Path:
    """The folder holding the Ebay_*.txt listings: root itself or root/Stanford_Online_Products."""
    for candidate in (root, root / FOLDER):
        if any((candidate / name).is_file() for name in LISTINGS):
            return candidate
    raise layout_error(TITLE, root, f"found neither {root / LISTINGS[0]} nor "
                       f"{root / FOLDER / LISTINGS[0]}", LAYOUT, DOWNLOAD_HINT)


def read_listing(path: Path, root: Path) -> tuple[list[Path], np.ndarray]:
    """(image paths, class ids) of one Ebay_*.txt file, after checking its header."""
    if not path.is_file():
        raise layout_error(TITLE, root, f"{path} is missing", LAYOUT, DOWNLOAD_HINT)
    lines = read_lines(path, TITLE)
    if not lines or lines[0].split() != list(COLUMNS):
        found = repr(lines[0]) if lines else "an empty file"
        raise DatasetError(f"{TITLE}: {path} must start with the header line "
                           f"{' '.join(COLUMNS)!r}; found {found}")
    rows = parse_columns(lines[1:], path, TITLE, COLUMNS, first_line_number=2)
    labels = np.array([parse_int(row[1], path, TITLE, "class_id") for row in rows],
                      dtype=np.int64)
    return [root / row[3] for row in rows], labels


def load_sop(root: Path, check_counts: bool = True) -> Records:
    """Read SOP under root: the union of Ebay_train.txt and Ebay_test.txt, in that order."""
    root = find_sop_root(absolute_root(root))
    paths: list[Path] = []
    label_parts = []
    checks = []
    for name in LISTINGS:
        file_paths, file_labels = read_listing(root / name, root)
        paths += file_paths
        label_parts.append(file_labels)
        images, classes = STANDARD_PER_FILE[name]
        checks += [CountCheck(f"images in {name}", images, len(file_labels)),
                   CountCheck(f"classes in {name}", classes, len(np.unique(file_labels)))]
    labels = np.concatenate(label_parts)
    if check_counts:
        verify_standard_counts(TITLE, root, [
            CountCheck("images", STANDARD_IMAGES, len(labels)),
            CountCheck("classes", STANDARD_CLASSES, len(np.unique(labels))),
            *checks,
        ])
    check_images_exist(TITLE, root, paths)
    return Records(name="sop", labels=labels, paths=paths, images=None, partition=None,
                   root=root)
