"""Registry of the benchmarked losses: name -> builder, defaults, search space.

The harness builds every loss through `build_loss(name, num_classes, embedding_size, **params)`,
type-checks user overrides against `type(defaults[key])`, and searches `search_space` (plus
`train.loss_lr` for entries with `has_parameters`; the proxy learning rate is not a loss
parameter). Search spaces of the pml baselines are MLRC's (Musgrave et al. 2020); new entries
use the ranges noted in their `reference`.

Proxy Synthesis entries (`proxy_synthesis_<base>`) are generated from their base's entry by
`_proxy_synthesis_spec`: the base's parameters and space unchanged, plus `ps_alpha` and `ps_mu`
(prefixed because Proxy Anchor already has `alpha`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pytorch_metric_learning import losses as pml_losses

from .proxy_anchor import ProxyAnchorLoss
from .proxy_isa import ProxyISALoss
from .proxy_nca_pp import ProxyNCAPlusPlusLoss
from .proxy_synthesis import ProxySynthesisLoss
from .sparse_centers_regularizer import SparseCentersRegularizer


@dataclass(frozen=True)
class SearchParam:
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[..., torch.nn.Module]  # build(num_classes=int, embedding_size=int, **params)
    defaults: dict[str, Any]  # every settable kwarg with its default value
    search_space: dict[str, SearchParam]  # keys are a subset of defaults
    has_parameters: bool  # learnable proxies / class weights (own optimizer, searched lr)
    reference: str  # paper / code the entry follows, one line


def _float(low, high, log=False) -> SearchParam:
    return SearchParam("float", float(low), float(high), log)


def _spec(name, factory, defaults, space, has_parameters, reference) -> LossSpec:
    """A LossSpec whose build fills missing parameters from `defaults` (the one source of them)."""
    unknown = set(space) - set(defaults)
    if unknown:
        raise AssertionError(f"{name}: search keys {sorted(unknown)} have no default")

    def build(num_classes: int, embedding_size: int, **params) -> torch.nn.Module:
        _check_params(name, defaults, params)
        return factory(num_classes, embedding_size, **{**defaults, **params})

    build.__name__ = f"build_{name}"
    return LossSpec(name, build, dict(defaults), dict(space), has_parameters, reference)


def _check_params(name: str, defaults: dict[str, Any], params: dict[str, Any]) -> None:
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(
            f"loss {name!r} has no parameter(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(sorted(defaults)) or '(none)'}"
        )


# -------------------------------------------------------------------------------------------
# Factories (num_classes, embedding_size, **all params)
# -------------------------------------------------------------------------------------------
def _proxy_nca(num_classes, embedding_size, softmax_scale):
    return pml_losses.ProxyNCALoss(num_classes, embedding_size, softmax_scale=softmax_scale)


def _proxy_nca_pp(num_classes, embedding_size, temperature):
    return ProxyNCAPlusPlusLoss(num_classes, embedding_size, temperature=temperature)


def _normalized_softmax(num_classes, embedding_size, temperature):
    return pml_losses.NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=temperature)


def _soft_triple(num_classes, embedding_size, centers_per_class, la, gamma, margin, reg_weight):
    # pml 2.9's SoftTripleLoss has no reg_weight: the official center regulariser is pml's
    # weight regulariser (our memory-light equivalent of SparseCentersRegularizer) times
    # weight_reg_weight.
    reg = SparseCentersRegularizer(centers_per_class) if centers_per_class > 1 else None
    return pml_losses.SoftTripleLoss(
        num_classes, embedding_size, centers_per_class=centers_per_class, la=la, gamma=gamma,
        margin=margin, weight_regularizer=reg, weight_reg_weight=reg_weight,
    )


def _cosface(num_classes, embedding_size, margin, scale):
    return pml_losses.CosFaceLoss(num_classes, embedding_size, margin=margin, scale=scale)


def _arcface(num_classes, embedding_size, margin, scale):
    return pml_losses.ArcFaceLoss(num_classes, embedding_size, margin=margin, scale=scale)


def _multi_similarity(_num_classes, _embedding_size, alpha, beta, base):
    return pml_losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)


def _contrastive(_num_classes, _embedding_size, pos_margin, neg_margin):
    return pml_losses.ContrastiveLoss(pos_margin=pos_margin, neg_margin=neg_margin)


def _triplet(_num_classes, _embedding_size, margin):
    return pml_losses.TripletMarginLoss(margin=margin)


def _proxy_anchor(num_classes, embedding_size, margin, alpha):
    return ProxyAnchorLoss(num_classes, embedding_size, margin=margin, alpha=alpha)


def _proxy_isa(num_classes, embedding_size, **params):
    return ProxyISALoss(num_classes, embedding_size, **params)


_PROXY_ANCHOR_DEFAULTS = {"alpha": 32.0, "margin": 0.1}
_PROXY_ANCHOR_SPACE = {"alpha": _float(1, 128, log=True), "margin": _float(0, 0.5)}

_BASE_SPECS = [
    _spec("proxy_nca", _proxy_nca, {"softmax_scale": 10.0},
          {"softmax_scale": _float(0.01, 100, log=True)}, True,
          "Movshovitz-Attias et al. 2017 via pml ProxyNCALoss; default scale 10 as "
          "navervision/proxy-synthesis; MLRC space"),
    _spec("proxy_nca_pp", _proxy_nca_pp, {"temperature": 1 / 9},
          {"temperature": _float(0.01, 1, log=True)}, True,
          "Teh et al. ECCV 2020, euwern/proxynca_pp (T=1/9); losses/proxy_nca_pp.py"),
    _spec("normalized_softmax", _normalized_softmax, {"temperature": 0.05},
          {"temperature": _float(0.01, 100, log=True)}, True,
          "Zhai & Wu BMVC 2019 via pml NormalizedSoftmaxLoss; MLRC space"),
    _spec("soft_triple", _soft_triple,
          {"centers_per_class": 10, "la": 20.0, "gamma": 0.1, "margin": 0.01, "reg_weight": 0.2},
          {"la": _float(0.01, 100, log=True), "gamma": _float(0.01, 100, log=True),
           "margin": _float(0, 1), "reg_weight": _float(0, 1)}, True,
          "Qian et al. ICCV 2019 via pml SoftTripleLoss (+ center regulariser, tau=0.2); MLRC "
          "ranges, la/gamma log-uniform (our reading)"),
    _spec("cosface", _cosface, {"margin": 0.35, "scale": 64.0},
          {"margin": _float(0, 1), "scale": _float(0.01, 200)}, True,
          "Wang et al. CVPR 2018 via pml CosFaceLoss; MLRC space"),
    _spec("arcface", _arcface, {"margin": 28.6, "scale": 64.0},
          {"margin": _float(0, 90), "scale": _float(0.01, 200)}, True,
          "Deng et al. CVPR 2019 via pml ArcFaceLoss (margin in degrees); MLRC space"),
    _spec("multi_similarity", _multi_similarity, {"alpha": 2.0, "beta": 50.0, "base": 0.5},
          {"alpha": _float(0.01, 100, log=True), "beta": _float(0.01, 100, log=True),
           "base": _float(0, 1)}, False,
          "Wang et al. CVPR 2019 via pml MultiSimilarityLoss (no miner); MLRC space"),
    _spec("contrastive", _contrastive, {"pos_margin": 0.0, "neg_margin": 1.0},
          {"pos_margin": _float(0, 1), "neg_margin": _float(0, 2)}, False,
          "Hadsell et al. CVPR 2006 via pml ContrastiveLoss (Euclidean); MLRC space"),
    _spec("triplet", _triplet, {"margin": 0.05}, {"margin": _float(0, 1)}, False,
          "Weinberger & Saul 2009 / Schroff et al. 2015 via pml TripletMarginLoss (all "
          "triplets); MLRC space"),
    _spec("proxy_anchor", _proxy_anchor, dict(_PROXY_ANCHOR_DEFAULTS), dict(_PROXY_ANCHOR_SPACE),
          True, "Kim et al. CVPR 2020, tjddus9597/Proxy-Anchor-CVPR2020; losses/proxy_anchor.py"),
    _spec("proxy_isa", _proxy_isa,
          {**_PROXY_ANCHOR_DEFAULTS, "V": 100.0, "h": 0.15, "k": 0.9, "lambda_": 0.1,
           "tau": 1.5, "memory_size": 55000, "memory_start_epoch": 2, "filter_start_epoch": 3,
           "weight_negatives_before_filter": True},
          {**_PROXY_ANCHOR_SPACE, "k": _float(0, 1), "lambda_": _float(0, 0.5),
           "h": _float(0.05, 1), "V": _float(10, 1000, log=True)}, True,
          "Li et al. MMAsia 2022, rioyokotalab/ProxyISA; losses/proxy_isa.py (deviations in "
          "its docstring)"),
]

#: Base losses that Proxy Synthesis wraps (one registry entry each).
PROXY_SYNTHESIS_BASES = (
    "normalized_softmax", "proxy_anchor", "proxy_nca", "proxy_nca_pp", "cosface", "arcface",
    "soft_triple", "proxy_isa",
)
_PS_DEFAULTS = {"ps_alpha": 0.4, "ps_mu": 1.0}
_PS_SPACE = {"ps_alpha": _float(0.1, 2), "ps_mu": _float(0, 1)}


def _proxy_synthesis_spec(base: LossSpec) -> LossSpec:
    """`proxy_synthesis_<base>`: the base's parameters and space plus ps_alpha / ps_mu."""
    clash = set(base.defaults) & set(_PS_DEFAULTS)
    if clash:
        raise AssertionError(f"{base.name}: parameters {sorted(clash)} clash with Proxy Synthesis")

    def factory(num_classes, embedding_size, ps_alpha, ps_mu, **base_params):
        inner = base.build(num_classes=num_classes, embedding_size=embedding_size, **base_params)
        return ProxySynthesisLoss(inner, alpha=ps_alpha, mu=ps_mu)

    return _spec(
        f"proxy_synthesis_{base.name}", factory, {**_PS_DEFAULTS, **base.defaults},
        {**_PS_SPACE, **base.search_space}, True,
        f"Gu et al. AAAI 2021, navervision/proxy-synthesis (alpha 0.4, mu 1.0) around "
        f"{base.name}; losses/proxy_synthesis.py",
    )


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _BASE_SPECS}
LOSSES.update(
    {(ps := _proxy_synthesis_spec(LOSSES[b])).name: ps for b in PROXY_SYNTHESIS_BASES}
)


def get_loss_spec(name: str) -> LossSpec:
    """The registry entry `name`; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


def build_loss(name: str, num_classes: int, embedding_size: int, **params) -> torch.nn.Module:
    """Build registry entry `name` with its defaults overridden by `params`.

    An unknown parameter raises ValueError naming it and the allowed ones.
    """
    spec = get_loss_spec(name)
    _check_params(name, spec.defaults, params)
    return spec.build(num_classes=num_classes, embedding_size=embedding_size, **params)
