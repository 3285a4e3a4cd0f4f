"""The four on-disk readers (harness/datasets/) against small fakes in the real layouts and file
formats (tests/fake_datasets.py): what they read, the data-root conventions, the DatasetError
every broken folder or file gives, and the path from a folder on disk to the MLRC split."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from fake_datasets import (cars_annotations, make_fake_cars, make_fake_cub, make_fake_inshop,
                           make_fake_sop, write_jpeg)
from harness.config import StudyConfig
from harness.data import (UInt8Images, fold_indices, prepare_data, query_gallery_indices,
                          resolve_data_root)
from harness.datasets import DATASETS, get_dataset, load_records
from harness.datasets.cars import load_cars
from harness.datasets.cub import load_cub
from harness.datasets.inshop import load_inshop
from harness.datasets.sop import load_sop
from harness.errors import ConfigError, DatasetError, HarnessError
from harness.splits import make_split, manifest_text, sample_indices, split_manifest
from harness.transforms import UInt8Crop

# name -> (builder with default sizes, reader, expected number of images of that default fake)
FAKES = {
    "cub200": (make_fake_cub, load_cub, 4 * 3),
    "cars196": (make_fake_cars, load_cars, 4 * 3),
    "sop": (make_fake_sop, load_sop, (3 + 3) * 2),
    "inshop": (make_fake_inshop, load_inshop, (4 + 3) * 2),
}


def assert_paths_exist_under(records, folder: Path):
    assert records.paths is not None and records.images is None
    for path in records.paths:
        assert path.is_absolute() and path.is_file(), path
        assert folder in path.parents, (path, folder)


# ---------------------------------------------------------------------------------------------
# 1. Each reader reads its layout


def test_cub_reads_its_layout(tmp_path):
    root = make_fake_cub(tmp_path / "CUB_200_2011", n_classes=5, per_class=3)
    records = load_cub(root, check_counts=False)
    assert records.name == "cub200" and records.partition is None
    assert records.root == root
    assert len(records) == 15
    # labels as image_class_labels.txt gives them: 1-based, in image-id order
    assert records.labels.dtype == np.int64
    assert records.labels.tolist() == [c for c in range(1, 6) for _ in range(3)]
    assert_paths_exist_under(records, root / "images")
    assert records.paths[0].parent.name == "001.Bird_species_1"
    assert records.paths[-1].parent.name == "005.Bird_species_5"


def test_cub_orders_by_image_id_not_by_line(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=4, per_class=3)
    expected = load_cub(root, check_counts=False)
    for name in ("images.txt", "image_class_labels.txt"):
        lines = (root / name).read_text().splitlines()
        random.Random(name).shuffle(lines)
        (root / name).write_text("\n".join(lines) + "\n")
    shuffled = load_cub(root, check_counts=False)
    assert shuffled.labels.tolist() == expected.labels.tolist()
    assert shuffled.paths == expected.paths


def test_cub_ignores_the_classification_split(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    with_split = load_cub(root, check_counts=False)
    (root / "train_test_split.txt").unlink()
    without = load_cub(root, check_counts=False)
    assert len(with_split) == len(without) == 12  # every image, not just the "train" ones
    assert with_split.paths == without.paths


def test_cub_accepts_windows_line_endings_and_blank_lines(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    expected = load_cub(root, check_counts=False)
    for name in ("images.txt", "image_class_labels.txt"):
        text = (root / name).read_text()
        (root / name).write_bytes((text.replace("\n", "\r\n") + "\r\n").encode())
    records = load_cub(root, check_counts=False)
    assert records.paths == expected.paths and records.labels.tolist() == expected.labels.tolist()


def test_cars_reads_cars_annos_mat(tmp_path):
    root = make_fake_cars(tmp_path / "cars", n_classes=4, per_class=3)
    records = load_cars(root, check_counts=False)
    assert records.name == "cars196" and records.partition is None and records.root == root
    assert len(records) == 12  # the `test` flag (classification split) is ignored
    assert records.labels.dtype == np.int64
    assert records.labels.tolist() == [c for c in range(1, 5) for _ in range(3)]
    assert_paths_exist_under(records, root / "car_ims")
    assert [p.name for p in records.paths[:2]] == ["000001.jpg", "000002.jpg"]


def test_cars_fake_is_the_real_mat_format(tmp_path):
    """What loadmat (no squeezing) gives for the fake is what it gives for Stanford's file."""
    root = make_fake_cars(tmp_path / "cars", n_classes=2, per_class=2)
    mat = scipy.io.loadmat(str(root / "cars_annos.mat"))
    annotations = mat["annotations"]
    assert annotations.shape == (1, 4)
    assert annotations.dtype.names == ("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2",
                                       "bbox_y2", "class", "test")
    first = annotations[0, 0]
    assert first["relative_im_path"].tolist() == ["car_ims/000001.jpg"]
    assert first["class"].dtype == np.uint8 and first["class"].shape == (1, 1)
    assert mat["class_names"].shape == (1, 2)


