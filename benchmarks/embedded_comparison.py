"""The embedded comparison: every method, the full protocol, on the glyphs; and its seed check.

    python benchmarks/embedded_comparison.py run --seed 0 [--methods a,b,...] [--jobs 2] [--out DIR]
    python benchmarks/embedded_comparison.py run --seed 0 --trials 20 --grow --out DIR
    python benchmarks/embedded_comparison.py spearman results/embedded/seed_0 \
        results/embedded/seed_1 [--differ-in model.cache_frozen_features] [--out FILE]

`run` renders the glyphs and builds the pretrained glyph trunk once, then runs each method's
cell `<alias>_glyphs --profile embedded` (studies/profiles/embedded.toml: Sobol+GP search with
--trials, best trial + --reproductions retrainings) into OUT/<study>, `--jobs` studies side by
side, each with one torch thread (measured faster on 2 cores than one study with 2 threads:
benchmarks/bench_embedded_parallel.py). Then the report (OUT/report) and OUT/comparison.md/.json:
wall time, share of final folds ended by early stopping, trained vs untrained test MAP@R.

Running `run` again into the same folder with other `--methods` adds them: comparison.json keeps
each invocation as a batch, and the table and the report cover every study of the folder that
succeeded. The studies of one folder must share the seed, trials and reproductions, and every
setting but the method (config.json) and the trunk (its tensors' hash in provenance.json, or
the file's hash for folders written before that was recorded): a new batch that would differ (a
changed profile, a trunk with other weights) is refused before any training.

`run --grow` with a larger --trials or --reproductions takes a finished folder to that budget:
each study resumes (MLRC's search goes on from the trials it has, and the final step is redone
where the best trial changed; harness.run keeps the old final/ under final/superseded/). Each
batch records the budget it ran at; the table and report cover the studies run at the folder's
newest budget only, so a folder grown for some methods never ranks them against the others'
smaller searches. A grown folder holds the same trials and final results as one run at the
larger budget from the start (the resumed search replays the GP's warm start from the study's
storage: harness/gp_warm_start.py; folders grown before commit a232fa9 do not, and differ from
the first trial the grown run proposed on); only its wall time is larger, since the finals
of changed winners ran twice.

`run --recheck-top K [--recheck-runs R]` takes the not-MLRC opt-in `final.recheck_top`
(harness/recheck.py: the search's K best trials retrained R more times, the best of those fresh
runs tested). It is part of the folder's budget: a folder run under MLRC's rule takes it only
with --grow (the searches are kept; a study whose tested trial changes moves MLRC's final
results to superseded/, so benchmarks/recheck_effect.py can compare both rules on one search),
and never drops it again.

`spearman` ranks the methods of two runs by concatenated test MAP@R and writes the Spearman rank
correlation with both tables (by default seeds.md in the first run's parent folder); the two
folders' studies must differ in the seed only (same settings and trunk), or it refuses.
`--differ-in KEY` (repeatable) lets them differ in that setting too, and says so in the output:
e.g. the same seed run with and without model.cache_frozen_features measures how far the
ranking moves with the last bits of the arithmetic alone.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from harness.config import recheck_budget  # noqa: E402
from harness.progress import bar  # noqa: E402
from harness.provenance import same_trunk  # noqa: E402
from harness.run_folder import MISSING, config_differences, describe, flat_config  # noqa: E402


def all_methods() -> list[str]:
    from harness.benchmark import loss_names, loss_row

    return [loss_row(name).alias for name in loss_names()]


def prepare_once() -> dict:
    """Render the glyphs and build the trunk before parallel studies would each wait on it;
    the trunk file's hashes, as provenance.json records them (what every study of this
    invocation starts from)."""
    from harness.config import load_study
    from harness.data import prepare_data
    from harness.models import find_weights_file
    from harness.provenance import file_sha256, tensors_sha256

    prepare_data(load_study("quickstart"))
    path = find_weights_file("small_cnn")
    return {"sha256": file_sha256(path), "tensors_sha256": tensors_sha256(path)}


def study_argv(study: str, args, out: Path) -> list[str]:
    """harness.run's arguments for one method's study: what runs it and what predicts its
    config (one list, so the two cannot drift apart)."""
    return ["--study", study, "--profile", "embedded", "--set", f"seed={args.seed}",
            "--trials", str(args.trials), "--reproductions", str(args.reproductions),
            "--output", str(out / study), "--device", args.device, *recheck_argv(args)]


def recheck_argv(args) -> list[str]:
    """The recheck opt-in (harness/recheck.py, not MLRC) as harness.run's --set arguments;
    none under MLRC's rule, so the argv of folders run before the option existed is unchanged."""
    if not getattr(args, "recheck_top", 0):
        return []
    return ["--set", f"final.recheck_top={args.recheck_top}",
            "--set", f"final.recheck_runs={args.recheck_runs}"]


