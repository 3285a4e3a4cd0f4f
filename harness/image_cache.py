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

Crash safety: the temporary folder's name carries the builder's host and process id
(`NAME.tmp-HOST-PID-XXXX`), so a later run removes the leftovers of a killed build (the builder
is dead) and never those of a build in progress (a live process, or another host). Decoding
processes exit when the builder dies. A finished cache is checked when it is opened (done.json,
index and file sizes agree: a cheap check, not a re-hash) and rebuilt when it is not whole.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from torchvision.transforms import functional as TF

from harness.datasets.base import Records, permission_error
from harness.errors import DatasetError
from harness.progress import bar

CACHE_VERSION = 1
CHUNK = 256  # images per task handed to a decoding process
# A temporary build folder without host and pid (written before they were recorded) is removed
# once it is this old: no build takes a day.
UNMARKED_STALE_SECONDS = 24 * 3600
_TMP_NAME = re.compile(r"\.tmp-(?P<host>[A-Za-z0-9._]+)-(?P<pid>\d+)-[A-Za-z0-9_]+$")
log = logging.getLogger(__name__)


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
        st = records.stat_image(path)
        rel = os.path.relpath(path, records.root)
        digest.update(f"{rel}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def _die_with(builder_pid: int) -> None:
    """Decoding-process initializer: exit when the builder dies (kill -9 included), instead of
    decoding on as an orphan. Linux: the kernel's parent-death signal; everywhere: a watchdog
    thread (also covers a builder that is not the direct parent)."""
    if os.getppid() == builder_pid:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # not Linux: the watchdog below does it
    if not _alive(builder_pid):  # died before the signal was armed
        os._exit(1)

    def watch() -> None:
        while _alive(builder_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="builder-watchdog").start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def remove_stale_builds(root: Path) -> list[Path]:
    """Delete the temporary folders of builds whose builder died (same host, process gone), and
    unmarked ones older than a day; keep live builds and those of other hosts. Returns what was
    removed."""
    removed = []
    try:
        candidates = [p for p in root.iterdir() if ".tmp-" in p.name and p.is_dir()]
    except OSError:
        return removed
    for path in candidates:
        match = _TMP_NAME.search(path.name)
        if match:
            if match["host"] != _host() or _alive(int(match["pid"])):
                continue
            why = f"its builder (pid {match['pid']} on this host) is gone"
        else:
            try:
                age = time.time() - path.stat().st_mtime
            except OSError:
                continue
            if age < UNMARKED_STALE_SECONDS:
                continue
            why = f"an unmarked partial build {age / 3600:.0f} h old"
        log.warning("image cache: removing the partial build %s (%s)", path, why)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def check_cache(folder: Path, records: Records, resize: int) -> str:
    """Why the finished cache in `folder` cannot be used ("" = it is whole). Cheap: done.json,
    the index and the file sizes must agree; pixels are not re-hashed."""
    try:
        done = json.loads((folder / "done.json").read_text())
        index = np.load(folder / "index.npy", allow_pickle=False)
        size = (folder / "pixels.u8").stat().st_size
    except PermissionError as e:
        raise permission_error(f"{records.name} image cache", e.filename or folder) from None
    except (OSError, ValueError, UnicodeDecodeError) as e:  # missing, truncated, not .npy/JSON
        return f"unreadable ({type(e).__name__}: {e})"
    if not isinstance(done, dict):
        return "done.json is not an object"
    expected = {"images": len(records), "resize": resize, "version": CACHE_VERSION}
    for key, value in expected.items():
        if done.get(key) != value:
            return f"done.json says {key}={done.get(key)!r}, expected {value!r}"
    if index.dtype != np.int64 or index.shape != (len(records), 3):
        return f"index.npy is {index.dtype} {index.shape}, expected int64 ({len(records)}, 3)"
    heights, widths = index[:, 1], index[:, 2]
    if len(index) and (np.minimum(heights, widths) != resize).any():
        return "index.npy holds shapes whose shorter side is not the resize"
    sizes = heights * widths * 3
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]) if len(index) else index[:, 0]
    if not np.array_equal(index[:, 0], offsets):
        return "index.npy offsets are not consecutive"
    total = int(sizes.sum())
    if done.get("bytes") != total or size != max(total, 1):
        return f"pixels.u8 holds {size:,} bytes, expected {max(total, 1):,} (truncated?)"
    return ""


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
    if root.is_dir():
        remove_stale_builds(root)
    if (folder / "done.json").exists():
        problem = check_cache(folder, records, resize)
        if problem:
            log.warning("image cache %s is damaged (%s): rebuilding it", folder, problem)
            _discard(folder)
    if not (folder / "done.json").exists():
        _build(records, resize, folder, workers)
        problem = check_cache(folder, records, resize)
        if problem:  # written just now: a full disk or a faulty file system
            raise DatasetError(f"the image cache just built in {folder} is not whole "
                               f"({problem}); is the disk full? Delete the folder and retry, or "
                               f"set data.cache_dir elsewhere (or data.cache=false)")
    index = np.load(folder / "index.npy")
    pixels = np.memmap(folder / "pixels.u8", dtype=np.uint8, mode="r")
    return ResizedImages(pixels, index, resize, where=str(folder))


def _discard(folder: Path) -> None:
    """Move a damaged cache aside (atomic, so no reader sees it half deleted), then delete it."""
    trash = folder.parent / f"{folder.name}.tmp-{_host()}-{os.getpid()}-discard"
    try:
        os.replace(folder, trash)
    except OSError:
        return  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def _build(records: Records, resize: int, folder: Path, workers: int | None) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    # Host and pid in the name: a later run can tell a dead build from a live one.
    tmp = Path(tempfile.mkdtemp(prefix=f"{folder.name}.tmp-{_host()}-{os.getpid()}-",
                                dir=folder.parent))
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
            with ProcessPoolExecutor(workers, initializer=_die_with,
                                     initargs=(os.getpid(),)) as pool:
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
           "resize_image", "cache_key", "check_cache", "remove_stale_builds"]
