"""What every dataset reader shares: the `Records` table, the `DatasetSpec` registry entry, and
the checks that turn a bad folder into a clear `DatasetError` (what is missing, what was expected,
where).

Readers never decode images when they load a dataset: they parse the listing files, check that
every listed file exists (a directory listing, not a decode), and check the standard counts. A
corrupt image is reported when it is first read, by `Records.load_image`.
"""

from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from harness.errors import DatasetError

# Shown whenever a count check fails, so a user with a deliberate subset knows the way out.
SUBSET_HINT = ("If this is a deliberate subset, pass --set data.check_counts=false "
               "(check_counts=False in Python).")

# How many missing paths an error message lists before it summarises the rest.
SHOWN_PATHS = 5


@dataclass
class Records:
    """Every image of one dataset, as parallel arrays."""

    name: str
    labels: np.ndarray  # int64 class ids, as the dataset files give them
    paths: list[Path] | None  # absolute image paths (datasets on disk), else None
    images: np.ndarray | None  # uint8 (N, H, W, 3) held in memory (embedded data), else None
    partition: np.ndarray | None  # In-Shop only: "train" / "query" / "gallery" per image
    root: Path

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.labels)
        if (self.paths is None) == (self.images is None):
            raise ValueError("Records needs exactly one of paths and images")
        source = self.paths if self.paths is not None else self.images
        if len(source) != n:
            raise ValueError(f"{self.name}: {len(source)} images but {n} labels")
        if self.partition is not None:
            self.partition = np.asarray(self.partition, dtype=str)
            if len(self.partition) != n:
                raise ValueError(f"{self.name}: {len(self.partition)} partition entries "
                                 f"but {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def fingerprint(self) -> str:
        """SHA-256 of what the data set is: its labels, and its pixels (data held in memory) or
        its image paths relative to their common folder and their sizes (data on disk: the root
        may move, and a copy may have new modification times; hashing every file's bytes would
        cost minutes on SOP, so a file rewritten in place with the same size goes unseen).
        A resumed run folder compares it with the one it recorded (split_manifest.json)."""
        digest = hashlib.sha256(f"{self.name}\n{len(self)}\n".encode())
        digest.update(np.ascontiguousarray(self.labels, dtype="<i8").tobytes())
        if self.images is not None:
            digest.update(f"{self.images.dtype.str} {self.images.shape}\n".encode())
            digest.update(np.ascontiguousarray(self.images).tobytes())
        else:
            # relative to the folder that holds every image, not to the root: the same files
            # in another of a data set's accepted layouts (In-Shop's Img/img or img) are the
            # same data
            names = [os.fspath(p) for p in self.paths]  # absolute (the readers make them so)
            base = os.path.commonpath([os.path.dirname(n) for n in names] or ["/"])
            cut = len(base.rstrip(os.sep)) + 1  # base is a prefix: slicing, not relpath (3x)
            for name in names:
                size = self.stat_image(name).st_size
                digest.update(f"{name[cut:]}|{size}\n".encode())
        if self.partition is not None:
            digest.update("\n".join(self.partition.tolist()).encode())
        return digest.hexdigest()

    def stat_image(self, path: Path | str) -> os.stat_result:
        """os.stat of one of the data set's image files; DatasetError if it is gone or
        unreadable."""
        try:
            return os.stat(path)
        except PermissionError:
            raise permission_error(self.name, path) from None
        except FileNotFoundError:
            raise DatasetError(f"{self.name}: image file {path} is missing (it was present "
                               f"when the dataset was loaded from {self.root})") from None

    def load_image(self, i: int) -> Image.Image:
        """Image i as RGB; an unreadable file raises DatasetError naming it and the dataset."""
        if self.images is not None:
            return Image.fromarray(self.images[i])  # (H, W, 3) uint8 -> RGB
        path = self.paths[i]
        try:
            with Image.open(path) as image:
                image.load()  # decode now, inside the try: PIL is lazy
                return image.convert("RGB")
        except FileNotFoundError:
            raise DatasetError(f"{self.name}: image file {path} is missing (it was present when "
                               f"the dataset was loaded from {self.root})") from None
        except PermissionError:
            raise permission_error(self.name, path) from None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # PIL reports truncated or garbled files as OSError (UnidentifiedImageError is one)
            # and, for some formats, as ValueError or SyntaxError.
            raise DatasetError(f"{self.name}: cannot read image file {path}: {e}. The file is "
                               f"corrupt or not an image; restore it from the original "
                               f"archive.") from None


def permission_error(title: str, path: Path | str) -> DatasetError:
    """An unreadable file or folder is a permission problem, not a corrupt or missing file."""
    return DatasetError(f"{title}: permission denied reading {path}: the user running the "
                        f"harness may not read it (a permission problem, not a damaged file). "
                        f"Fix its permissions (e.g. chmod -R a+rX on the data folder) or run as "
                        f"a user who can read it.")


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: how to load it and its MLRC training schedule."""

    name: str  # registry key: "cub200", "cars196", "sop", "inshop", "glyphs"
    load: Callable[..., Records]  # load(root: Path, check_counts: bool = True) -> Records
    split_kind: str  # "mlrc" or "inshop"
    val_every_epochs: int
    patience: int
    layout: str  # the on-disk layout expected under root, for README and error messages
    download_hint: str  # where users get the data (the harness never downloads)


# ---------------------------------------------------------------------------------------------
# Checks shared by the readers


def layout_error(title: str, root: Path, problem: str, layout: str, hint: str) -> DatasetError:
    """A DatasetError that says what is wrong and shows the whole expected layout."""
    where = "" if root.is_dir() else f" (the folder {root} does not exist)"
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        where = (f" (this user may not read the folder {root}: a permission problem; fix its "
                 f"permissions, e.g. chmod -R a+rX)")
    return DatasetError(f"{title}: {problem}{where}.\nExpected layout under the data root:\n"
                        f"{layout}\n{hint}")


def read_lines(path: Path, title: str) -> list[str]:
    """Non-empty lines of a listing file; undecodable text is a DatasetError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{title}: {path} is not a UTF-8 text file ({e}); is it the "
                           f"original listing file?") from None
    except PermissionError:
        raise permission_error(title, path) from None
    except OSError as e:
        raise DatasetError(f"{title}: cannot read {path}: {e}") from None
    return [line for line in text.splitlines() if line.strip()]