# What may differ between the studies of one comparison: the method, and the names it gives.
PER_METHOD_KEYS = ("name", "description", "loss")


def protocol(config: dict, trunk: dict | None, also_ignore: tuple = (),
             libraries: str | None = None, data: str | None = None) -> dict:
    """A study's config without its method, plus the trunk it started from (provenance.json's
    trunk_weights: the file's hash and, since it was recorded, its tensors' hash) and the torch
    and pml versions it ran with (`harness.provenance.numeric_versions`; a SoftTriple run
    differs between torch 2.11 and 2.14): what every study in one table (or, less the seed, in
    both seeds) must share; and the data's fingerprint (`Records.fingerprint`, None where not
    recorded)."""
    ignore = PER_METHOD_KEYS + also_ignore  # sections ("seed", "loss") or dotted settings
    flat = {**SETTINGS_BEFORE_THEY_EXISTED, **flat_config(config)}
    kept = {k: v for k, v in flat.items() if k.split(".")[0] not in ignore and k not in ignore}
    trunk = trunk if isinstance(trunk, dict) else {}
    return {**kept, "trunk sha256": trunk.get("sha256"),
            "trunk tensors sha256": trunk.get("tensors_sha256"), "libraries": libraries,
            "data fingerprint": data}


# Settings a config.json written before they existed ran with: the recheck opt-in (harness/
# recheck.py) did not exist, so such a study tested the search's best trial (MLRC's rule).
SETTINGS_BEFORE_THEY_EXISTED = {"final.recheck_top": 0, "final.recheck_runs": 2}


def recorded_protocol(run_dir: Path, also_ignore: tuple = ()) -> dict:
    """The protocol a finished study folder records: config.json, the trunk hashes of its
    last invocation's provenance.json (None where it predates recording them), the torch/pml
    versions of all its invocations (more than one: joined with ' + ', which matches no single
    version) and the data's fingerprint in split_manifest.json (None where it predates it).
    The files are untrusted: unreadable ones are a clear refusal."""
    from harness.provenance import recorded_numeric_versions
    from harness.splits import recorded_data_fingerprint

    try:
        config = json.loads((run_dir / "config.json").read_text())
        invocations = json.loads((run_dir / "provenance.json").read_text())
        trunk = invocations[-1].get("trunk_weights")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        raise SystemExit(f"{run_dir}: config.json/provenance.json unreadable ({e!r}); it cannot "
                         f"be compared with the other studies") from None
    libraries = " + ".join(recorded_numeric_versions(invocations)) or None
    return protocol(config, trunk, also_ignore, libraries,
                    recorded_data_fingerprint(run_dir / "split_manifest.json"))


RECORDED_KEYS = ("libraries", "data fingerprint")  # None where a folder predates recording it
TRUNK_FIELDS = {"trunk sha256": "sha256", "trunk tensors sha256": "tensors_sha256"}


def differences(a: dict, b: dict) -> list[str]:
    """'key: A vs B' for each key where two protocols differ, a setting that one study's
    config lacks (written by an older harness) included; an unrecorded library version or data
    fingerprint (None: not recorded) is not a difference, and trunks differ as
    `trunk_difference` says."""
    older = "absent (an older harness)"
    found = [(k, x, y) for k, x, y in config_differences(a, b, skip=set(TRUNK_FIELDS))
             if not (k in RECORDED_KEYS and (None in (x, y) or MISSING in (x, y)))]
    return [f"{k}: {describe(k, x, older)} vs {describe(k, y, older)}"
            for k, x, y in sorted(found + trunk_difference(a, b), key=lambda d: d[0])]


def trunk_difference(a: dict, b: dict) -> list[tuple[str, str, str]]:
    """The trunks of two protocols, compared as a resumed run compares them
    (harness.provenance.same_trunk: by tensors where both record them, else by the file's
    hash); a hash one side did not record is not a difference."""
    records = [{field: p.get(key) for key, field in TRUNK_FIELDS.items()} for p in (a, b)]
    key = "trunk tensors sha256" if all(r["tensors_sha256"] for r in records) else \
        "trunk sha256"
    x, y = a.get(key), b.get(key)
    if x is None or y is None or same_trunk(*records):
        return []
    return [(key, x, y)]


