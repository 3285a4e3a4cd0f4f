"""Do two runs of the same comparison agree trial by trial (e.g. one on a GPU, one on the CPU)?

    python benchmarks/trial_agreement.py RUN_A RUN_B

RUN_A and RUN_B are embedded_comparison folders (one study folder per method, each with its
Optuna `study.db`). For every complete trial of RUN_A whose study has a trial of the same number
in RUN_B, complete too: did both draw the same parameters, and among those, how far apart are
their objectives (mean validation MAP@R over the folds)? Trials that diverged (scored 0) on
either side are listed, not averaged.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import optuna


def study_trials(study_dir: Path) -> dict[int, optuna.trial.FrozenTrial]:
    """Every trial of the one study in STUDY_DIR/study.db, by number, in any state."""
    db = study_dir / "study.db"
    if not db.is_file():
        raise SystemExit(f"{db}: no study database in {study_dir}")
    storage = optuna.storages.RDBStorage(f"sqlite:///{db}")
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if len(names) != 1:
        raise SystemExit(f"{db}: expected one study, found {names}")
    return {t.number: t for t in optuna.load_study(study_name=names[0], storage=storage).trials}


def complete_trials(study_dir: Path) -> dict[int, optuna.trial.FrozenTrial]:
    return {n: t for n, t in study_trials(study_dir).items()
            if t.state == optuna.trial.TrialState.COMPLETE}


def compare(run_a: Path, run_b: Path) -> dict:
    same, other_params, diverged = [], 0, []
    for db in sorted(run_a.glob("*/study.db")):
        if not (run_b / db.parent.name / "study.db").is_file():
            continue
        a, b = complete_trials(db.parent), complete_trials(run_b / db.parent.name)
        for number in sorted(set(a) & set(b)):
            ta, tb = a[number], b[number]
            if ta.params != tb.params:
                other_params += 1
            elif ta.user_attrs.get("diverged") or tb.user_attrs.get("diverged"):
                diverged.append((db.parent.name, number, bool(ta.user_attrs.get("diverged")),
                                 bool(tb.user_attrs.get("diverged"))))
            else:
                same.append(abs(ta.value - tb.value))
    return {"same_params": same, "other_params": other_params, "diverged": diverged}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    result = compare(args.run_a, args.run_b)
    gaps = sorted(result["same_params"])
    compared = len(gaps) + len(result["diverged"]) + result["other_params"]
    print(f"trials complete in both: {compared}; other parameters: {result['other_params']}; "
          f"same parameters: {len(gaps) + len(result['diverged'])}")
    if gaps:
        print(f"same parameters, neither diverged: {len(gaps)}; |objective difference| median "
              f"{statistics.median(gaps):.4f}, 90th percentile "
              f"{gaps[int(0.9 * (len(gaps) - 1))]:.4f}, largest {gaps[-1]:.4f}")
    for study, number, in_a, in_b in result["diverged"]:
        print(f"diverged: {study} trial {number} (in {args.run_a.name}: {in_a}, "
              f"in {args.run_b.name}: {in_b})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
