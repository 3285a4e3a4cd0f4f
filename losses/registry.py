"""Registry of the benchmarked losses: name -> builder, defaults, search spaces.

The harness builds every loss through
`build_loss(name, num_classes, embedding_size, dataset=<data set>, **params)`, type-checks user
overrides against `type(defaults[key])`, and searches `spec.space_for(<data set>)` (plus
`train.loss_lr` for entries with `has_parameters`; the proxy learning rate is not a loss
parameter). A dimension that a data set does not search takes the value in
`spec.fixed_for(<data set>)` (MLRC's, cited), which `build_loss(..., dataset=...)` applies.

Search spaces of the pml baselines are MLRC's (Musgrave et al. 2020) per data set, read from its
published Ax plots; every SearchParam's `source` names the plot file. In-Shop and the glyphs are
not in MLRC and get the default space (`search_space`: each dimension's range shared by most of
CUB / Cars / SOP). The seed losses' ranges are harness choices, said so in their `source`.

Proxy Synthesis entries (`proxy_synthesis_<base>`) are generated from their base's entry by
`_proxy_synthesis_spec`: the base's parameters and spaces (per data set) unchanged, plus
`ps_alpha` and `ps_mu` (prefixed because Proxy Anchor already has `alpha`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from pytorch_metric_learning import losses as pml_losses

from .proxy_anchor import ProxyAnchorLoss
from .proxy_isa import ProxyISALoss
from .proxy_nca_log_softmax import ProxyNCALogSoftmaxLoss
from .proxy_nca_pp import ProxyNCAPlusPlusLoss
from .proxy_synthesis import ProxySynthesisLoss
from .sparse_centers_regularizer import SparseCentersRegularizer


#: Data-set registry names (harness/datasets) that `LossSpec.space_for` knows. MLRC searched CUB,
#: Cars and SOP; In-Shop and the embedded glyphs are not in MLRC and get the default space.
DATASETS = ("cub200", "cars196", "sop", "inshop", "glyphs")
MLRC_DATASETS = ("cub200", "cars196", "sop")
#: MLRC's published Ax search plots, one per (data set, loss): the source of every MLRC range.
MLRC_PLOTS = "powerful-benchmarker v0.9.33 docs/papers/mlrc_plots/"
_PLOT_PREFIX = {"cub200": "cub", "cars196": "cars", "sop": "sop"}


@dataclass(frozen=True)
class SearchParam:
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    choices: tuple = ()
    source: str = ""  # where the range comes from (a file, a paper, or "harness choice: why")


@dataclass(frozen=True)
class FixedParam:
    """A parameter that a data set does not search, and the value used there instead."""

    value: Any
    source: str


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[..., torch.nn.Module]  # build(num_classes=, embedding_size=, dataset=None, **)
    defaults: dict[str, Any]  # every settable kwarg with its default value
    search_space: dict[str, SearchParam]  # the default space; keys are a subset of defaults
    has_parameters: bool  # learnable proxies / class weights (own optimizer, searched lr)
    reference: str  # paper / code the entry follows
    # Per data set, where it differs from the default: the whole space, and the fixed values of
    # the dimensions that data set does not search (MLRC removed some on SOP).
    dataset_spaces: dict[str, dict[str, SearchParam]] = field(default_factory=dict)
    dataset_fixed: dict[str, dict[str, FixedParam]] = field(default_factory=dict)

    def space_for(self, dataset: str) -> dict[str, SearchParam]:
        """The search space on `dataset` (a harness data-set name: see DATASETS)."""
        _check_dataset(dataset)
        if dataset in self.dataset_spaces:
            return dict(self.dataset_spaces[dataset])
        if dataset in MLRC_DATASETS:
            return dict(self.search_space)
        note = f"; {dataset} is not in MLRC: the default space"
        return {k: replace(p, source=p.source + note) for k, p in self.search_space.items()}

    def fixed_for(self, dataset: str) -> dict[str, FixedParam]:
        """Parameters `dataset` does not search although the default space does, with the value
        used there and its source."""
        _check_dataset(dataset)
        return dict(self.dataset_fixed.get(dataset, {}))

    def defaults_for(self, dataset: str | None) -> dict[str, Any]:
        """`defaults` with `dataset`'s fixed values (None: the plain defaults)."""
        if dataset is None:
            return dict(self.defaults)
        return {**self.defaults, **{k: f.value for k, f in self.fixed_for(dataset).items()}}