def parse_columns(lines: Sequence[str], path: Path, title: str, columns: Sequence[str],
                  first_line_number: int = 1) -> list[list[str]]:
    """Split whitespace-separated rows, insisting on exactly len(columns) fields per row."""
    rows = []
    for offset, line in enumerate(lines):
        fields = line.split()
        if len(fields) != len(columns):
            raise DatasetError(
                f"{title}: {path} line {first_line_number + offset}: expected "
                f"{len(columns)} columns ({' '.join(columns)}), found {len(fields)}: {line!r}")
        rows.append(fields)
    return rows


def parse_int(text: str, path: Path, title: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{title}: {path}: {what} {text!r} is not an integer") from None


def check_images_exist(title: str, root: Path, paths: Sequence[Path]) -> None:
    """Every listed image file must exist. Stat-level only: nothing is decoded here.

    One directory listing per folder answers most files (SOP has 120k files in 12 folders);
    names not found that way are confirmed with a stat, which also covers case-insensitive
    file systems where the listing and the file names differ in case.
    """
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in paths:
        by_folder[path.parent].append(path)
    missing = []
    for folder, files in by_folder.items():
        try:
            present = set(os.listdir(folder))
        except PermissionError:  # else every file in it would be reported missing
            raise permission_error(title, folder) from None
        except OSError:
            present = set()
        missing.extend(p for p in files if p.name not in present and not p.is_file())
    if missing:
        shown = "\n  ".join(str(p) for p in missing[:SHOWN_PATHS])
        extra = len(missing) - SHOWN_PATHS
        more = f"\n  ... and {extra} more" if extra > 0 else ""
        raise DatasetError(
            f"{title}: {len(missing):,} of the {len(paths):,} images listed are missing under "
            f"{root}; the first ones:\n  {shown}{more}\nIs the image archive fully extracted "
            f"into that folder?")


@dataclass(frozen=True)
class CountCheck:
    """One standard count of a dataset, compared with what was found."""

    what: str
    expected: int
    found: int


def count_in_range(labels: np.ndarray, low: int, high: int) -> int:
    """Number of images whose class id lies in [low, high]."""
    return int(((labels >= low) & (labels <= high)).sum())


def verify_standard_counts(title: str, root: Path, checks: Iterable[CountCheck]) -> None:
    """Raise a DatasetError listing every standard count that does not match."""
    wrong = [c for c in checks if c.expected != c.found]
    if not wrong:
        return
    lines = "\n".join(f"  {c.what}: expected {c.expected:,}, found {c.found:,}" for c in wrong)
    raise DatasetError(f"{title} at {root} does not have the standard counts:\n{lines}\n"
                       f"A partial download or extraction is the usual cause. {SUBSET_HINT}")


def absolute_root(root: Path | str) -> Path:
    """The data root as an absolute path; symlinks are kept so messages show the user's path."""
    return Path(root).expanduser().absolute()
