"""Would a bigger search make the seeds agree? Grow copies of some studies' searches and see.

    python benchmarks/more_trials.py results/embedded/seed_0 results/embedded/seed_1 \
        --methods arcface,norm_softmax --trials 20 --out runs/more_trials [--jobs 2]

Copies each method's study folder from both seed folders into OUT/seed_S/<study> (the originals
are not touched), grows each copy's search to --trials with `harness.run --stage search` (MLRC's
GP search goes on from the trials the study has; the final step is not rerun), then runs
benchmarks/search_noise.py on the two copies (OUT/search_noise.md and .csv): the seeds'
agreement and the gap between them when each seed keeps the best of its first k trials, now for
k up to --trials. Growing a copy again with a larger --trials resumes it.

A copy of a folder written before the `train.tf32` setting existed would be refused on resume
(its config.json lacks the key). It gets `tf32 = false` only when every invocation recorded in
its provenance.json ran on the CPU, which has no TF32 (float32 either way); otherwise the script
stops and says so. Likewise `train.center_collapse_gradient`: "zero" when every invocation ran
torch 2.14.1 or later (whose clamp gave that gradient), otherwise it stops.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from benchmarks.embedded_comparison import run_study  # noqa: E402
COPY_IGNORE = shutil.ignore_patterns(".lock", "*.db.lock")  # a copy starts unlocked


def state_older_settings(folder: Path) -> None:
    """config.json written before train.tf32 or train.center_collapse_gradient existed: state
    what the run computed, read once from its provenance.json (module docstring), or refuse
    before anything is written. Unknown collapse gradient is refused for every loss
    (retrain_trial can tell a loss without the regulariser, but the copy must resume under the
    profile's own value, which is only known to be right when the run computed it)."""
    from harness.provenance import older_center_collapse_gradient
    from harness.run_folder import read_json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    train = config.setdefault("train", {})
    if "tf32" in train and "center_collapse_gradient" in train:
        return
    invocations = read_json(folder / "provenance.json")
    invocations = [i for i in invocations if isinstance(i, dict)] \
        if isinstance(invocations, list) else []
    if "tf32" not in train:
        devices = {str((i.get("hardware") or {}).get("device", "")) for i in invocations}
        if not devices or any(not d.startswith("cpu") for d in devices):
            raise SystemExit(f"{folder}: config.json predates train.tf32 and the run used "
                             f"{sorted(devices)}, where TF32 may have been on; it cannot be "
                             f"grown as the same study")
        train["tf32"] = False
    if "center_collapse_gradient" not in train:
        mode = older_center_collapse_gradient(invocations)
        if mode is None:
            raise SystemExit(f"{folder}: config.json predates train.center_collapse_gradient "
                             f"and its provenance.json (missing, unreadable, or some run under "
                             f"a torch before 2.14.1) does not say which gradient it computed; "
                             f"it cannot be grown as the same study")
        train["center_collapse_gradient"] = mode
    path.write_text(json.dumps(config, indent=2))


def copy_study(source: Path, target: Path) -> None:
    """Copy once; a target that exists is a copy being grown further (harness.run checks that
    it is the same study)."""
    if not target.exists():
        shutil.copytree(source, target, ignore=COPY_IGNORE)
    state_older_settings(target)


def grow(folder: Path, study: str, seed: int, trials: int) -> dict:
    """harness.run's search stage on the copy: the comparison's own arguments (study_argv, so
    that the copy resumes as the same study), with more trials."""
    config = json.loads((folder / "config.json").read_text())
    args = argparse.Namespace(seed=seed, trials=trials, device="cpu", threads=1,
                              reproductions=config["final"]["reproductions"])
    return {"seed": seed, **run_study(study, args, folder.parent, extra=("--stage", "search"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs=2, help="two seed folders of embedded_comparison.py run")
    p.add_argument("--methods", required=True, help="comma-separated loss aliases")
    p.add_argument("--trials", type=int, required=True, help="grow each search to this many")
    p.add_argument("--out", required=True, help="folder for the copies and the analysis")
    p.add_argument("--jobs", type=int, default=2, help="studies grown side by side")
    args = p.parse_args(argv)
    out = Path(args.out)
    jobs = []
    for run in map(Path, args.runs):
        seed = json.loads((run / "comparison.json").read_text())["seed"]
        for method in args.methods.split(","):
            study = f"{method}_glyphs"
            if not (run / study / "config.json").is_file():
                raise SystemExit(f"{run / study}: no such study folder")
            target = out / f"seed_{seed}" / study
            copy_study(run / study, target)
            jobs.append((target, study, seed))
    with ThreadPoolExecutor(args.jobs) as pool:
        grown = list(pool.map(lambda job: grow(*job, args.trials), jobs))
    (out / "grown.json").write_text(json.dumps(grown, indent=2))
    if any(g["exit"] for g in grown):
        print(f"some studies failed: see {out}/seed_*/<study>.log", file=sys.stderr)
        return 1
    seeds = sorted({str(out / f"seed_{seed}") for _, _, seed in jobs})
    return subprocess.call([sys.executable, str(REPO / "benchmarks" / "search_noise.py"),
                            *seeds, "--jobs", str(args.jobs),
                            "--out", str(out / "search_noise.md")], cwd=REPO)


if __name__ == "__main__":
    sys.exit(main())
