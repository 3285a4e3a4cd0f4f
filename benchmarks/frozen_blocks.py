"""How much of the glyph trunk should the embedded profile fine-tune? (#12: the comparison must
fit in about an hour on 2 CPU cores.)

    python benchmarks/frozen_blocks.py [--methods proxy_anchor,multi_similarity,...] [--blocks 0,3]
    python benchmarks/frozen_blocks.py --blocks 3,3+cache   # model.cache_frozen_features

Trains the 4 folds of `<loss>_glyphs --profile embedded` (its schedule and early stopping, the
loss's default parameters, fold seed = fold index) once per `model.frozen_blocks` value (N+cache:
N blocks frozen, their output computed once per image: model.cache_frozen_features), one torch
thread per process and two processes side by side (each method's variants run together, so a
busy machine slows them alike), and prints per fold the best validation MAP@R, the iteration it
came at, where the fold stopped and why (p = patience, m = the epoch cap, d = diverged), and per
method and variant the mean MAP@R and the seconds all 4 folds took; then the seconds of each
variant summed over the methods, as a ratio to the first variant's.

The loss parameters are the registry's defaults, not searched ones: this compares the schedule
and the fine-tuned part of the trunk, not the losses.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

METHODS = "proxy_anchor,multi_similarity,norm_softmax,proxy_nca_pp,arcface,triplet"


def variant_overrides(variant: str) -> list[str]:
    """`--blocks` entry -> overrides: "3" = model.frozen_blocks 3, "3+cache" = with the
    frozen blocks' output cached (model.cache_frozen_features)."""
    blocks, plus, cache = variant.partition("+")
    if not blocks.isdigit() or (plus and cache != "cache"):
        raise SystemExit(f"--blocks entry {variant!r}: expected N or N+cache (N = 0-4)")
    return [f"model.frozen_blocks={blocks}",
            f"model.cache_frozen_features={'true' if plus else 'false'}"]


def train_folds(loss: str, variant: str, overrides: tuple[str, ...] = ()
                ) -> tuple[str, str, list[tuple], float]:
    """(loss, variant, [(best MAP@R, best iteration, last iteration, stop)], seconds)."""
    import torch

    from harness.config import load_study
    from harness.data import prepare_data
    from harness.train import train_fold

    torch.set_num_threads(1)
    cfg = load_study(f"{loss}_glyphs", profile="embedded",
                     overrides=[*overrides, *variant_overrides(variant)])
    data = prepare_data(cfg)
    per_epoch = cfg.train.iters_per_epoch
    folds, began = [], time.perf_counter()
    for fold in data.split.folds:
        with tempfile.TemporaryDirectory() as tmp:
            r = train_fold(cfg, data, fold, torch.device("cpu"), fold.index, Path(tmp))
        folds.append((r.best_map_at_r, r.best_epoch * per_epoch, r.epochs_trained * per_epoch,
                      r.stop_reason[0]))
    return loss, variant, folds, time.perf_counter() - began


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=METHODS, help="comma-separated loss aliases")
    p.add_argument("--blocks", default="0,3",
                   help="model.frozen_blocks values to compare; N+cache caches their output")
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="another override of the profile, for every variant")
    args = p.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    blocks = [b for b in args.blocks.split(",") if b]
    for b in blocks:
        variant_overrides(b)  # a bad entry fails here, before any training

    from harness.glyph_trunk import pretrained_trunk_file

    pretrained_trunk_file()  # built once here, not by two workers at a time
    jobs = [(m, b, tuple(args.set)) for m in methods for b in blocks]
    with ProcessPoolExecutor(args.procs) as pool:
        rows = list(pool.map(train_folds, *zip(*jobs)))

    print(f"embedded profile{''.join(' --set ' + s for s in args.set)}, 4 folds per method "
          f"(loss defaults), {args.procs} processes of 1 torch thread; per fold: best val "
          f"MAP@R @ its iteration / last iteration + stop")
    seconds = dict.fromkeys(blocks, 0.0)
    for loss, frozen, folds, took in rows:
        seconds[frozen] += took
        mean = sum(f[0] for f in folds) / len(folds)
        cells = " | ".join(f"{f[0]:.3f} @{f[1]}/{f[2]}{f[3]}" for f in folds)
        print(f"{loss:<18} frozen {frozen}: mean {mean:.3f}  {took:6.1f} s | {cells}")
    first = blocks[0]
    for b in blocks:
        print(f"frozen_blocks {b}: {seconds[b]:.1f} s over the methods, "
              f"{seconds[first] / seconds[b]:.2f}x the speed of frozen_blocks {first}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
