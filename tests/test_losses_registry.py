"""Every registry entry builds, trains one step and samples its search space."""

import dataclasses
import math

import pytest
import torch

from losses import LOSSES, ProxySynthesisLoss, build_loss, get_loss_spec
from losses.registry import (DATASETS, PROXY_SYNTHESIS_BASES, PROXY_SYNTHESIS_WRAPS, LossSpec,
                             SearchParam)
from conftest import m_per_class_labels

NUM_CLASSES, EMBEDDING_SIZE = 10, 16
REQUIRED = [
    "proxy_nca", "proxy_nca_pp", "normalized_softmax", "soft_triple", "cosface", "arcface",
    "multi_similarity", "contrastive", "triplet", "proxy_anchor", "proxy_isa",
    "proxy_synthesis_normalized_softmax", "proxy_synthesis_proxy_anchor",
    "proxy_synthesis_proxy_nca", "proxy_synthesis_proxy_nca_pp", "proxy_synthesis_cosface",
    "proxy_synthesis_arcface", "proxy_synthesis_soft_triple", "proxy_synthesis_proxy_isa",
]


def one_step(loss: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    """A batch of 12 = 3 classes x 4: finite loss, every loss parameter gets a finite grad."""
    g = torch.Generator().manual_seed(seed)
    labels = m_per_class_labels([0, 3, 7], 4)
    x = torch.randn(len(labels), EMBEDDING_SIZE, generator=g, requires_grad=True)
    value = loss(x, labels)
    assert value.dim() == 0 and torch.isfinite(value), value
    value.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in loss.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
    return value


def test_required_names_present():
    assert set(REQUIRED) <= set(LOSSES)
    assert {f"proxy_synthesis_{b}" for b in PROXY_SYNTHESIS_BASES} <= set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_entry_builds_with_defaults_and_trains(name):
    spec = get_loss_spec(name)
    assert isinstance(spec, LossSpec) and spec.name == name and spec.reference
    torch.manual_seed(0)
    loss = spec.build(num_classes=NUM_CLASSES, embedding_size=EMBEDDING_SIZE)
    assert isinstance(loss, torch.nn.Module)
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(1)
    one_step(loss)
    assert spec.has_parameters == any(True for _ in loss.parameters())
    if name.startswith("proxy_synthesis_"):
        assert isinstance(loss, ProxySynthesisLoss)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_search_space_is_valid_and_its_bounds_build(name):
    spec = get_loss_spec(name)
    assert set(spec.search_space) <= set(spec.defaults)
    settings = [{}]
    for key, p in spec.search_space.items():
        assert isinstance(p, SearchParam) and p.kind in ("float", "int", "categorical")
        default = spec.defaults[key]
        if p.kind == "categorical":
            assert p.choices and all(isinstance(c, type(default)) for c in p.choices)
            settings += [{key: c} for c in p.choices]
            continue
        assert p.low is not None and p.high is not None and p.low < p.high
        assert not p.log or p.low > 0
        # the harness checks values against type(default): a float dimension needs a float default
        assert isinstance(default, float if p.kind == "float" else int), (key, default)
        cast = float if p.kind == "float" else int
        settings += [{key: cast(p.low)}, {key: cast(p.high)}]
    lows = {k: p.low for k, p in spec.search_space.items() if p.kind != "categorical"}
    highs = {k: p.high for k, p in spec.search_space.items() if p.kind != "categorical"}
    settings += [lows, highs]
    for i, params in enumerate(settings):
        torch.manual_seed(i)
        loss = build_loss(name, NUM_CLASSES, EMBEDDING_SIZE, **params)
        one_step(loss, seed=i)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_defaults_are_plain_values(name):
    for key, value in get_loss_spec(name).defaults.items():
        assert isinstance(value, (bool, int, float, str)), (key, value)
        if isinstance(value, float):
            assert math.isfinite(value)


def test_proxy_synthesis_entries_extend_their_base():
    for base in PROXY_SYNTHESIS_BASES:
        b = get_loss_spec(PROXY_SYNTHESIS_WRAPS[base])
        ps = get_loss_spec(f"proxy_synthesis_{base}")
        assert ps.defaults == {"ps_alpha": 0.4, "ps_mu": 1.0, **b.defaults}
        base_part = {k: v for k, v in ps.search_space.items() if not k.startswith("ps_")}
        assert base_part == b.search_space
        for d in DATASETS:  # the base's space on every data set, fixed values included
            base_part = {k: v for k, v in ps.space_for(d).items() if not k.startswith("ps_")}
            assert base_part == b.space_for(d)
            assert ps.fixed_for(d) == b.fixed_for(d)
        assert ps.search_space["ps_alpha"].low == 0.1 and ps.search_space["ps_alpha"].high == 2.0
        assert ps.search_space["ps_mu"].low == 0.0 and ps.search_space["ps_mu"].high == 1.0
        assert ps.has_parameters


def test_overrides_reach_the_loss():
    loss = build_loss("proxy_synthesis_normalized_softmax", 5, 8, temperature=0.043478,
                      ps_alpha=0.7, ps_mu=0.5)
    assert loss.alpha == 0.7 and loss.mu == 0.5 and loss.base_loss.temperature == 0.043478
    isa = build_loss("proxy_isa", 5, 8, k=0.4, memory_size=64, filter_start_epoch=5)
    assert isa.k == 0.4 and isa.queue_labels.numel() == 64 and int(isa.filter_start_epoch) == 5


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as info:
        get_loss_spec("proxy_ancor")
    assert "proxy_anchor" in str(info.value) and "triplet" in str(info.value)
    with pytest.raises(ValueError):
        build_loss("nope", 10, 16)


def test_unknown_parameter_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError) as info:
        build_loss("proxy_anchor", 10, 16, margn=0.2)
    msg = str(info.value)
    assert "margn" in msg and "margin" in msg and "alpha" in msg
    with pytest.raises(ValueError, match="margn"):
        get_loss_spec("proxy_anchor").build(num_classes=10, embedding_size=16, margn=0.2)


def test_specs_are_frozen():
    spec = get_loss_spec("proxy_anchor")
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.name = "x"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_entry_runs_under_bf16_autocast(name):
    """The harness computes embeddings under autocast; every loss must accept that context."""
    torch.manual_seed(0)
    loss = build_loss(name, NUM_CLASSES, EMBEDDING_SIZE)
    reference = one_step(loss, seed=3).detach()
    torch.manual_seed(0)
    loss = build_loss(name, NUM_CLASSES, EMBEDDING_SIZE)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = one_step(loss, seed=3)
    # bf16 matmuls: ~3 significant digits, amplified by scales up to 64 in the logits
    torch.testing.assert_close(value.detach().float(), reference.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_dataset_space_is_valid(name):
    """Cheap structural checks on each data set's space (tests/test_conformance_spaces.py
    trains at its corners)."""
    spec = get_loss_spec(name)
    for d in DATASETS:
        space = spec.space_for(d)
        assert set(space) <= set(spec.defaults) and set(space) <= set(spec.search_space)
        for key, p in space.items():
            assert p.kind == "float" and p.low < p.high and (not p.log or p.low > 0), (d, key)
            assert isinstance(spec.defaults_for(d)[key], float), (d, key)
            assert p.source, (d, key)
