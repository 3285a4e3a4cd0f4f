"""The glyph trunk's "ImageNet": small_cnn pretrained offline on glyph classes the benchmark
never uses.

MLRC fine-tunes an ImageNet-pretrained trunk with each metric loss; the embedded glyph benchmark
does the same at laptop scale. Its stand-in for ImageNet is a classification task on other
characters: PretrainParams.num_classes code points of scripts and symbol sets the benchmark
does not use (Armenian, Georgian, Hebrew, box drawing, APL, arrows, maths, dingbats, ...)
drawn by the same fonts and the same augmentation as the benchmark's glyphs
(harness.datasets.glyphs).

Disjointness from the benchmark's 256 characters (train, validation AND test halves), so the
pretraining cannot have seen a benchmark class:
  * the code point is not one of them;
  * its compatibility decomposition (NFKD) contains none of them and neither does its case
    mapping (no é for e, no ǅ for D, no ℌ for H, no lower case of a benchmark capital);
  * it is no homoglyph: rendered plainly in a font that draws both, its mask correlates below
    HOMOGLYPH_CORRELATION with every benchmark character (drops Armenian օ for o, Hebrew ו for l,
    ∣ for |, ...).
From the characters left, PretrainParams.num_classes are drawn with a fixed seed.

The trunk (SmallCNN + global average pooling + a linear classifier that is thrown away) is
trained with cross-entropy; its BatchNorm statistics are kept, as with ImageNet weights (the
embedded profile freezes them like MLRC). Held-out images (HELD_OUT_PER_CLASS per class) give the
top-1 accuracy written beside the weights, a check that the stand-in learned something.

Cache: `$HARNESS_CACHE/glyph_trunk/` (else ~/.cache/harness/glyph_trunk), one weight file
`small_cnn_glyphs_v<version>_<hash>.pt` (a plain state dict, read with weights_only) and a
`.json` beside it with the cache key, the characters, accuracy and build time. The hash covers
everything that changes the weights (pretraining version and parameters, the benchmark
characters, the fonts, torch's thread count, which the build fixes: PRETRAIN_THREADS). The
same file comes out of every build with the same torch on the same kind of CPU; another
instruction set (AVX2 vs AVX-512) or torch build may round differently. First use builds it
(a few minutes on 2 CPU cores: rendering, then training); a file lock makes concurrent studies
wait for one build instead of each building.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
import unicodedata
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from harness.errors import DatasetError, WeightsError
from harness.provenance import file_sha256
from harness.run_folder import write_bytes_atomic, write_json_atomic

PRETRAIN_VERSION = 1  # bump whenever the pretraining recipe changes: old weights are not reused
PRETRAIN_SEED = 1409_04842  # fixed (an arXiv id, like the glyph data's seed)
HOMOGLYPH_CORRELATION = 0.9  # plain-rendered masks this similar count as the same character
HELD_OUT_PER_CLASS = 4
# torch's intra-op thread count changes the weights: it splits the float sums of convolutions
# and reductions, and training amplifies the rounding (built on 1 thread, the default trunk
# differed from the 2-thread one by up to 0.73 in a weight). So every build uses this count,
# whatever the caller set (a study on 8 cores, a comparison worker on 1 thread), and the cache
# key records it. 2: the count the trunk of results/ was built with.
PRETRAIN_THREADS = 2

# Unicode blocks the pretraining characters are drawn from.
# Unicode blocks the pretraining characters are drawn from: scripts and symbol sets the
# benchmark does not use at all (no Latin, Greek or Cyrillic letters), so the stand-in is, like
# ImageNet for birds and cars, a related but different domain.
CANDIDATE_RANGES = (
    (0x0531, 0x058F),  # Armenian
    (0x05D0, 0x05EA),  # Hebrew letters
    (0x10A0, 0x10FF),  # Georgian
    (0x2100, 0x214F),  # letterlike symbols
    (0x2190, 0x21FF),  # arrows
    (0x2200, 0x22FF),  # mathematical operators
    (0x2300, 0x23FF),  # miscellaneous technical (APL)
    (0x2500, 0x259F),  # box drawing, block elements
    (0x25A0, 0x25FF),  # geometric shapes
    (0x2600, 0x26FF),  # miscellaneous symbols
    (0x2700, 0x27BF),  # dingbats
    (0x2A00, 0x2AFF),  # supplemental mathematical operators
)
MIN_FONTS = 3  # a class drawn by fewer fonts has too little style variety to teach much


@dataclass(frozen=True)
class PretrainParams:
    """Everything that changes the pretrained weights (all of it is in the cache key)."""

    num_classes: int = 512
    per_class: int = 32  # images rendered per class, HELD_OUT_PER_CLASS of them held out
    image_size: int = 32
    epochs: int = 6
    batch_size: int = 128
    lr: float = 3e-3  # Adam, cosine decay to 0 over the epochs
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = PRETRAIN_SEED


DEFAULT_PARAMS = PretrainParams()  # what the embedded profile and the quickstart use


def default_trunk_root() -> Path:
    """$HARNESS_CACHE/glyph_trunk, else ~/.cache/harness/glyph_trunk."""
    cache = os.environ.get("HARNESS_CACHE")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache" / "harness"
    return base / "glyph_trunk"


# ---------------------------------------------------------------------------------------------
# Which characters


def _forbidden_by_text(char: str, benchmark: set[str]) -> bool:
    """The character is, decomposes to, or case-maps to something containing a benchmark one."""
    variants = {char, unicodedata.normalize("NFKD", char), char.lower(), char.upper(),
                char.casefold()}
    return any(c in benchmark for v in variants for c in unicodedata.normalize("NFKD", v))


def plain_mask(char: str, font_path: Path, size: int) -> np.ndarray:
    """The character centred, unrotated, at the data set's em size: for the homoglyph test."""
    from PIL import Image, ImageDraw

    from harness.datasets.glyphs import BASELINE, FONT_SIZE, SUPERSAMPLE, truetype

    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    ImageDraw.Draw(canvas).text((big / 2, BASELINE * big), char, fill=255,
                                font=truetype(str(font_path), int(FONT_SIZE * big)), anchor="ms")
    small = canvas.resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0


