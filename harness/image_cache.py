"""Decode every image of a data set once, resized, into a memory-mapped uint8 file.

Why: decoding a 500x375 JPEG and resizing it costs more CPU than a GPU needs to train on it,
so a loader that decodes on every access starves the accelerator. MLRC's first transform is
Resize(256) (shorter side), the same for every epoch, trial and fold: it is done once here, and
training only crops and resizes small uint8 arrays (harness/transforms.py `UInt8Crop`).

The cache stores each image exactly as `Resize(resize)` of the protocol gives it (aspect ratio
kept, shorter side = resize), so random crops see the whole image as they do without a cache,
and evaluation's centre crop is identical. Images have different shapes, so they sit one after
another in one flat file (`pixels.u8`), with `index.npy` holding (offset, height, width) per
image. Both are memory-mapped read-only: loader workers share the page cache, nothing is copied.

Cache key: data set name, `resize`, the generator version, and a hash of every image's relative
path, size and modification time (a stat, not a read: hashing the bytes of SOP's 120k files on
every run would cost what the cache saves). A changed or replaced file changes the key, and the
cache is rebuilt. Location: `data.cache_dir`, else `$HARNESS_CACHE/images`, else
`~/.cache/harness/images`. Built in a temporary folder and renamed, so an interrupted build never
leaves a half cache behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF

from harness.datasets.base import Records
from harness.errors import DatasetError
from harness.progress import bar

CACHE_VERSION = 1
CHUNK = 256  # images per task handed to a decoding process


def default_cache_root() -> Path:
    base = os.environ.get("HARNESS_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "harness") / "images"


class ResizedImages:
    """uint8 (h, w, 3) images of one data set after Resize(resize), by record index."""

    def __init__(self, pixels: np.ndarray, index: np.ndarray, resize: int, where: str = ""):
        self.pixels = pixels  # flat uint8
        self.index = index  # (N, 3) int64: offset, height, width
        self.resize = resize
        self.where = where  # the cache folder ("" = in memory)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> np.ndarray:
        offset, h, w = (int(v) for v in self.index[i])
        return self.pixels[offset: offset + h * w * 3].reshape(h, w, 3)

    @property
    def nbytes(self) -> int:
        return int(self.pixels.size)


def resized_shape(height: int, width: int, resize: int) -> tuple[int, int]:
    """The (h, w) torchvision's Resize(resize) gives: shorter side = resize, ratio kept."""
    short, long = (height, width) if height <= width else (width, height)
    new_long = int(resize * long / short)
    return (resize, new_long) if height <= width else (new_long, resize)


def resize_image(image: Image.Image, resize: int) -> np.ndarray:
    """The protocol's Resize(resize) on a PIL image (torchvision's own call), as uint8 HWC."""
    return np.asarray(TF.resize(image, resize), dtype=np.uint8)


def resize_in_memory(records: Records, resize: int) -> ResizedImages:
    """Data held in memory (the glyphs): resize once, keep in memory."""
    arrays = [resize_image(Image.fromarray(records.images[i]), resize)
              for i in range(len(records))]
    return _pack(arrays, resize)


def _pack(arrays: list[np.ndarray], resize: int) -> ResizedImages:
    index = np.zeros((len(arrays), 3), dtype=np.int64)
    offset = 0
    for i, a in enumerate(arrays):
        index[i] = (offset, a.shape[0], a.shape[1])
        offset += a.size
    pixels = np.concatenate([a.reshape(-1) for a in arrays]) if arrays else \
        np.zeros(0, np.uint8)
    return ResizedImages(pixels, index, resize)


def cache_key(records: Records, resize: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_VERSION}|{records.name}|{resize}|".encode())
    for path in records.paths:
        st = os.stat(path)
        rel = os.path.relpath(path, records.root)
        digest.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _decode_chunk(args) -> list[np.ndarray]:
    part, resize = args  # a Records of this chunk's images only: cheap to send to a process
    return [resize_image(part.load_image(i), resize) for i in range(len(part))]


def _chunk_records(records: Records, indices: np.ndarray) -> Records:
    return Records(name=records.name, labels=records.labels[indices],
                   paths=[records.paths[i] for i in indices], images=None, partition=None,
                   root=records.root)


def _image_sizes(records: Records) -> np.ndarray:
    """(height, width) of every image from its header (no decode)."""
    sizes = np.zeros((len(records), 2), dtype=np.int64)
    for i, path in enumerate(bar(records.paths, desc=f"{records.name}: image sizes",
                                 unit="img")):
        try:
            with Image.open(path) as image:
                w, h = image.size
        except (OSError, ValueError, SyntaxError):
            records.load_image(i)  # raises the DatasetError that names the file
            raise
        sizes[i] = (h, w)
    return sizes


def build_or_open(records: Records, resize: int, cache_root: Path | None = None,
                  workers: int | None = None) -> ResizedImages:
    """The cache of `records` at `resize`: opened if present, else built (once) and opened."""
    if records.images is not None:
        return resize_in_memory(records, resize)
    root = Path(cache_root) if cache_root else default_cache_root()
    folder = root / f"{records.name}-r{resize}-{cache_key(records, resize)}"
    if not (folder / "done.json").exists():
        _build(records, resize, folder, workers)
    index = np.load(folder / "index.npy")
    pixels = np.memmap(folder / "pixels.u8", dtype=np.uint8, mode="r")
    return ResizedImages(pixels, index, resize, where=str(folder))


def _build(records: Records, resize: int, folder: Path, workers: int | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        shapes = np.array([resized_shape(h, w, resize) for h, w in _image_sizes(records)],
                          dtype=np.int64).reshape(-1, 2)
        sizes = shapes[:, 0] * shapes[:, 1] * 3
        offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        index = np.column_stack([offsets, shapes])
        pixels = np.memmap(tmp / "pixels.u8", dtype=np.uint8, mode="w+",
                           shape=(max(int(sizes.sum()), 1),))
        chunks = [np.arange(s, min(s + CHUNK, len(records))) for s in
                  range(0, len(records), CHUNK)]
        workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        progress = bar(total=len(records), desc=f"{records.name}: caching at {resize}px",
                       unit="img")
        tasks = ((_chunk_records(records, idx), resize) for idx in chunks)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                results = pool.map(_decode_chunk, tasks)
                _write(results, chunks, pixels, index, progress)
        else:
            _write(map(_decode_chunk, tasks), chunks, pixels, index, progress)
        progress.close()
        pixels.flush()
        del pixels
        np.save(tmp / "index.npy", index)
        (tmp / "done.json").write_text(json.dumps({
            "dataset": records.name, "root": str(records.root), "resize": resize,
            "images": len(records), "bytes": int(sizes.sum()), "version": CACHE_VERSION}))
        try:
            os.replace(tmp, folder)  # atomic: another process may have finished first
        except OSError:
            if not (folder / "done.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(results, chunks, pixels, index, progress) -> None:
    for idx, arrays in zip(chunks, results):
        for i, a in zip(idx, arrays):
            offset, h, w = index[i]
            if a.shape != (h, w, 3):  # the header promised another size: a damaged file
                raise DatasetError(f"image {i} decoded to {a.shape[1]}x{a.shape[0]} pixels after "
                                   f"resizing, but its header implies {w}x{h}; the file is "
                                   f"damaged")
            pixels[offset: offset + a.size] = a.reshape(-1)
        progress.update(len(idx))


__all__ = ["ResizedImages", "build_or_open", "default_cache_root", "resized_shape",
           "resize_image", "cache_key"]
