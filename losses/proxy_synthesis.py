"""Proxy Synthesis (Gu, Ko, Kim, AAAI 2021; navervision/proxy-synthesis, `loss/proxy_losses.py`).

A wrapper around a proxy loss. Per call, as the official `proxy_synthesis` function:

  1. L2-normalise embeddings e_i and class proxies p_c.
  2. Draw ONE lambda ~ Beta(alpha, alpha).
  3. Pair sample i with a partner j(i) of a DIFFERENT class and build
         synthetic embedding  e~_i = lambda e_i + (1 - lambda) e_j(i)
         synthetic proxy      p~_i = lambda p_{y_i} + (1 - lambda) p_{y_j(i)}
     with a NEW label C + k for the k-th synthetic (C = number of real classes).
  4. Keep n = int(B (1 + mu)) - B synthetics (the first n anchors in batch order, as the
     official truncation), re-normalise them (no detach: gradients flow to e and p).
  5. Run the base loss on [embeddings; e~] with labels [y; C..C+n-1] and proxies [P; p~]: real
     samples see the synthetic proxies as negatives and vice versa.

Pairing (the official code pairs i with i-1 and relies on its loader, n_instance=1, to put
different classes side by side, so every synthetic point gets its own (class, partner class)
pair). An m-per-class sampler delivers m samples per class, and pairing whole classes (all m
samples of class a with class b) makes the synthetic proxies of a batch only B/m distinct
vectors copied under m labels each: each synthetic row then has m identical "negatives" of its
own (loss floor log m under a softmax base) and every synthetic negative counts m times. Ours,
`different_class_partners`, independent of the batch order: put the K classes of the batch on a
cycle (in an order drawn from the loss's RNG, so no fixed label neighbourhood is favoured), and
give the t-th sample (batch order) of a class the class 1 + (t mod (K - 1)) steps ahead on the
cycle; the partner sample is taken round robin among that class's samples. So a class with n
samples gets min(n, K - 1) distinct partner classes - the most any pairing can give - never its
own class, and MLRC's 8 x 4 batch gets 32 distinct ordered pairs, every sample being a partner
exactly once, as with the official roll. A batch with a single class (or a single sample) has no
different-class pair: the call then returns the base loss unchanged, counts it in
`num_unsynthesised_batches` and warns once (an m-per-class sampler never yields one unless the
data set has a single class).

Base losses (an adapter per type says where the class weights live, how to read them as
(C, K, D) "rows" - K centers per class - and which attributes hold the class count, which are
enlarged to C + n for the duration of the call):
  pml ProxyNCALoss        `proxies` (C, D)            proxy_labels (= arange(C))
  ProxyNCAPlusPlusLoss    `proxies` (C, D)            num_classes
  pml ProxyAnchorLoss     `proxies` (C, D)            num_classes   (also ours and ProxyISALoss)
  pml NormalizedSoftmax   `W` (D, C)                  -
  pml CosFaceLoss         `W` (D, C)                  num_classes
  pml ArcFaceLoss         `W` (D, C)                  num_classes
  pml SoftTripleLoss      `fc` (D, C*K), class-major  num_classes; each center k of a synthetic
                          class is lambda p_{y_i,k} + (1 - lambda) p_{y_j,k}, re-normalised.
The base runs through torch.func.functional_call with its weight parameter replaced by the
enlarged one, so gradients reach the real parameter through both its real and synthetic rows.

Choices and differences from the official code:
  * Pairing: described above (official: neighbour i-1 in loader order).
  * lambda: numpy's Beta sampler on the loss's own numpy Generator (`Generator.beta`), not
    numpy's global RNG (official `np.random.beta`). `generator` = an int seed, a
    numpy.random.Generator, or None (seeded once from torch's global RNG, so torch.manual_seed
    makes runs repeatable). The same Generator orders the classes for the pairing. Its state is
    saved in state_dict (extra state; plain dicts and ints, loadable with weights_only=True).
    The last draw is in `last_lambda`, the last partners in `last_partners`.
  * distance / reducer: the base loss computes and reduces the value, so the wrapper refuses
    its own `distance=` / `reducer=` (ValueError: give them to the base loss).
    `embedding_regularizer` is honoured (on the real embeddings).
  * Real rows are passed to the base as they are (the base L2-normalises them itself); the
    synthetic rows are normalised. For every supported base this equals the official call on
    normalised inputs; it is also why losses that use the norms (SphereFace / plain
    LargeMarginSoftmax) are not supported.
  * mu = 0 (or n = 0), fewer than 2 classes in the batch (warned, counted), or eval mode: the
    base loss is called directly (exactly the wrapped loss). Official: no synthesis when
    mu = 0; it has no eval path.
  * The base's weight regulariser (e.g. SoftTriple's) sees the real class weights only: it is
    a property of the base's parameters, not of the synthetic classes.
  * Miner indices_tuple are passed through; they refer to the real samples (pml gives samples
    that no tuple mentions - here the synthetics - weight 0 in losses that use miner weights).
  * `set_epoch(e)` is forwarded to the base (Proxy-ISA needs it). With Proxy-ISA as the base,
    pairs that involve a synthetic sample or proxy get weight 1 and never update its state.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as c_f
from torch.func import functional_call

from ._checks import check_labels
from .proxy_nca_pp import ProxyNCAPlusPlusLoss


# -------------------------------------------------------------------------------------------
# Adapters: where each base loss keeps its class weights
# -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxyAdapter:
    """How Proxy Synthesis reads and enlarges one base-loss type's class weights."""

    types: tuple[type, ...]
    param: str  # name of the nn.Parameter holding the class weights
    to_rows: Callable[[torch.Tensor, torch.nn.Module], torch.Tensor]  # param -> (C, K, D)
    from_rows: Callable[[torch.Tensor], torch.Tensor]  # (C', K, D) -> param layout
    reg_input: Callable[[torch.Tensor], torch.Tensor]  # param -> what the base regularises
    count_attrs: tuple[str, ...] = ()  # int attributes equal to the number of classes
    label_attrs: tuple[str, ...] = ()  # tensor attributes equal to arange(num_classes)


