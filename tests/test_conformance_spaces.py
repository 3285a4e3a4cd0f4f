"""Search spaces per (loss, data set) pinned against MLRC's published Ax plots.

Every MLRC range below was read from powerful-benchmarker v0.9.33 docs/papers/mlrc_plots/
{cub,cars,sop}_<loss>.html (the default runs): bounds = ends of the model grid Ax drew, scale =
that grid's spacing (linspace / logspace), cross-checked with the 50 trial values in the file.
"""

import io

import pytest
import torch

from harness.datasets import DATASETS as HARNESS_DATASETS
from losses import LOSSES, build_loss, get_loss_spec
from losses.registry import (DATASETS, MLRC_DATASETS, PROXY_SYNTHESIS_BASES,
                             PROXY_SYNTHESIS_WRAPS, SearchParam)
from conftest import m_per_class_labels

PLOTS = "powerful-benchmarker v0.9.33 docs/papers/mlrc_plots/"
PREFIX = {"cub200": "cub", "cars196": "cars", "sop": "sop"}
LIN, LOG = False, True

# (loss, data set) -> {dimension: (low, high, log)}; MLRC data sets only.
MLRC = {}
for d in MLRC_DATASETS:
    MLRC["proxy_nca", d] = {"softmax_scale": (0.01, 100, LIN)}
    MLRC["normalized_softmax", d] = {"temperature": (0.01, 100, LOG)}
    MLRC["cosface", d] = {"margin": (0, 1, LIN), "scale": (0.01, 200, LIN)}
    MLRC["arcface", d] = {"margin": (0, 90, LIN), "scale": (0.01, 300 if d == "sop" else 200, LIN)}
    MLRC["soft_triple", d] = {
        "la": (0.01, 200 if d == "sop" else 100, LIN),
        "gamma": (1e-4 if d == "cub200" else 0.01, 100, LIN),
        "margin": (0, 1, LIN),
        **({} if d == "sop" else {"reg_weight": (0, 1, LIN)}),
    }
    MLRC["multi_similarity", d] = {"alpha": (0.001 if d == "cub200" else 0.01, 100, LIN),
                                   "beta": (0.01, 100, LIN), "base": (0, 1, LIN)}
    MLRC["contrastive", d] = {"pos_margin": (-0.2, 2, LIN), "neg_margin": (-0.2, 2, LIN)}
    MLRC["triplet", d] = {"margin": (-0.2, 2, LIN)}
    MLRC["proxy_nca_log_softmax", d] = MLRC["proxy_nca", d]  # MLRC's proxy_nca space

# Default space (In-Shop, glyphs): each dimension's range shared by most MLRC data sets.
DEFAULT = {
    "proxy_nca": MLRC["proxy_nca", "cars196"],
    "proxy_nca_log_softmax": MLRC["proxy_nca", "cars196"],
    "normalized_softmax": MLRC["normalized_softmax", "cars196"],
    "cosface": MLRC["cosface", "cars196"],
    "arcface": MLRC["arcface", "cars196"],
    "soft_triple": MLRC["soft_triple", "cars196"],
    "multi_similarity": MLRC["multi_similarity", "cars196"],
    "contrastive": MLRC["contrastive", "cars196"],
    "triplet": MLRC["triplet", "cars196"],
    # seed losses: harness choices (no searched range published), the same on every data set
    "proxy_anchor": {"alpha": (1, 128, LOG), "margin": (0, 0.5, LIN)},
    "proxy_nca_pp": {"temperature": (0.01, 1, LOG)},
    "proxy_isa": {"alpha": (1, 128, LOG), "margin": (0, 0.5, LIN), "k": (0, 1, LIN),
                  "lambda_": (0, 0.5, LIN), "h": (0.05, 1, LIN), "V": (10, 1000, LOG)},
}
PS = {"ps_alpha": (0.1, 2, LIN), "ps_mu": (0, 1, LIN)}


def expected_space(name, dataset):
    if name.startswith("proxy_synthesis_"):
        base = PROXY_SYNTHESIS_WRAPS[name[len("proxy_synthesis_"):]]
        return {**PS, **expected_space(base, dataset)}
    return MLRC.get((name, dataset), DEFAULT[name])


def test_dataset_names_are_the_harness_ones():
    assert set(DATASETS) == set(HARNESS_DATASETS)