def refuse_mixed_protocols(protocols: dict[str, dict], what: str) -> None:
    """SystemExit naming two studies whose protocols differ, and how: a table (or a seed
    comparison) of studies run under different schedules, budgets or trunks would rank unlike
    runs, with exit 0. Every pair is compared (20 methods: 190 pairs), since an unrecorded trunk
    hash matches any other and so does not make a study a reference for the rest."""
    items = list(protocols.items())
    for i, (name, other) in enumerate(items):
        for first, reference in items[:i]:
            diff = differences(reference, other)
            if diff:
                raise SystemExit(
                    f"{what}: {name} and {first} were not run under the same protocol "
                    f"({'; '.join(diff[:5])}{'; ...' if len(diff) > 5 else ''}); a table of "
                    f"both would compare unlike runs. Give another --out, or rerun the odd one "
                    f"with the same settings and trunk file.")


def run_study(study: str, args, out: Path, extra: tuple[str, ...] = ()) -> dict:
    """harness.run on one study (`extra`: more arguments, e.g. --stage search), its output
    appended to OUT/<study>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HARNESS_NO_PROGRESS": "1"}
    cmd = [sys.executable, "-m", "harness.run", *study_argv(study, args, out), *extra]
    start = time.perf_counter()
    with open(out / f"{study}.log", "a") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    print(f"{'done' if code == 0 else 'FAILED'} {study} in {seconds:.0f} s (exit {code})",
          flush=True)
    return {"study": study, "exit": code, "seconds": round(seconds, 1)}


def final_folds(run_dir: Path) -> pd.DataFrame:
    """The separated rows of the retrained final folds (reproductions >= 1)."""
    frame = pd.read_csv(run_dir / "final" / "test_metrics.csv")
    return frame[(frame["mode"] == "separated") & (frame["source"] != "best_trial")]


def markdown(frame: pd.DataFrame, index: bool = False) -> str:
    """A GitHub table (pandas' to_markdown needs tabulate, which the harness does not install)."""
    frame = frame.reset_index() if index else frame
    cell = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)  # noqa: E731
    rows = [list(frame.columns)] + [[cell(v) for v in row] for row in frame.itertuples(False)]
    lines = ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join([lines[0], "|" + "---|" * len(frame.columns), *lines[1:]])


def summarise(out: Path, studies: list[str]) -> pd.DataFrame:
    rows = []
    for study in studies:
        final = out / study / "final"
        summary = json.loads((final / "summary.json").read_text())
        means = {(r["mode"], r["metric"]): r for r in summary["summary"]}
        folds = final_folds(out / study)
        rows.append({"study": study,
                     "concatenated_map_at_r": means[("concatenated", "map_at_r")]["mean"],
                     "ci95": means[("concatenated", "map_at_r")]["ci95"],
                     "separated_map_at_r": means[("separated", "map_at_r")]["mean"],
                     "untrained_map_at_r": summary["untrained"]["map_at_r"],
                     "runs": means[("concatenated", "map_at_r")]["n"],
                     "final_folds": len(folds),
                     "early_stopped": int((folds["stop"] == "patience").sum()),
                     "mean_best_epoch": float(folds["best_epoch"].mean())})
    return pd.DataFrame(rows)


def read_record(path: Path, use):
    """`use(record)` of the JSON in `path`, a comparison.json; the folder's files are untrusted,
    so a torn or foreign file is a clear refusal naming it, not a traceback."""
    try:
        return use(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{path} is not a comparison record this script wrote ({e!r}); "
                         f"move it away or give another --out") from None


BUDGET_KEYS = ("trials", "reproductions", "recheck_top", "recheck_runs")
# A record or summary written before the recheck opt-in existed ran without it.
BUDGET_BEFORE_RECHECK = {"recheck_top": 0, "recheck_runs": 0}


def budget_of(source: dict, fallback: dict | None = None) -> dict:
    """The budget keys of a record, batch or summary; a key it lacks is `fallback`'s, or for the
    recheck keys of a file older than them, no recheck."""
    fallback = fallback or {}
    return {k: source.get(k, fallback.get(k, BUDGET_BEFORE_RECHECK.get(k))) for k in BUDGET_KEYS}


