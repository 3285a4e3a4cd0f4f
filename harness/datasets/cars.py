"""Stanford Cars / Cars196 (Krause et al. 2013): 16,185 car images, 196 models.

Read from cars_annos.mat, the annotation file covering all 16,185 images: its struct array
`annotations` has `relative_im_path` (e.g. car_ims/000001.jpg) and `class` (1-based). Its
`test` flag is the classification split and is ignored: MLRC splits by class.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io

from harness.datasets.base import (CountCheck, Records, absolute_root, check_images_exist,
                                   count_in_range, layout_error, permission_error,
                                   verify_standard_counts)
from harness.errors import DatasetError

TITLE = "Cars196"
ANNOTATIONS = "cars_annos.mat"
REQUIRED_FIELDS = ("relative_im_path", "class")

LAYOUT = """\
<root>/
  cars_annos.mat               struct array `annotations` (relative_im_path, bbox_x1, bbox_y1,
                               bbox_x2, bbox_y2, class 1-196, test), one entry per image (16,185)
  car_ims/000001.jpg
  car_ims/...                  the 16,185 JPEG files named by relative_im_path"""

DOWNLOAD_HINT = ("Get car_ims.tgz and cars_annos.mat from the Stanford AI Lab 'Cars Dataset' "
                 "page (ai.stanford.edu/~jkrause/cars/car_dataset.html, or a mirror of it); "
                 "extract car_ims.tgz next to cars_annos.mat.")

STANDARD_IMAGES = 16_185
STANDARD_CLASSES = 196
STANDARD_FIRST_HALF = 8_054  # classes 1-98
STANDARD_SECOND_HALF = 8_131  # classes 99-196


def read_annotations(path: Path) -> np.ndarray:
    """The `annotations` struct array of cars_annos.mat, as a 1-d numpy record array."""
    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True)
    except PermissionError:
        raise permission_error(TITLE, path) from None
    except Exception as e:  # scipy raises several types (ValueError, MatReadError, TypeError...)
        raise DatasetError(f"{TITLE}: cannot read {path} as a MATLAB file ({type(e).__name__}: "
                           f"{e}); is it the original cars_annos.mat?") from None
    if "annotations" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{TITLE}: {path} has no `annotations` variable (found: {keys}); "
                           f"expected the full-dataset cars_annos.mat")
    annotations = np.atleast_1d(mat["annotations"])  # squeeze_me turns a single entry to 0-d
    fields = annotations.dtype.names or ()
    absent = [f for f in REQUIRED_FIELDS if f not in fields]
    if absent:
        # The devkit's cars_train_annos.mat / cars_test_annos.mat also hold `annotations`, but
        # name images by `fname` (relative to cars_train/ or cars_test/), not relative_im_path.
        devkit = (" This looks like the devkit's cars_train_annos.mat / cars_test_annos.mat; "
                  "expected the full-dataset cars_annos.mat" if "fname" in fields else "")
        raise DatasetError(f"{TITLE}: the `annotations` struct in {path} lacks the fields "
                           f"{absent} (it has {list(fields)}).{devkit}")
    return annotations


def annotation_labels(annotations: np.ndarray, path: Path) -> np.ndarray:
    try:
        return np.array([int(np.squeeze(c)) for c in annotations["class"]], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{TITLE}: {path}: `class` must hold one integer per image "
                           f"({e})") from None


def load_cars(root: Path, check_counts: bool = True) -> Records:
    """Read Cars196 under root (the folder holding cars_annos.mat and car_ims/)."""
    root = absolute_root(root)
    mat_path = root / ANNOTATIONS
    if not mat_path.is_file():
        raise layout_error(TITLE, root, f"{mat_path} is missing", LAYOUT, DOWNLOAD_HINT)
    annotations = read_annotations(mat_path)
    labels = annotation_labels(annotations, mat_path)
    paths = [root / str(np.squeeze(p)) for p in annotations["relative_im_path"]]
    if check_counts:
        verify_standard_counts(TITLE, root, [
            CountCheck("images", STANDARD_IMAGES, len(labels)),
            CountCheck("classes", STANDARD_CLASSES, len(np.unique(labels))),
            CountCheck("images in classes 1-98", STANDARD_FIRST_HALF,
                       count_in_range(labels, 1, 98)),
            CountCheck("images in classes 99-196", STANDARD_SECOND_HALF,
                       count_in_range(labels, 99, 196)),
        ])
    check_images_exist(TITLE, root, paths)
    return Records(name="cars196", labels=labels, paths=paths, images=None, partition=None,
                   root=root)