def _rows_first(p, _base):  # (C, D) -> (C, 1, D)
    return p.unsqueeze(1)


def _rows_first_back(rows):
    return rows.reshape(-1, rows.shape[-1])


def _columns(w, base):  # (D, C*K) -> (C, K, D)
    k = getattr(base, "centers_per_class", 1)
    return w.t().reshape(-1, k, w.shape[0])


def _columns_back(rows):
    return rows.reshape(-1, rows.shape[-1]).t()


def _identity(p):
    return p


def _transpose(w):
    return w.t()


_ROWS = dict(to_rows=_rows_first, from_rows=_rows_first_back, reg_input=_identity)
_COLS = dict(to_rows=_columns, from_rows=_columns_back, reg_input=_transpose)

# Order matters only for subclasses: the first matching entry wins.
ADAPTERS: tuple[ProxyAdapter, ...] = (
    ProxyAdapter((pml_losses.ProxyAnchorLoss,), "proxies", **_ROWS, count_attrs=("num_classes",)),
    # pml's ProxyNCALoss reads its class count from proxy_labels (its num_classes is unused)
    ProxyAdapter((pml_losses.ProxyNCALoss,), "proxies", **_ROWS, label_attrs=("proxy_labels",)),
    ProxyAdapter((ProxyNCAPlusPlusLoss,), "proxies", **_ROWS, count_attrs=("num_classes",)),
    ProxyAdapter((pml_losses.NormalizedSoftmaxLoss,), "W", **_COLS),
    ProxyAdapter((pml_losses.CosFaceLoss, pml_losses.ArcFaceLoss), "W", **_COLS,
                 count_attrs=("num_classes",)),
    ProxyAdapter((pml_losses.SoftTripleLoss,), "fc", **_COLS, count_attrs=("num_classes",)),
)

SUPPORTED_BASES = (
    "pytorch_metric_learning ProxyNCALoss, ProxyAnchorLoss, NormalizedSoftmaxLoss, CosFaceLoss, "
    "ArcFaceLoss, SoftTripleLoss; losses.ProxyNCAPlusPlusLoss, losses.ProxyAnchorLoss, "
    "losses.ProxyISALoss (and their subclasses)"
)


def adapter_for(base_loss: torch.nn.Module) -> ProxyAdapter:
    """The adapter of `base_loss`'s type, or TypeError naming the supported types."""
    for adapter in ADAPTERS:
        if isinstance(base_loss, adapter.types):
            return adapter
    raise TypeError(
        f"ProxySynthesisLoss cannot wrap {type(base_loss).__module__}.{type(base_loss).__name__}: "
        f"it needs a proxy loss whose class weights it knows how to enlarge. Supported: "
        f"{SUPPORTED_BASES}."
    )


class _RealWeightsRegularizer(torch.nn.Module):
    """Stands in for the base's weight regulariser during the enlarged call: it ignores the
    enlarged weights it is given and regularises the real ones, as the base alone would."""

    def __init__(self, regularizer: torch.nn.Module, real_weights: torch.Tensor):
        super().__init__()
        self.regularizer = regularizer
        self.real_weights = real_weights

    def forward(self, _enlarged_weights):
        return self.regularizer(self.real_weights)


