"""Which operation makes a diverging trial's fold go non-finite?

    python benchmarks/find_divergence.py STUDY_DIR TRIAL FOLD [--device cuda] [--set ...]

Trains the fold the way `retrain_trial.py` does (the study's config, the trial's parameters and
fold seed; the same `--device` / `--set`), with PyTorch's autograd anomaly detection on: the
first backward operation that returns a non-finite gradient stops the run, and its forward
operation's stack is printed. It also records, after every backward pass, whether any gradient
is non-finite and which parameters hold them. Anomaly detection slows training several times:
for diagnosis only. Used on the SoftTriple trials that diverged on a GPU and not on the CPU
(docs/embedded.md).
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrain_trial  # noqa: E402  (a sibling script)


def main(argv: list[str] | None = None) -> int:
    args = retrain_trial.trial_parser(__doc__, many_folds=False).parse_args(argv)
    import torch

    # Scoped: a caller in the same process (a test) gets normal autograd back.
    with tempfile.TemporaryDirectory() as tmp, torch.autograd.detect_anomaly(check_nan=True):
        try:
            retrain_trial.retrain(args.study_dir, args.trial, [args.fold],
                                  retrain_trial.overrides(args), Path(tmp))
        except RuntimeError as e:
            print("ANOMALY:", str(e).splitlines()[0][:500])
            traceback.print_exc(limit=3)
            return 1
    print("no non-finite gradient: the fold trained to its end (see the row above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
