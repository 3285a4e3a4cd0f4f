"""Search cost with and without pruning: the same trial budget under each pruner.

    python benchmarks/bench_pruning.py                       # proxy_anchor_cub on the glyphs, CPU
    python benchmarks/bench_pruning.py --variants none,median-in-fold,hyperband-in-fold
    python benchmarks/bench_pruning.py --trials 16 --epochs 12 --device cuda

Runs the search stage of one study (`--profile embedded`: the embedded glyph data, a small CNN)
once per variant, each in its own fresh study with the same sampler seed and trial budget:

  none               no pruning (the cost every other variant is compared with)
  median             MedianPruner on the running fold mean, from the end of the first fold
  hyperband          HyperbandPruner, resource = training iterations, rungs from one fold
  median-in-fold     median, also at every validation point inside a fold (warm-up 0 folds)
  hyperband-in-fold  hyperband with rungs from the first validation point of the first fold

and prints, per variant: trials complete / pruned, fold trainings begun, training iterations
spent, wall time, the best validation MAP@R (mean over the 4 folds of a complete trial), and the
ratios to no pruning. Pruned trials count toward the budget (as in harness.run), so pruning buys
a cheaper search of the same number of configurations. The first trials are the same in every
variant; after the first pruned trial TPE sees different histories, so later suggestions differ.
The per-fold budget is cut (`--epochs`, `--iters`) so that the whole bench takes minutes on two
CPU cores (defaults: 8 trials, 6 epochs x 40 iterations per fold, about 8 minutes); on the
glyphs the small CNN only starts to learn after about 200 iterations, so validation points
before that carry no signal (the in-fold variants prune on noise there). Numbers on the glyphs
say nothing about real-data accuracy, only about cost.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
os.environ.setdefault("HARNESS_NO_PROGRESS", "1")

import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from harness.config import load_study  # noqa: E402
from harness.data import prepare_data, resolve_device  # noqa: E402
from harness.search import default_storage, run_search  # noqa: E402

VARIANTS = {  # name: (search.pruner, search.prune_warmup_folds)
    "none": ("none", 1),
    "median": ("median", 1),
    "hyperband": ("hyperband", 1),
    "median-in-fold": ("median", 0),
    "hyperband-in-fold": ("hyperband", 0),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="proxy_anchor_cub")
    p.add_argument("--profile", default="embedded")
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6, help="train.max_epochs per fold")
    p.add_argument("--iters", type=int, default=40, help="train.iters_per_epoch")
    p.add_argument("--val-every", type=int, default=2, help="train.val_every_epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="none,median,hyperband",
                   help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--output", help="folder for the runs (default: a temporary folder)")
    return p.parse_args()


def cost(study: optuna.Study, iters_per_epoch: int) -> dict:
    """Work spent: folds begun and iterations trained (user attrs written by the objective)."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    folds = iterations = 0
    for t in complete + pruned:
        finished = t.user_attrs.get("fold_results", {})
        spent = t.user_attrs.get("train_iterations", 0)
        full = sum(r["epochs"] for r in finished.values()) * iters_per_epoch
        folds += len(finished) + (1 if t.state == TrialState.PRUNED and spent > full else 0)
        iterations += spent
    best = max((t.value for t in complete), default=math.nan)
    return {"complete": len(complete), "pruned": len(pruned), "folds": folds,
            "iterations": iterations, "best": best}


def main() -> int:
    args = parse_args()
    names = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    root = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-pruning-"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = [f"search.trials={args.trials}", f"train.max_epochs={args.epochs}",
                 f"train.iters_per_epoch={args.iters}", f"train.val_every_epochs={args.val_every}",
                 f"train.patience={args.epochs}", f"train.device={args.device}"]
    base = load_study(args.study, profile=args.profile, overrides=overrides)
    device = resolve_device(base.train.device)
    data = prepare_data(base)  # once: every variant trains on the same images and split
    print(f"{args.study} --profile {args.profile}: {args.trials} trials x {base.search.folds} "
          f"folds, {args.epochs} epochs x {args.iters} iterations per fold, validation every "
          f"{args.val_every} epoch(s), sampler {base.search.sampler} seed {base.seed}, "
          f"device {device}, torch threads {__import__('torch').get_num_threads()}",
          flush=True)
    rows = {}
    for name in names:
        pruner, warmup = VARIANTS[name]
        cfg = load_study(args.study, profile=args.profile, overrides=overrides + [
            f"search.pruner={pruner}", f"search.prune_warmup_folds={warmup}"])
        output = root / name
        output.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        study = run_search(cfg, data, output, default_storage(output), device)
        rows[name] = {**cost(study, cfg.train.iters_per_epoch),
                      "wall": time.perf_counter() - started}
        r = rows[name]
        print(f"  {name}: {r['complete']} complete, {r['pruned']} pruned, {r['wall']:.0f} s",
              flush=True)
    print_table(rows, names)
    print(f"runs kept under {root}")
    return 0


def print_table(rows: dict, names: list[str]) -> None:
    ref = rows.get("none")
    header = ("| pruner | complete | pruned | fold trainings | train iterations | wall s "
              "| best val MAP@R | iterations / none | wall / none | best - none |")
    print("\n" + header)
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        r = rows[name]
        ratio = (lambda key: f"{r[key] / ref[key]:.2f}") if ref else (lambda key: "-")
        delta = f"{r['best'] - ref['best']:+.4f}" if ref else "-"
        print(f"| {name} | {r['complete']} | {r['pruned']} | {r['folds']} | {r['iterations']} "
              f"| {r['wall']:.0f} | {r['best']:.4f} | {ratio('iterations')} | {ratio('wall')} "
              f"| {delta} |")


if __name__ == "__main__":
    sys.exit(main())