def _unit(mask: np.ndarray) -> np.ndarray:
    flat = mask.ravel() - mask.mean()
    norm = np.linalg.norm(flat)
    return flat / norm if norm > 0 else flat


def homoglyphs(candidates: list[str], benchmark: list[str], support_c: list[list[int]],
               support_b: list[list[int]], fonts: list[Path], size: int = 32) -> set[str]:
    """Candidates whose plain rendering correlates >= HOMOGLYPH_CORRELATION with a benchmark
    character's in some font that draws both."""
    found: set[str] = set()
    for font_index, font in enumerate(fonts):
        bench = [b for b, s in zip(benchmark, support_b) if font_index in s]
        cands = [c for c, s in zip(candidates, support_c) if font_index in s and c not in found]
        if not bench or not cands:
            continue
        b = np.stack([_unit(plain_mask(ch, font, size)) for ch in bench])
        c = np.stack([_unit(plain_mask(ch, font, size)) for ch in cands])
        similar = (c @ b.T).max(axis=1) >= HOMOGLYPH_CORRELATION
        found.update(ch for ch, s in zip(cands, similar) if s)
    return found


def pretrain_characters(params: PretrainParams, fonts: list[Path]) -> list[str]:
    """The pretraining classes: disjoint from the benchmark's 256 characters (module docstring),
    drawn by at least MIN_FONTS fonts, params.num_classes of them picked with a fixed seed."""
    return list(_pretrain_characters(params, tuple(fonts)))