def wanted_budget(args) -> dict:
    return {"trials": args.trials, "reproductions": args.reproductions,
            **recheck_budget(getattr(args, "recheck_top", 0), getattr(args, "recheck_runs", 0))}


def load_record(out: Path, args) -> dict:
    """OUT/comparison.json, to extend: one seed and one budget per folder, or refuse.

    A folder's table mixes studies from several invocations (`--methods` in batches); they must
    share the seed, trials and reproductions, or the table would compare unlike runs silently.
    With `--grow`, a larger budget is the folder's new one: each earlier batch keeps the budget
    it ran at, and only studies run at the new budget enter the table (`succeeded_studies`).
    """
    path = out / "comparison.json"
    want = {"seed": args.seed, **wanted_budget(args)}
    if not path.exists():
        return {**want, "batches": []}

    def with_batches(record: dict) -> dict:
        if "batches" in record:
            return record
        # written before batches: the record was one invocation
        keys = ("methods", "jobs", "threads", "prepare_seconds", "studies_wall_seconds", "runs",
                "failed", "cpu_count")
        return {"seed": record["seed"], "trials": record["trials"],
                "reproductions": record["reproductions"], **budget_of(record),
                "batches": [{k: record.get(k) for k in keys}]}

    record = read_record(path, with_batches)
    have = {"seed": record.get("seed"), **budget_of(record)}
    if have == want:
        return record
    if getattr(args, "grow", False) and grows(have, want):
        for batch in record["batches"]:  # the budget each earlier batch ran at
            batch.update(budget_of(batch, have))
        return {**record, **want}
    hint = (" (--grow may only raise trials, reproductions and the recheck, for the same seed)"
            if getattr(args, "grow", False) else
            "; or add --grow to take every study of it to the larger budget (each search goes "
            "on from its trials, and a study whose best trial changes is retested)"
            if grows(have, want) else "")
    raise SystemExit(f"{path} holds a comparison with {have}, not {want}: give another --out "
                     f"(or --seed/--trials/--reproductions matching it){hint}")


def grows(have: dict, want: dict) -> bool:
    """`want` is `have` with a larger budget: the same seed, no fewer trials or retrainings."""
    return (have.get("seed") == want["seed"] and have != want and all(
        isinstance(have.get(k), int) and want[k] >= have[k] for k in BUDGET_KEYS))


def folder_budget(record: dict) -> dict:
    """The folder's budget: what its table covers and what a new batch runs at."""
    return budget_of(record)


def batch_budget(record: dict, batch: dict) -> dict:
    """The budget a batch ran at: its own, recorded since --grow, or else the folder's."""
    return budget_of(batch, budget_of(record))


def finished_budget(study_dir: Path) -> dict | None:
    """The budget a study folder's last final step finished at: final/summary.json's record of
    it, or for a summary from before that was recorded, the study's config.json (which a later
    invocation rewrites as it starts: an interrupted growth is then taken for a finished one,
    which mislabels its timing only, never the table: see command_run). None if unreadable."""
    from harness.run_folder import read_json

    summary = read_json(study_dir / "final" / "summary.json")
    budget = summary.get("budget") if isinstance(summary, dict) else None
    if isinstance(budget, dict):
        return budget_of(budget)
    config = read_json(study_dir / "config.json")
    if not isinstance(config, dict):
        return None
    flat = flat_config(config)
    return {"trials": flat.get("search.trials"), "reproductions": flat.get("final.reproductions"),
            **recheck_budget(flat.get("final.recheck_top", 0), flat.get("final.recheck_runs"))}


def succeeded_studies(out: Path, record: dict) -> list[str]:
    """The folder's studies that some batch at the folder's budget ran to the end, the oldest
    first (a study last run at a smaller budget, before --grow, is not one of them)."""
    budget = folder_budget(record)
    succeeded = [r["study"] for b in record["batches"] if batch_budget(record, b) == budget
                 for r in b["runs"] if not r["exit"]]
    return [s for s in dict.fromkeys(succeeded) if (out / s / "final" / "summary.json").exists()]


