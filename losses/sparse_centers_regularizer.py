"""SoftTriple's center regulariser (Qian et al., ICCV 2019; idstcv/SoftTriple), memory-light.

    R = sum_c sum_{k < k'} sqrt(2 + eps - 2 <w^_ck, w^_ck'>) / (C K (K - 1))

over the L2-normalised centers w^ of each class. Same value as pml 2.9.0's
`regularizers.SparseCentersRegularizer` (its clamp, small value and divisor 2 * #pairs), which
builds two (C*K) x (C*K) masks and the full (C*K) x (C*K) similarity matrix: 12.8 GB of masks
alone for SOP's 11,318 classes x 10 centers. This one computes the C blocks of K x K similarities
with one batched matmul: O(C K^2) memory, and any number of classes (so it also works on a
weight matrix that Proxy Synthesis enlarged).

The gradient at an exact collapse (2 <w^_ck, w^_ck'> rounds to 2, square root's argument 0) is
chosen here, not left to torch.clamp: PyTorch gave clamp the subgradient 1 at its bound until
2026 (pytorch/pytorch#184574, #191142) and 0 since (torch 2.14.1, the version pinned here).
Same-class centers collapse often (what the regulariser pulls them towards): on the glyph data,
SoftTriple trial 1 of the embedded comparison had a pair at exactly 2 in 398 of its 480 steps.
`collapse_gradient` says which gradient, on every torch version:
  * "mlrc": the subgradient 1 of the PyTorch MLRC ran (pml 0.9.92, 2020): the square root's
    infinite derivative reaches the centers, they turn NaN and the trial diverges (MLRC scores it
    0). The harness's default for every study (`train.center_collapse_gradient`).
  * "zero": torch 2.14.1's subgradient 0: training goes on. The official SoftTriple code also
    trains on there: sqrt(2 + 1e-5 - 2 cos) has a finite derivative, and the cosine's gradient
    with respect to the raw centers vanishes at its maximum (up to rounding). The class's
    default (pml 2.9.0 under the pinned torch), and the embedded profile's opt-in
    (docs/embedded.md, "SoftTriple and the clamp's subgradient").

Input: the (C*K, D) centers in pml SoftTripleLoss's class-major order (row c*K + k), i.e. what
SoftTripleLoss passes to its weight regulariser (`fc.t()`). pml's weight_reg_weight multiplies it
(MLRC's SoftTriple `reg_weight`, official tau = 0.2).
"""

from __future__ import annotations

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.reducers import DivisorReducer
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f


# The gradients at an exactly collapsed pair a regulariser can take (module docstring).
COLLAPSE_GRADIENTS = ("mlrc", "zero")


class SparseCentersRegularizer(BaseRegularizer):
    """Pulls the K centers of each class together; equal to pml's, O(C K^2) memory."""

    def __init__(self, centers_per_class: int, collapse_gradient: str = "zero", **kwargs):
        super().__init__(**kwargs)
        if centers_per_class < 2:
            raise ValueError("SparseCentersRegularizer needs centers_per_class >= 2")
        check_collapse_gradient(collapse_gradient)
        self.collapse_gradient = collapse_gradient
        c_f.assert_distance_type(self, CosineSimilarity)
        self.centers_per_class = int(centers_per_class)
        self.add_to_recordable_attributes(list_of_names=["centers_per_class"], is_stat=False)

    def compute_loss(self, weights):
        k = self.centers_per_class
        if weights.shape[0] % k:
            raise ValueError(
                f"SparseCentersRegularizer: {weights.shape[0]} centers is not a multiple of "
                f"centers_per_class={k}"
            )
        centers = self.distance.normalize(weights).reshape(-1, k, weights.shape[1])
        sims = torch.bmm(centers, centers.transpose(1, 2))  # (C, K, K)
        iu = torch.triu_indices(k, k, offset=1, device=weights.device)
        same_class = sims[:, iu[0], iu[1]].reshape(-1)
        small_val = c_f.small_val(weights.dtype)
        reg = torch.sqrt(2.0 + small_val - self.clamp_two_cos(2.0 * same_class))
        return {
            "loss": {
                "losses": reg,
                "indices": c_f.torch_arange_from_size(reg),
                "reduction_type": "element",
                "divisor": 2 * reg.numel(),  # pml: 2 * (number of same-class pairs)
            }
        }

    def clamp_two_cos(self, two_cos: torch.Tensor) -> torch.Tensor:
        """clamp(2 cos, max=2) with the chosen subgradient at the bound, whatever the torch
        version (module docstring): 1 up to and at 2 ("mlrc"), or only below it ("zero"). NaN
        propagates as through clamp."""
        below = two_cos <= 2.0 if self.collapse_gradient == "mlrc" else two_cos < 2.0
        return torch.where(below, two_cos, torch.clamp(two_cos, max=2).detach())

    def get_default_distance(self):
        return CosineSimilarity()

    def get_default_reducer(self):
        return DivisorReducer()


def check_collapse_gradient(mode: str) -> None:
    if mode not in COLLAPSE_GRADIENTS:
        raise ValueError(f"collapse_gradient={mode!r}: expected one of "
                         f"{', '.join(COLLAPSE_GRADIENTS)}")


def set_collapse_gradient(loss: torch.nn.Module, mode: str) -> int:
    """Give every SparseCentersRegularizer inside `loss` (SoftTriple's, also under Proxy
    Synthesis) the gradient `mode` at an exactly collapsed pair; returns how many there were.
    A setting of the run rather than a loss parameter: the same for every loss of a study."""
    check_collapse_gradient(mode)
    found = [m for m in loss.modules() if isinstance(m, SparseCentersRegularizer)]
    for regularizer in found:
        regularizer.collapse_gradient = mode
    return len(found)
