"""Proxy-based deep-metric-learning losses as pytorch-metric-learning 2.9.0 loss classes.

Each is a `BaseMetricLossFunction`: `loss(embeddings, labels)` in any pml training loop, with the
proxies in an nn.Parameter `proxies` (num_classes, embedding_size) to give to their own optimizer.

* ProxyNCAPlusPlusLoss  (losses/proxy_nca_pp.py)   ProxyNCA++, Teh et al. 2020
* ProxyAnchorLoss       (losses/proxy_anchor.py)   Proxy Anchor, Kim et al. 2020
* ProxySynthesisLoss    (losses/proxy_synthesis.py) Proxy Synthesis, Gu et al. 2021 (a wrapper)
* ProxyISALoss          (losses/proxy_isa.py)      Proxy-ISA, Li et al. 2022
* ProxyNCALogSoftmaxLoss (losses/proxy_nca_log_softmax.py) pml's ProxyNCA without underflow
* SparseCentersRegularizer (losses/sparse_centers_regularizer.py) SoftTriple's center
  regulariser with O(C K^2) memory
* losses/registry.py: names -> builders, defaults and search spaces for the harness.
"""

from .proxy_anchor import ProxyAnchorLoss
from .proxy_isa import ProxyISALoss
from .proxy_nca_log_softmax import ProxyNCALogSoftmaxLoss
from .proxy_nca_pp import ProxyNCAPlusPlusLoss
from .proxy_synthesis import ProxySynthesisLoss
from .registry import LOSSES, FixedParam, LossSpec, SearchParam, build_loss, get_loss_spec
from .sparse_centers_regularizer import SparseCentersRegularizer

__all__ = [
    "ProxyAnchorLoss",
    "ProxyISALoss",
    "ProxyNCALogSoftmaxLoss",
    "ProxyNCAPlusPlusLoss",
    "ProxySynthesisLoss",
    "SparseCentersRegularizer",
    "LOSSES",
    "FixedParam",
    "LossSpec",
    "SearchParam",
    "build_loss",
    "get_loss_spec",
]