def check_extends_alike(out: Path, record: dict, studies: list[str], args, trunk: dict) -> None:
    """Before any training: the studies this invocation will run share the folder's protocol
    (the config less the method, the trunk file, and the torch and pml versions), or refuse.
    Otherwise a changed profile, a rebuilt trunk or another torch would slip into one table
    with the earlier batches' studies."""
    from harness.data import study_records
    from harness.errors import HarnessError
    from harness.provenance import library_versions, numeric_versions
    from harness.run import parse_args, resolve_config

    libraries = numeric_versions(library_versions())
    protocols = {s: recorded_protocol(out / s) for s in succeeded_studies(out, record)}
    fingerprints: dict[str, str] = {}  # one data set for all studies, in practice: load it once
    for study in studies:
        try:
            cfg = resolve_config(parse_args(study_argv(study, args, out)))
            data_key = json.dumps(cfg.to_dict()["data"], sort_keys=True, default=str)
            if data_key not in fingerprints:
                fingerprints[data_key] = study_records(cfg).fingerprint()
        except HarnessError as e:
            raise SystemExit(f"{study}: {e}") from None
        config = json.loads(json.dumps(cfg.to_dict()))  # as config.json has it: lists, not tuples
        protocols[f"{study} (to run now)"] = protocol(config, trunk, libraries=libraries,
                                                      data=fingerprints[data_key])
    refuse_mixed_protocols(protocols, str(out))


