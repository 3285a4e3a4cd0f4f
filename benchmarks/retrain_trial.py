"""Train one search trial's folds again, e.g. on another device or at another precision, and
set the new result beside the one the study recorded.

    python benchmarks/retrain_trial.py STUDY_DIR TRIAL FOLD [FOLD ...] \
        [--device cuda] [--set train.tf32=true] [--set train.center_collapse_gradient=mlrc] \
        [--max-epochs N] [--out DIR] [--json FILE]

STUDY_DIR is a finished or running study folder (config.json, study.db, split_manifest.json).
The fold is trained with the study's recorded config, the trial's parameters and the trial's
fold seed, the way the search trained it; `--set` changes settings that do not change what is
trained (the device, `train.tf32`, `train.eval_batch_size`, and the gradient convention at
collapsed SoftTriple centers), so a difference in the result is the device's or the
arithmetic's. The data must split exactly as the study's manifest says.
`--max-epochs N` (at least the study's cap) trains past the cap: the recorded validations must
come back first (`same_curve` then compares them with the new curve's start), and what follows
is what the cap cut off.
Used to test whether TF32 made SoftTriple trials diverge on a GPU (it did not:
docs/embedded.md). On the CPU, with the study's torch version and thread count (one per process
in embedded_comparison: OMP_NUM_THREADS=1), it reproduces the recorded validation curve to the
last bit (`same_curve`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# What --set may change: how the fold computes, not what it trains (the gradient at collapsed
# SoftTriple centers is a convention of the autograd, like TF32 one of the arithmetic).
COMPUTE_KEYS = ("train.device", "train.tf32", "train.eval_batch_size",
                "train.center_collapse_gradient")


def recorded_config(study_dir: Path, overrides: list[str]):
    """The study's config as its config.json records it, plus `overrides` (COMPUTE_KEYS only).
    A config.json from before `train.tf32` existed gets the harness default (float32) and says
    so: pass --set train.tf32=... to choose."""
    from harness.config import StudyConfig, apply_table, parse_cli_value, set_value, validate
    from harness.errors import HarnessError
    from harness.run_folder import read_json

    path = study_dir / "config.json"
    table = read_json(path)
    if not isinstance(table, dict):
        raise SystemExit(f"{path}: missing, unreadable or not a study config (a JSON object)")
    try:
        cfg = StudyConfig()
        apply_table(cfg, table, str(path))
    except HarnessError as e:
        raise SystemExit(f"{path}: not a config this harness can run ({e})") from None
    chosen = any(o.startswith("train.center_collapse_gradient=") for o in overrides)
    if "center_collapse_gradient" not in (table.get("train") or {}) and not chosen:
        set_value(cfg, "train.center_collapse_gradient", older_collapse_gradient(study_dir, cfg))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or key not in COMPUTE_KEYS:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(COMPUTE_KEYS)} (settings that change how a fold "
                             f"computes, not what it trains)")
        set_value(cfg, key, parse_cli_value(value))
    validate(cfg)
    return cfg, "tf32" not in table.get("train", {})


def older_collapse_gradient(study_dir: Path, cfg) -> str:
    """The gradient at collapsed SoftTriple centers that a study written before
    `train.center_collapse_gradient` existed trained with (harness.provenance
    older_center_collapse_gradient), or a refusal when that is unknown and the loss has the
    regulariser. A loss without it computes the same either way."""
    from harness.provenance import older_center_collapse_gradient
    from harness.run_folder import read_json
    from losses.registry import build_loss
    from losses.sparse_centers_regularizer import set_collapse_gradient

    mode = older_center_collapse_gradient(read_json(study_dir / "provenance.json"))
    if mode is not None:
        return mode
    probe = build_loss(cfg.loss.name, num_classes=4, embedding_size=8,
                       dataset=cfg.data.dataset, **cfg.loss.params)
    if set_collapse_gradient(probe, cfg.train.center_collapse_gradient):
        raise SystemExit(f"{study_dir}/config.json predates train.center_collapse_gradient and "
                         f"its provenance.json does not show torch >= 2.14.1 for every run: what "
                         f"its SoftTriple regulariser computed at collapsed centers is unknown; "
                         f"pass --set train.center_collapse_gradient=mlrc|zero to choose")
    return cfg.train.center_collapse_gradient


def trial_record(study_dir: Path, number: int):
    """The trial of that number in the study's study.db (any state: a diverged trial is
    complete with value 0)."""
    import optuna

    from benchmarks.trial_agreement import study_trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = study_trials(study_dir)
    if number not in trials:
        raise SystemExit(f"{study_dir / 'study.db'}: no trial {number} (trials 0-"
                         f"{len(trials) - 1})")
    return trials[number]


def check_same_split(study_dir: Path, data) -> None:
    """Refuse unless the data splits exactly as the study's split_manifest.json records (and,
    where it records one, has the same fingerprint: harness.splits.manifest_differences)."""
    from harness.splits import manifest_differences, split_manifest

    recorded = study_dir / "split_manifest.json"
    try:
        then = json.loads(recorded.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{recorded}: cannot read the study's split ({e})") from None
    found = manifest_differences(then, split_manifest(data.records, data.split))
    if found:
        raise SystemExit(f"{recorded}: the data here splits differently from the study's "
                         f"(another data set version or root: {'; '.join(found)}); the folds "
                         f"would not be the same")


def same_trunk_as_recorded(study_dir: Path, cfg) -> bool | None:
    """Whether the trunk weights found now are the ones the study's provenance.json records
    (harness.run_folder.check_same_trunk); None when it records none (random init, or a folder
    from before trunks were recorded). Not a refusal: retraining from other weights is a
    legitimate question, but its rows must say so, or a trunk difference would read as a
    device's or a library's; a note is printed."""
    from harness.errors import ConfigError
    from harness.run import _trunk_weights
    from harness.run_folder import check_same_trunk, read_json

    now = _trunk_weights(cfg)
    runs = read_json(study_dir / "provenance.json")
    if now is None or not isinstance(runs, list) or not any(
            isinstance(r, dict) and isinstance(r.get("trunk_weights"), dict) for r in runs):
        return None
    try:
        check_same_trunk(study_dir, now)
    except ConfigError as e:
        print(f"note: {e}", flush=True)
        return False
    return True


def record(path: Path, *keys: str) -> dict:
    """A JSON object from a run folder holding `keys`, or a clear refusal (files in a run
    folder are untrusted)."""
    from harness.run_folder import read_json

    obj = read_json(path)
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        raise SystemExit(f"{path}: missing, unreadable or without {', '.join(keys)}")
    return obj


def read_history(path: Path) -> list[dict] | None:
    """A fold's validation history (history.json: a non-empty list of rows with epoch and
    map_at_r), or None when there is none or the file is not one."""
    from harness.run_folder import read_json

    rows = read_json(path)
    if isinstance(rows, list) and rows and all(
            isinstance(r, dict) and {"epoch", "map_at_r"} <= set(r) for r in rows):
        return rows
    return None


def same_curve(recorded_history: Path, history: list[dict], extended: bool = False
               ) -> bool | None:
    """Whether the new validation curve equals the recorded one (None: none recorded); with
    `extended` (trained past the recorded cap), whether it starts with it. On the CPU with the
    study's thread count (one per process in embedded_comparison) it does."""
    then = read_history(recorded_history)
    if then is None:
        return None  # nothing recorded to compare with (or not a history)
    key = ("epoch", "map_at_r")
    new = [[row[k] for k in key] for row in history]
    return [[row[k] for k in key] for row in then] == (new[:len(then)] if extended else new)


