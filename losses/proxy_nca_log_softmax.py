"""ProxyNCA in the log-softmax form: pml 2.9.0's ProxyNCALoss without its underflow.

pml's NCALoss (2.9.0, and v0.9.92 that MLRC ran) computes softmax(scale * -d^2), sums the
positive probabilities, and then keeps only the samples whose sum is not 0:

    exp = softmax(softmax_scale * mat); exp = sum(exp * same_labels); loss = -log(exp[exp != 0])

In float32 the positive probability underflows once the positive's logit trails the largest by
more than ~87-104, i.e. at softmax_scale * (d^2_pos - d^2_min) > ~100: at scale 100 (inside
MLRC's space) that sample is silently dropped from the mean (the loss can read 0.0 where the
log-softmax form gives 32.9), and a positive probability that is subnormal but not 0 gives an
infinite 1/p in the backward pass: non-finite gradients (measured in docs/losses_proxy_nca.md).

This class computes -log softmax(...)[positive] with logsumexp (the form of the official Proxy
Synthesis `Proxy_NCA`, navervision/proxy-synthesis loss/proxy_losses.py: F.log_softmax), keeps
every sample, and is otherwise pml's ProxyNCALoss (same distance: squared L2 between normalised
embeddings and proxies; same proxies, regulariser and reduction). Samples without any positive
reference are excluded, as pml does. The `proxy_nca` registry entry keeps pml's own form
(MLRC's baseline, fidelity); this one is `proxy_nca_log_softmax`, the base of Proxy Synthesis.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu


class ProxyNCALogSoftmaxLoss(pml_losses.ProxyNCALoss):
    """pml ProxyNCALoss computed as a log-softmax: no sample dropped, finite gradients."""

    def nca_computation(self, query, reference, query_labels, reference_labels, indices_tuple):
        dtype = query.dtype
        miner_weights = lmu.convert_to_weights(
            indices_tuple, query_labels, dtype=dtype, using_ref=query is not reference
        )
        mat = self.distance(query, reference)
        if not self.distance.is_inverted:
            mat = -mat
        same = query_labels.unsqueeze(1) == reference_labels.unsqueeze(0)
        if query is reference:  # NCA on the batch itself: a sample is not its own positive
            mat.fill_diagonal_(c_f.neg_inf(dtype))
            same.fill_diagonal_(False)
        logits = self.softmax_scale * mat
        has_positive = same.any(dim=1)
        log_positive = torch.logsumexp(logits.masked_fill(~same, c_f.neg_inf(dtype)), dim=1)
        log_all = torch.logsumexp(logits, dim=1)
        loss = (log_all - log_positive)[has_positive] * miner_weights[has_positive]
        return {
            "loss": {
                "losses": loss,
                "indices": c_f.torch_arange_from_size(query)[has_positive],
                "reduction_type": "element",
            }
        }
