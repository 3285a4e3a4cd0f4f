"""Small fake copies of the four on-disk benchmarks, in their real layouts and file formats.

Each builder writes under `root` exactly what the original archive holds (listing files with
the real columns and headers, `cars_annos.mat` as the MATLAB struct array Stanford ships, real
JPEG files in the real folder structure), only with a few classes and images, and returns the
folder to pass to the reader. The tests load them with check_counts=False.

Real samples of each format, for reference:
  CUB images.txt                 "1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg"
  CUB image_class_labels.txt     "1 1"
  Cars cars_annos.mat            annotations(1, N): relative_im_path 'car_ims/000001.jpg',
                                 bbox_x1..bbox_y2, class (uint8, 1-based), test (0/1);
                                 class_names(1, 196) cell of strings
  SOP Ebay_train.txt             "image_id class_id super_class_id path" then
                                 "1 1 1 bicycle_final/111085122871_0.JPG"
  In-Shop list_eval_partition    "52712" / "image_name item_id evaluation_status" /
                                 "img/WOMEN/Dresses/id_00000002/02_1_front.jpg  id_00000002 train"
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
from PIL import Image

SOP_CATEGORIES = ("bicycle", "cabinet", "chair", "coffee_maker", "fan", "kettle", "lamp", "mug",
                  "sofa", "stapler", "table", "toaster")


def write_jpeg(path: Path, rng: np.random.Generator, size: int = 8) -> Path:
    """A tiny real JPEG of random colours."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, (size, size + 2, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG", quality=90)
    return path


def make_fake_cub(root: Path, n_classes: int = 4, per_class: int = 3, *,
                  nested: bool = False, seed: int = 0) -> Path:
    """CUB-200-2011: images.txt, image_class_labels.txt, images/<NNN.Name>/<file>.jpg,
    plus the train_test_split.txt the reader must ignore.

    Returns the CUB_200_2011 folder; with nested=True it is created as root/CUB_200_2011 (the
    archive's own top folder) and root, its parent, is returned instead."""
    rng = np.random.default_rng(seed)
    cub = root / "CUB_200_2011" if nested else root
    cub.mkdir(parents=True, exist_ok=True)
    image_lines, label_lines, split_lines = [], [], []
    image_id = 0
    for c in range(1, n_classes + 1):
        folder = f"{c:03d}.Bird_species_{c}"
        for k in range(per_class):
            image_id += 1
            name = f"Bird_Species_{c}_{k:04d}_{1000 + image_id}.jpg"
            write_jpeg(cub / "images" / folder / name, rng)
            image_lines.append(f"{image_id} {folder}/{name}")
            label_lines.append(f"{image_id} {c}")
            split_lines.append(f"{image_id} {k % 2}")
    (cub / "images.txt").write_text("\n".join(image_lines) + "\n")
    (cub / "image_class_labels.txt").write_text("\n".join(label_lines) + "\n")
    (cub / "train_test_split.txt").write_text("\n".join(split_lines) + "\n")
    return root if nested else cub


def cars_annotations(entries: list[tuple[str, int, int]]) -> np.ndarray:
    """The `annotations` struct array of cars_annos.mat, shape (1, N), as MATLAB stores it:
    one cell per field, char for the path and small unsigned ints for the numbers."""
    fields = ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test")
    annotations = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, (path, label, test) in enumerate(entries):
        annotations[0, i] = (np.array([path]),
                             np.array([[1]], np.uint8), np.array([[2]], np.uint8),
                             np.array([[7]], np.uint16), np.array([[6]], np.uint16),
                             np.array([[label]], np.uint8), np.array([[test]], np.uint8))
    return annotations


