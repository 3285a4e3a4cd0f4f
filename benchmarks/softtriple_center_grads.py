"""Where SoftTriple's center regulariser makes non-finite gradients (a diagnosis, docs/embedded.md).

    python benchmarks/softtriple_center_grads.py STUDY_DIR TRIAL FOLD [--device cuda] [--set ...] \
        [--clamp torch|harness]

Trains the fold as `retrain_trial.py` does, with the regulariser's intermediate tensors watched
(the same operations in the same order as losses/sparse_centers_regularizer.py, so the numbers
are the training's own). `--clamp torch` (default): the regulariser as it was before it chose its
gradient at the clamp's bound, i.e. with the installed torch's subgradient there (1 before 2026,
0 since: pytorch/pytorch#184574); `--clamp harness`: as it is now, with the study's
`train.center_collapse_gradient` ("zero" for the embedded runs; `--set
train.center_collapse_gradient=mlrc` for MLRC's). After each backward pass:
how many entries of each one's gradient are +-inf or NaN, and how many same-class center pairs
have 2 cos rounded to exactly 2 or above (the square root's argument 0). Prints the steps where
any gradient is non-finite, up to the first NaN, and a summary.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import retrain_trial  # noqa: E402  (a sibling script)

WATCHED = ("weights", "centers", "sims", "2cos", "clamped", "arg")


def watch_regulariser(log: list[dict], clamp: str):
    """Replace SparseCentersRegularizer.compute_loss by a copy of it that hooks its tensors;
    returns the original, for the caller to put back."""
    import torch
    from pytorch_metric_learning.utils import common_functions as c_f

    from losses.sparse_centers_regularizer import SparseCentersRegularizer

    def compute_loss(self, weights):
        k = self.centers_per_class
        centers = self.distance.normalize(weights).reshape(-1, k, weights.shape[1])
        sims = torch.bmm(centers, centers.transpose(1, 2))
        iu = torch.triu_indices(k, k, offset=1, device=weights.device)
        two_cos = 2.0 * sims[:, iu[0], iu[1]].reshape(-1)
        clamped = self.clamp_two_cos(two_cos) if clamp == "harness" else \
            torch.clamp(two_cos, max=2)
        arg = 2.0 + c_f.small_val(weights.dtype) - clamped
        reg = torch.sqrt(arg)
        row = {"step": len(log), "2cos==2": int((two_cos == 2.0).sum()),
               "2cos>2": int((two_cos > 2.0).sum()), "grads": {}}
        log.append(row)
        for name, t in zip(WATCHED, (weights, centers, sims, two_cos, clamped, arg)):
            if t.requires_grad:
                t.register_hook(lambda g, name=name, row=row: row["grads"].__setitem__(
                    name, (int(torch.isinf(g).sum()), int(torch.isnan(g).sum()))))
        return {"loss": {"losses": reg, "indices": c_f.torch_arange_from_size(reg),
                         "reduction_type": "element", "divisor": 2 * reg.numel()}}

    original = SparseCentersRegularizer.compute_loss
    SparseCentersRegularizer.compute_loss = compute_loss
    return original


def main(argv: list[str] | None = None) -> int:
    p = retrain_trial.trial_parser(__doc__, many_folds=False)
    p.add_argument("--clamp", choices=("torch", "harness"), default="torch")
    args = p.parse_args(argv)
    from losses.sparse_centers_regularizer import SparseCentersRegularizer

    log: list[dict] = []
    original = watch_regulariser(log, args.clamp)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            retrain_trial.retrain(args.study_dir, args.trial, [args.fold],
                                  retrain_trial.overrides(args), Path(tmp))
    finally:  # a caller in the same process (a test) gets the real regulariser back
        SparseCentersRegularizer.compute_loss = original
    bad = [r for r in log if any(inf or nan for inf, nan in r["grads"].values())]
    for row in bad:
        print(json.dumps(row))
        if any(nan for _, nan in row["grads"].values()):
            break
    first_nan = next((r["step"] for r in log if any(n for _, n in r["grads"].values())), None)
    print(f"steps {len(log)}; with a pair at 2cos == 2: "
          f"{sum(1 for r in log if r['2cos==2'])}, above 2: "
          f"{sum(1 for r in log if r['2cos>2'])}; with a non-finite gradient in the "
          f"regulariser: {len(bad)}; first NaN gradient at step {first_nan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
