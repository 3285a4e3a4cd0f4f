"""The pretrained glyph trunk (harness/glyph_trunk.py): disjoint classes, cache, loading."""

from __future__ import annotations

import json
import unicodedata
from functools import lru_cache

import numpy as np
import pytest
import torch
from conftest import TINY_TRUNK

from harness import glyph_trunk
from harness.config import ModelConfig, load_study
from harness.datasets import glyphs
from harness.errors import WeightsError
from harness.models import SmallCNN, build_model, find_weights_file


@lru_cache(maxsize=1)
def characters() -> tuple[str, ...]:
    return tuple(glyph_trunk.pretrain_characters(TINY_TRUNK, glyphs.available_fonts()))


def test_pretraining_classes_are_disjoint_from_every_benchmark_class():
    benchmark = set(glyphs.glyph_characters(glyphs.MAX_CLASSES))  # train, val and test halves
    chosen = characters()
    assert len(chosen) == TINY_TRUNK.num_classes == len(set(chosen))
    for char in chosen:
        assert char not in benchmark
        for variant in (char, char.lower(), char.upper(), unicodedata.normalize("NFKD", char)):
            assert not set(unicodedata.normalize("NFKD", variant)) & benchmark, char
        assert unicodedata.category(char)[0] in "LSNP"
    # The real pool is large enough for the default 512 classes, and the pick is deterministic.
    assert characters() == tuple(glyph_trunk.pretrain_characters(TINY_TRUNK,
                                                                 glyphs.available_fonts()))


def test_text_and_pixel_filters_reject_lookalikes():
    bench = set("eOlD")
    assert glyph_trunk._forbidden_by_text("é", bench)  # decomposes to e + accent
    assert glyph_trunk._forbidden_by_text("ǅ", bench)  # D + ž
    assert glyph_trunk._forbidden_by_text("E", set("e"))  # case mapping
    assert not glyph_trunk._forbidden_by_text("Ж", bench)
    fonts = glyphs.available_fonts()
    candidates, benchmark = ["Ο", "Ж"], ["O"]  # Greek capital omicron is drawn like O
    found = glyph_trunk.homoglyphs(candidates, benchmark,
                                   glyphs.fonts_per_character(candidates, fonts),
                                   glyphs.fonts_per_character(benchmark, fonts), fonts)
    assert found == {"Ο"}


def test_built_once_then_reused_and_keyed(tmp_path, monkeypatch):
    path = glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK, log=lambda *_: None)
    info = json.loads(path.with_suffix(".json").read_text())
    assert info["key"]["params"]["num_classes"] == TINY_TRUNK.num_classes
    assert len(info["characters"]) == TINY_TRUNK.num_classes
    assert 0.0 <= info["held_out_top1"] <= 1.0
    state = torch.load(path, weights_only=True)
    SmallCNN().load_state_dict(state)  # strict: the file is exactly the trunk

    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached trunk")

    monkeypatch.setattr(glyph_trunk, "pretrain", no_build)
    assert glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK) == path
    # Anything that changes the weights changes the file: another recipe is not served this one.
    other = glyph_trunk.weights_path(tmp_path, glyph_trunk.cache_key(
        glyph_trunk.PretrainParams(**{**TINY_TRUNK.__dict__, "epochs": 2}),
        glyphs.available_fonts()))
    assert other != path


def test_a_foreign_sidecar_or_weight_file_is_rebuilt_not_trusted(tmp_path):
    path = glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK, log=lambda *_: None)
    sidecar = path.with_suffix(".json")
    good = sidecar.read_text()
    for bad_sidecar in ('{"key": {"pretrain_version": -1}}', "not json", "[1]", good):
        sidecar.write_text(bad_sidecar)
        torch.save({"planted": torch.zeros(1)}, path)  # a file the sidecar does not describe
        rebuilt = glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK, log=lambda *_: None)
        SmallCNN().load_state_dict(torch.load(rebuilt, weights_only=True))