@lru_cache(maxsize=8)  # scanning and rendering ~1,900 candidates takes seconds; it is pure
def _pretrain_characters(params: PretrainParams, fonts: tuple[Path, ...]) -> tuple[str, ...]:
    from harness.datasets.glyphs import MAX_CLASSES, fonts_per_character, glyph_characters

    fonts = list(fonts)

    benchmark = glyph_characters(MAX_CLASSES)
    bench_set = set(benchmark)
    pool = [chr(c) for low, high in CANDIDATE_RANGES for c in range(low, high + 1)]
    pool = [c for c in pool if unicodedata.category(c)[0] in "LSNP"
            and not _forbidden_by_text(c, bench_set)]
    support = fonts_per_character(pool, fonts, require_all=False)
    pool, support = zip(*[(c, s) for c, s in zip(pool, support) if len(s) >= MIN_FONTS])
    lookalikes = homoglyphs(list(pool), benchmark, list(support),
                            fonts_per_character(benchmark, fonts), fonts)
    pool = [c for c in pool if c not in lookalikes]
    if len(pool) < params.num_classes:
        raise DatasetError(f"glyph trunk: only {len(pool)} pretraining characters are drawn by "
                           f"{MIN_FONTS}+ of matplotlib's fonts, {params.num_classes} asked")
    rng = np.random.default_rng(params.seed)
    picked = rng.choice(len(pool), size=params.num_classes, replace=False)
    return tuple(pool[i] for i in sorted(picked))


# ---------------------------------------------------------------------------------------------
# Pretraining


class GlyphClassifier(nn.Module):
    """The trunk the embedded profile fine-tunes, plus a classifier head used only here."""

    def __init__(self, num_classes: int):
        super().__init__()
        from harness.models import SmallCNN

        self.trunk = SmallCNN()
        self.head = nn.Linear(self.trunk.feature_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(x).mean(dim=(2, 3)))


def _to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, s, s, 3) -> the float input small_cnn expects (its input_norm: (x-0.5)/0.5)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return (x - 0.5) / 0.5


def render_pretraining_set(params: PretrainParams, characters: list[str], fonts: list[Path]
                           ) -> tuple[np.ndarray, np.ndarray]:
    from harness.datasets.glyphs import GlyphParams, fonts_per_character, render_classes

    glyph_params = GlyphParams(num_classes=len(characters), per_class=params.per_class,
                               image_size=params.image_size, seed=params.seed)
    images, labels, _ = render_classes(characters, fonts_per_character(characters, fonts),
                                       fonts, glyph_params, desc="rendering pretraining glyphs")
    return images, labels