def test_cars_reads_a_single_annotation(tmp_path):
    """squeeze_me turns a 1x1 struct array into a 0-d record; the reader must still see one."""
    root = tmp_path / "cars"
    write_jpeg(root / "car_ims" / "000001.jpg", np.random.default_rng(0))
    scipy.io.savemat(str(root / "cars_annos.mat"),
                     {"annotations": cars_annotations([("car_ims/000001.jpg", 7, 0)])})
    records = load_cars(root, check_counts=False)
    assert records.labels.tolist() == [7]
    assert records.paths == [root / "car_ims" / "000001.jpg"]


def test_sop_reads_both_listings_train_then_test(tmp_path):
    root = make_fake_sop(tmp_path / "sop", n_train_classes=3, n_test_classes=2, per_class=2)
    records = load_sop(root, check_counts=False)
    assert records.name == "sop" and records.partition is None and records.root == root
    assert len(records) == 10
    assert records.labels.tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert_paths_exist_under(records, root)
    assert records.paths[0].relative_to(root).as_posix() == "bicycle_final/111085122871_0.JPG"
    assert records.paths[-1].parent.name == "fan_final"  # class 5: 5th category


def test_inshop_reads_partitions_and_numbers_items_by_first_appearance(tmp_path):
    root = make_fake_inshop(tmp_path / "inshop", n_train_items=4, n_eval_items=3, per_item=3)
    records = load_inshop(root, check_counts=False)
    assert records.name == "inshop" and records.root == root
    assert len(records) == 21
    assert records.labels.dtype == np.int64
    assert records.labels.tolist() == [i for i in range(7) for _ in range(3)]  # id_00000001 -> 0
    assert_paths_exist_under(records, root / "img")
    part = records.partition
    assert sorted(set(part.tolist())) == ["gallery", "query", "train"]
    assert (part == "train").sum() == 12 and (part == "query").sum() == 3
    assert (part == "gallery").sum() == 6
    train_items = set(records.labels[part == "train"].tolist())
    query_items = set(records.labels[part == "query"].tolist())
    gallery_items = set(records.labels[part == "gallery"].tolist())
    assert len(train_items) == 4 and query_items == gallery_items and len(query_items) == 3
    assert not train_items & query_items
    # the listing interleaves train and eval items: labels follow the file, not the status
    listing = (root / "list_eval_partition.txt").read_text().splitlines()
    first_item_status = listing[2].split()[2]
    assert part[0] == first_item_status


def test_inshop_accepts_the_archive_layout(tmp_path):
    flat = load_inshop(make_fake_inshop(tmp_path / "flat"), check_counts=False)
    root = make_fake_inshop(tmp_path / "archive", archive_layout=True)
    assert (root / "Eval" / "list_eval_partition.txt").is_file()
    records = load_inshop(root, check_counts=False)
    assert_paths_exist_under(records, root / "Img" / "img")
    assert records.labels.tolist() == flat.labels.tolist()
    assert records.partition.tolist() == flat.partition.tolist()


