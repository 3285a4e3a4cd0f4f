"""Run one study end to end: split, search, retrain, test, summarise.

    python -m harness.run --study quickstart
    python -m harness.run --study proxy_synthesis_cars --data-root /data/cars196
    python -m harness.run --study proxy_anchor_cub --profile embedded   # on the glyphs
    python -m harness.run --loss mypkg.losses:FancyLoss --loss-space fancy.toml --study cub
    python -m harness.run --list

A study is a cell of the benchmark matrix, <loss>_<data set>[_paper] (docs/benchmark.md), or a
study file (studies/NAME.toml or a path).

Re-running the same command resumes: finished trials and finished final folds are kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from harness import config as config_mod
from harness.config import RUNS_DIR, StudyConfig, load_study, recheck_budget
from harness.errors import ConfigError, HarnessError, WeightsError
from harness.provenance import provenance
from harness.run_folder import (RESUMABLE_KEYS, check_output_dir, write_json_atomic,  # noqa: F401 (re-exported)
                                check_same_data, check_same_study, check_same_trunk,
                                check_study_database, read_invocations, read_json,
                                write_bytes_atomic)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", help="a cell of the benchmark matrix (<loss>_<data set>[_paper], "
                                   "e.g. proxy_anchor_cub), a study file (studies/NAME.toml or a "
                                   "path); with --loss: a data set (cub, cars, sop, inshop)")
    p.add_argument("--list", action="store_true", help="list the benchmark matrix and the study "
                                                       "files, and exit")
    p.add_argument("--loss", metavar="MODULE:CLASS",
                   help="benchmark a loss class from your own code (a torch.nn.Module called as "
                        "loss(embeddings, labels)); give it on every invocation of the run")
    p.add_argument("--loss-space", metavar="FILE",
                   help="with --loss: TOML file with its [space] (e.g. \"loss.margin\" = "
                        "{low = 0, high = 1}), [defaults] and name (docs/benchmark.md)")
    p.add_argument("--profile", help="apply studies/profiles/NAME.toml over the study "
                                     "(e.g. 'embedded': the study on the glyph data, small budget)")
    p.add_argument("--data-root", help="folder holding the data set (see README: layouts)")
    p.add_argument("--output", help="run folder (default runs/STUDY, or "
                                    "runs/PROFILE/STUDY with --profile)")
    p.add_argument("--storage", help="Optuna storage URL (default sqlite:///OUTPUT/study.db); "
                                     "any SQLAlchemy URL, e.g. postgresql://user@host/db")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (default: the study's)")
    p.add_argument("--trials", type=int, help="search trials (MLRC: 50)")
    p.add_argument("--reproductions", type=int, help="final retrainings (MLRC: 10)")
    p.add_argument("--stage", choices=("all", "search", "final"), default="all",
                   help="search only (e.g. extra workers), final only, or both (default)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, type-checked (repeatable), e.g. "
                        "--set train.lr=1e-5 --set loss.margin=0.2")
    return p.parse_args(argv)


def resolve_config(args: argparse.Namespace) -> StudyConfig:
    study = _study_with_own_loss(args) if args.loss or args.loss_space else args.study
    overrides = list(args.overrides)
    flag_keys = {"trials": "search.trials", "reproductions": "final.reproductions",
                 "device": "train.device", "data_root": "data.root"}
    for attr, key in flag_keys.items():
        value = getattr(args, attr)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    return load_study(study, profile=args.profile, overrides=overrides)


def _study_with_own_loss(args: argparse.Namespace) -> str:
    """Register --loss; `--study cub` then means the cell of that loss on CUB (MLRC recipe)."""
    from harness.benchmark import Cell, cell_name, dataset_by_name
    from harness.own_loss import register_own_loss

    if not args.loss:
        raise ConfigError("--loss-space needs --loss MODULE:CLASS")
    name = register_own_loss(args.loss, args.loss_space)
    dataset = dataset_by_name(args.study or "")
    return cell_name(Cell(name, dataset)) if dataset else args.study


def output_dir(args: argparse.Namespace, cfg: StudyConfig) -> Path:
    if args.output:
        return Path(args.output)
    if args.profile:
        return RUNS_DIR / Path(args.profile).stem / cfg.name
    return RUNS_DIR / cfg.name


def note_earlier_default(args: argparse.Namespace, output: Path) -> str:
    """A note when a new default run folder starts while results/ holds a run of the same
    name: the committed reference run, or a run made when results/ was the default. The new run
    does not resume it (and never writes into results/ unasked); the note says how to."""
    if args.output or (output / "config.json").exists():
        return ""
    earlier = RUNS_DIR.parent / "results" / output.relative_to(RUNS_DIR)
    if not (earlier / "config.json").is_file():
        return ""
    return (f"note: {earlier} holds an earlier run of this study (a committed reference run, or "
            f"one from when run folders defaulted to results/). This run starts afresh in "
            f"{output}; to resume that one instead, pass --output {earlier}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            return list_studies()
        if not args.study:
            raise ConfigError("--study NAME is required (python -m harness.run --list shows them)")
        return run(args)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished trials and folds are saved; re-run the same command to "
              "resume", file=sys.stderr)
        return 130


def list_studies() -> int:
    """The benchmark matrix, one line per cell (name, description), then the study files."""
    from harness.benchmark import cell_description, cell_name, cells, loss_row

    print("# benchmark matrix: <loss>_<data set>[_<recipe>] (docs/benchmark.md); registry "
          "spellings work too (proxy_synthesis_proxy_anchor_cars196); any cell runs on the "
          "glyphs with --profile embedded")
    previous = None
    for cell in cells():
        if cell.loss != previous:
            print(f"\n## {cell.loss}" + (f" (alias {loss_row(cell.loss).alias})"
                                         if loss_row(cell.loss).alias != cell.loss else ""))
            previous = cell.loss
        print(f"{cell_name(cell):40s} {cell_description(cell)}")
    print("\n# study files (studies/NAME.toml)")
    for name in config_mod.study_files():
        table = config_mod.read_toml(config_mod.study_path(name))
        print(f"{name:40s} {table.get('description', '')}")
    return 0


def run(args: argparse.Namespace) -> int:
    # Imported here so that `--list` and config errors answer without loading torch models.
    from harness.data import resolve_device
    from harness.preflight import preflight
    from harness.aggregate import summarize
    from harness.final import final_stage_lock, retrain_and_test, untrained_baseline
    from harness.recheck import choose_trial
    from harness.storage import default_storage, sqlite_path
    from harness.search import (check_trial_inputs, config_for_params, run_search,
                                write_search_summary)
    from harness.splits import manifest_text

    cfg = resolve_config(args)
    output = output_dir(args, cfg)
    note = note_earlier_default(args, output)
    if note:
        print(note, flush=True)
    check_output_dir(output)
    check_same_study(output, cfg)
    output.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.train.device)
    storage = args.storage or default_storage(output)
    check_study_database(sqlite_path(storage), output)
    trunk_weights = _trunk_weights(cfg)  # may build the glyph trunk: not under the lock
    started = time.time()
    data, manifest = checked_inputs(cfg, output, trunk_weights)
    preflight(cfg, data, device)  # weight file, loss, sampler: fail now, not inside trial 0
    with output_lock(output):  # several workers may share one output folder
        # again under the lock: workers starting together on a new folder all passed the
        # checks before the first of them wrote what the others must match
        check_same_trunk(output, trunk_weights)
        check_same_data(output, manifest, data.records)
        write_json_atomic(output / "config.json", cfg.to_dict())
        _log_invocation(output, device, storage, trunk_weights)
        write_bytes_atomic(output / "split_manifest.json", manifest_text(manifest).encode())
    print(f"[{cfg.name}] {cfg.data.dataset}: {len(data.records)} images; output {output}")

    # what every trial records it trained on (machines sharing only the database compare it)
    inputs = {"data_fingerprint": manifest["data_fingerprint"],
              "trunk_tensors_sha256": (trunk_weights or {}).get("tensors_sha256")}
    if args.stage in ("all", "search"):
        study = run_search(cfg, data, output, storage, device, inputs)
    if args.stage == "search":
        print(f"[{cfg.name}] search stage done in {time.time() - started:.0f} s")
        return 0
    from harness.search import open_study

    study = open_study(cfg, storage)
    check_search_finished(study, cfg, output)
    check_trial_inputs(study, inputs)  # the final stage retrains or tests the best trial
    summary = write_search_summary(study, output / "search_summary.json")
    print(f"[{cfg.name}] best trial {summary['best_trial']}: validation MAP@R "
          f"{summary['best_value']:.4f} params {summary['best_params']}")
    if summary["diverged_trials"]:
        print(f"[{cfg.name}] trials whose loss diverged (scored 0, as in MLRC): "
              f"{summary['diverged_trials']}")
    with final_stage_lock(output):  # one process at a time rechecks and tests
        best, recheck = choose_trial(cfg, data, output, device, study)
        best_cfg = config_for_params(cfg, best.params)
        best_info = {"trial": best.number, "seed_number": best.user_attrs.get("seed_number",
                                                                              best.number),
                     "params": best.params, "value": best.value}
        frame = retrain_and_test(best_cfg, data, output, device, best_info,
                                 cfg.final.reproductions)
    untrained = untrained_baseline(best_cfg, data, output, device)
    table = summarize(frame)
    table.to_csv(output / "final" / "summary.csv", index=False)
    write_json_atomic(output / "final" / "summary.json", {
        # the tested trial: the search's best, or under final.recheck_top the recheck's choice
        "study": cfg.name, "dataset": cfg.data.dataset, "best_trial": best.number,
        "best_val_map_at_r": best.value, "best_params": best.params,
        "search_best_trial": summary["best_trial"], "recheck": recheck,
        "runs": sorted(int(r) for r in frame["reproduction"].unique()),
        # the budget this final step finished: a folder grown to a larger one says which it holds
        "budget": {"trials": cfg.search.trials, "reproductions": cfg.final.reproductions,
                   **recheck_budget(cfg.final.recheck_top, cfg.final.recheck_runs)},
        "diverged_trials": summary["diverged_trials"],
        "untrained": untrained, "summary": table.to_dict(orient="records"),
        "wall_time_s_this_invocation": time.time() - started})
    _print_summary(cfg, table, untrained)
    return 0


def check_search_finished(study, cfg: StudyConfig, output: Path) -> None:
    """The final stage tests the best of a finished search, never of a partial one."""
    from optuna.trial import TrialState

    from harness.storage import counted_trials

    counted = counted_trials(study)
    if counted == 0:
        raise ConfigError(f"no search has run for study {cfg.name!r} in {output} yet: run "
                          f"--stage search (or --stage all) first")
    if counted < cfg.search.trials:
        running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        raise ConfigError(f"the search of {cfg.name!r} is not finished: {counted} of "
                          f"{cfg.search.trials} trials done, {running} running. Finish it "
                          f"(--stage search or all), or test the best so far with --trials "
                          f"{counted}")


def output_lock(output: Path):
    """Exclusive lock on OUTPUT/.lock: workers sharing a run folder write its JSON files in turn
    (they share one temporary file name and read-modify-write provenance.json)."""
    from harness.storage import file_lock

    return file_lock(output / ".lock")


def _log_invocation(output: Path, device, storage: str, trunk_weights: dict | None) -> None:
    runs = read_invocations(output)
    record = provenance(device, storage=storage, trunk_weights=trunk_weights)
    note = mixed_versions_note(output, runs, record["versions"])
    if note:
        print(note, flush=True)
    runs.append(record)
    write_json_atomic(output / "provenance.json", runs)


def mixed_versions_note(output: Path, earlier: list, versions: dict) -> str:
    """A warning when this invocation's torch or pml differs from the folder's earlier ones:
    its trials and runs may then differ numerically from theirs (docs/embedded.md, "SoftTriple
    and the clamp's subgradient"). Not a refusal: upgrading is legitimate, mixing silently is
    not."""
    from harness.provenance import numeric_versions, recorded_numeric_versions

    before = recorded_numeric_versions(earlier)
    now = numeric_versions(versions)
    if not before or before == [now]:
        return ""
    return (f"note: {output} was run before with {' and with '.join(before)}; this invocation "
            f"runs {now}. Its new trials and runs may differ numerically from the earlier ones "
            f"(torch 2.14 changed torch.clamp's gradient at its bound: docs/embedded.md). For one "
            f"table, finish a study with one version, or start it again in a new --output.")


def checked_inputs(cfg: StudyConfig, output: Path, trunk_weights: dict | None):
    """(data, split manifest) of the study, after refusing an output folder that ran from other
    trunk weights (`_trunk_weights`' record) or on other data (`check_same_trunk`,
    `check_same_data`). The trunk comes first: it is cheap to check, and the data may take
    minutes to prepare."""
    from harness.data import prepare_data
    from harness.splits import split_manifest

    check_same_trunk(output, trunk_weights)
    data = prepare_data(cfg)
    manifest = split_manifest(data.records, data.split)
    check_same_data(output, manifest, data.records)
    return data, manifest


def _trunk_weights(cfg: StudyConfig) -> dict | None:
    """Which pretrained weight file the run starts from, and its hash (None: random init, or
    no file yet: preflight then says what is missing). The glyph trunk is built here on first
    use."""
    from harness.models import find_weights_file
    from harness.provenance import file_sha256, tensors_sha256

    if not cfg.model.pretrained:
        return None
    try:
        weights = find_weights_file(cfg.model.trunk, cfg.model.weights)
    except HarnessError:
        return None
    try:
        return {"file": str(weights), "sha256": file_sha256(weights),
                "tensors_sha256": tensors_sha256(weights)}  # WeightsError: not a weight file
    except OSError as e:
        raise WeightsError(f"{weights}: cannot be read ({e})") from None


def _print_summary(cfg: StudyConfig, table, untrained: dict) -> None:
    print(f"\n[{cfg.name}] test results (mean ± std over reproductions)")
    for mode in ("separated", "concatenated"):
        rows = table[table["mode"] == mode].set_index("metric")
        if rows.empty:
            continue
        parts = [f"{m}={rows.loc[m, 'mean']:.4f}±{rows.loc[m, 'std']:.4f}"
                 for m in ("precision_at_1", "r_precision", "map_at_r") if m in rows.index]
        print(f"  {mode:13s} " + "  ".join(parts))
    print("  untrained     " + "  ".join(f"{m}={untrained[m]:.4f}" for m in
                                         ("precision_at_1", "r_precision", "map_at_r")))


if __name__ == "__main__":
    sys.exit(main())
