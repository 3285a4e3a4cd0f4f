"""The fast input pipeline (decode-once uint8 cache, crop in the workers, normalise on the
device) against the reference PIL transforms of the protocol (harness/transforms.py)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import functional as TF

from conftest import SHAPES, write_jpegs
from harness import image_cache
from harness.config import load_study
from harness.data import UInt8Images, loader_workers
from harness.errors import DatasetError
from harness.image_cache import build_or_open, resized_shape
from harness.models import TRUNKS
from harness.transforms import BatchNormalize, UInt8Crop, build_transforms

def test_resized_shape_is_torchvision_resize():
    for h, w in SHAPES + [(10, 11), (11, 10)]:
        out = TF.resize(Image.new("RGB", (w, h)), 64)
        assert resized_shape(h, w, 64) == (out.height, out.width)


def test_cache_holds_exactly_the_protocol_resize(tmp_path):
    records = write_jpegs(tmp_path / "imgs")
    cache = build_or_open(records, 64, tmp_path / "cache", workers=2)
    assert cache.where and Path(cache.where, "done.json").exists()
    for i, path in enumerate(records.paths):
        with Image.open(path) as im:
            expected = np.asarray(TF.resize(im.convert("RGB"), 64))
        np.testing.assert_array_equal(cache[i], expected)
    assert cache.nbytes == sum(np.prod(resized_shape(h, w, 64)) * 3 for h, w in SHAPES)


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    records = write_jpegs(tmp_path / "imgs")
    first = build_or_open(records, 48, tmp_path / "cache", workers=1)

    def no_rebuild(*_args, **_kwargs):
        raise AssertionError("the cache was rebuilt although nothing changed")

    monkeypatch.setattr(image_cache, "_build", no_rebuild)
    again = build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert again.where == first.where
    monkeypatch.undo()

    Image.new("RGB", (80, 60), (255, 0, 0)).save(records.paths[2])  # replace one image
    os.utime(records.paths[2], ns=(1, 1))
    changed = build_or_open(records, 48, tmp_path / "cache", workers=1)
    assert changed.where != first.where
    red = changed[2].astype(int)  # JPEG: (254, 0, 0) or so
    assert (red[..., 0] > 240).all() and (red[..., 1:] < 15).all()
    assert changed[2].shape == (48, 64, 3)


def test_corrupt_image_names_the_file_and_leaves_no_half_cache(tmp_path):
    records = write_jpegs(tmp_path / "imgs")
    records.paths[3].write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(DatasetError, match="img_3.jpg"):
        build_or_open(records, 32, tmp_path / "cache", workers=1)
    assert not any((tmp_path / "cache").glob("fake-*"))


@pytest.mark.parametrize("trunk", sorted(TRUNKS))
def test_eval_path_equals_reference_transform(tmp_path, trunk):
    records = write_jpegs(tmp_path / "imgs")
    cache = build_or_open(records, 64, tmp_path / "cache", workers=1)
    reference = build_transforms(trunk, resize=64, crop=56, train=False)
    to_input = BatchNormalize(trunk, train=False)
    crop = UInt8Crop(56, train=False)
    for i in range(len(records)):
        ours = to_input(crop(cache[i])[None])[0]
        torch.testing.assert_close(ours, reference(records.load_image(i)), rtol=0, atol=1e-4)


def test_train_crop_equals_reference_random_resized_crop(tmp_path):
    """Same RNG state -> same crop box -> the same pixels as PIL's crop + bilinear resize."""
    records = write_jpegs(tmp_path / "imgs")
    cache = build_or_open(records, 64, tmp_path / "cache", workers=1)
    reference = build_transforms("small_cnn", resize=64, crop=32, train=True, scale=(0.2, 1.0))
    to_input = BatchNormalize("small_cnn", train=True)  # small_cnn: no flip
    crop = UInt8Crop(32, train=True, scale=(0.2, 1.0))
    for i in range(len(records)):
        for seed in range(3):
            torch.manual_seed(seed)
            ours = to_input(crop(cache[i])[None])[0]
            torch.manual_seed(seed)
            torch.testing.assert_close(ours, reference(records.load_image(i)), rtol=0,
                                       atol=1e-4)


def test_device_flip_mirrors_about_half_the_batch_and_nothing_else():
    to_input = BatchNormalize("resnet18", train=True)
    x = torch.randint(0, 256, (400, 3, 8, 8), dtype=torch.uint8)
    plain = BatchNormalize("resnet18", train=False)(x)
    out = to_input(x, generator=torch.Generator().manual_seed(0))
    mirrored = torch.tensor([torch.equal(o, p.flip(2)) for o, p in zip(out, plain)])
    same = torch.tensor([torch.equal(o, p) for o, p in zip(out, plain)])
    assert (mirrored | same).all()
    assert 150 < int(mirrored.sum()) < 250


def test_bninception_input_is_bgr_0_255_minus_caffe_means():
    x = torch.tensor([10, 20, 30], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = BatchNormalize("bninception", train=False)(x)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([30 - 104., 20 - 117., 10 - 128.]))


def test_uncached_and_cached_datasets_give_the_same_tensors(tmp_path):
    records = write_jpegs(tmp_path / "imgs")
    cache = build_or_open(records, 40, tmp_path / "cache", workers=1)
    crop = UInt8Crop(32, train=False)
    cached = UInt8Images(records, np.arange(5), crop, cache, 40)
    uncached = UInt8Images(records, np.arange(5), crop, None, 40)
    for j in range(5):
        a, la = cached[j]
        b, lb = uncached[j]
        assert torch.equal(a, b) and la == lb and a.dtype == torch.uint8


def test_loader_workers_default_uses_the_cores():
    cfg = load_study("quickstart")
    cfg.data.num_workers = -1
    assert loader_workers(cfg) == max(0, min(8, (os.cpu_count() or 1) - 1))
    cfg.data.num_workers = 3
    assert loader_workers(cfg) == 3