def pretrain(params: PretrainParams, images: np.ndarray, labels: np.ndarray,
             log=print) -> tuple[dict[str, torch.Tensor], float]:
    """Train GlyphClassifier; returns (trunk state dict, held-out top-1 accuracy)."""
    from harness.progress import bar

    torch.default_generator.manual_seed(params.seed)  # the CPU's only: the caller's CUDA stays
    rng = np.random.default_rng(params.seed)
    held_out = np.zeros(len(labels), dtype=bool)
    for label in np.unique(labels):  # the first HELD_OUT_PER_CLASS images of every class
        held_out[np.flatnonzero(labels == label)[:HELD_OUT_PER_CLASS]] = True
    train_x, train_y = _to_input(images[~held_out]), torch.from_numpy(labels[~held_out])
    model = GlyphClassifier(int(labels.max()) + 1)
    opt = torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    steps_per_epoch = math.ceil(len(train_y) / params.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, params.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=params.label_smoothing)
    model.train()
    for epoch in bar(range(params.epochs), desc="pretraining the glyph trunk", unit="epoch"):
        order = torch.from_numpy(rng.permutation(len(train_y)))
        for start in range(0, len(order), params.batch_size):
            batch = order[start:start + params.batch_size]
            loss = loss_fn(model(train_x[batch]), train_y[batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            schedule.step()
        log(f"glyph trunk pretraining: epoch {epoch + 1}/{params.epochs}, last batch loss "
            f"{float(loss.detach()):.3f}")
    model.eval()
    with torch.no_grad():
        test_x, test_y = _to_input(images[held_out]), torch.from_numpy(labels[held_out])
        accuracy = float((model(test_x).argmax(1) == test_y).float().mean())
    return {k: v.detach().clone() for k, v in model.trunk.state_dict().items()}, accuracy


# ---------------------------------------------------------------------------------------------
# Cache


@contextmanager
def torch_threads(count: int):
    """torch's intra-op thread count is `count` inside the block and the caller's after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cache_key(params: PretrainParams, fonts: list[Path]) -> dict:
    from harness.datasets.glyphs import (GENERATOR_VERSION, MAX_CLASSES, fonts_fingerprint,
                                         glyph_characters)
    from harness.models import SmallCNN

    return {"pretrain_version": PRETRAIN_VERSION, "glyph_generator_version": GENERATOR_VERSION,
            "params": asdict(params), "trunk": "small_cnn", "widths": list(SmallCNN.WIDTHS),
            "torch_threads": PRETRAIN_THREADS,
            "benchmark_characters": "".join(glyph_characters(MAX_CLASSES)),
            "fonts": fonts_fingerprint(fonts)}


def weights_path(root: Path, key: dict) -> Path:
    from harness.datasets.glyphs import key_digest

    return root / f"small_cnn_glyphs_v{PRETRAIN_VERSION}_{key_digest(key)}.pt"


def _cached(path: Path, key: dict) -> bool:
    """The weight file and its sidecar exist, the sidecar's key is this one and the file is the
    one the sidecar describes (its hash): anything else is rebuilt, never trusted."""
    sidecar = path.with_suffix(".json")
    if not (path.is_file() and sidecar.is_file()):
        return False
    try:
        info = json.loads(sidecar.read_text())
        return info.get("key") == key and info.get("sha256") == file_sha256(path)
    except (OSError, ValueError, AttributeError):
        return False


def pretrained_trunk_file(root: Path | None = None, params: PretrainParams | None = None,
                          log=print) -> Path:
    """The weight file of the pretrained glyph trunk, built on first use (module docstring)."""
    from harness.datasets.glyphs import available_fonts
    from harness.storage import file_lock

    params = params if params is not None else DEFAULT_PARAMS
    root = Path(root) if root is not None else default_trunk_root()
    fonts = available_fonts()
    key = cache_key(params, fonts)
    path = weights_path(root, key)
    if _cached(path, key):
        return path
    try:
        root.mkdir(parents=True, exist_ok=True)
        with file_lock(root / ".build.lock"):  # concurrent studies wait for one build
            if _cached(path, key):
                return path
            log(f"building the pretrained glyph trunk (first use, a few minutes) in {root}")
            start = time.perf_counter()
            characters = pretrain_characters(params, fonts)
            images, labels = render_pretraining_set(params, characters, fonts)
            rendered = time.perf_counter()
            # fork_rng: pretrain seeds torch's global generator, and the caller's next draws
            # (a fold's embedder and proxies) must not depend on whether the trunk was cached.
            with torch_threads(PRETRAIN_THREADS), torch.random.fork_rng(devices=[]):
                state, accuracy = pretrain(params, images, labels, log=log)
            finished = time.perf_counter()
            # Through a buffer: torch.save names the archive inside the file after the file,
            # and a temporary name would make every build's bytes (and hash) differ.
            buffer = io.BytesIO()
            torch.save(state, buffer)
            write_bytes_atomic(path, buffer.getvalue())
            info = {"key": key, "sha256": file_sha256(path), "characters": "".join(characters),
                    "held_out_top1": accuracy, "render_seconds": round(rendered - start, 1),
                    "train_seconds": round(finished - rendered, 1)}
            write_json_atomic(path.with_suffix(".json"), info)
            log(f"glyph trunk ready: held-out top-1 {accuracy:.3f} on {len(characters)} "
                f"pretraining classes, {finished - start:.0f} s -> {path}")
    except OSError as e:
        raise WeightsError(f"glyph trunk: cannot write the cache in {root}: {e}. Point "
                           f"$HARNESS_CACHE at a writable folder.") from None
    return path


__all__ = ["PretrainParams", "pretrained_trunk_file", "pretrain_characters", "pretrain",
           "default_trunk_root", "PRETRAIN_VERSION"]
