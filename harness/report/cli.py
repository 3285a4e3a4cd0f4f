"""python -m harness.report: the command line."""

from __future__ import annotations

import argparse
import sys

from harness.errors import HarnessError
from harness.report import __doc__ as REPORT_DOC
from harness.report.build import build_report
from harness.report.runs import DEFAULT_OUT, RUNS_DIR


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m harness.report", description=REPORT_DOC,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="*", metavar="RUN_DIR",
                   help="run folders (or folders to scan); default: every run folder under "
                        f"{RUNS_DIR}")
    p.add_argument("--out", help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--no-plots", action="store_true", help="tables and tests only")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = build_report(args.run_dirs or None, args.out or DEFAULT_OUT,
                              plots=not args.no_plots)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for note in report.notes:
        print(f"warning: {note}", file=sys.stderr)
    print(f"report of {len(report.runs)} run(s) written to {report.out} "
          f"(index: {report.out / 'README.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

