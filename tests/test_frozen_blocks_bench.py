"""benchmarks/frozen_blocks.py: the embedded folds with more or less of the trunk frozen."""

from __future__ import annotations

import re

import pytest
from conftest import benchmark_script


@pytest.mark.slow
def test_frozen_blocks_trains_every_fold_of_each_variant_and_compares_their_time(
        capsys, tiny_glyph_trunk):
    script = benchmark_script("frozen_blocks")
    shrink = ["--set", "train.max_epochs=2", "--set", "train.iters_per_epoch=2",
              "--set", "train.val_every_epochs=1"]
    assert script.main(["--methods", "proxy_anchor", "--blocks", "0,4+cache", "--procs", "1",
                        *shrink]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("proxy_anchor")]
    assert [row.split()[2] for row in rows] == ["0:", "4+cache:"]
    assert all(row.count("@") == 4 and row.count("/4m") == 4 for row in rows)  # the cap: 4
    assert any(line.startswith("frozen_blocks 4+cache: ") and line.endswith(
        "the speed of frozen_blocks 0") for line in out)


def test_a_fold_with_every_block_frozen_trains_the_embedder_only():
    """All 4 blocks frozen is a linear probe: the variant the script compares must train."""
    import torch

    from harness.config import load_study
    from harness.train import build_fold_modules, trainable

    cfg = load_study("proxy_anchor_glyphs", profile="embedded", overrides=[
        "model.frozen_blocks=4", "model.pretrained=false"])
    model, *_ = build_fold_modules(cfg, num_classes=8, device=torch.device("cpu"))
    assert {id(p) for p in trainable(model)} == {id(p) for p in model.embedder.parameters()}


@pytest.mark.parametrize("entry", ["3+fast", "x", "+cache"])
def test_a_variant_the_script_does_not_know_fails_before_training(entry):
    script = benchmark_script("frozen_blocks")
    with pytest.raises(SystemExit, match=re.escape(f"--blocks entry {entry!r}")):
        script.main(["--methods", "proxy_anchor", "--blocks", f"3,{entry}"])