@contextmanager
def _enlarged(base, adapter: ProxyAdapter, num_classes: int, real_param: torch.Tensor):
    """Temporarily make `base` believe it has `num_classes` classes."""
    saved = {}
    try:
        for name in adapter.count_attrs:
            saved[name] = getattr(base, name)
            setattr(base, name, num_classes)
        for name in adapter.label_attrs:
            old = getattr(base, name)
            saved[name] = old
            setattr(base, name, torch.arange(num_classes, device=real_param.device))
        reg = getattr(base, "weight_regularizer", None)
        if reg is not None:
            saved["weight_regularizer"] = reg
            base.weight_regularizer = _RealWeightsRegularizer(reg, adapter.reg_input(real_param))
        yield
    finally:
        for name, value in saved.items():
            setattr(base, name, value)


# -------------------------------------------------------------------------------------------
# Pairing and lambda
# -------------------------------------------------------------------------------------------
def different_class_partners(labels: torch.Tensor,
                             rng: np.random.Generator | None = None) -> torch.Tensor | None:
    """For each sample i a partner j(i) of a different class; None if the batch has < 2 classes.

    Class-cycle pairing (module docstring): the t-th sample of a class (batch order) is paired
    with the class 1 + (t mod (K - 1)) steps ahead on a cycle of the batch's K classes, partner
    samples taken round robin within each class. Maximises the number of distinct ordered
    (class, partner class) pairs: sum over classes of min(count, K - 1). The cycle follows the
    sorted labels, or an order drawn from `rng` (one permutation draw) when given.
    """
    y = labels.detach().cpu().numpy()
    classes, cls, counts = np.unique(y, return_inverse=True, return_counts=True)
    num_classes = classes.size
    if num_classes < 2:
        return None
    cycle = rng.permutation(num_classes) if rng is not None else np.arange(num_classes)
    position = np.empty(num_classes, dtype=np.int64)
    position[cycle] = np.arange(num_classes)
    by_class = np.argsort(cls, kind="stable")  # sample indices grouped by class, batch order
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each class starts in by_class
    nth = _rank_within_groups(cls, by_class, first, counts)  # t: index of i among its class
    steps = 1 + nth % (num_classes - 1)
    partner_cls = cycle[(position[cls] + steps) % num_classes]
    # round robin: the q-th request (batch order) to class c gets c's sample q mod count_c
    requests = np.bincount(partner_cls, minlength=num_classes)
    request_first = np.concatenate([[0], np.cumsum(requests)[:-1]])
    q = _rank_within_groups(partner_cls, np.argsort(partner_cls, kind="stable"), request_first,
                            requests)
    partner = by_class[first[partner_cls] + q % counts[partner_cls]]
    return torch.as_tensor(partner, dtype=torch.long, device=labels.device)


def _rank_within_groups(group, grouped_order, group_first, group_sizes) -> np.ndarray:
    """For each element, its index among the elements of its group (in `grouped_order`)."""
    rank = np.empty(group.size, dtype=np.int64)
    rank[grouped_order] = np.arange(group.size) - np.repeat(group_first, group_sizes)
    return rank


def sample_beta(alpha: float, rng: np.random.Generator) -> float:
    """One Beta(alpha, alpha) draw from `rng` (numpy's sampler)."""
    return float(rng.beta(alpha, alpha))


def _make_generator(generator) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None:  # follow torch's global seed (torch.manual_seed -> repeatable)
        generator = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(generator, bool) or not isinstance(generator, (int, np.integer)):
        raise TypeError(f"ProxySynthesisLoss: generator must be None, an int seed or a "
                        f"numpy.random.Generator, got {generator!r}")
    return np.random.default_rng(int(generator))


