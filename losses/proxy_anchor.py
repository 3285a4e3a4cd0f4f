"""Proxy Anchor loss (Kim, Kim, Cho, Kwak, CVPR 2020; tjddus9597/Proxy-Anchor-CVPR2020).

With s(x, p) the cosine similarity, P+ the proxies that have a positive in the batch, X_p+ / X_p-
the batch samples of / not of the class of proxy p, alpha the scale and delta the margin:

    L = 1/|P+| sum_{p in P+} log(1 + sum_{x in X_p+} exp(-alpha (s(x, p) - delta)))
      + 1/C    sum_{p}       log(1 + sum_{x in X_p-} exp( alpha (s(x, p) + delta)))

This is pml 2.9.0's ProxyAnchorLoss (same proxies -> same value and gradients: the official
code's `log(1 + sum exp)` written as a log-sum-exp with an appended zero, a DivisorReducer for the
two divisors, and pml's miner weights added to the exponent). What this subclass adds:

* a clear ValueError for labels outside [0, num_classes) (pml fails inside one_hot);
* a hook, `pair_weights`, through which a subclass multiplies each proxy-sample exponent by a
  weight and replaces the two divisors. Proxy-ISA (losses/proxy_isa.py) is such a subclass; with
  no weights (this class) the computation is operation for operation pml's.

Proxies: an nn.Parameter `proxies` of shape (num_classes, embedding_size), initialised like the
official code (kaiming_normal_, mode="fan_out"), as pml does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ._checks import check_labels


class PairWeights(NamedTuple):
    """Per proxy-sample weights of the exponents and the divisors of the two terms."""

    pos: torch.Tensor  # (batch, num_classes), multiplies alpha * (delta - s) of positive pairs
    neg: torch.Tensor  # (batch, num_classes), multiplies alpha * (s + delta) of negative pairs
    pos_divisor: torch.Tensor | float  # replaces |P+|
    neg_divisor: torch.Tensor | float  # replaces C


class ProxyAnchorLoss(pml_losses.ProxyAnchorLoss):
    """Proxy Anchor loss; equal to pml's ProxyAnchorLoss for the same proxies.

    Args:
        num_classes: number of proxies (one per training class); labels must be in [0, num_classes).
        embedding_size: proxy dimension.
        margin: delta (official 0.1).
        alpha: scale (official 32).
        **kwargs: pml's (distance, reducer, weight_regularizer, weight_init_func, ...).
    """

    def __init__(self, num_classes, embedding_size, margin=0.1, alpha=32, **kwargs):
        super().__init__(num_classes, embedding_size, margin=margin, alpha=alpha, **kwargs)
        self.embedding_size = embedding_size

    def pair_weights(self, cos: torch.Tensor, labels: torch.Tensor,
                     pos_mask: torch.Tensor) -> PairWeights | None:
        """Weights of the exponents; None = plain Proxy Anchor (every weight 1)."""
        return None

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        check_labels(labels, self.num_classes, type(self).__name__)
        dtype, device = embeddings.dtype, embeddings.device
        self.cast_types(dtype, device)
        # pml's convention: miner weights (1 = sample used by the miner) enter the exponent as w - 1
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype).unsqueeze(1) - 1

        cos = self.get_logits(embeddings)
        pos_mask = torch.nn.functional.one_hot(labels, self.num_classes).bool()
        neg_mask = ~pos_mask

        pos_exp = self.alpha * self.distance.margin(cos, self.margin)  # alpha * (delta - s)
        neg_exp = self.alpha * self.distance.margin(-self.margin, cos)  # alpha * (s + delta)

        # Weights never carry gradient: they are computed from the detached similarities.
        weights = self.pair_weights(cos.detach(), labels, pos_mask)
        if weights is None:
            # Same divisors as pml (a Python int keeps the value bit-identical to pml's).
            pos_divisor = int(pos_mask.any(dim=0).sum())
            neg_divisor = self.num_classes
        else:
            pos_exp = pos_exp * weights.pos
            neg_exp = neg_exp * weights.neg
            pos_divisor, neg_divisor = weights.pos_divisor, weights.neg_divisor

        pos_term = lmu.logsumexp(pos_exp + miner_weights, keep_mask=pos_mask, add_one=True, dim=0)
        neg_term = lmu.logsumexp(neg_exp + miner_weights, keep_mask=neg_mask, add_one=True, dim=0)

        loss_indices = c_f.torch_arange_from_size(self.proxies)
        loss_dict = {
            "pos_loss": {
                "losses": pos_term.squeeze(0),
                "indices": loss_indices,
                "reduction_type": "element",
                "divisor": pos_divisor,
            },
            "neg_loss": {
                "losses": neg_term.squeeze(0),
                "indices": loss_indices,
                "reduction_type": "element",
                "divisor": neg_divisor,
            },
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        self.after_loss(embeddings, labels, cos.detach(), pos_mask)
        return loss_dict

    def after_loss(self, embeddings, labels, cos, pos_mask) -> None:
        """Called once per forward after the loss terms are built (state updates go here)."""