def command_run(args) -> int:
    from harness.run_folder import write_json_atomic

    registered = all_methods()
    methods = args.methods.split(",") if args.methods else registered
    unknown = sorted(set(methods) - set(registered))
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)}; registered: "
                         f"{', '.join(registered)}")
    studies = [f"{m}_glyphs" for m in methods]
    out = Path(args.out or REPO / "runs" / "embedded" / f"seed_{args.seed}")
    out.mkdir(parents=True, exist_ok=True)
    record = load_record(out, args)
    start = time.perf_counter()
    trunk = prepare_once()
    check_extends_alike(out, record, studies, args, trunk)
    # Studies an earlier invocation finished at this budget without recording them here (it was
    # interrupted before its end, or ran into a copy of the folder): harness.run only checks
    # them now, so their seconds here are not their cost.
    recorded = set(succeeded_studies(out, record))
    budget = folder_budget(record)
    finished_before = {s for s in studies if s not in recorded
                       and (out / s / "final" / "summary.json").exists()
                       and finished_budget(out / s) == budget}
    prepared = time.perf_counter()
    # one bar over the studies (each study's own output goes to OUT/<study>.log): a seed of
    # the full comparison runs for hours on a laptop
    with ThreadPoolExecutor(args.jobs) as pool, \
            bar(total=len(studies), desc=f"seed {args.seed}", unit="study", leave=True) as done:
        futures = [pool.submit(run_study, s, args, out) for s in studies]
        for future in as_completed(futures):
            done.update()
        runs = [f.result() for f in futures]  # in the order of the studies
    finished = time.perf_counter()
    for run in runs:
        run["finished_before"] = run["study"] in finished_before
    failed = [r["study"] for r in runs if r["exit"]]
    record["batches"].append({
        **budget, "methods": methods, "jobs": args.jobs, "threads": args.threads,
        "device": args.device,
        "prepare_seconds": round(prepared - start, 1),
        "studies_wall_seconds": round(finished - prepared, 1), "runs": runs, "failed": failed,
        "cpu_count": os.cpu_count()})
    # the table: every study of this folder that has succeeded in some batch, the old first
    done = succeeded_studies(out, record)
    table = summarise(out, done) if done else pd.DataFrame()
    subprocess.call([sys.executable, "-m", "harness.report", *[str(out / s) for s in done],
                     "--out", str(out / "report")], cwd=REPO)
    record["table"] = table.to_dict(orient="records")
    # atomic: the record holds every earlier batch's timings, which no rerun recovers
    write_json_atomic(out / "comparison.json", record)
    lines = comparison_markdown(record, table, failed)
    (out / "comparison.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 1 if failed else 0


def comparison_markdown(record: dict, table: pd.DataFrame, failed: list[str]) -> list[str]:
    batches = record["batches"]
    lines = [f"# Embedded comparison, seed {record['seed']}", "",
             f"{len(table)} methods, {record['trials']} trials, best trial + "
             f"{record['reproductions']} retrainings each{recheck_text(record)}, run in "
             f"{len(batches)} batch(es):", ""]
    budget = folder_budget(record)
    smaller = [b for b in batches if batch_budget(record, b) != budget]
    for b in batches:
        at = batch_budget(record, b)
        lines.append(f"- {len(b['runs'])} studies ({', '.join(b['methods'])}), {b['jobs']} side "
                     f"by side with {b['threads']} torch thread(s) on {b['cpu_count']} CPU "
                     f"cores ({b.get('device') or 'cpu'}): {b['studies_wall_seconds']:.0f} s "
                     f"wall (data + trunk preparation before: {b['prepare_seconds']:.0f} s)"
                     + (f", at {at['trials']} trials and {at['reproductions']} retrainings"
                        + (f", the best {at['recheck_top']} trials rechecked x "
                           f"{at['recheck_runs']}" if at["recheck_top"] else
                           ", MLRC's best trial tested" if budget["recheck_top"] else "")
                        if smaller else ""))
        earlier = [r["study"] for r in b["runs"] if r.get("finished_before")]
        if earlier:
            lines.append(f"  - of these, {len(earlier)} ({', '.join(earlier)}) had been run to "
                         f"their end by an earlier invocation this record does not hold (one "
                         f"interrupted before it recorded them, or one run into a copy of the "
                         f"folder): this batch only checked them, so its wall time does not "
                         f"include theirs (their `provenance.json` and logs have it)")
    total = sum(b["studies_wall_seconds"] for b in batches)
    lines.append(f"- wall time of all batches: {total:.0f} s" + (
        f" (with {len(smaller)} batch(es) at a smaller budget: the folder was grown with --grow, "
        f"so this is not the time of one run at its budget)" if smaller else ""))
    if len(table):
        stopped, folds = int(table["early_stopped"].sum()), int(table["final_folds"].sum())
        lines += [f"- final (retrained) folds ended by early stopping: {stopped} / {folds} "
                  f"({stopped / folds:.1%})", "",
                  markdown(table.sort_values("concatenated_map_at_r", ascending=False))]
    if failed:
        lines += ["", f"FAILED: {', '.join(failed)} (see OUT/<study>.log)"]
    return lines


def recheck_text(record: dict) -> str:
    budget = budget_of(record)
    if not budget["recheck_top"]:
        return ""
    return (f" (the trial tested is the best on validation of the search's "
            f"{budget['recheck_top']} best, each retrained {budget['recheck_runs']} more times: "
            f"--recheck-top, not MLRC)")


def seed_agreement(a: pd.Series, b: pd.Series) -> dict:
    """How far two seeds' scores of the same methods agree: Spearman's rho, the pairs of methods
    ordered the same way by both, and the between-seed gap of each method's score."""
    from scipy import stats

    rho, p = stats.spearmanr(a, b)
    pairs = [(x, y) for i, x in enumerate(a.index) for y in a.index[i + 1:]]
    same = sum((a[x] - a[y]) * (b[x] - b[y]) > 0 for x, y in pairs)
    return {"rho": float(rho), "p": float(p), "pairs": len(pairs), "same_order": int(same),
            "mean_abs_gap": float((a - b).abs().mean())}


def method_name(label: str) -> str:
    """'proxy_anchor_glyphs [embedded]' (a report label) or a study name -> 'proxy_anchor'."""
    return label.split(" [")[0].removesuffix("_glyphs")


def significance_agreement(a: pd.DataFrame, b: pd.DataFrame, seed_a, seed_b) -> list[str]:
    """Do the within-seed Holm-corrected Welch tests (concatenated MAP@R) replicate? For each
    pair tested in both seeds: significant in both the same way, in one only, or in opposite
    directions (each seed's test blind to the search variance that makes that possible).
    Returns markdown: the counts, then which pairs fall in each case, grouped by the better
    method."""
    def outcomes(frame: pd.DataFrame) -> dict:
        rows = frame[(frame["mode"] == "concatenated") & (frame["metric"] == "map_at_r")]
        result = {}
        for r in rows.itertuples():
            x, y = method_name(r.method_a), method_name(r.method_b)
            better, worse = (x, y) if r.diff > 0 else (y, x)
            result[frozenset((x, y))] = (better, worse, bool(r.significant))
        return result

    sa, sb = outcomes(a), outcomes(b)
    cases = {"both, same direction": [], "both, opposite directions": [], "one seed only": [],
             "neither": []}
    for pair in sorted(sa.keys() & sb.keys(), key=sorted):
        (better_a, worse_a, sig_a), (better_b, worse_b, sig_b) = sa[pair], sb[pair]
        if not (sig_a or sig_b):
            cases["neither"].append((better_a, worse_a, ""))
        elif sig_a != sig_b:
            better, worse, seed = (better_a, worse_a, seed_a) if sig_a else (
                better_b, worse_b, seed_b)
            cases["one seed only"].append((better, worse, f" (seed {seed})"))
        elif better_a == better_b:
            cases["both, same direction"].append((better_a, worse_a, ""))
        else:
            cases["both, opposite directions"].append((better_a, worse_a, ""))
    tested = sum(len(v) for v in cases.values())
    lines = [f"Pairs significant after Holm (concatenated MAP@R, each seed's report) among the "
             f"{tested} pairs tested in seeds {seed_a} and {seed_b}: "
             + "; ".join(f"{k}: {len(v)}" for k, v in cases.items()) + ".", ""]
    headings = {
        "both, same direction": "Significant after Holm in both seeds, the same way "
                                "(better > worse):",
        "both, opposite directions": f"Significant after Holm in both seeds, in opposite "
                                     f"directions (seed {seed_a}'s better > worse; seed "
                                     f"{seed_b} has the reverse):",
        "one seed only": "Significant after Holm in one seed only (better > worse, in that seed):"}
    for case, pairs in cases.items():
        if not pairs or case == "neither":
            continue
        lines += [headings[case], ""]
        by_better: dict[str, list[str]] = {}
        for better, worse, where in pairs:
            by_better.setdefault(better, []).append(worse + where)
        lines += [f"- {better} > {', '.join(worse)}"
                  for better, worse in sorted(by_better.items())]
        lines.append("")
    if cases["neither"]:
        lines += ["Not significant in either seed: " + "; ".join(
            f"{x} vs {y}" for x, y, _ in cases["neither"]) + ".", ""]
    return lines


def both_seeds_table(tables: list, common: list[str]) -> pd.DataFrame:
    """One row per method in both runs, ordered by the mean of the two seeds' concatenated test
    MAP@R: each seed's score (± the 95% half-width over its retrainings where recorded), rank,
    and final folds ended by early stopping; then the untrained floor of each seed."""
    scores = [frame.loc[common, "concatenated_map_at_r"] for _, _, frame in tables]
    # "min" ranks: ties share the better rank and stay whole numbers
    ranks = [s.rank(ascending=False, method="min").astype(int) for s in scores]
    rows = []
    for study in common:
        row = {"method": method_name(study)}
        for (_, seed, frame), score, rank in zip(tables, scores, ranks):
            ci = f" ± {frame.loc[study, 'ci95']:.4f}" if "ci95" in frame.columns else ""
            row[f"seed {seed}"] = f"{score[study]:.4f}{ci}"
            row[f"rank {seed}"] = rank[study]
        row["mean"] = sum(score[study] for score in scores) / len(scores)
        if all({"early_stopped", "final_folds"} <= set(t[2].columns) for t in tables):
            row["early-stopped final folds"] = " / ".join(
                f"{int(t[2].loc[study, 'early_stopped'])}/{int(t[2].loc[study, 'final_folds'])}"
                for t in tables)
        rows.append(row)
    table = pd.DataFrame(rows).sort_values("mean", ascending=False)
    if all("untrained_map_at_r" in t[2].columns for t in tables):
        floor = {"method": "untrained (pretrained trunk, random embedder)"}
        for _, seed, frame in tables:
            floor[f"seed {seed}"] = f"{frame.loc[common, 'untrained_map_at_r'].mean():.4f}"
            floor[f"rank {seed}"] = ""
        floor["mean"] = sum(t[2].loc[common, "untrained_map_at_r"].mean()
                            for t in tables) / len(tables)
        table = pd.concat([table, pd.DataFrame([floor])]).fillna("")
    return table


def check_seeds_alike(runs: list[Path], common: list[str], differ_in: tuple = ()) -> None:
    """Two seeds compare one protocol: each method's study in both folders, where its folder is
    there, has the same config less method, seed and the `differ_in` settings, and the same
    trunk."""
    protocols = {f"{run / study}": recorded_protocol(run / study,
                                                     also_ignore=("seed", *differ_in))
                 for study in common for run in runs if (run / study).is_dir()}
    if protocols:
        refuse_mixed_protocols(protocols, "spearman")


def settings_allowed_to_differ(keys: list[str]) -> tuple[str, ...]:
    """--differ-in values, each a dotted setting of the study config (a typo would allow
    nothing and say that it did), or SystemExit."""
    from harness.config import StudyConfig

    known = set(flat_config(StudyConfig().to_dict()))
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"--differ-in {', '.join(unknown)}: not a study setting (expected a "
                         f"dotted key such as model.cache_frozen_features or train.lr)")
    return tuple(keys)