@pytest.mark.parametrize("name", sorted(FAKES))
def test_registry_loads_each_fake(tmp_path, name):
    build, _, n = FAKES[name]
    root = build(tmp_path / name)
    records = load_records(name, root, check_counts=False)
    assert records.name == name and len(records) == n
    spec = get_dataset(name)
    assert spec is DATASETS[name] and spec.split_kind == ("inshop" if name == "inshop" else "mlrc")


def test_readers_do_not_decode_images(tmp_path):
    """Loading parses listings and stats files only; a garbage image is found when read."""
    root = make_fake_cub(tmp_path / "cub")
    records = load_cub(root, check_counts=False)
    records.paths[4].write_bytes(b"garbage")
    load_cub(root, check_counts=False)  # no error at load time


# ---------------------------------------------------------------------------------------------
# Standard counts: on by default, a clear "expected vs found" when a small copy is loaded


@pytest.mark.parametrize("name,expected_lines", [
    ("cub200", ["images: expected 11,788, found 12", "classes: expected 200, found 4",
                "images in classes 1-100: expected 5,864, found 12",
                "images in classes 101-200: expected 5,924, found 0"]),
    ("cars196", ["images: expected 16,185, found 12", "classes: expected 196, found 4",
                 "images in classes 1-98: expected 8,054, found 12"]),
    ("sop", ["images: expected 120,053, found 12", "classes: expected 22,634, found 6",
             "images in Ebay_train.txt: expected 59,551, found 6",
             "classes in Ebay_test.txt: expected 11,316, found 3"]),
    ("inshop", ["images (rows): expected 52,712, found 14",
                "images (count on line 1): expected 52,712, found 14",
                "items: expected 7,982, found 7", "train items: expected 3,997, found 4",
                "query images: expected 14,218, found 3"]),
])
def test_count_check_says_expected_and_found(tmp_path, name, expected_lines):
    build, load, _ = FAKES[name]
    root = build(tmp_path / name)
    with pytest.raises(DatasetError) as info:
        load(root)  # check_counts defaults to True
    message = str(info.value)
    assert "does not have the standard counts" in message and str(root) in message
    for line in expected_lines:
        assert line in message
    assert "data.check_counts=false" in message and "check_counts=False" in message
    # the registry and the study config take the same switch
    with pytest.raises(DatasetError, match="standard counts"):
        load_records(name, root)
    assert len(load_records(name, root, check_counts=False)) == len(load(root, False))


def test_count_check_passes_when_only_matching_counts_are_listed(tmp_path, monkeypatch):
    """A copy with the standard counts loads with checking on (counts patched down to the fake)."""
    from harness.datasets import cub

    root = make_fake_cub(tmp_path / "cub", n_classes=4, per_class=3)
    monkeypatch.setattr(cub, "STANDARD_IMAGES", 12)
    monkeypatch.setattr(cub, "STANDARD_CLASSES", 4)
    monkeypatch.setattr(cub, "STANDARD_FIRST_HALF", 12)
    monkeypatch.setattr(cub, "STANDARD_SECOND_HALF", 0)
    assert len(load_cub(root)) == 12


# ---------------------------------------------------------------------------------------------
# 2. Missing or malformed files: a DatasetError naming the path and what was expected


def raises_dataset_error(load, root, *fragments, check_counts=False) -> str:
    with pytest.raises(DatasetError) as info:
        load(root, check_counts=check_counts)
    message = str(info.value)
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)
    assert isinstance(info.value, HarnessError)
    return message