def _check_dataset(dataset: str) -> None:
    if dataset not in DATASETS:
        raise ValueError(f"unknown data set {dataset!r} for a loss search space; "
                         f"known: {', '.join(DATASETS)}")


def _float(low, high, log=False, source="") -> SearchParam:
    return SearchParam("float", float(low), float(high), log, source=source)


def _plot(datasets, loss: str) -> str:
    """The MLRC plot file(s) of `loss` on `datasets`, e.g. '.../{cub,cars}_proxy_nca.html'."""
    prefixes = [_PLOT_PREFIX[d] for d in datasets]
    joined = prefixes[0] if len(prefixes) == 1 else "{" + ",".join(prefixes) + "}"
    return f"{MLRC_PLOTS}{joined}_{loss}.html"


def _mlrc_spaces(plot_name: str, ranges: dict[str, dict[str, tuple | None]]):
    """MLRC's spaces of one loss from its ranges per data set: (low, high, log) tuples, None
    where that data set did not search the dimension. Returns (default space, per-data-set
    spaces that differ from it). The default holds each dimension's range shared by most of
    CUB / Cars / SOP, citing the plot files that show it; a data set's own entries cite its file.
    """
    dims = dict.fromkeys(k for d in MLRC_DATASETS for k in ranges[d])  # ordered, unique
    default = {}
    for key in dims:
        seen = [ranges[d].get(key) for d in MLRC_DATASETS]
        common = max((r for r in seen if r), key=seen.count)
        agreeing = [d for d, r in zip(MLRC_DATASETS, seen) if r == common]
        default[key] = _float(*common, source=_plot(agreeing, plot_name))
    per_dataset = {}
    for d in MLRC_DATASETS:
        space = {k: _float(*r, source=_plot([d], plot_name)) for k, r in ranges[d].items() if r}
        per_dataset[d] = space
    return default, per_dataset


def _spec(name, factory, defaults, space, has_parameters, reference, dataset_spaces=None,
          dataset_fixed=None) -> LossSpec:
    """A LossSpec whose build fills missing parameters from `defaults` (the one source of them)."""
    dataset_spaces, dataset_fixed = dataset_spaces or {}, dataset_fixed or {}
    for where, keys in [("search", space), *[(f"{d} search", s) for d, s in
                                               dataset_spaces.items()],
                        *[(f"{d} fixed", f) for d, f in dataset_fixed.items()]]:
        unknown = set(keys) - set(defaults)
        if unknown:
            raise AssertionError(f"{name}: {where} keys {sorted(unknown)} have no default")
    if "dataset" in defaults:
        raise AssertionError(f"{name}: 'dataset' is build()'s own keyword, not a parameter name")

    spec_holder = []

    def build(num_classes: int, embedding_size: int, dataset: str | None = None,
              **params) -> torch.nn.Module:
        base = spec_holder[0].defaults_for(dataset)
        _check_params(name, base, params)
        return factory(num_classes, embedding_size, **{**base, **params})

    build.__name__ = f"build_{name}"
    spec = LossSpec(name, build, dict(defaults), dict(space), has_parameters, reference,
                    {d: dict(s) for d, s in dataset_spaces.items()},
                    {d: dict(f) for d, f in dataset_fixed.items()})
    spec_holder.append(spec)
    return spec


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


def _proxy_nca_log_softmax(num_classes, embedding_size, softmax_scale):
    return ProxyNCALogSoftmaxLoss(num_classes, embedding_size, softmax_scale=softmax_scale)


def _proxy_nca_pp(num_classes, embedding_size, temperature):
    return ProxyNCAPlusPlusLoss(num_classes, embedding_size, temperature=temperature)


