"""The embedded "glyphs" dataset: 256 classes of printed characters, generated offline.

Why it exists: the real benchmarks are gigabytes and need a GPU; this one lets the whole protocol
(4-fold search, retraining, both test modes) run on a laptop CPU in minutes, and is still a
metric-learning problem worth learning: test classes are unseen characters, and many classes
differ by small details (Ш/Щ, И/Й, O/Q/Θ/Ø, I/l/Ї/ł, d/đ, ⊕/⊗/⊙, ⇒/⇔).

A class is one character (Latin, digits, Greek, Cyrillic, maths symbols, punctuation). Each
image draws it in one of the TrueType fonts matplotlib ships (DejaVu Sans/Serif/Mono in four
styles, STIX General in four, Computer Modern), at a random scale, rotation, shift and stroke
weight, in random foreground/background tints with pixel noise, as a 32x32 RGB uint8 image.
Characters that are drawn identically in some font (Latin/Greek/Cyrillic homoglyphs such as
A/Α/А, n/п, 3/З, κ/к, Cyrillic italic т = m) were removed when the list was made, so every
class is learnable.

Class order (why the lists below look shuffled): MLRC takes contiguous class blocks, the last
half as test. The two 128-character halves were balanced offline by script (Latin+digits 48,
symbols 47/46, Cyrillic 19/20, Greek 14 each), and each family of confusable characters
(space-separated groups below) sits in one half, so the test half holds whole confusion
families. Within a half the families are interleaved across scripts, so every contiguous
validation block (32 classes) is a mix too. A smaller `num_classes` takes the front of each half.

Generation is deterministic: a fixed seed, one random stream per character (so a character's
images do not depend on which other classes are generated), FreeType's basic layout (not raqm,
which varies between installs), and an .npz written with fixed zip timestamps. Same fonts and
Pillow version give the same bytes. The cache file name carries the generator version, the
parameters and a hash of them plus the font files, so any change regenerates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import unicodedata
import zipfile
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from harness.datasets.base import Records
from harness.errors import DatasetError

GENERATOR_VERSION = 1  # bump whenever the rendering changes, so old caches are not reused
SEED = 2003_08505  # fixed: the MLRC arXiv id
SUPERSAMPLE = 4  # render at 4x and box-filter down, for anti-aliased thin strokes

# Train+val half, then test half; spaces separate families of confusable characters.
FIRST_HALF = ("BБЪЬѢ Ξ ЦЏ ←→↔ OQΘØ Σ шщ ≡≅ AΔΛ Ψ Ж ⇒⇔ hnħ α Ч + EЁ γ Э × LŁ ζ Я = dđ ι г ≈ "
              "oø λ ж > 0θ ν й ≥ J π м ∓ M ς ф ∂ P υ ч √ S χ э ∝ U ω я ⊂ W ї ⊆ Y љ ∪ a њ ∧ "
              "g ¬ j ∃ m ⊥ r ∴ t ↑ w ° y ∘ 1 ℵ 3 ℓ 5 ♦ 7 ! 9 # æ % Œ @ Þ ¶ ® * \\ ( [ { ~ : "
              "£ ¢ ∮")
SECOND_HALF = ("HΠИЙ δб ШЩ ⊕⊗⊙ IlЇł Φ ъь ∈∉ bpρþ Ω Д ♠♣ CЄ β Л − DÐ ε Ы ÷ FΓ η Ю ≠ cє κ в "
               "< eё μ д ≤ uџ ξ з ± G σ л ∞ K τ н ∇ N φ ц ∫ R ψ ы ∋ T ю ⊃ V ѣ ⊇ X Љ ∩ Z Њ ∨ "
               "f Ћ ∀ i ∅ k ∠ q ∵ s ↓ v ∗ x • z ℏ 2 ♥ 4 ★ 6 ? 8 $ ß & Æ § œ © ð ¡ / | ) ] } ; "
               "€ ¥ ¿")
MAX_CLASSES = 256

# matplotlib's bundled fonts (mpl-data/fonts/ttf). The Computer Modern files use TeX encodings,
# so a code point can map to a different character there: `font_has` checks glyph names.
FONT_NAMES = (
    "DejaVuSans", "DejaVuSans-Bold", "DejaVuSans-Oblique", "DejaVuSans-BoldOblique",
    "DejaVuSansMono", "DejaVuSansMono-Bold", "DejaVuSansMono-Oblique",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSerif", "DejaVuSerif-Bold", "DejaVuSerif-Italic", "DejaVuSerif-BoldItalic",
    "STIXGeneral", "STIXGeneralBol", "STIXGeneralItalic", "STIXGeneralBolIta",
    "cmr10", "cmss10", "cmtt10", "cmti10", "cmb10", "cmmi10",
)

# Augmentation ranges. Shifts and scale stay small on purpose: size and baseline position are
# what separate o/O, c/C, s/S, °/∘, so they must survive augmentation.
FONT_SIZE = 0.62  # em size as a fraction of the image side
BASELINE = 0.72  # baseline height (from the top) as a fraction of the side
SCALE_RANGE = (0.88, 1.12)
MAX_SHIFT = 0.06  # fraction of the side, each axis
MAX_ROTATION = 12.0  # degrees
MAX_STROKE = 2  # extra outline in supersampled pixels (0..MAX_STROKE): stroke weight
MIN_CONTRAST, MAX_CONTRAST = 0.35, 0.85  # |foreground - background| grey level
MAX_TINT = 0.15  # per-channel colour offset of foreground and background
MAX_NOISE = 0.05  # std of the Gaussian pixel noise, drawn per image in [0, MAX_NOISE]

LAYOUT = """\
<root>/                        default $HARNESS_CACHE/glyphs, else ~/.cache/harness/glyphs
  glyphs_v1_256c_32pc_32px_<hash>.npz   generated on first use (about 20 s); nothing to download"""

DOWNLOAD_HINT = ("Nothing to download: the glyph images are rendered from the fonts bundled "
                 "with matplotlib and cached under the root.")


@dataclass(frozen=True)
class GlyphParams:
    num_classes: int
    per_class: int
    image_size: int
    seed: int = SEED


def default_glyphs_root() -> Path:
    """$HARNESS_CACHE/glyphs, else ~/.cache/harness/glyphs."""
    cache = os.environ.get("HARNESS_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "harness"
    return base / "glyphs"


def glyph_families(half: str) -> list[str]:
    return half.split()


def glyph_characters(num_classes: int = MAX_CLASSES) -> list[str]:
    """The characters of classes 0..num_classes-1: the front of the train+val half, then the
    front of the test half, so MLRC's last int(n/2) classes are exactly the test characters."""
    if not 2 <= num_classes <= MAX_CLASSES:
        raise DatasetError(f"glyphs: num_classes must be between 2 and {MAX_CLASSES}, got "
                           f"{num_classes}")
    first, second = "".join(glyph_families(FIRST_HALF)), "".join(glyph_families(SECOND_HALF))
    num_test = num_classes // 2
    return list(first[: num_classes - num_test]) + list(second[:num_test])