# -------------------------------------------------------------------------------------------
# The loss
# -------------------------------------------------------------------------------------------
class ProxySynthesisLoss(BaseMetricLossFunction):
    """Proxy Synthesis around a proxy loss (see the module docstring).

    Args:
        base_loss: the wrapped proxy loss (a submodule: its proxies are this loss's parameters).
        alpha: Beta(alpha, alpha) parameter of lambda (official 0.4).
        mu: synthetics per batch sample, 0 <= mu <= 1 (official 1.0).
        generator: int seed, numpy.random.Generator, or None (seeded from torch's global RNG).
        **kwargs: pml's embedding_regularizer / embedding_reg_weight / collect_stats. Not
            distance or reducer: the base loss computes and reduces the value (ValueError).
    """

    def __init__(self, base_loss, alpha=0.4, mu=1.0, generator=None, **kwargs):
        refused = sorted(k for k in ("distance", "reducer") if kwargs.get(k) is not None)
        if refused:
            raise ValueError(
                f"ProxySynthesisLoss: {' and '.join(refused)} would be ignored - the wrapped "
                f"{type(base_loss).__name__} computes and reduces the loss. Give "
                f"{', '.join(f'{k}=' for k in refused)} to the base loss instead, e.g. "
                f"ProxySynthesisLoss({type(base_loss).__name__}(..., {refused[0]}=...)).")
        super().__init__(**kwargs)
        self.adapter = adapter_for(base_loss)
        if not alpha > 0:
            raise ValueError(f"ProxySynthesisLoss: alpha must be > 0, got {alpha}")
        if not 0.0 <= mu <= 1.0:
            raise ValueError(f"ProxySynthesisLoss: mu must be in [0, 1], got {mu}")
        self.base_loss = base_loss
        self.alpha = float(alpha)
        self.mu = float(mu)
        self.generator = _make_generator(generator)
        self.last_lambda: float | None = None
        self.last_partners: torch.Tensor | None = None
        self.num_unsynthesised_batches = 0  # training batches with < 2 classes (no pair)
        self.add_to_recordable_attributes(list_of_names=["alpha", "mu"], is_stat=False)

    # The generator's state travels with state_dict, so a resumed run draws the same lambdas.
    def get_extra_state(self):
        # numpy's bit-generator state: a dict of str and int (torch.load(weights_only=True) ok)
        return {"numpy_generator_state": copy.deepcopy(self.generator.bit_generator.state)}

    def set_extra_state(self, state):
        if "numpy_generator_state" not in state:
            raise ValueError(
                "ProxySynthesisLoss: this state_dict holds no numpy generator state (keys "
                f"{sorted(state)}); it was saved by an older version whose lambdas came from a "
                "torch.Generator and cannot be continued. Start the loss from a fresh seed.")
        self.generator.bit_generator.state = copy.deepcopy(state["numpy_generator_state"])

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.base_loss, "set_epoch"):
            self.base_loss.set_epoch(epoch)

    def num_synthetic(self, batch_size: int) -> int:
        """Official count: int(B * (1 + mu)) - B."""
        return max(0, min(batch_size, int(batch_size * (1.0 + self.mu)) - batch_size))

    def compute_loss(self, embeddings, labels, indices_tuple, ref_emb, ref_labels):
        c_f.labels_required(labels)
        c_f.ref_not_supported(embeddings, labels, ref_emb, ref_labels)
        base, adapter = self.base_loss, self.adapter
        dtype, device = embeddings.dtype, embeddings.device
        if hasattr(base, "cast_types"):
            base.cast_types(dtype, device)  # cast the real weights first, as the base would
        param = getattr(base, adapter.param)
        rows = adapter.to_rows(param, base)  # (C, K, D)
        num_classes = rows.shape[0]
        check_labels(labels, num_classes, type(self).__name__)

        n_syn = self.num_synthetic(labels.numel())
        partners = None
        if n_syn > 0 and self.training:
            partners = different_class_partners(labels, self.generator)
            if partners is None:
                self._note_single_class_batch(labels)
        self.last_partners = partners
        if partners is None:
            self.last_lambda = None
            return self._as_loss_dict(base(embeddings, labels, indices_tuple))

        lam = sample_beta(self.alpha, self.generator)
        self.last_lambda = lam
        anchors = torch.arange(n_syn, device=device)
        mates = partners[:n_syn]
        e = F.normalize(embeddings, p=2, dim=1)
        syn_emb = F.normalize(lam * e[anchors] + (1.0 - lam) * e[mates], p=2, dim=1)
        rows_hat = F.normalize(rows, p=2, dim=-1)
        syn_rows = F.normalize(
            lam * rows_hat[labels[anchors]] + (1.0 - lam) * rows_hat[labels[mates]], p=2, dim=-1
        )
        big_param = adapter.from_rows(torch.cat([rows, syn_rows.to(rows.dtype)], dim=0))
        big_emb = torch.cat([embeddings, syn_emb.to(embeddings.dtype)], dim=0)
        syn_labels = torch.arange(num_classes, num_classes + n_syn, device=device,
                                  dtype=labels.dtype)
        big_labels = torch.cat([labels, syn_labels], dim=0)
        with _enlarged(base, adapter, num_classes + n_syn, param):
            value = functional_call(
                base, {adapter.param: big_param}, args=(big_emb, big_labels),
                kwargs={"indices_tuple": indices_tuple},
            )
        return self._as_loss_dict(value)

    def _note_single_class_batch(self, labels):
        self.num_unsynthesised_batches += 1
        if self.num_unsynthesised_batches == 1:
            warnings.warn(
                f"ProxySynthesisLoss: a training batch of {labels.numel()} sample(s) has a "
                f"single class, so no different-class pair exists; this batch gets the base "
                f"loss without synthetics. Counted in num_unsynthesised_batches; warned once.",
                RuntimeWarning, stacklevel=4)

    @staticmethod
    def _as_loss_dict(value):
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}