def test_every_loss_has_a_pinned_space():
    bases = {n for n in LOSSES if not n.startswith("proxy_synthesis_")}
    assert bases == set(DEFAULT)
    assert {n for n in LOSSES if n.startswith("proxy_synthesis_")} == {
        f"proxy_synthesis_{b}" for b in PROXY_SYNTHESIS_BASES}


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_space_matches_mlrc_and_cites_its_source(name, dataset):
    space = get_loss_spec(name).space_for(dataset)
    expected = expected_space(name, dataset)
    assert list(space) == list(expected) or set(space) == set(expected)
    for key, (low, high, log) in expected.items():
        p = space[key]
        assert isinstance(p, SearchParam) and p.kind == "float", key
        assert (p.low, p.high, p.log) == (float(low), float(high), log), (key, p)
        assert p.source, f"{name} on {dataset}: {key} has no source"
    base = name.removeprefix("proxy_synthesis_")
    base = PROXY_SYNTHESIS_WRAPS.get(base, base)
    for key, p in space.items():
        if (base, dataset) in MLRC and key in MLRC[base, dataset]:
            plot = "proxy_nca" if base == "proxy_nca_log_softmax" else base
            assert p.source == f"{PLOTS}{PREFIX[dataset]}_{plot}.html", (key, p.source)
        elif base in ("proxy_anchor", "proxy_nca_pp", "proxy_isa") or key in PS:
            assert p.source.startswith("harness choice: ") and "official" in p.source
        if dataset not in MLRC_DATASETS and base not in ("proxy_anchor", "proxy_nca_pp",
                                                         "proxy_isa") and key not in PS:
            assert p.source.startswith(PLOTS) and f"{dataset} is not in MLRC" in p.source


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_default_space_is_the_in_shop_one(name):
    spec = get_loss_spec(name)
    strip = {k: (p.kind, p.low, p.high, p.log) for k, p in spec.search_space.items()}
    assert strip == {k: (p.kind, p.low, p.high, p.log)
                     for k, p in spec.space_for("inshop").items()}


def test_soft_triple_on_sop_fixes_reg_weight_to_mlrc_value():
    """MLRC searched no reg_weight on SOP (sop_soft_triple.html) and lists it as N/A
    (docs/papers/mlrc.md line 50): the regulariser is off there."""
    for name in ("soft_triple", "proxy_synthesis_soft_triple"):
        spec = get_loss_spec(name)
        fixed = spec.fixed_for("sop")
        assert set(fixed) == {"reg_weight"} and fixed["reg_weight"].value == 0.0
        assert "sop_soft_triple.html" in fixed["reg_weight"].source
        assert "mlrc.md" in fixed["reg_weight"].source
        assert spec.defaults_for("sop")["reg_weight"] == 0.0
        assert spec.defaults_for("cub200")["reg_weight"] == 0.2 == spec.defaults["reg_weight"]
        for d in ("cub200", "cars196", "inshop", "glyphs"):
            assert spec.fixed_for(d) == {}
    sop = build_loss("soft_triple", 10, 16, dataset="sop")
    assert sop.weight_regularizer is None
    assert build_loss("soft_triple", 10, 16, dataset="cub200").weight_regularizer is not None
    assert build_loss("soft_triple", 10, 16, dataset="sop", reg_weight=0.3).weight_reg_weight == 0.3


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_no_other_dimension_is_fixed_per_dataset(name):
    spec = get_loss_spec(name)
    for d in DATASETS:
        removed = set(spec.search_space) - set(spec.space_for(d))
        assert removed == set(spec.fixed_for(d)), (d, removed)


def test_unknown_dataset_is_a_clear_error():
    spec = get_loss_spec("arcface")
    for call in (spec.space_for, spec.fixed_for, spec.defaults_for):
        with pytest.raises(ValueError, match="cub200"):
            call("cub")
    with pytest.raises(ValueError, match="known"):
        build_loss("arcface", 10, 16, dataset="CUB200")


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_space_bounds_build_and_train_and_state_round_trips(name, dataset):
    """Each data set's space at its low and high corner builds a loss that trains one step, and
    whose state_dict survives torch.save + torch.load(weights_only=True) + load_state_dict."""
    spec = get_loss_spec(name)
    space = spec.space_for(dataset)
    labels = m_per_class_labels([0, 3, 7], 4)
    for corner in ("low", "high"):
        params = {k: getattr(p, corner) for k, p in space.items()}
        torch.manual_seed(0)
        loss = build_loss(name, 10, 16, dataset=dataset, **params)
        if hasattr(loss, "set_epoch"):
            loss.set_epoch(1)
        x = torch.randn(12, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        value = loss(x, labels)
        assert torch.isfinite(value), (corner, params)
        value.backward()
        buffer = io.BytesIO()
        torch.save(loss.state_dict(), buffer)
        buffer.seek(0)
        fresh = build_loss(name, 10, 16, dataset=dataset, **params)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