# ---------------------------------------------------------------------------------------------
# Fonts


def font_folder() -> Path:
    import matplotlib  # a harness dependency; imported lazily since only glyphs need it

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def available_fonts() -> list[Path]:
    """The FONT_NAMES files present in this matplotlib install, in FONT_NAMES order."""
    folder = font_folder()
    fonts = [folder / f"{name}.ttf" for name in FONT_NAMES if (folder / f"{name}.ttf").is_file()]
    if not fonts:
        raise DatasetError(f"glyphs: none of matplotlib's fonts ({', '.join(FONT_NAMES[:3])}, "
                           f"...) were found in {folder}; reinstall matplotlib")
    return fonts


@contextmanager
def quiet_fonttools():
    """fontTools logs a warning for the 1970s timestamps of the Computer Modern files."""
    logger = logging.getLogger("fontTools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def font_has(cmap: dict, glyph_set, char: str) -> bool:
    """Does the font draw `char` as itself, with ink?

    The cmap must map the code point to a glyph whose standard name means the same character
    (fontTools' Adobe Glyph List, compared after NFKC so that e.g. 'Omega' = U+2126 matches
    U+03A9): this rejects the TeX-encoded Computer Modern slots (cmr10 maps '<' to exclamdown).
    An outline-less glyph (a blank placeholder) is rejected too.
    """
    from fontTools import agl  # fontTools is a dependency of matplotlib

    name = cmap.get(ord(char))
    if name is None:
        return False
    meaning = agl.toUnicode(name)
    if unicodedata.normalize("NFKC", meaning) != unicodedata.normalize("NFKC", char):
        return False
    return glyph_set[name].numberOfContours != 0


def fonts_per_character(characters: list[str], fonts: list[Path],
                        require_all: bool = True) -> list[list[int]]:
    """For each character, the indices (into `fonts`) of the fonts that draw it. A character no
    font draws is a DatasetError, or an empty list with require_all=False."""
    from fontTools.ttLib import TTFont

    support: list[list[int]] = [[] for _ in characters]
    with quiet_fonttools():
        for font_index, path in enumerate(fonts):
            with TTFont(str(path), lazy=True) as font:
                cmap, glyph_set = font.getBestCmap(), font["glyf"]
                for char_index, char in enumerate(characters):
                    if font_has(cmap, glyph_set, char):
                        support[char_index].append(font_index)
    lacking = [c for c, fonts_of_c in zip(characters, support) if not fonts_of_c]
    if lacking and require_all:
        raise DatasetError(f"glyphs: no available font draws {''.join(lacking)!r} (fonts "
                           f"looked at: {', '.join(p.stem for p in fonts)})")
    return support


def fonts_fingerprint(fonts: list[Path]) -> list[list]:
    """Names and sizes of the font files: a new matplotlib with changed fonts regenerates."""
    return [[path.name, path.stat().st_size] for path in fonts]


@lru_cache(maxsize=1024)
def truetype(path: str, size: int) -> ImageFont.FreeTypeFont:
    # Basic layout: raqm is optional in Pillow builds and would make the bytes install-dependent.
    return ImageFont.truetype(path, size, layout_engine=ImageFont.Layout.BASIC)


# ---------------------------------------------------------------------------------------------
# Rendering


def render_mask(char: str, font_path: Path, rng: np.random.Generator, size: int) -> np.ndarray:
    """One randomly placed, scaled, rotated, weighted glyph as float coverage in [0, 1]."""
    big = size * SUPERSAMPLE
    scale = math.exp(rng.uniform(math.log(SCALE_RANGE[0]), math.log(SCALE_RANGE[1])))
    font_px = max(4, int(round(FONT_SIZE * big * scale / 2)) * 2)  # even sizes: fewer fonts
    stroke = int(rng.integers(0, MAX_STROKE + 1))
    shift_x, shift_y = rng.uniform(-MAX_SHIFT, MAX_SHIFT, size=2) * big
    angle = rng.uniform(-MAX_ROTATION, MAX_ROTATION)
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).text((big / 2 + shift_x, BASELINE * big + shift_y), char, fill=255,
                                font=truetype(str(font_path), font_px), anchor="ms",
                                stroke_width=stroke, stroke_fill=255)
    canvas = canvas.rotate(angle, resample=Image.Resampling.BICUBIC, center=(big / 2, big / 2))
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def colourise(masks: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Coverage masks (m, s, s) -> uint8 RGB with random tinted fg/bg, contrast and noise."""
    m = len(masks)
    background = rng.uniform(0.0, 1.0, size=(m, 1))
    contrast = rng.uniform(MIN_CONTRAST, MAX_CONTRAST, size=(m, 1))
    # Light ink on dark ground or the reverse, whichever fits in [0, 1].
    foreground = np.where(background < 0.5, background + contrast, background - contrast)
    background = background + rng.uniform(-MAX_TINT, MAX_TINT, size=(m, 3))
    foreground = np.clip(foreground, 0, 1) + rng.uniform(-MAX_TINT, MAX_TINT, size=(m, 3))
    noise_std = rng.uniform(0.0, MAX_NOISE, size=(m, 1, 1, 1))
    alpha = masks[..., None]
    image = (background[:, None, None, :] * (1 - alpha) + foreground[:, None, None, :] * alpha
             + rng.standard_normal(size=alpha.shape[:3] + (3,)) * noise_std)
    return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def render_class(char: str, font_choices: list[Path], params: GlyphParams) -> tuple[np.ndarray,
                                                                                    np.ndarray]:
    """(images (per_class, s, s, 3) uint8, index into font_choices per image) of one class."""
    # One stream per character: the class looks the same whatever else is generated.
    rng = np.random.default_rng([params.seed, ord(char)])
    picks = rng.integers(0, len(font_choices), size=params.per_class)
    masks = np.stack([render_mask(char, font_choices[k], rng, params.image_size) for k in picks])
    return colourise(masks, rng), picks


def _render_class_job(job: tuple[str, list[str], GlyphParams]) -> tuple[np.ndarray, np.ndarray]:
    char, font_paths, params = job
    return render_class(char, [Path(p) for p in font_paths], params)


def render_workers() -> int:
    """Processes that render classes side by side: the usable cores, at most 8."""
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else (os.cpu_count() or 1)))


def render_classes(characters: list[str], support: list[list[int]], fonts: list[Path],
                   params: GlyphParams, desc: str = "rendering glyph classes"
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images, labels, font index per image) of `characters`, label = position in the list.

    Classes render in parallel processes (one random stream per character, so the bytes do not
    depend on how many processes drew them)."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from tqdm import tqdm

    jobs = [(char, [str(fonts[i]) for i in font_ids], params)
            for char, font_ids in zip(characters, support)]
    workers = min(render_workers(), len(jobs))
    if workers > 1:
        # fork, not spawn: spawn re-runs the caller's __main__ (a user's script without a
        # __main__ guard would recurse). The children only run Pillow and numpy.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
            rendered = list(tqdm(pool.map(_render_class_job, jobs, chunksize=8), total=len(jobs),
                                 desc=desc, unit="class", disable=None, leave=False))
    else:
        rendered = [_render_class_job(job) for job in tqdm(jobs, desc=desc, unit="class",
                                                            disable=None, leave=False)]
    images = np.concatenate([class_images for class_images, _ in rendered])
    labels = np.repeat(np.arange(len(jobs), dtype=np.int64), params.per_class)
    font_index = np.concatenate([np.asarray(font_ids, dtype=np.int16)[picks]
                                 for (_, picks), font_ids in zip(rendered, support)])
    return images, labels, font_index


def generate(params: GlyphParams) -> dict[str, np.ndarray]:
    """Render the whole dataset; returns the arrays stored in the cache file."""
    characters = glyph_characters(params.num_classes)
    fonts = available_fonts()
    support = fonts_per_character(characters, fonts)
    images, labels, font_index = render_classes(characters, support, fonts, params)
    return {
        "images": images,
        "labels": labels,
        "characters": np.array(characters, dtype="<U1"),
        "font_names": np.array([p.stem for p in fonts]),
        "font_index": font_index,
    }


# ---------------------------------------------------------------------------------------------
# Cache


def cache_key(params: GlyphParams, fonts: list[Path]) -> dict:
    return {"generator_version": GENERATOR_VERSION, "seed": params.seed,
            "num_classes": params.num_classes, "per_class": params.per_class,
            "image_size": params.image_size,
            "characters": "".join(glyph_characters(params.num_classes)),
            "fonts": fonts_fingerprint(fonts)}


def key_digest(key: dict) -> str:
    """12 hex digits naming a cache file after everything that went into it."""
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def cache_path(root: Path, params: GlyphParams, key: dict) -> Path:
    return root / (f"glyphs_v{GENERATOR_VERSION}_{params.num_classes}c_{params.per_class}pc_"
                   f"{params.image_size}px_{key_digest(key)}.npz")


def write_npz_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """np.savez-compatible file, byte-reproducible (fixed zip timestamps), via temp + rename so
    a reader never sees a half-written cache and concurrent writers cannot corrupt it."""
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".",
                                             suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as handle:
            with zipfile.ZipFile(handle, "w", zipfile.ZIP_STORED) as archive:
                for name, array in arrays.items():
                    member = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                    with archive.open(member, "w", force_zip64=True) as out:
                        np.lib.format.write_array(out, np.asarray(array), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp_name, 0o644)  # mkstemp creates 0600; the cache is not secret
        os.replace(temp_name, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(temp_name)
        raise


def read_cache(path: Path, key: dict, params: GlyphParams) -> dict[str, np.ndarray] | None:
    """The cached arrays if the file exists, is readable and matches `key`; else None."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        stored_key = json.loads(str(arrays.pop("key")))
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, json.JSONDecodeError):
        return None  # unreadable or truncated: regenerate
    expected = params.num_classes * params.per_class
    shape_ok = arrays.get("images", np.empty(0)).shape == (expected, params.image_size,
                                                           params.image_size, 3)
    return arrays if stored_key == key and shape_ok and len(arrays.get("labels", ())) == expected \
        else None


