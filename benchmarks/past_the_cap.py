"""What did the epoch cap cost? The final folds that the cap ended, trained on past it.

    python benchmarks/past_the_cap.py STUDY_DIR [STUDY_DIR ...] [--max-epochs 150] [--jobs 2] \
        [--out results/embedded/past_the_cap.csv]

Issue #12 asks that early stopping, not the cap, end at least 90% of the final folds; in the
embedded comparison some methods' did not (ArcFace 21/40 in seed 0). This measures what that
cost them. For every run (reproduction) of a finished study's final table, each fold whose
training the cap ended is trained again with the same config, best parameters and seed and a
higher cap (`--max-epochs`). Its validations up to the old cap must equal the recorded ones (the
same trajectory; otherwise the script stops with an error), and it then trains until early
stopping or the new cap. The run's concatenated test MAP@R is computed again with the extended
folds' best models and the other folds' recorded test embeddings (early stopping ended those,
so a higher cap would not change them). Before that, each run's recorded concatenated MAP@R is
recomputed from its recorded embeddings and must match final/rep_RR/concatenated.json.

Needs each fold's test_embeddings.npz (not committed; `embedded_comparison.py run` writes them),
torch 2.14.1 and one torch thread per process, as the studies ran (the recorded curves are
reproduced bit for bit only so). Writes one row per run to OUT (csv) and a per-study summary
to OUT with .md.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.retrain_trial import (check_same_split, read_history, record,  # noqa: E402
                                      recorded_config, refuse_unfinished, same_curve,
                                      trial_record)
from benchmarks.search_noise import check_recorded_score  # noqa: E402
from harness.splits import NUM_FOLDS  # noqa: E402


def load_embeddings(path: Path) -> dict[str, np.ndarray]:
    """A fold's recorded test embeddings (arrays only: no pickle from a run folder)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise SystemExit(f"{path}: cannot read the fold's test embeddings ({e}); they are "
                         f"written by the final step and not committed") from None
    if not {"query_emb", "query_labels"} <= set(arrays):
        raise SystemExit(f"{path}: not a fold's test embeddings (no query_emb/query_labels)")
    return arrays


def fold_plan(folder: Path, rep: int, best: dict) -> list[dict]:
    """The 4 folds of run `rep`: source, seed, whether the cap ended them, recorded curve."""
    from harness.seeds import reproduction_fold_seed, trial_fold_seed

    cfg_seed = record(folder / "config.json", "seed")["seed"]
    rep_dir = folder / "final" / f"rep_{rep:02d}"
    trial = None  # the best trial's study.db record, read once if a fold needs it
    plan = []
    for k in range(NUM_FOLDS):
        result = record(rep_dir / f"fold_{k}" / "result.json", "source", "stop")
        source = result["source"]
        if source == "retrained":
            seed = reproduction_fold_seed(cfg_seed, rep, k)
            history, stop = rep_dir / f"fold_{k}" / "history.json", result["stop"]
        else:  # the best trial's models from the search, or retrained with its seed
            seed = trial_fold_seed(cfg_seed, best["seed_number"], k)
            if source == "best_trial":
                trial = trial or trial_record(folder, best["trial"])
                done = trial.user_attrs.get("fold_results")
                if not (isinstance(done, dict) and isinstance(done.get(str(k)), dict)):
                    raise SystemExit(f"{folder}: trial {best['trial']} records no result of "
                                     f"fold {k} in study.db")
                stop = done[str(k)].get("stop")
                history = (folder / "trials" / f"trial_{best['seed_number']:04d}" / f"fold_{k}"
                           / "history.json")
            else:
                history, stop = rep_dir / f"fold_{k}" / "history.json", result["stop"]
        plan.append({"fold": k, "source": source, "seed": seed, "capped": stop == "max_epochs",
                     "history": history, "embeddings": rep_dir / f"fold_{k}" /
                     "test_embeddings.npz"})
    return plan