def refuse_unfinished(run_dir: Path) -> None:
    """train_fold resumes a fold folder's last.pt: one left by an earlier, interrupted
    invocation (perhaps with another device, precision or cap) would mix two trainings in one
    row. Refused; a finished folder (no last.pt) is trained again from the start."""
    if (run_dir / "last.pt").exists():
        raise SystemExit(f"{run_dir}: holds an interrupted earlier training (last.pt); delete "
                         f"the folder or give another output folder")


def retrain(study_dir: Path, number: int, folds: list[int], overrides: list[str],
            out: Path, max_epochs: int | None = None) -> list[dict]:
    import torch

    from harness.data import prepare_data, resolve_device
    from harness.search import config_for_params, fold_seed
    from harness.train import train_fold

    cfg, tf32_defaulted = recorded_config(study_dir, overrides)
    if tf32_defaulted and not any(o.startswith("train.tf32=") for o in overrides):
        print(f"note: {study_dir}/config.json predates train.tf32; training with "
              f"tf32={cfg.train.tf32}", flush=True)
    recorded_cap = cfg.train.max_epochs
    if max_epochs is not None:
        if max_epochs < recorded_cap:
            raise SystemExit(f"--max-epochs {max_epochs}: below the study's cap "
                             f"({recorded_cap}); only training past it is comparable")
        cfg.train.max_epochs = max_epochs
    trial = trial_record(study_dir, number)
    if not trial.params:
        raise SystemExit(f"trial {number} of {study_dir} has no parameters (state "
                         f"{trial.state.name})")
    trial_cfg = config_for_params(cfg, trial.params)
    seed_number = trial.user_attrs.get("seed_number", number)
    recorded = trial.user_attrs.get("fold_results")
    recorded = recorded if isinstance(recorded, dict) else {}
    data = prepare_data(cfg)
    check_same_split(study_dir, data)
    trunk_as_recorded = same_trunk_as_recorded(study_dir, cfg)
    device = resolve_device(cfg.train.device)
    by_index = {f.index: f for f in data.split.folds}
    rows = []
    for index in folds:
        if index not in by_index:
            raise SystemExit(f"fold {index}: the study has folds {sorted(by_index)}")
        seed = fold_seed(cfg, seed_number, index)
        began = time.perf_counter()
        run_dir = out / f"trial_{seed_number:04d}" / f"fold_{index}"
        refuse_unfinished(run_dir)
        result = train_fold(trial_cfg, data, by_index[index], device, seed=seed,
                            run_dir=run_dir, desc=f"trial {number} fold {index}")
        if device.type == "cuda":
            torch.cuda.synchronize()
        then = recorded.get(str(index))
        then = then if isinstance(then, dict) else {}
        history = study_dir / "trials" / f"trial_{seed_number:04d}" / f"fold_{index}" / \
            "history.json"
        rows.append({
            "study": cfg.name, "trial": number, "fold": index, "device": str(device),
            "tf32": cfg.train.tf32,
            "center_collapse_gradient": cfg.train.center_collapse_gradient,
            "stop": result.stop_reason,
            "map_at_r": round(result.best_map_at_r, 4), "best_epoch": result.best_epoch,
            "epochs": result.epochs_trained,
            "recorded_stop": then.get("stop"),
            "recorded_map_at_r": round(then["map_at_r"], 4) if isinstance(
                then.get("map_at_r"), (int, float)) else None,
            "recorded_epochs": then.get("epochs"),
            # True: every validation of the recorded curve reproduced to the last bit.
            "same_curve": same_curve(history, result.history,
                                     extended=cfg.train.max_epochs > recorded_cap),
            "same_trunk": trunk_as_recorded,
            "max_epochs": cfg.train.max_epochs, "recorded_max_epochs": recorded_cap,
            "torch_threads": torch.get_num_threads(),
            "seconds": round(time.perf_counter() - began, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def trial_parser(doc: str, many_folds: bool = True) -> argparse.ArgumentParser:
    """STUDY_DIR TRIAL FOLD(S) [--device] [--set]: the arguments of this script and of the
    diagnoses that train a trial's fold the same way (find_divergence, softtriple_center_grads);
    `overrides(args)` turns them into retrain's overrides."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study_dir", type=Path)
    p.add_argument("trial", type=int)
    if many_folds:
        p.add_argument("folds", type=int, nargs="+")
    else:
        p.add_argument("fold", type=int)
    p.add_argument("--device", help="shorthand for --set train.device=DEVICE")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help=f"one of {', '.join(COMPUTE_KEYS)}")
    return p


def overrides(args: argparse.Namespace) -> list[str]:
    return args.overrides + ([f"train.device={args.device}"] if args.device else [])


def main(argv: list[str] | None = None) -> int:
    p = trial_parser(__doc__)
    p.add_argument("--max-epochs", type=int, help="train past the study's cap (at least it)")
    p.add_argument("--out", type=Path, help="where the fold folders go (default: a temporary "
                   "folder, removed afterwards)")
    p.add_argument("--json", type=Path, help="also write the rows to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        rows = retrain(args.study_dir, args.trial, args.folds, overrides(args),
                       args.out or Path(tmp), args.max_epochs)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
