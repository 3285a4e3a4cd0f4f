"""Validation curves of one embedded fold under a candidate schedule: how the embedded profile's
lr and length were chosen (docs/embedded.md).

    python benchmarks/embedded_schedule.py proxy_anchor --set train.lr=1e-3 --set train.loss_lr=0.1

Trains fold 0 of `<loss>_glyphs --profile embedded` with the given overrides, no early stopping,
validating every `--every` iterations up to `--iters`, on one torch thread, and prints the
validation MAP@R of the untrained model (pretrained trunk, random embedder) and the curve.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> int:
    import torch

    from harness.config import load_study
    from harness.data import fold_indices, prepare_data
    from harness.models import build_model
    from harness.train import seed_everything, train_fold, validate

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("loss", help="loss alias, e.g. proxy_anchor")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--iters", type=int, default=400)
    p.add_argument("--every", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = load_study(f"{args.loss}_glyphs", profile="embedded", overrides=[
        f"train.iters_per_epoch={args.every}", f"train.max_epochs={args.iters // args.every}",
        "train.val_every_epochs=1", "train.patience=100000", *args.set])
    data = prepare_data(cfg)
    fold = data.split.folds[0]
    seed_everything(0)
    untrained = validate(cfg, build_model(cfg.model), data, fold_indices(data, fold)[1],
                         torch.device("cpu"))["map_at_r"]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        result = train_fold(cfg, data, fold, torch.device("cpu"), 0, Path(tmp))
    curve = ", ".join(f"{h['map_at_r']:.3f}" for h in result.history)
    print(f"{args.loss} {' '.join(args.set)}: untrained {untrained:.3f}; "
          f"{time.perf_counter() - start:.0f} s; best at iteration "
          f"{result.best_epoch * args.every}; MAP@R every {args.every} iterations: {curve}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
