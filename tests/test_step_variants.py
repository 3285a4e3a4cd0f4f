"""benchmarks/step_variants.py: the CPU step as trained against faster variants."""

from __future__ import annotations

import pytest
from conftest import benchmark_script


@pytest.mark.slow
def test_step_variants_times_each_and_says_which_keep_the_weights(capsys):
    """benchmarks/step_variants.py: every variant timed against the baseline, and foreach Adam
    the same arithmetic as the per-tensor Adam a fold trains with (bit-identical weights, as
    results/bench/step_variants_cpu.txt says)."""
    assert benchmark_script("step_variants").main(["--steps", "2", "--rounds", "1"]) == 0
    variants = {"baseline", "foreach_adam", "channels_last", "compiled", "half_widths",
                "input_24px", "frozen_1_2", "frozen_1_3", "baseline_again"}
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in variants}
    assert set(rows) == variants
    assert rows["baseline"].endswith("1.00x  reference")
    assert rows["baseline_again"].endswith("bit-identical")  # the step is deterministic
    assert rows["foreach_adam"].endswith("bit-identical")
    assert rows["frozen_1_3"].endswith("another benchmark")


def test_a_frozen_prefix_variant_trains_only_the_blocks_after_it():
    import torch

    from harness.config import load_study

    script = benchmark_script("step_variants")
    cfg = load_study("proxy_anchor_glyphs", profile="embedded")
    cfg.model.pretrained = False  # the structure is what is tested, not the weights
    step, model, _ = script.build("frozen_1_3", cfg, num_classes=96)
    assert [type(m).__name__ for m in model.trunk.features] == ["Conv2d", "BatchNorm2d", "ReLU"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    step()
    after = model.state_dict()
    assert not torch.equal(after["trunk.features.0.weight"], before["trunk.features.0.weight"])
    assert not torch.equal(after["embedder.weight"], before["embedder.weight"])
    # The smaller-trunk variant patched the trunk class and registry for its own build only.
    from harness.models import TRUNKS, SmallCNN
    assert SmallCNN.WIDTHS == (16, 32, 64, 128) and TRUNKS["small_cnn"].feature_dim == 128
