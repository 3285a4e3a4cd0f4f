"""Record the tensors' hash of the trunk a run folder started from, for folders written before
harness.run recorded it (provenance.json's trunk_weights had only the file's sha256).

    python benchmarks/record_trunk_tensors.py --weights FILE RUN_DIR [RUN_DIR ...]

FILE must be the very file the folder recorded: every invocation record whose trunk_weights
sha256 equals FILE's gets `tensors_sha256` (harness.provenance.tensors_sha256) and
`tensors_sha256_recorded_later: true`; a folder with no such record is left as it is and named.
Why: a resumed run, `more_trials.py` or `embedded_comparison.py` compares trunks by their
tensors where both sides record them, and by file bytes otherwise, so a trunk rebuilt into other
bytes with the same weights (as the glyph trunk was when its file became byte-reproducible) is
refused beside an older folder until this is recorded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def record_tensors(run_dir: Path, weights: Path) -> int:
    """How many invocation records of run_dir/provenance.json got the tensors' hash."""
    from harness.provenance import file_sha256, tensors_sha256
    from harness.run_folder import read_json, write_json_atomic

    path = run_dir / "provenance.json"
    runs = read_json(path)
    if not isinstance(runs, list):
        raise SystemExit(f"{path}: missing or not the harness's list of invocations")
    sha, tensors = file_sha256(weights), None
    added = 0
    for run in runs:
        trunk = run.get("trunk_weights") if isinstance(run, dict) else None
        if isinstance(trunk, dict) and trunk.get("sha256") == sha and \
                not trunk.get("tensors_sha256"):
            tensors = tensors or tensors_sha256(weights)
            trunk["tensors_sha256"] = tensors
            trunk["tensors_sha256_recorded_later"] = True
            added += 1
    if added:
        write_json_atomic(path, runs)
    return added


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True)
    p.add_argument("run_dirs", type=Path, nargs="+")
    args = p.parse_args(argv)
    from harness.errors import HarnessError

    untouched = []
    for run_dir in args.run_dirs:
        try:
            added = record_tensors(run_dir, args.weights)
        except (HarnessError, OSError) as e:
            raise SystemExit(f"{run_dir}: {e}") from None
        print(f"{run_dir}: {added} record(s)")
        if not added:
            untouched.append(str(run_dir))
    if untouched:
        print(f"no record of {args.weights} without its tensors' hash in: "
              f"{', '.join(untouched)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