def test_unwritable_cache_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(WeightsError, match="cannot write the cache"):
        glyph_trunk.pretrained_trunk_file(blocker / "sub", TINY_TRUNK, log=lambda *_: None)


def test_pretrained_small_cnn_loads_the_glyph_trunk(tiny_glyph_trunk):
    path = find_weights_file("small_cnn")
    assert path.parent == tiny_glyph_trunk
    model = build_model(ModelConfig(trunk="small_cnn", pretrained=True, embedding_size=8))
    expected = torch.load(path, weights_only=True)
    for name, value in model.trunk.state_dict().items():
        assert torch.equal(value, expected[name]), name
    random = build_model(ModelConfig(trunk="small_cnn", pretrained=False, embedding_size=8))
    assert not torch.equal(random.trunk.state_dict()["features.0.weight"],
                           expected["features.0.weight"])


def test_the_embedded_profile_fine_tunes_the_pretrained_trunk_like_mlrc():
    cfg = load_study("proxy_anchor_cub", profile="embedded")
    assert cfg.model.trunk == "small_cnn" and cfg.model.pretrained and cfg.model.freeze_bn
    assert cfg.search.sampler == "gp" and cfg.search.pruner == "none"
    assert cfg.search.trials >= 10 and cfg.final.reproductions >= 10
    assert cfg.train.patience > 0 and cfg.train.max_epochs * cfg.train.iters_per_epoch >= 400


def test_parallel_rendering_gives_the_same_bytes(monkeypatch):
    params = glyphs.GlyphParams(num_classes=6, per_class=3, image_size=16)
    chars = glyphs.glyph_characters(6)
    fonts = glyphs.available_fonts()
    support = glyphs.fonts_per_character(chars, fonts)
    monkeypatch.setattr(glyphs, "render_workers", lambda: 1)
    one = glyphs.render_classes(chars, support, fonts, params)
    monkeypatch.setattr(glyphs, "render_workers", lambda: 2)
    two = glyphs.render_classes(chars, support, fonts, params)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
    assert list(one[1]) == [c for c in range(6) for _ in range(3)]


def test_the_weights_do_not_depend_on_the_callers_thread_count(tmp_path):
    """torch splits float sums by its intra-op thread count, and training amplifies the
    rounding: a trunk built on 1 thread differed from one built on 2 by up to 0.73 in a weight.
    The build always uses PRETRAIN_THREADS, so every caller (a study on 8 cores, a comparison
    worker on 1 thread) gets the same file, and the caller's setting comes back afterwards."""
    before = torch.get_num_threads()
    built = {}
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            path = glyph_trunk.pretrained_trunk_file(tmp_path / str(threads), TINY_TRUNK,
                                                     log=lambda *_: None)
            assert torch.get_num_threads() == threads
            built[threads] = path.read_bytes()
            info = json.loads(path.with_suffix(".json").read_text())
            assert info["key"]["torch_threads"] == glyph_trunk.PRETRAIN_THREADS
    finally:
        torch.set_num_threads(before)
    assert built[1] == built[3]


def test_a_build_leaves_the_callers_random_state_alone(tmp_path):
    """A fold seeds torch, then builds its model: the first fold of a fresh cache builds the
    trunk on the way and must draw the same embedder and proxies as a fold with it cached."""
    torch.manual_seed(5)
    glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK, log=lambda *_: None)
    after_build = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(after_build, torch.rand(3))


def test_a_failed_build_gives_the_caller_its_thread_count_back(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        assert torch.get_num_threads() == glyph_trunk.PRETRAIN_THREADS
        raise RuntimeError("out of memory")

    monkeypatch.setattr(glyph_trunk, "pretrain", broken)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(RuntimeError, match="out of memory"):
            glyph_trunk.pretrained_trunk_file(tmp_path, TINY_TRUNK, log=lambda *_: None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
