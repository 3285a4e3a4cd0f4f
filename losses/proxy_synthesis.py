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

Pairing (the official code pairs i with i-1 and relies on its loader to put different classes
side by side; an m-per-class sampler puts SAME-class samples side by side). Ours, independent of
the batch order: sort the batch by label (stable) and pair the sample at sorted position t with
the one at (t + m) mod B, m = the size of the largest class in the batch. A class occupies a
contiguous run of at most m sorted positions, and the partner is m (or B - m >= m when it wraps)
positions away, so when m <= B / 2 every pair has different labels and, as with the official
roll, every sample is an anchor once and a partner once. When one class holds more than half of
the batch (m > B / 2) the anchors of that class whose partner would share their label get, round
robin, partners from the other classes instead. A batch with a single class (or a single sample)
cannot make a different-class pair: the call then returns the base loss unchanged.

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
  * lambda: drawn from a torch.Generator (CPU) with a Marsaglia-Tsang Gamma sampler (lambda =
    G1 / (G1 + G2)), not numpy's global RNG. `generator` = an int seed, a torch.Generator, or
    None (seeded once from torch's global RNG, so torch.manual_seed makes runs repeatable). Its
    state is saved in state_dict (extra state). The last draw is in `last_lambda`.
  * Real rows are passed to the base as they are (the base L2-normalises them itself); the
    synthetic rows are normalised. For every supported base this equals the official call on
    normalised inputs; it is also why losses that use the norms (SphereFace / plain
    LargeMarginSoftmax) are not supported.
  * mu = 0 (or n = 0), fewer than 2 classes in the batch, or eval mode: the base loss is called
    directly (exactly the wrapped loss). Official: no synthesis when mu = 0; it has no eval path.
  * The base's weight regulariser (e.g. SoftTriple's) sees the real class weights only: it is
    a property of the base's parameters, not of the synthetic classes.
  * Miner indices_tuple are passed through; they refer to the real samples (pml gives samples
    that no tuple mentions - here the synthetics - weight 0 in losses that use miner weights).
  * `set_epoch(e)` is forwarded to the base (Proxy-ISA needs it). With Proxy-ISA as the base,
    pairs that involve a synthetic sample or proxy get weight 1 and never update its state.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

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
def different_class_partners(labels: torch.Tensor) -> torch.Tensor | None:
    """For each sample i a partner j(i) with labels[j] != labels[i]; None if < 2 classes.

    Sorted-roll pairing (module docstring): a permutation when no class has more than half of the
    batch, with a round-robin fix for the majority class otherwise.
    """
    n = labels.numel()
    if n < 2:
        return None
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
    if classes.numel() < 2:
        return None
    shift = int(counts.max())
    partner = torch.empty_like(order)
    partner[order] = order[(torch.arange(n, device=labels.device) + shift) % n]
    if 2 * shift > n:  # a majority class: some of its samples point into itself
        clash = (labels[partner] == labels).nonzero().squeeze(1)
        majority = classes[counts.argmax()]
        others = (labels != majority).nonzero().squeeze(1)
        partner[clash] = others[torch.arange(clash.numel(), device=labels.device) % others.numel()]
    return partner


def _log_gamma_sample(shape: float, generator: torch.Generator) -> float:
    """log of one Gamma(shape, 1) draw (Marsaglia & Tsang 2000), using only `generator`."""

    def uniform() -> float:  # in (0, 1): log() below never sees 0
        return max(torch.rand((), generator=generator, dtype=torch.float64).item(), 1e-300)

    boost = 0.0
    if shape < 1.0:  # Gamma(a) = Gamma(a + 1) * U^(1/a)
        boost = math.log(uniform()) / shape
        shape += 1.0
    d = shape - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    while True:
        x = torch.randn((), generator=generator, dtype=torch.float64).item()
        v = (1.0 + c * x) ** 3
        if v <= 0.0:
            continue
        if math.log(uniform()) < 0.5 * x * x + d - d * v + d * math.log(v):
            return math.log(d * v) + boost


def sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One Beta(alpha, alpha) draw, G1 / (G1 + G2), computed from log-Gammas (no underflow)."""
    diff = _log_gamma_sample(alpha, generator) - _log_gamma_sample(alpha, generator)
    return 0.5 * (1.0 + math.tanh(0.5 * diff))  # = 1 / (1 + exp(-diff))


def _make_generator(generator) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        if generator.device.type != "cpu":
            raise ValueError("ProxySynthesisLoss: the generator must be a CPU torch.Generator")
        return generator
    if generator is None:  # follow torch's global seed (torch.manual_seed -> repeatable)
        generator = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise TypeError(f"ProxySynthesisLoss: generator must be None, an int seed or a "
                        f"torch.Generator, got {generator!r}")
    return torch.Generator(device="cpu").manual_seed(generator)


# -------------------------------------------------------------------------------------------
# The loss
# -------------------------------------------------------------------------------------------
class ProxySynthesisLoss(BaseMetricLossFunction):
    """Proxy Synthesis around a proxy loss (see the module docstring).

    Args:
        base_loss: the wrapped proxy loss (a submodule: its proxies are this loss's parameters).
        alpha: Beta(alpha, alpha) parameter of lambda (official 0.4).
        mu: synthetics per batch sample, 0 <= mu <= 1 (official 1.0).
        generator: int seed, CPU torch.Generator, or None (seeded from torch's global RNG).
        **kwargs: pml's (reducer, embedding_regularizer, ...) applied around the base's value.
    """

    def __init__(self, base_loss, alpha=0.4, mu=1.0, generator=None, **kwargs):
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
        self.add_to_recordable_attributes(list_of_names=["alpha", "mu"], is_stat=False)

    # The generator's state travels with state_dict, so a resumed run draws the same lambdas.
    def get_extra_state(self):
        return {"generator_state": self.generator.get_state()}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator_state"])

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
        partners = different_class_partners(labels) if (n_syn > 0 and self.training) else None
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

    @staticmethod
    def _as_loss_dict(value):
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}