def _normalized_softmax(num_classes, embedding_size, temperature):
    return pml_losses.NormalizedSoftmaxLoss(num_classes, embedding_size, temperature=temperature)


def _soft_triple(num_classes, embedding_size, centers_per_class, la, gamma, margin, reg_weight):
    # pml 2.9's SoftTripleLoss has no reg_weight: the official center regulariser is pml's
    # weight regulariser (our memory-light equivalent of SparseCentersRegularizer) times
    # weight_reg_weight.
    # reg_weight 0 means no regulariser at all, as in the pml MLRC ran (`if self.reg_weight > 0`).
    # MLRC's gradient at an exactly collapsed pair of centers, as the harness's default
    # (train.center_collapse_gradient, which build_fold_modules applies).
    use_reg = centers_per_class > 1 and reg_weight > 0
    reg = SparseCentersRegularizer(centers_per_class, collapse_gradient="mlrc") if use_reg \
        else None
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


# MLRC's ranges, read from its Ax plots (powerful-benchmarker v0.9.33 docs/papers/mlrc_plots/
# {cub,cars,sop}_<loss>.html, the default runs): each dimension's bounds are the ends of the model
# grid Ax drew and its scale is that grid's spacing (linspace = linear, logspace = log; log axes
# also have their range in log10 units), checked against the 50 trial values in the same file.
# (low, high, log) per data set; a dimension missing on a data set was not searched there.
_LIN_0_1 = (0.0, 1.0, False)
_MLRC_RANGES = {
    "proxy_nca": {d: {"softmax_scale": (0.01, 100.0, False)} for d in MLRC_DATASETS},
    "proxy_nca_log_softmax": {d: {"softmax_scale": (0.01, 100.0, False)} for d in MLRC_DATASETS},
    "normalized_softmax": {d: {"temperature": (0.01, 100.0, True)} for d in MLRC_DATASETS},
    "cosface": {d: {"margin": _LIN_0_1, "scale": (0.01, 200.0, False)} for d in MLRC_DATASETS},
    "arcface": {
        "cub200": {"margin": (0.0, 90.0, False), "scale": (0.01, 200.0, False)},
        "cars196": {"margin": (0.0, 90.0, False), "scale": (0.01, 200.0, False)},
        "sop": {"margin": (0.0, 90.0, False), "scale": (0.01, 300.0, False)},
    },
    "soft_triple": {
        "cub200": {"la": (0.01, 100.0, False), "gamma": (1e-4, 100.0, False),
                   "margin": _LIN_0_1, "reg_weight": _LIN_0_1},
        "cars196": {"la": (0.01, 100.0, False), "gamma": (0.01, 100.0, False),
                    "margin": _LIN_0_1, "reg_weight": _LIN_0_1},
        "sop": {"la": (0.01, 200.0, False), "gamma": (0.01, 100.0, False), "margin": _LIN_0_1},
    },
    "multi_similarity": {
        "cub200": {"alpha": (0.001, 100.0, False), "beta": (0.01, 100.0, False),
                   "base": _LIN_0_1},
        "cars196": {"alpha": (0.01, 100.0, False), "beta": (0.01, 100.0, False),
                    "base": _LIN_0_1},
        "sop": {"alpha": (0.01, 100.0, False), "beta": (0.01, 100.0, False), "base": _LIN_0_1},
    },
    "contrastive": {d: {"pos_margin": (-0.2, 2.0, False), "neg_margin": (-0.2, 2.0, False)}
                    for d in MLRC_DATASETS},
    "triplet": {d: {"margin": (-0.2, 2.0, False)} for d in MLRC_DATASETS},
}

# SoftTriple on SOP: MLRC searched no reg_weight (sop_soft_triple.html has la, gamma, margin and
# the lr only) and its optimal-hyperparameter table gives SOP's reg_weight as "N/A"
# (powerful-benchmarker v0.9.33 docs/papers/mlrc.md, line 50). The pml SoftTripleLoss of that
# time computed the regulariser only `if self.reg_weight > 0` (pytorch-metric-learning c9797d1^
# losses/soft_triple_loss.py): "N/A" = regulariser off, reg_weight 0.
_SOFT_TRIPLE_SOP_FIXED = {"reg_weight": FixedParam(
    0.0, f"{MLRC_PLOTS}sop_soft_triple.html (no reg_weight dimension) and powerful-benchmarker "
         f"v0.9.33 docs/papers/mlrc.md line 50 (SOP reg_weight N/A): regulariser off")}


