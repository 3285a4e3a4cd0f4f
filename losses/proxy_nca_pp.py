"""ProxyNCA++ (Teh, DeVries, Taylor, ECCV 2020; euwern/proxynca_pp).

The official loss L2-normalises embeddings x and proxies p, scales both by s = sqrt(1/T), takes
D(x, p) = ||s x^ - s p^||^2 = ||x^ - p^||^2 / T, and applies cross-entropy to softmax(-D) over ALL
proxies (the positive one included: "proxy assignment probability"), one-hot targets (no label
smoothing), averaged over the batch. T = 1/9 by default (the paper's low temperature).

    L = mean_i  -log( exp(-||x^_i - p^_{y_i}||^2 / T) / sum_c exp(-||x^_i - p^_c||^2 / T) )

Written over pml's parts: the distance is pml's LpDistance(power=2) (normalises both sides, so
the matrix is ||x^ - p^||^2), the reducer pml's MeanReducer. With the same proxies it equals pml
2.9.0's ProxyNCALoss(softmax_scale=1/T); the difference is numerical: pml takes log(softmax) and
drops a sample whose positive probability underflows to 0 (possible at small T), while this class
uses log_softmax (via cross_entropy) like the official code and keeps it.

Proxies: nn.Parameter `proxies` (num_classes, embedding_size), initialised randn/8 as the official
code (the scale does not change the loss, only the proxies' effective step size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.losses.mixins import WeightRegularizerMixin
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import loss_and_miner_utils as lmu

from ._checks import check_labels


class ProxyNCAPlusPlusLoss(WeightRegularizerMixin, BaseMetricLossFunction):
    """ProxyNCA++: softmax over all proxies of -||x^ - p^||^2 / T, cross-entropy on the true one.

    Args:
        num_classes: number of proxies; labels must be in [0, num_classes).
        embedding_size: proxy dimension.
        temperature: T (official 1/9, i.e. scale sqrt(9) = 3 on both sides).
        **kwargs: pml's (distance, reducer, weight_regularizer, weight_init_func, ...). With an
            inverted distance (a similarity such as CosineSimilarity) the logits are sim / T.
    """

    def __init__(self, num_classes, embedding_size, temperature=1 / 9, **kwargs):
        super().__init__(**kwargs)
        if not temperature > 0:
            raise ValueError(f"ProxyNCAPlusPlusLoss: temperature must be > 0, got {temperature}")
        self.num_classes = num_classes
        self.embedding_size = embedding_size
        self.temperature = temperature
        self.proxies = torch.nn.Parameter(torch.empty(num_classes, embedding_size))
        self.weight_init_func(self.proxies)
        self.add_to_recordable_attributes(
            list_of_names=["num_classes", "embedding_size", "temperature"], is_stat=False
        )

    def cast_types(self, dtype, device):
        self.proxies.data = c_f.to_device(self.proxies.data, device=device, dtype=dtype)

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        check_labels(labels, self.num_classes, type(self).__name__)
        dtype, device = embeddings.dtype, embeddings.device
        self.cast_types(dtype, device)
        miner_weights = lmu.convert_to_weights(indices_tuple, labels, dtype=dtype)
        logits = self.get_logits(embeddings)
        # cross_entropy = -log_softmax at the target: the official one-hot NLL, without the
        # underflow a log(softmax) has at small temperatures.
        losses = F.cross_entropy(logits, labels, reduction="none") * miner_weights
        loss_dict = {
            "loss": {
                "losses": losses,
                "indices": c_f.torch_arange_from_size(embeddings),
                "reduction_type": "element",
            }
        }
        self.add_weight_regularization_to_loss_dict(loss_dict, self.proxies)
        return loss_dict

    def get_logits(self, embeddings):
        """(batch, num_classes) logits: -distance / T (or similarity / T)."""
        mat = self.distance(embeddings, self.proxies)
        if not self.distance.is_inverted:
            mat = -mat
        return mat / self.temperature

    def get_default_distance(self):
        return LpDistance(power=2)  # normalize_embeddings=True: squared distance of unit vectors

    def get_default_weight_init_func(self):
        return c_f.TorchInitWrapper(torch.nn.init.normal_, std=1 / 8)