def extend_run(folder: str, rep: int, max_epochs: int, out: str, threads: int = 1) -> dict:
    """One run of one study: its capped folds trained past the cap, its score recomputed.
    `threads`: the torch threads the study trained with (embedded_comparison: 1), without which
    the recorded curves do not come back bit for bit."""
    import torch

    from harness.data import prepare_data
    from harness.final import concatenate, embed_test_set, test_metrics
    from harness.search import config_for_params
    from harness.train import load_best_model, train_fold

    torch.set_num_threads(threads)
    study = Path(folder)
    cfg, _ = recorded_config(study, [])
    best = record(study / "final" / "best_trial.json", "trial", "seed_number", "params")
    best_cfg = config_for_params(cfg, best["params"])
    old_cap = best_cfg.train.max_epochs
    if max_epochs <= old_cap:
        raise SystemExit(f"--max-epochs {max_epochs}: not above the study's cap ({old_cap})")
    best_cfg.train.max_epochs = max_epochs
    data = prepare_data(cfg)
    check_same_split(study, data)
    cpu = torch.device("cpu")
    plan = fold_plan(study, rep, best)
    recorded = [load_embeddings(f["embeddings"]) for f in plan]
    before = test_metrics(concatenate(recorded), cpu)["map_at_r"]
    check_recorded_score(study, rep, before, f"run {rep}'s recorded test embeddings")
    folds = {d.index: d for d in data.split.folds}
    extended, added, val_gain = list(recorded), 0, 0.0
    for f in plan:
        if not f["capped"]:
            continue
        run_dir = Path(out) / study.parent.name / study.name / f"rep_{rep:02d}" / \
            f"fold_{f['fold']}"
        refuse_unfinished(run_dir)
        result = train_fold(best_cfg, data, folds[f["fold"]], cpu, seed=f["seed"],
                            run_dir=run_dir, desc=f"rep {rep} fold {f['fold']}")
        if same_curve(f["history"], result.history, extended=True) is not True:
            raise SystemExit(f"{study} run {rep} fold {f['fold']}: training it again did not "
                             f"reproduce its recorded validations (torch version or thread "
                             f"count other than the study's?)")
        old_best = max(h["map_at_r"] for h in read_history(f["history"]))  # checked just above
        val_gain += result.best_map_at_r - old_best
        added += result.epochs_trained - old_cap
        model = load_best_model(best_cfg, Path(result.checkpoint), cpu)
        extended[f["fold"]] = embed_test_set(best_cfg, model, data, cpu)
    after = test_metrics(concatenate(extended), cpu)["map_at_r"] if added else before
    return {"seed_dir": study.parent.name, "study": study.name, "reproduction": rep,
            "capped_folds": sum(f["capped"] for f in plan), "epochs_added": added,
            "val_map_at_r_gain": round(val_gain, 6), "test_map_at_r": before,
            "test_map_at_r_past_cap": after}


def fold_rows(studies: list[Path], work: Path) -> pd.DataFrame:
    """One row per capped fold: its recorded best validation MAP@R and epoch, and those of its
    training past the cap (from WORK, where extend_run trained it), with the epoch it stopped."""
    rows = []
    for study in studies:
        best = record(study / "final" / "best_trial.json", "trial", "seed_number", "params")
        cap = record(study / "config.json", "train")["train"].get("max_epochs")
        for rep in final_runs(study):
            for f in fold_plan(study, rep, best):
                if not f["capped"]:
                    continue
                path = (work / study.parent.name / study.name / f"rep_{rep:02d}" /
                        f"fold_{f['fold']}" / "history.json")
                then, now = record_list(f["history"]), record_list(path)
                b0 = max(then, key=lambda h: h["map_at_r"])
                b1 = max(now, key=lambda h: h["map_at_r"])
                rows.append({"seed_dir": study.parent.name, "study": study.name,
                             "reproduction": rep, "fold": f["fold"], "cap": cap,
                             "best_epoch": b0["epoch"], "val_map_at_r": b0["map_at_r"],
                             "best_epoch_past_cap": b1["epoch"],
                             "val_map_at_r_past_cap": b1["map_at_r"],
                             "stopped_at": max(h["epoch"] for h in now)})
    return pd.DataFrame(rows)


def record_list(path: Path) -> list[dict]:
    """A validation history, or a refusal."""
    rows = read_history(path)
    if rows is None:
        raise SystemExit(f"{path}: missing or not a validation history (run the extension "
                         f"first, with the same --work)")
    return rows


def final_runs(study: Path) -> list[int]:
    reps = sorted(int(d.name[4:]) for d in (study / "final").glob("rep_[0-9][0-9]"))
    if not reps:
        raise SystemExit(f"{study}: no final runs (final/rep_NN)")
    return reps


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    by = frame.groupby(["seed_dir", "study"])
    table = by.agg(runs=("reproduction", "count"), capped_folds=("capped_folds", "sum"),
                   epochs_added=("epochs_added", "sum"), test_map_at_r=("test_map_at_r", "mean"),
                   test_map_at_r_past_cap=("test_map_at_r_past_cap", "mean")).reset_index()
    table["change"] = table["test_map_at_r_past_cap"] - table["test_map_at_r"]
    return table