def _mlrc_spec(name, factory, defaults, has_parameters, reference, plot_name=None,
               dataset_fixed=None) -> LossSpec:
    default, per_dataset = _mlrc_spaces(plot_name or name, _MLRC_RANGES[name])
    return _spec(name, factory, defaults, default, has_parameters, reference, per_dataset,
                 dataset_fixed)


def _choice(why: str) -> str:
    return f"harness choice: {why}"


_PROXY_ANCHOR_DEFAULTS = {"alpha": 32.0, "margin": 0.1}
_PROXY_ANCHOR_SPACE = {
    "alpha": _float(1, 128, log=True, source=_choice(
        "no searched range published; log-uniform 2^0..2^7 around the official a=32 "
        "(tjddus9597/Proxy-Anchor-CVPR2020)")),
    "margin": _float(0, 0.5, source=_choice(
        "no searched range published; 0..0.5 around the official d=0.1 (cosine margin)")),
}

_BASE_SPECS = [
    _mlrc_spec("proxy_nca", _proxy_nca, {"softmax_scale": 10.0}, True,
               "Movshovitz-Attias et al. 2017 via pml ProxyNCALoss, kept as MLRC ran it (pml "
               "v0.9.92 nca_loss.py has the same softmax-then-drop-zeros form): at scale >= ~75 "
               "float32 underflow drops samples (2.3% at 100, loss 8.8 vs 11.4 log-softmax) and "
               "gives non-finite gradients in ~20% of batches (docs/losses_proxy_nca.md); "
               "default scale 10 as navervision/proxy-synthesis; MLRC space"),
    _mlrc_spec("proxy_nca_log_softmax", _proxy_nca_log_softmax, {"softmax_scale": 10.0}, True,
               "ProxyNCA as pml ProxyNCALoss but computed as a log-softmax (no dropped samples, "
               "finite gradients at any scale of the space): losses/proxy_nca_log_softmax.py, "
               "docs/losses_proxy_nca.md; the official Proxy Synthesis Proxy_NCA's form; not an "
               "MLRC baseline, MLRC's proxy_nca space", plot_name="proxy_nca"),
    _spec("proxy_nca_pp", _proxy_nca_pp, {"temperature": 1 / 9},
          {"temperature": _float(0.01, 1, log=True, source=_choice(
              "no searched range published; log-uniform 0.01..1 around the official T=1/9 "
              "(euwern/proxynca_pp)"))}, True,
          "Teh et al. ECCV 2020, euwern/proxynca_pp (T=1/9); losses/proxy_nca_pp.py"),
    _mlrc_spec("normalized_softmax", _normalized_softmax, {"temperature": 0.05}, True,
               "Zhai & Wu BMVC 2019 via pml NormalizedSoftmaxLoss; MLRC space"),
    _mlrc_spec("soft_triple", _soft_triple,
               {"centers_per_class": 10, "la": 20.0, "gamma": 0.1, "margin": 0.01,
                "reg_weight": 0.2}, True,
               "Qian et al. ICCV 2019 via pml SoftTripleLoss (+ center regulariser, tau=0.2); "
               "MLRC space (all linear; SOP: la up to 200, no reg_weight = regulariser off). "
               "centers_per_class 10 = the paper's K and pml's default; MLRC's value is not in "
               "its published files (unconfirmed)",
               dataset_fixed={"sop": _SOFT_TRIPLE_SOP_FIXED}),
    _mlrc_spec("cosface", _cosface, {"margin": 0.35, "scale": 64.0}, True,
               "Wang et al. CVPR 2018 via pml CosFaceLoss; MLRC space"),
    _mlrc_spec("arcface", _arcface, {"margin": 28.6, "scale": 64.0}, True,
               "Deng et al. CVPR 2019 via pml ArcFaceLoss (margin in degrees); MLRC space "
               "(SOP: scale up to 300)"),
    _mlrc_spec("multi_similarity", _multi_similarity, {"alpha": 2.0, "beta": 50.0, "base": 0.5},
               False, "Wang et al. CVPR 2019 via pml MultiSimilarityLoss (no miner); MLRC space "
               "(linear; CUB: alpha from 0.001)"),
    _mlrc_spec("contrastive", _contrastive, {"pos_margin": 0.0, "neg_margin": 1.0}, False,
               "Hadsell et al. CVPR 2006 via pml ContrastiveLoss (Euclidean); MLRC space"),
    _mlrc_spec("triplet", _triplet, {"margin": 0.05}, False,
               "Weinberger & Saul 2009 / Schroff et al. 2015 via pml TripletMarginLoss (all "
               "triplets); MLRC space"),
    _spec("proxy_anchor", _proxy_anchor, dict(_PROXY_ANCHOR_DEFAULTS), dict(_PROXY_ANCHOR_SPACE),
          True, "Kim et al. CVPR 2020, tjddus9597/Proxy-Anchor-CVPR2020; losses/proxy_anchor.py"),
    _spec("proxy_isa", _proxy_isa,
          {**_PROXY_ANCHOR_DEFAULTS, "V": 100.0, "h": 0.15, "k": 0.9, "lambda_": 0.1,
           "tau": 1.5, "memory_size": 55000, "memory_start_epoch": 2, "filter_start_epoch": 3,
           "weight_negatives_before_filter": True},
          {**_PROXY_ANCHOR_SPACE,
           "k": _float(0, 1, source=_choice(
               "no searched range published; the whole [0, 1] of k (official 0.9)")),
           "lambda_": _float(0, 0.5, source=_choice(
               "no searched range published; 0..0.5 around the official lambda=0.1")),
           "h": _float(0.05, 1, source=_choice(
               "no searched range published; 0.05..1 around the official h=0.15")),
           "V": _float(10, 1000, log=True, source=_choice(
               "no searched range published; log-uniform 10..1000 around the official V=100"))},
          True,
          "Li et al. MMAsia 2022, rioyokotalab/ProxyISA; losses/proxy_isa.py (deviations in "
          "its docstring)"),
]