def load_glyphs(root: Path | None = None, check_counts: bool = True, num_classes: int = 256,
                per_class: int = 32, image_size: int = 32) -> Records:
    """The glyph dataset under root (default `default_glyphs_root()`), generated if needed.

    check_counts is accepted for the common reader interface; a generated set always has the
    requested counts (a cached file that does not is regenerated).
    """
    if per_class < 2:
        raise DatasetError(f"glyphs: per_class must be at least 2 (retrieval needs another "
                           f"image of the same class), got {per_class}")
    if image_size < 8:
        raise DatasetError(f"glyphs: image_size must be at least 8 pixels, got {image_size}")
    root = Path(root).expanduser().absolute() if root is not None else default_glyphs_root()
    params = GlyphParams(num_classes=num_classes, per_class=per_class, image_size=image_size)
    key = cache_key(params, available_fonts())
    path = cache_path(root, params, key)
    arrays = read_cache(path, key, params)
    if arrays is None:
        arrays = generate(params)
        try:
            root.mkdir(parents=True, exist_ok=True)
            write_npz_atomically(path, {**arrays, "key": np.array(json.dumps(key,
                                                                             sort_keys=True))})
        except OSError as e:
            raise DatasetError(f"glyphs: cannot write the cache file {path}: {e}. Point "
                               f"$HARNESS_CACHE or data.root at a writable folder.") from None
    return Records(name="glyphs", labels=arrays["labels"].astype(np.int64), paths=None,
                   images=arrays["images"], partition=None, root=root)
