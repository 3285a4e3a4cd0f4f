"""What the recheck opt-in (harness/recheck.py) changed: MLRC's tested trial against the
recheck's, per method and seed, and the agreement between seeds under each rule.

    python benchmarks/recheck_effect.py SEED_DIR SEED_DIR [...] [--out FILE]

Each SEED_DIR is one seed of `embedded_comparison.py run`, run under MLRC's rule and then grown
with `--recheck-top K --grow`: the search is the same, and where the recheck chose another trial
MLRC's final results were moved to <study>/superseded/final_trial_NNNN/ (harness/final.py). So
both rules are measured on one search, paired. The script writes (OUT, default
recheck_effect.md beside the first folder):

  * per method and seed: the search's best trial, the candidates' fresh validation means, the
    trial the recheck tests, and concatenated test MAP@R under both rules;
  * per method: the spread of its score between seeds under each rule, and their root mean
    square over the methods (the between-seed noise the recheck is meant to lower);
  * Spearman's rho between each pair of seeds under each rule.

The files are untrusted: a study without a recheck record, a final step that is not the chosen
trial's, or MLRC's results missing is a clear refusal, never a silent mix of the two rules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.embedded_comparison import markdown, method_name, seed_agreement  # noqa: E402


def concatenated_map_at_r(summary: dict, where: Path) -> float:
    try:
        row = next(r for r in summary["summary"]
                   if r["mode"] == "concatenated" and r["metric"] == "map_at_r")
        return float(row["mean"])
    except (KeyError, TypeError, StopIteration, ValueError):
        raise SystemExit(f"{where}: no concatenated MAP@R in it; is it a finished final step's "
                         f"summary.json?") from None


def read(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: missing or unreadable ({e!r})") from None
    if not isinstance(value, dict):
        raise SystemExit(f"{path}: not a JSON object")
    return value


def study_effect(study_dir: Path) -> dict:
    """Both rules' results of one rechecked study folder, or SystemExit naming what is wrong."""
    if not (study_dir / "recheck" / "choice.json").exists():
        raise SystemExit(f"{study_dir}: no recheck/choice.json; run the seed again with "
                         f"`embedded_comparison.py run ... --recheck-top K --grow`")
    choice = read(study_dir / "recheck" / "choice.json")
    summary = read(study_dir / "final" / "summary.json")
    try:
        chosen, search_best = int(choice["chosen_trial"]), int(choice["search_best_trial"])
        candidates = {int(c["trial"]): float(c["recheck_mean"]) for c in choice["candidates"]}
    except (KeyError, TypeError, ValueError):
        raise SystemExit(f"{study_dir / 'recheck' / 'choice.json'}: not a recheck record")
    if summary.get("best_trial") != chosen or summary.get("recheck") != choice:
        raise SystemExit(f"{study_dir / 'final'}: its results are not those of the recheck's "
                         f"choice (trial {chosen}); finish the recheck run first")
    recheck = concatenated_map_at_r(summary, study_dir / "final" / "summary.json")
    if chosen == search_best:
        mlrc = recheck
    else:
        found = sorted((study_dir / "superseded").glob(f"final_trial_{search_best:04d}*"))
        plain = [read(f / "summary.json") for f in found if (f / "summary.json").exists()]
        plain = [p for p in plain if p.get("best_trial") == search_best]
        if not plain:
            raise SystemExit(f"{study_dir}: MLRC's final results for trial {search_best} are "
                             f"not under superseded/ (was the seed run under MLRC's rule "
                             f"first?)")
        mlrc = concatenated_map_at_r(plain[-1], found[-1])
    return {"search_best": search_best, "chosen": chosen, "changed": chosen != search_best,
            "fresh_means": candidates, "mlrc": mlrc, "recheck": recheck}


def seed_effects(seed_dir: Path) -> pd.DataFrame:
    record = read(seed_dir / "comparison.json")
    try:
        seed, studies = record["seed"], [row["study"] for row in record["table"]]
    except (KeyError, TypeError):
        raise SystemExit(f"{seed_dir / 'comparison.json'}: not a comparison record") from None
    rows = [{"seed": seed, "method": method_name(s), **study_effect(seed_dir / s)}
            for s in studies]
    return pd.DataFrame(rows)


def between_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Per method (in every seed): its score's standard deviation between seeds per rule."""
    wide = frame.pivot(index="method", columns="seed", values=["mlrc", "recheck"]).dropna()
    return pd.DataFrame({"mlrc sd": wide["mlrc"].std(axis=1, ddof=1),
                         "recheck sd": wide["recheck"].std(axis=1, ddof=1)})


def spearman_rows(frame: pd.DataFrame) -> list[dict]:
    rows = []
    for a, b in itertools.combinations(sorted(frame["seed"].unique()), 2):
        row = {"seeds": f"{a}-{b}"}
        for rule in ("mlrc", "recheck"):
            wide = frame.pivot(index="method", columns="seed", values=rule)[[a, b]].dropna()
            row[rule] = seed_agreement(wide[a], wide[b])["rho"] if len(wide) >= 3 \
                else float("nan")
        rows.append(row)
    return rows


def report(frame: pd.DataFrame, runs: list[Path]) -> str:
    spread = between_seeds(frame)
    rms = {rule: float(np.sqrt((spread[f"{rule} sd"] ** 2).mean())) for rule in
           ("mlrc", "recheck")}
    table = frame.assign(
        fresh=[", ".join(f"{t}: {v:.4f}" for t, v in r.items()) for r in frame["fresh_means"]],
        delta=frame["recheck"] - frame["mlrc"]).drop(columns="fresh_means")
    changed = int(frame["changed"].sum())
    lines = [
        "# What the recheck changed (final.recheck_top, not MLRC)", "",
        f"Seeds: {', '.join(str(r) for r in runs)}; {frame['method'].nunique()} methods. Each "
        "seed's search was run once; MLRC's rule tested its best trial, the recheck retrained "
        "its best trials and tested the best of their fresh runs on validation.", "",
        f"The recheck chose another trial in {changed} of {len(frame)} searches; the change "
        f"in concatenated test MAP@R (recheck - MLRC) averaged "
        f"{table['delta'].mean():+.4f} (mean |change| {table['delta'].abs().mean():.4f}).", "",
        markdown(table.sort_values(["method", "seed"])), "",
        "Between seeds, each method's standard deviation under each rule:", "",
        markdown(spread, index=True), "",
        f"Root mean square over the methods: MLRC's rule {rms['mlrc']:.4f}, recheck "
        f"{rms['recheck']:.4f}.", "",
        "Spearman's rho between seeds under each rule:", "",
        markdown(pd.DataFrame(spearman_rows(frame))), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--out", default="", help="default: recheck_effect.md beside the first run")
    args = p.parse_args(argv)
    frame = pd.concat([seed_effects(run) for run in args.runs], ignore_index=True)
    if frame.duplicated(["seed", "method"]).any():
        raise SystemExit("a seed is given twice: give each seed's folder once")
    text = report(frame, args.runs)
    out = Path(args.out) if args.out else args.runs[0].parent / "recheck_effect.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
