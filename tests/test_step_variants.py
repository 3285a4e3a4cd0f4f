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
                "input_24px", "baseline_again"}
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in variants}
    assert set(rows) == variants
    assert rows["baseline"].endswith("1.00x  reference")
    assert rows["baseline_again"].endswith("bit-identical")  # the step is deterministic
    assert rows["foreach_adam"].endswith("bit-identical")
    # The smaller-trunk variant patched the trunk class and registry for its own build only.
    from harness.models import TRUNKS, SmallCNN
    assert SmallCNN.WIDTHS == (16, 32, 64, 128) and TRUNKS["small_cnn"].feature_dim == 128