def make_fake_cars(root: Path, n_classes: int = 4, per_class: int = 3, *,
                   seed: int = 0) -> Path:
    """Cars196: cars_annos.mat (struct array `annotations` + cell `class_names`) and
    car_ims/NNNNNN.jpg, images numbered from 1 in class order as in the original."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for c in range(1, n_classes + 1):
        for k in range(per_class):
            path = f"car_ims/{len(entries) + 1:06d}.jpg"
            write_jpeg(root / path, rng)
            entries.append((path, c, k % 2))
    class_names = np.empty((1, n_classes), dtype=object)
    for c in range(n_classes):
        class_names[0, c] = f"Make{c + 1} Model Sedan 2012"
    scipy.io.savemat(str(root / "cars_annos.mat"),
                     {"annotations": cars_annotations(entries), "class_names": class_names})
    return root


def make_fake_sop(root: Path, n_train_classes: int = 3, n_test_classes: int = 3,
                  per_class: int = 2, *, nested: bool = False, seed: int = 0) -> Path:
    """Stanford Online Products: Ebay_train.txt (classes 1..n_train) and Ebay_test.txt (the
    next n_test classes), each with the header row and image ids from 1, and the images in
    <category>_final/<product>_<k>.JPG. Each class is one product of one category
    (super_class_id 1-12 cycles through the 12 categories).

    With nested=True the files go into root/Stanford_Online_Products and root is returned."""
    rng = np.random.default_rng(seed)
    sop = root / "Stanford_Online_Products" if nested else root
    sop.mkdir(parents=True, exist_ok=True)
    header = "image_id class_id super_class_id path"
    class_id = 0
    for name, n_classes in (("Ebay_train.txt", n_train_classes),
                            ("Ebay_test.txt", n_test_classes)):
        lines = [header]
        for _ in range(n_classes):
            class_id += 1
            super_id = (class_id - 1) % len(SOP_CATEGORIES) + 1
            product = 111085122870 + class_id
            for k in range(per_class):
                path = f"{SOP_CATEGORIES[super_id - 1]}_final/{product}_{k}.JPG"
                write_jpeg(sop / path, rng)
                lines.append(f"{len(lines)} {class_id} {super_id} {path}")
        (sop / name).write_text("\n".join(lines) + "\n")
    return root if nested else sop


def make_fake_inshop(root: Path, n_train_items: int = 4, n_eval_items: int = 3,
                     per_item: int = 2, *, archive_layout: bool = False,
                     seed: int = 0) -> Path:
    """In-Shop: list_eval_partition.txt (line 1 the count, line 2 the header, then padded rows
    as in the original) and img/<MEN|WOMEN>/<category>/id_XXXXXXXX/NN_K_view.jpg.

    Train items have only train images; each eval item has one query image and per_item - 1
    gallery images (items are disjoint between train and query/gallery, as in the original).
    archive_layout=True writes the archive's own layout, Eval/list_eval_partition.txt next to
    Img/img/..., instead of list_eval_partition.txt next to img/."""
    if per_item < 2:
        raise ValueError("an eval item needs a query and at least one gallery image")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    listing = root / "Eval" / "list_eval_partition.txt" if archive_layout else \
        root / "list_eval_partition.txt"
    image_base = root / "Img" if archive_layout else root
    # Train and eval items interleave in the file (as in the original), so "label = order of
    # first appearance" differs from "train items first".
    is_train = np.array([True] * n_train_items + [False] * n_eval_items)[
        rng.permutation(n_train_items + n_eval_items)]
    rows = []
    for item in range(1, n_train_items + n_eval_items + 1):
        item_id = f"id_{item:08d}"
        gender, category = ("WOMEN", "Dresses") if item % 2 else ("MEN", "Denim")
        for k in range(per_item):
            name = f"img/{gender}/{category}/{item_id}/{k + 1:02d}_{k + 1}_front.jpg"
            write_jpeg(image_base / name, rng)
            if is_train[item - 1]:
                status = "train"
            else:
                status = "query" if k == 0 else "gallery"
            rows.append(f"{name:<60}{item_id:<20}{status}")
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text("\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows])
                       + "\n")
    return root


__all__ = ["write_jpeg", "make_fake_cub", "make_fake_cars", "cars_annotations", "make_fake_sop",
           "make_fake_inshop", "SOP_CATEGORIES"]
