"""Time one embedded fold and fingerprint its validation history, to compare two checkouts.

    python benchmarks/fold_time.py [--study proxy_anchor_glyphs] [--fold 1] [--seed 11]

Trains one fold of the study with the embedded profile's own schedule (early stopping as in the
comparison), one torch thread, and prints the seconds and the sha256 of its history (every
validation's metrics). Run it from two checkouts in turn, several times interleaved: equal
hashes mean the change left the fold's numbers byte-identical, and the median seconds give the
speed-up (how docs/embedded.md measured the sampler, batch and checkpoint savings).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", default="proxy_anchor_glyphs")
    p.add_argument("--fold", type=int, default=1)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args(argv)

    import torch

    from harness.config import load_study
    from harness.data import prepare_data, resolve_device
    from harness.train import train_fold

    torch.set_num_threads(1)
    cfg = load_study(args.study, profile="embedded")
    data = prepare_data(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = train_fold(cfg, data, data.split.folds[args.fold], resolve_device("cpu"),
                            seed=args.seed, run_dir=Path(tmp))
        seconds = time.perf_counter() - began
    digest = hashlib.sha256(json.dumps(result.history).encode()).hexdigest()
    print(f"{args.study} fold {args.fold}: {seconds:.2f} s, "
          f"{result.history[-1]['iteration'] if result.history else 0} iterations, "
          f"history sha256 {digest[:16]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