def test_cub_missing_images_txt(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    (root / "images.txt").unlink()
    message = raises_dataset_error(load_cub, root, root / "images.txt",
                                   root / "CUB_200_2011" / "images.txt",
                                   "Expected layout under the data root", "image_class_labels.txt")
    assert "CUB_200_2011.tgz" in message  # where to get it


def test_cub_missing_label_file(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    (root / "image_class_labels.txt").unlink()
    raises_dataset_error(load_cub, root, f"{root / 'image_class_labels.txt'} is missing",
                         "class ids 1-200")


def test_missing_root_folder_says_so(tmp_path):
    root = tmp_path / "nowhere"
    raises_dataset_error(load_cub, root, f"the folder {root} does not exist")
    raises_dataset_error(load_cars, root, root / "cars_annos.mat", "does not exist")
    raises_dataset_error(load_sop, root, root / "Ebay_train.txt", "does not exist")
    raises_dataset_error(load_inshop, root, root / "list_eval_partition.txt", "does not exist")


def test_cub_listing_files_disagree(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[:-1]) + "\n")
    raises_dataset_error(load_cub, root, "different image ids", "[12]")


@pytest.mark.parametrize("bad_line,fragment", [
    ("13 a b", "expected 2 columns (image_id path), found 3"),
    ("x 001.Bird_species_1/x.jpg", "image_id 'x' is not an integer"),
    ("1 001.Bird_species_1/dup.jpg", "lists image_id 1 twice"),
])
def test_cub_malformed_images_txt(tmp_path, bad_line, fragment):
    root = make_fake_cub(tmp_path / "cub")
    with (root / "images.txt").open("a") as f:
        f.write(bad_line + "\n")
    raises_dataset_error(load_cub, root, root / "images.txt", fragment)


def test_cub_non_integer_class(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    path = root / "image_class_labels.txt"
    path.write_text(path.read_text().replace("1 1\n", "1 one\n", 1))
    raises_dataset_error(load_cub, root, path, "class_id 'one' is not an integer")


def test_listing_that_is_not_text(tmp_path):
    root = make_fake_cub(tmp_path / "cub")
    (root / "images.txt").write_bytes(b"\xff\xfe\x00\x81 binary")
    raises_dataset_error(load_cub, root, root / "images.txt", "not a UTF-8 text file")


@pytest.mark.parametrize("name", sorted(FAKES))
def test_missing_listed_image(tmp_path, name):
    build, load, n = FAKES[name]
    root = build(tmp_path / name)
    victim = load(root, check_counts=False).paths[5]
    victim.unlink()
    raises_dataset_error(load, root, f"1 of the {n} images listed are missing", victim,
                         "fully extracted")


def test_many_missing_images_are_summarised(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=4, per_class=3)
    for folder in (root / "images").iterdir():
        for f in folder.iterdir():
            f.unlink()
        folder.rmdir()
    message = raises_dataset_error(load_cub, root, "12 of the 12 images listed are missing",
                                   "... and 7 more")
    assert message.count("Bird_species") == 5  # the first five are named


def test_cars_missing_mat(tmp_path):
    root = make_fake_cars(tmp_path / "cars")
    (root / "cars_annos.mat").unlink()
    message = raises_dataset_error(load_cars, root, f"{root / 'cars_annos.mat'} is missing",
                                   "struct array `annotations`")
    assert "does not exist" not in message  # the folder is there, only the file is not


def test_cars_mat_that_is_not_a_mat_file(tmp_path):
    root = make_fake_cars(tmp_path / "cars")
    (root / "cars_annos.mat").write_bytes(b"<html>404 Not Found</html>" * 10)
    raises_dataset_error(load_cars, root, root / "cars_annos.mat", "cannot read",
                         "MATLAB file")


def test_cars_truncated_mat(tmp_path):
    root = make_fake_cars(tmp_path / "cars")
    path = root / "cars_annos.mat"
    path.write_bytes(path.read_bytes()[:300])
    raises_dataset_error(load_cars, root, path, "cannot read")


def test_cars_mat_without_annotations(tmp_path):
    root = make_fake_cars(tmp_path / "cars")
    scipy.io.savemat(str(root / "cars_annos.mat"), {"labels": np.arange(3)})
    raises_dataset_error(load_cars, root, root / "cars_annos.mat",
                         "no `annotations` variable", "['labels']")


def test_cars_devkit_annotation_file_is_recognised(tmp_path):
    """The devkit's cars_train_annos.mat also holds `annotations`, but with `fname` (a bare
    file name under cars_train/) instead of relative_im_path."""
    root = make_fake_cars(tmp_path / "cars")
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    devkit = np.zeros((1, 2), dtype=[(f, "O") for f in fields])
    for i in range(2):
        devkit[0, i] = (np.array([[1]]), np.array([[1]]), np.array([[5]]), np.array([[5]]),
                        np.array([[i + 1]], np.uint8), np.array([f"{i + 1:05d}.jpg"]))
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": devkit})
    raises_dataset_error(load_cars, root, root / "cars_annos.mat", "relative_im_path",
                         "cars_train_annos.mat")


def test_cars_non_integer_class(tmp_path):
    root = make_fake_cars(tmp_path / "cars")
    annotations = cars_annotations([("car_ims/000001.jpg", 1, 0)])
    annotations[0, 0]["class"] = np.array(["one"])
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": annotations})
    raises_dataset_error(load_cars, root, root / "cars_annos.mat", "`class`")


def test_sop_missing_one_listing(tmp_path):
    root = make_fake_sop(tmp_path / "sop")
    (root / "Ebay_test.txt").unlink()
    raises_dataset_error(load_sop, root, f"{root / 'Ebay_test.txt'} is missing", "60,502 rows")


def test_sop_missing_both_listings(tmp_path):
    root = make_fake_sop(tmp_path / "sop")
    (root / "Ebay_test.txt").unlink()
    (root / "Ebay_train.txt").unlink()
    raises_dataset_error(load_sop, root, root / "Ebay_train.txt",
                         root / "Stanford_Online_Products" / "Ebay_train.txt",
                         "Stanford_Online_Products.zip")


def test_sop_listing_without_header(tmp_path):
    root = make_fake_sop(tmp_path / "sop")
    path = root / "Ebay_train.txt"
    path.write_text("\n".join(path.read_text().splitlines()[1:]) + "\n")
    raises_dataset_error(load_sop, root, path,
                         "must start with the header line 'image_id class_id super_class_id path'",
                         "found '1 1 1 bicycle_final/")


def test_sop_short_row(tmp_path):
    root = make_fake_sop(tmp_path / "sop")
    with (root / "Ebay_test.txt").open("a") as f:
        f.write("7 4 4 \n")
    raises_dataset_error(load_sop, root, root / "Ebay_test.txt", "line 8", "expected 4 columns")


def test_inshop_missing_listing(tmp_path):
    root = make_fake_inshop(tmp_path / "inshop")
    (root / "list_eval_partition.txt").unlink()
    raises_dataset_error(load_inshop, root, root / "list_eval_partition.txt",
                         root / "Eval" / "list_eval_partition.txt", "DeepFashion")


@pytest.mark.parametrize("edit,fragments", [
    (lambda lines: lines[1:], ["expected an image count on line 1 and the header"]),
    (lambda lines: ["many"] + lines[1:], ["the image count on line 1 'many' is not an integer"]),
    (lambda lines: lines[:3] + [lines[3].replace("train", "val")] + lines[4:],
     ["evaluation_status 'val'", "not one of train, query, gallery"]),
])
def test_inshop_malformed_listing(tmp_path, edit, fragments):
    root = make_fake_inshop(tmp_path / "inshop", n_train_items=7, n_eval_items=0)
    path = root / "list_eval_partition.txt"
    path.write_text("\n".join(edit(path.read_text().splitlines())) + "\n")
    raises_dataset_error(load_inshop, root, path, *fragments)


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="unknown dataset 'cub'.*cub200, cars196, sop"):
        get_dataset("cub")


# ---------------------------------------------------------------------------------------------
# 3. A corrupt image: a DatasetError naming the file when it is read


def corrupt(records, i: int, kind: str) -> Path:
    path = records.paths[i]
    if kind == "garbage":
        path.write_bytes(b"\x00\x01 this is not an image \xfe" * 4)
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    return path


@pytest.mark.parametrize("name", sorted(FAKES))
@pytest.mark.parametrize("kind", ["garbage", "truncated", "empty"])
def test_corrupt_image_names_the_file(tmp_path, name, kind):
    build, load, _ = FAKES[name]
    records = load(build(tmp_path / name), check_counts=False)
    path = corrupt(records, 3, kind)
    assert records.load_image(2).mode == "RGB"  # the others still read
    with pytest.raises(DatasetError) as info:
        records.load_image(3)
    message = str(info.value)
    assert str(path) in message and name in message and "corrupt or not an image" in message


def test_corrupt_image_through_the_training_loader_path(tmp_path):
    """UInt8Images without a cache (data.cache=false) decodes on access, as workers do."""
    records = load_cub(make_fake_cub(tmp_path / "cub"), check_counts=False)
    path = corrupt(records, 0, "garbage")
    dataset = UInt8Images(records, np.arange(len(records)), UInt8Crop(6, train=False),
                          resized=None, resize=8)
    assert dataset[1][0].shape == (3, 6, 6)
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        dataset[0]


def test_image_deleted_after_loading(tmp_path):
    records = load_sop(make_fake_sop(tmp_path / "sop"), check_counts=False)
    records.paths[1].unlink()
    with pytest.raises(DatasetError, match=r"image file .*_1\.JPG is missing"):
        records.load_image(1)


# ---------------------------------------------------------------------------------------------
# 4. Data-root conventions (README "Data sets on disk")


def test_cub_root_may_be_the_archive_folder_or_its_parent(tmp_path):
    parent = make_fake_cub(tmp_path / "data", nested=True)
    assert (parent / "CUB_200_2011" / "images.txt").is_file()
    from_parent = load_cub(parent, check_counts=False)
    from_folder = load_cub(parent / "CUB_200_2011", check_counts=False)
    assert from_parent.root == from_folder.root == parent / "CUB_200_2011"
    assert from_parent.paths == from_folder.paths


def test_sop_root_may_be_the_archive_folder_or_its_parent(tmp_path):
    parent = make_fake_sop(tmp_path / "data", nested=True)
    from_parent = load_sop(parent, check_counts=False)
    from_folder = load_sop(parent / "Stanford_Online_Products", check_counts=False)
    assert from_parent.paths == from_folder.paths and len(from_parent) == 12


def test_relative_and_home_roots_become_absolute(tmp_path, monkeypatch):
    make_fake_cub(tmp_path / "cub")
    monkeypatch.chdir(tmp_path)
    records = load_records("cub200", "cub", check_counts=False)
    assert records.root == tmp_path / "cub" and all(p.is_absolute() for p in records.paths)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_records("cub200", "~/cub", check_counts=False).root == tmp_path / "cub"


def config(dataset: str = "cub200", root: str = "") -> StudyConfig:
    cfg = StudyConfig()
    cfg.data.dataset, cfg.data.root = dataset, root
    cfg.data.check_counts, cfg.data.cache = False, False
    return cfg


def test_data_root_from_harness_data(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    assert resolve_data_root(config("cars196")) == tmp_path / "cars196"
    assert resolve_data_root(config("cars196", str(tmp_path / "x"))) == tmp_path / "x"
    monkeypatch.delenv("HARNESS_DATA")
    with pytest.raises(ConfigError, match="--data-root.*HARNESS_DATA") as info:
        resolve_data_root(config("sop"))
    assert "Ebay_train.txt" in str(info.value)  # the expected layout is shown


def test_prepare_data_finds_harness_data_subfolder(tmp_path, monkeypatch):
    """$HARNESS_DATA/cub200 may itself hold the archive's CUB_200_2011/ folder."""
    make_fake_cub(tmp_path / "cub200", n_classes=16, per_class=2, nested=True)
    monkeypatch.setenv("HARNESS_DATA", str(tmp_path))
    data = prepare_data(config("cub200"))
    assert len(data.records) == 32
    assert data.records.root == tmp_path / "cub200" / "CUB_200_2011"
    # with count checking on (the default), the same folder is refused with the counts
    cfg = config("cub200")
    cfg.data.check_counts = True
    with pytest.raises(DatasetError, match="expected 11,788, found 32"):
        prepare_data(cfg)


# ---------------------------------------------------------------------------------------------
# 5. From a folder on disk to the split and the loaders


@pytest.mark.parametrize("name,build", [
    ("cub200", lambda root: make_fake_cub(root, n_classes=16, per_class=2)),
    ("cars196", lambda root: make_fake_cars(root, n_classes=16, per_class=2)),
    ("sop", lambda root: make_fake_sop(root, n_train_classes=8, n_test_classes=8, per_class=2)),
])
def test_fake_folder_to_mlrc_split(tmp_path, name, build):
    root = build(tmp_path / name)
    data = prepare_data(config(name, str(root)))
    records, split = data.records, data.split
    assert split.kind == "mlrc" and len(records) == 32
    # 16 classes 1..16: test = the last 8, then 2 val and 6 train per fold among 1..8
    assert split.test_classes.tolist() == list(range(9, 17))
    assert split.folds[0].train_classes.tolist() == list(range(1, 7))
    assert split.folds[0].val_classes.tolist() == [7, 8]
    for fold in split.folds:
        train, val = fold_indices(data, fold)
        assert len(train) == 12 and len(val) == 4
        assert not np.isin(records.labels[train], split.test_classes).any()
    query, gallery = query_gallery_indices(records, split)
    assert gallery is None and len(query) == 16
    # images of the split decode through the training input path
    dataset = UInt8Images(records, query, UInt8Crop(6, train=False), data.resized, resize=8)
    image, label = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 6, 6) and label == 9
    manifest = split_manifest(records, split)
    (tmp_path / "split.json").write_text(manifest_text(manifest))
    assert json.loads((tmp_path / "split.json").read_text()) == manifest
    assert manifest["dataset"] == name and manifest["test"]["query_images"] == 16


def test_fake_cub_through_the_image_cache(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=16, per_class=1)
    cfg = config("cub200", str(root))
    cfg.data.cache, cfg.data.cache_dir, cfg.data.resize = True, str(tmp_path / "cache"), 8
    data = prepare_data(cfg)
    assert data.resized is not None and len(data.resized) == 16
    assert data.resized[0].shape == (8, 10, 3)  # 8x10 JPEG, shorter side already 8
    uncached = UInt8Images(data.records, np.arange(16), UInt8Crop(8, train=False), None, 8)
    cached = UInt8Images(data.records, np.arange(16), UInt8Crop(8, train=False), data.resized, 8)
    assert torch.equal(cached[5][0], uncached[5][0])


def test_fake_inshop_to_its_split(tmp_path):
    root = make_fake_inshop(tmp_path / "inshop", n_train_items=8, n_eval_items=3, per_item=2)
    data = prepare_data(config("inshop", str(root)))
    records, split = data.records, data.split
    assert split.kind == "inshop"
    train_items = np.unique(records.labels[records.partition == "train"])
    assert len(train_items) == 8
    for fold in split.folds:
        assert len(fold.train_classes) == 6 and len(fold.val_classes) == 2
        assert np.isin(np.concatenate([fold.train_classes, fold.val_classes]), train_items).all()
        train, val = fold_indices(data, fold)
        assert (records.partition[np.concatenate([train, val])] == "train").all()
    query, gallery = query_gallery_indices(records, split)
    assert len(query) == 3 and len(gallery) == 3
    assert set(records.labels[query]) == set(records.labels[gallery]) == set(split.test_classes)
    assert len(sample_indices(records, split.test_classes)) == 6


def test_too_few_classes_for_the_split_is_a_dataset_error(tmp_path):
    root = make_fake_cub(tmp_path / "cub", n_classes=4, per_class=2)
    with pytest.raises(DatasetError, match="at least 16 classes.*has 4"):
        make_split(load_cub(root, check_counts=False), "mlrc")


def test_corrupt_image_through_the_image_cache_workers(tmp_path):
    """data.cache=true (the default) decodes in a process pool; a truncated JPEG (its header
    still reads) must come back from the worker as the DatasetError naming the file."""
    root = make_fake_cub(tmp_path / "cub", n_classes=16, per_class=1)
    path = corrupt(load_cub(root, check_counts=False), 7, "truncated")
    cfg = config("cub200", str(root))
    cfg.data.cache, cfg.data.cache_dir, cfg.data.resize = True, str(tmp_path / "cache"), 8
    with pytest.raises(DatasetError, match=re.escape(str(path))):
        prepare_data(cfg)
    assert not any((tmp_path / "cache").glob("cub200-*"))  # no half-built cache left behind
