"""What the fast search choices cost against MLRC's search: the same trial budget each.

    python benchmarks/bench_search.py                  # proxy_anchor_cub on the glyphs, CPU
    python benchmarks/bench_search.py --seeds 0,1 --trials 16
    python benchmarks/bench_search.py --variants mlrc,tpe-median,tpe-hyperband --device cuda

Runs the search stage of one study (`--profile embedded`: the embedded glyph data, a small CNN)
once per variant and seed, each in its own fresh study with the same trial budget:

  mlrc            MLRC's search, the default: Sobol start then GP (search.sampler=gp), no pruning
  tpe             TPE (search.sampler=tpe), no pruning
  tpe-median      TPE + MedianPruner from the end of the first fold (the old default)
  tpe-hyperband   TPE + HyperbandPruner, resource = training iterations, rungs from one fold
  gp-median       MLRC's sampler + MedianPruner

and prints, per variant (summed / averaged over seeds): trials complete / pruned, fold trainings
begun, training iterations spent, wall time, the best validation MAP@R (mean over the 4 folds of
a complete trial), and the ratios / differences to `mlrc`. Pruned trials count toward the budget
(as in harness.run), so pruning buys a cheaper search of the same number of configurations; the
price is in the best configuration found. The per-fold budget is cut (`--epochs`, `--iters`) so
that the bench takes minutes per variant on two CPU cores. Numbers on the glyphs say nothing
about real-data accuracy, only about cost and about how much a search finds on this problem.
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
from harness.search import run_search  # noqa: E402
from harness.storage import default_storage  # noqa: E402

VARIANTS = {  # name: (search.sampler, search.pruner, search.prune_warmup_folds)
    "mlrc": ("gp", "none", 1),
    "tpe": ("tpe", "none", 1),
    "tpe-median": ("tpe", "median", 1),
    "tpe-hyperband": ("tpe", "hyperband", 1),
    "gp-median": ("gp", "median", 1),
}
REFERENCE = "mlrc"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="proxy_anchor_cub")
    p.add_argument("--profile", default="embedded")
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--seeds", default="0", help="comma-separated study seeds (one search each)")
    p.add_argument("--epochs", type=int, default=6, help="train.max_epochs per fold")
    p.add_argument("--iters", type=int, default=40, help="train.iters_per_epoch")
    p.add_argument("--val-every", type=int, default=2, help="train.val_every_epochs")
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", default="mlrc,tpe,tpe-median",
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
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    root = Path(args.output) if args.output else Path(tempfile.mkdtemp(prefix="bench-search-"))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    overrides = [f"search.trials={args.trials}", f"train.max_epochs={args.epochs}",
                 f"train.iters_per_epoch={args.iters}", f"train.val_every_epochs={args.val_every}",
                 f"train.patience={args.epochs}", f"train.device={args.device}"]
    base = load_study(args.study, profile=args.profile, overrides=overrides)
    device = resolve_device(base.train.device)
    data = prepare_data(base)  # once: every variant trains on the same images and split
    print(f"{args.study} --profile {args.profile}: {args.trials} trials x {base.search.folds} "
          f"folds, {args.epochs} epochs x {args.iters} iterations per fold, validation every "
          f"{args.val_every} epoch(s), seeds {seeds}, device {device}, torch threads "
          f"{__import__('torch').get_num_threads()}", flush=True)
    rows = {}
    for name in names:
        sampler, pruner, warmup = VARIANTS[name]
        per_seed = []
        for seed in seeds:
            cfg = load_study(args.study, profile=args.profile, overrides=overrides + [
                f"seed={seed}", f"search.sampler={sampler}", f"search.pruner={pruner}",
                f"search.prune_warmup_folds={warmup}"])
            output = root / f"{name}_seed{seed}"
            output.mkdir(parents=True, exist_ok=True)
            started = time.perf_counter()
            study = run_search(cfg, data, output, default_storage(output), device)
            r = {**cost(study, cfg.train.iters_per_epoch), "wall": time.perf_counter() - started}
            per_seed.append(r)
            print(f"  {name} seed {seed}: {r['complete']} complete, {r['pruned']} pruned, "
                  f"{r['iterations']} iterations, best {r['best']:.4f}, {r['wall']:.0f} s",
                  flush=True)
        rows[name] = {key: sum(r[key] for r in per_seed) for key in
                      ("complete", "pruned", "folds", "iterations", "wall")}
        rows[name]["best"] = sum(r["best"] for r in per_seed) / len(per_seed)
        rows[name]["bests"] = [r["best"] for r in per_seed]
    print_table(rows, names)
    print(f"runs kept under {root}")
    return 0


def print_table(rows: dict, names: list[str]) -> None:
    ref = rows.get(REFERENCE)
    print("\n| variant | complete | pruned | fold trainings | train iterations | wall s "
          "| best val MAP@R, mean of seeds (each) | iterations / mlrc | wall / mlrc "
          "| best - mlrc |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |")
    for name in names:
        r = rows[name]
        ratio = (lambda key: f"{r[key] / ref[key]:.2f}") if ref else (lambda key: "-")
        delta = f"{r['best'] - ref['best']:+.4f}" if ref else "-"
        each = ", ".join(f"{b:.4f}" for b in r["bests"])
        print(f"| {name} | {r['complete']} | {r['pruned']} | {r['folds']} | {r['iterations']} "
              f"| {r['wall']:.0f} | {r['best']:.4f} ({each}) | {ratio('iterations')} "
              f"| {ratio('wall')} | {delta} |")


if __name__ == "__main__":
    sys.exit(main())