#: Base losses that Proxy Synthesis wraps: registry entry `proxy_synthesis_<name>` each.
PROXY_SYNTHESIS_BASES = (
    "normalized_softmax", "proxy_anchor", "proxy_nca", "proxy_nca_pp", "cosface", "arcface",
    "soft_triple", "proxy_isa",
)
#: The registry entry each `proxy_synthesis_<name>` actually wraps, where it is not <name>:
#: Proxy Synthesis + ProxyNCA is the official code's log-softmax ProxyNCA
#: (navervision/proxy-synthesis loss/proxy_losses.py, Proxy_NCA: F.log_softmax), not pml's
#: underflowing form (docs/losses_proxy_nca.md).
PROXY_SYNTHESIS_WRAPS = {name: name for name in PROXY_SYNTHESIS_BASES}
PROXY_SYNTHESIS_WRAPS["proxy_nca"] = "proxy_nca_log_softmax"
_PS_DEFAULTS = {"ps_alpha": 0.4, "ps_mu": 1.0}
_PS_SPACE = {
    "ps_alpha": _float(0.1, 2, source=_choice(
        "no searched range published; 0.1..2 around the official alpha=0.4 "
        "(navervision/proxy-synthesis README)")),
    "ps_mu": _float(0, 1, source=_choice(
        "the whole domain of mu (synthetics per sample, mu <= 1 in the official "
        "proxy_synthesis); official 1.0")),
}