def folds_summary(folds: pd.DataFrame, max_epochs: int) -> str:
    """How the capped folds ended when trained on (the per-fold rows are in OUT_folds.csv)."""
    if folds.empty:
        return ""
    stopped = folds["stopped_at"]
    better = folds["best_epoch_past_cap"] > folds["cap"]
    gain = folds["val_map_at_r_past_cap"] - folds["val_map_at_r"]
    return (f"\nThe {len(folds)} capped folds, trained on: early stopping ended "
            f"{int((stopped < max_epochs).sum())} before the new cap of {max_epochs} epochs "
            f"(at epoch {int(stopped.min())}-{int(stopped.max())}, median "
            f"{stopped.median():g}); {int(better.sum())} found a better model after the old "
            f"cap (validation MAP@R up by {gain[better].median():.4f} median, "
            f"{gain.max():.4f} at most).\n")


def seeds_agreement(table: pd.DataFrame) -> str:
    """With the studies of two seed folders: Spearman between the seeds' rankings of the
    methods, as recorded and past the cap (only methods present in both)."""
    from benchmarks.embedded_comparison import seed_agreement

    seeds = sorted(table["seed_dir"].unique())
    if len(seeds) != 2:
        return ""
    wide = {col: table.pivot(index="study", columns="seed_dir", values=col).dropna()
            for col in ("test_map_at_r", "test_map_at_r_past_cap")}
    lines = [f"\nBetween {seeds[0]} and {seeds[1]} ({len(wide['test_map_at_r'])} methods):\n"]
    for col, label in (("test_map_at_r", "as recorded"), ("test_map_at_r_past_cap",
                                                          "past the cap")):
        agree = seed_agreement(wide[col][seeds[0]], wide[col][seeds[1]])
        lines.append(f"- {label}: Spearman {agree['rho']:.3f} (p = {agree['p']:.4f}), "
                     f"{agree['same_order']} of {agree['pairs']} pairs in the same order, "
                     f"mean gap between the seeds {agree['mean_abs_gap']:.4f}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("studies", type=Path, nargs="+")
    p.add_argument("--max-epochs", type=int, required=True,
                   help="the new cap (with --report-only: the one the rows were made with)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/past_the_cap.csv"))
    p.add_argument("--work", type=Path, default=Path("runs/past_the_cap"),
                   help="where the extended folds train (kept: checkpoints, histories)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process: those the studies trained with")
    p.add_argument("--report-only", action="store_true",
                   help="write the per-fold rows and the .md from OUT (the rows of an earlier "
                        "run) and WORK (its folds) only")
    args = p.parse_args(argv)
    if args.report_only:
        write_report(pd.read_csv(args.out), args)
        return 0
    units = [(str(study), rep) for study in args.studies for rep in final_runs(study)]
    from harness.progress import bar

    n = len(units)
    columns = (*zip(*units), [args.max_epochs] * n, [str(args.work)] * n, [args.threads] * n)
    if args.jobs == 1:
        rows = [extend_run(*unit) for unit in bar(list(zip(*columns)), desc="runs", unit="run")]
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            rows = list(bar(pool.map(extend_run, *columns), total=len(units), desc="runs",
                            unit="run"))
    frame = pd.DataFrame(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out, index=False)
    write_report(frame, args)
    return 0


def write_report(frame: pd.DataFrame, args) -> None:
    """OUT's .md, and OUT's per-fold rows (OUT_folds.csv) from the extended folds in WORK."""
    from benchmarks.embedded_comparison import markdown

    folds = fold_rows(args.studies, args.work)
    folds.to_csv(args.out.with_name(args.out.stem + "_folds.csv"), index=False)
    table = summary(frame)
    folders = sorted(frame["seed_dir"].unique())
    text = (f"# Past the cap: the final folds the cap ended, trained on to at most "
            f"{args.max_epochs} epochs\n\n`python benchmarks/past_the_cap.py "
            f"<the {len(table)} study folders of {', '.join(folders)}> --max-epochs "
            f"{args.max_epochs}`\n\n"
            f"Mean concatenated test MAP@R over the runs, as recorded and with the capped "
            f"folds trained past the cap:\n\n" + markdown(table.round(4)) + "\n"
            + seeds_agreement(table) + folds_summary(folds, args.max_epochs))
    args.out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
