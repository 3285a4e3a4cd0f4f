"""Can an embedded training step be made faster on the CPU without changing the protocol? (#12:
the full comparison takes about 4 hours per seed on 2 cores against a goal of 60 minutes.)

    python benchmarks/step_variants.py [--study proxy_anchor_glyphs] [--steps 150] [--rounds 5]

Times one training step (forward, loss, backward, both optimiser steps) of the study's embedded
configuration at its batch (32 x 3 x 32 x 32), one torch thread, in these variants:

  baseline        harness.train.build_fold_modules and training_step with the whole trunk
                  fine-tuned (model.frozen_blocks = 0, as MLRC; torch's Adam picks its
                  per-tensor loop on the CPU)
  foreach_adam    the same with Adam(foreach=True): one fused call per operation over all tensors
  channels_last   model and batch in channels-last memory format (oneDNN's preferred layout)
  compiled        torch.compile(model) (inductor, C++ on the CPU); compile time not counted
  half_widths     a smaller benchmark: small_cnn at half its widths (8-16-32-64, randomly
                  initialised: no pretrained trunk of that shape exists)
  input_24px      a smaller benchmark: 24x24 instead of 32x32 images
  frozen_1_2      a smaller benchmark: the pretrained trunk's first 2 of 4 conv blocks frozen
                  (no gradient, not updated; BatchNorm is frozen anyway) and their output
                  computed once per image, so a step runs blocks 3-4, pooling, embedder and loss
  frozen_1_3      the same with the first 3 blocks frozen: only block 4 is fine-tuned
  profile_1_3     the embedded profile's own step (model.frozen_blocks = 3): blocks 1-3 frozen
                  but computed again at every step (under no_grad), as a fold trains now; its
                  gap to frozen_1_3 is what a cache of their output would save
  baseline_again  the baseline built and timed a second time: how far apart two timings of the
                  same step come on this machine (a ratio within that is no difference)

The variants run in interleaved rounds, each round starting one variant later (A B C, B C A,
...), so that a noisy machine slows them alike; the median round of each is compared with the
baseline's. Also reported: whether the variant's weights after the timed steps are
bit-identical to the baseline's (the same seed, batch and steps), i.e. whether it could replace
the baseline without changing any result (the two smaller benchmarks change the model or its
input, so they cannot).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = ("baseline", "foreach_adam", "channels_last", "compiled", "half_widths", "input_24px",
            "frozen_1_2", "frozen_1_3", "profile_1_3", "baseline_again")
FROZEN_BLOCKS = {"frozen_1_2": 2, "frozen_1_3": 3}
OTHER_MODEL = ("half_widths", "input_24px", *FROZEN_BLOCKS, "profile_1_3")


def build(variant: str, cfg, num_classes: int):
    """(step function, model, loss) of one variant, from the same seed."""
    import copy
    import dataclasses

    import torch

    from harness.models import TRUNKS, SmallCNN
    from harness.train import build_fold_modules, training_step

    widths, spec = SmallCNN.WIDTHS, TRUNKS["small_cnn"]
    cfg = copy.deepcopy(cfg)  # each variant states how much of the trunk trains
    cfg.model.frozen_blocks = 3 if variant == "profile_1_3" else 0
    try:
        if variant == "half_widths":  # for this build only: the class and registry are restored
            cfg.model.pretrained = False
            SmallCNN.WIDTHS = tuple(w // 2 for w in widths)
            TRUNKS["small_cnn"] = dataclasses.replace(spec, feature_dim=SmallCNN.WIDTHS[-1])
        torch.manual_seed(0)
        model, loss_fn, model_opt, loss_opt = build_fold_modules(cfg, num_classes,
                                                                 torch.device("cpu"))
    finally:
        SmallCNN.WIDTHS, TRUNKS["small_cnn"] = widths, spec
    if variant == "foreach_adam":
        model_opt = type(model_opt)(model.parameters(),
                                    **(model_opt.defaults | {"foreach": True}))
        if loss_opt is not None:
            loss_opt = type(loss_opt)(loss_opt.param_groups[0]["params"],
                                      **(loss_opt.defaults | {"foreach": True}))
    if variant == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    forward = torch.compile(model) if variant == "compiled" else model
    generator = torch.Generator().manual_seed(1)
    size = 24 if variant == "input_24px" else cfg.data.crop
    images = torch.randn(cfg.train.batch_size, 3, size, size, generator=generator)
    if variant == "channels_last":
        images = images.contiguous(memory_format=torch.channels_last)
    if variant in FROZEN_BLOCKS:
        # conv, BN, ReLU per block: the frozen prefix runs once (as a feature cache would),
        # the model keeps the rest, and the optimiser only what still trains
        layers = list(model.trunk.features)
        cut = 3 * FROZEN_BLOCKS[variant]
        with torch.no_grad():
            images = torch.nn.Sequential(*layers[:cut]).eval()(images)
        model.trunk.features = torch.nn.Sequential(*layers[cut:])
        model_opt = type(model_opt)(model.parameters(), **model_opt.defaults)
    labels = torch.arange(cfg.train.batch_size // cfg.train.m_per_class).repeat_interleave(
        cfg.train.m_per_class)
    model.train()

    def step() -> None:
        training_step(forward, loss_fn, model_opt, loss_opt, images, labels, amp=False,
                      grad_clip=cfg.train.grad_clip)

    return step, model, loss_fn


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="proxy_anchor_glyphs")
    p.add_argument("--steps", type=int, default=150, help="timed steps per variant and round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)

    import torch

    from harness.config import load_study

    torch.set_num_threads(1)
    cfg = load_study(args.study, profile="embedded")
    num_classes = 96  # a fold's training classes on the glyphs (128 train+val, 4 folds)
    built = {v: build(v, cfg, num_classes) for v in VARIANTS}
    for step, _, _ in built.values():  # warm-up (and compilation) before any timing
        for _ in range(10):
            step()
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
            step = built[variant][0]
            began = time.perf_counter()
            for _ in range(args.steps):
                step()
            times[variant].append((time.perf_counter() - began) / args.steps * 1e3)

    base_model, base_loss = built["baseline"][1], built["baseline"][2]

    def same_weights(variant: str) -> bool:
        if variant in OTHER_MODEL:
            return False
        _, model, loss_fn = built[variant]
        pairs = [*zip(base_model.state_dict().values(), model.state_dict().values()),
                 *zip(base_loss.state_dict().values(), loss_fn.state_dict().values())]
        return all(torch.equal(a, b.contiguous()) for a, b in pairs)

    base = statistics.median(times["baseline"])
    print(f"{args.study}, embedded profile: batch {cfg.train.batch_size} at "
          f"{cfg.data.crop} px, 1 torch thread, torch {torch.__version__}; {args.rounds} "
          f"interleaved rounds of {args.steps} steps per variant (median round)")
    print(f"{'variant':<15} {'ms/step':>8} {'vs baseline':>12}  weights after the steps")
    for variant in VARIANTS:
        ms = statistics.median(times[variant])
        same = "reference" if variant == "baseline" else "another benchmark" \
            if variant in OTHER_MODEL else "bit-identical" if same_weights(variant) else "differ"
        print(f"{variant:<15} {ms:8.2f} {base / ms:11.2f}x  {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