def _proxy_synthesis_spec(name: str, base: LossSpec) -> LossSpec:
    """`proxy_synthesis_<name>` around `base`: its parameters and spaces plus ps_alpha / ps_mu."""
    clash = set(base.defaults) & set(_PS_DEFAULTS)
    if clash:
        raise AssertionError(f"{base.name}: parameters {sorted(clash)} clash with Proxy Synthesis")

    def factory(num_classes, embedding_size, ps_alpha, ps_mu, **base_params):
        inner = base.build(num_classes=num_classes, embedding_size=embedding_size, **base_params)
        return ProxySynthesisLoss(inner, alpha=ps_alpha, mu=ps_mu)

    return _spec(
        f"proxy_synthesis_{name}", factory, {**_PS_DEFAULTS, **base.defaults},
        {**_PS_SPACE, **base.search_space}, True,
        f"Gu et al. AAAI 2021, navervision/proxy-synthesis (alpha 0.4, mu 1.0) around "
        f"{base.name}; losses/proxy_synthesis.py; the base's space per data set",
        {d: {**_PS_SPACE, **space} for d, space in base.dataset_spaces.items()},
        base.dataset_fixed,
    )


LOSSES: dict[str, LossSpec] = {spec.name: spec for spec in _BASE_SPECS}
LOSSES.update({f"proxy_synthesis_{b}": _proxy_synthesis_spec(b, LOSSES[PROXY_SYNTHESIS_WRAPS[b]])
               for b in PROXY_SYNTHESIS_BASES})


#: The entries of this file; register_external_loss never replaces one of them.
BUILTIN_LOSSES = frozenset(LOSSES)
#: Sizes of the one instance register_external_loss builds to see whether the loss has
#: parameters (and that its class accepts the arguments) before anything trains.
_PROBE_CLASSES, _PROBE_EMBEDDING = 4, 8


def register_external_loss(name: str, cls: type, defaults: dict[str, Any],
                           space: dict[str, SearchParam], reference: str) -> LossSpec:
    """Register a pml-style loss class from the user's own code as loss `name` (`defaults`:
    every parameter the harness may set, `space`: the searched ones, one range for every data
    set). The class is called with `num_classes` / `embedding_size` keyword arguments when its
    __init__ names them, plus the parameters. One instance is built now: a class that rejects
    the arguments fails here, and `has_parameters` (own optimizer, searched train.loss_lr) is
    whether that instance has trainable parameters. Registering `name` again replaces the
    earlier external entry (ValueError for a built-in name or an unusable class)."""
    if name in BUILTIN_LOSSES:
        raise ValueError(f"loss name {name!r} is a built-in loss; choose another name")
    if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
        raise ValueError(f"{cls!r} is not a torch.nn.Module subclass (a pml-style loss: "
                         f"forward(embeddings, labels))")
    accepted = inspect.signature(cls).parameters
    sizes = [k for k in ("num_classes", "embedding_size") if k in accepted]

    def factory(num_classes, embedding_size, **params):
        given = {"num_classes": num_classes, "embedding_size": embedding_size}
        return cls(**{k: given[k] for k in sizes}, **params)

    try:
        probe = factory(_PROBE_CLASSES, _PROBE_EMBEDDING, **defaults)
    except Exception as e:  # the user's class: any exception means it rejects the arguments
        shown = {**{k: f"<{k}>" for k in sizes}, **defaults}
        raise ValueError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())}) "
                         f"failed: {type(e).__name__}: {e}") from None
    has_parameters = any(p.requires_grad for p in probe.parameters())
    spec = _spec(name, factory, defaults, space, has_parameters, reference)
    LOSSES[name] = spec
    return spec


def get_loss_spec(name: str) -> LossSpec:
    """The registry entry `name`; ValueError listing the known names otherwise."""
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}; known losses: {', '.join(sorted(LOSSES))}"
        ) from None


def build_loss(name: str, num_classes: int, embedding_size: int, dataset: str | None = None,
               **params) -> torch.nn.Module:
    """Build registry entry `name` with its defaults (on `dataset`: `spec.defaults_for(dataset)`,
    i.e. with the values MLRC fixed there) overridden by `params`.

    An unknown parameter raises ValueError naming it and the allowed ones; so does an unknown
    data set.
    """
    spec = get_loss_spec(name)
    return spec.build(num_classes=num_classes, embedding_size=embedding_size, dataset=dataset,
                      **params)