def command_spearman(args) -> int:
    differ_in = settings_allowed_to_differ(args.differ_in)
    tables = []
    for run in args.runs:
        seed, frame = read_record(Path(run) / "comparison.json", lambda record: (
            record["seed"], pd.DataFrame(record["table"]).set_index("study")))
        tables.append((run, seed, frame))
    if tables[0][1] == tables[1][1]:  # one seed twice (--differ-in): tell the columns apart
        tables = [(run, f"{seed} (run {i})", frame)
                  for i, (run, seed, frame) in enumerate(tables, 1)]
    common = sorted(set(tables[0][2].index) & set(tables[1][2].index))
    check_seeds_alike([Path(run) for run in args.runs], common, differ_in)
    a, b = (t[2].loc[common, "concatenated_map_at_r"] for t in tables)
    agree = seed_agreement(a, b)
    (_, seed_a, _), (_, seed_b, _) = tables
    lines = [
        "# Is the ranking reproducible? Two "
        f"{'runs' if differ_in else 'seeds'} of the embedded comparison", "",
        f"Runs: {tables[0][0]} and {tables[1][0]}; {len(common)} methods in both.", "",
        *([f"Besides the seed, the runs were allowed to differ in: {', '.join(differ_in)} "
           f"(--differ-in).", ""] if differ_in else []),
        f"Spearman rank correlation of concatenated test MAP@R: **{agree['rho']:.3f}** "
        f"(p = {agree['p']:.3g}).", "",
        f"Pairs of methods in the same order in both seeds: {agree['same_order']} of "
        f"{agree['pairs']}.", ""]
    if all("ci95" in t[2].columns for t in tables):
        ci = pd.concat([t[2].loc[common, "ci95"] for t in tables]).mean()
        lines += [f"Mean gap between a method's two seeds: {agree['mean_abs_gap']:.4f} MAP@R; "
                  f"mean half-width of a seed's 95% interval over its retrainings: {ci:.4f} "
                  "(the interval does not contain the search's variance).", ""]
    lines += ["Concatenated test MAP@R per seed (mean ± 95% half-width over the best trial and "
              "its retrainings), ordered by the mean of the two seeds:", "",
              markdown(both_seeds_table(tables, common)), ""]
    tests = [Path(run) / "report" / "significance.csv" for run in args.runs]
    if all(t.exists() for t in tests):
        lines += significance_agreement(*(pd.read_csv(t) for t in tests), seed_a, seed_b)
    text = "\n".join(lines)
    out = Path(args.out) if args.out else Path(args.runs[0]).parent / "seeds.md"
    out.write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the comparison for one seed")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--methods", default="", help="comma-separated loss aliases (default all)")
    run.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                     help="studies side by side (default: the CPU cores)")
    run.add_argument("--threads", type=int, default=1, help="torch threads per study")
    run.add_argument("--trials", type=int, default=10)
    run.add_argument("--reproductions", type=int, default=10)
    run.add_argument("--device", default="cpu")
    run.add_argument("--recheck-top", type=int, default=0, metavar="K",
                     help="not MLRC (an explicit opt-in): retrain each search's K best trials "
                          "--recheck-runs more times and test the best of those fresh runs on "
                          "validation (harness/recheck.py); 0 = MLRC's best trial")
    run.add_argument("--recheck-runs", type=int, default=2, metavar="R")
    run.add_argument("--grow", action="store_true",
                     help="take a folder run at a smaller --trials/--reproductions to these "
                          "(each study resumes: its search goes on, its final step is redone "
                          "where the best trial changes); without it a new budget is refused")
    run.add_argument("--out", default="", help="default runs/embedded/seed_<seed> (the "
                     "committed comparison, results/embedded/, was written with --out)")
    spearman = sub.add_parser("spearman", help="rank agreement of two runs")
    spearman.add_argument("runs", nargs=2)
    spearman.add_argument("--out", default="",
                          help="default: seeds.md beside the first run's folder")
    spearman.add_argument("--differ-in", action="append", default=[], metavar="KEY",
                          help="a setting (e.g. model.cache_frozen_features) the two runs may "
                               "differ in besides the seed; repeatable")
    args = p.parse_args(argv)
    return command_run(args) if args.command == "run" else command_spearman(args)


if __name__ == "__main__":
    sys.exit(main())
