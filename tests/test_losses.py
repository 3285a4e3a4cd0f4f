"""ProxyNCA++, Proxy Anchor and the SoftTriple center regulariser against slow references.

The references are written from the formulas with explicit Python loops over samples and proxies
in float64 (torch scalars, so autograd gives reference gradients too); they never call the
implementation (tests/conftest.py, shared with the other loss test files).
"""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import regularizers as pml_regularizers

from conftest import (BF16_TOL, DTYPES, assert_close, m_per_class_labels, make_batch,
                      ref_grads, ref_proxy_anchor, ref_proxy_nca_pp, run, unit)
from losses import ProxyAnchorLoss, ProxyISALoss, ProxyNCAPlusPlusLoss, ProxySynthesisLoss
from losses import SparseCentersRegularizer, build_loss
from losses.sparse_centers_regularizer import set_collapse_gradient

# -------------------------------------------------------------------------------------------
# Proxy Anchor
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha,margin", [(32.0, 0.1), (4.0, 0.4)])
def test_proxy_anchor_matches_reference(dtype, alpha, margin):
    C = 10
    labels = m_per_class_labels([2, 5, 7], 4)
    X, P = make_batch(labels, C)
    loss = ProxyAnchorLoss(C, 16, margin=margin, alpha=alpha).to(dtype)
    value, gx, gp = run(loss, X, P, labels, dtype)
    ref = ref_proxy_anchor(X, labels, P, alpha=alpha, delta=margin)
    rgx, rgp = ref_grads(ref, X, P)
    assert_close(value, ref, dtype)
    assert_close(gx, rgx, dtype)
    assert_close(gp, rgp, dtype)
    assert gp.abs().sum() > 0 and gx.abs().sum() > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_proxy_anchor_equals_pml(dtype):
    C = 10
    labels = m_per_class_labels([0, 3, 4], 4)
    X, P = make_batch(labels, C, seed=3)
    ours, theirs = ProxyAnchorLoss(C, 16).to(dtype), pml_losses.ProxyAnchorLoss(C, 16).to(dtype)
    v1, gx1, gp1 = run(ours, X, P, labels, dtype)
    v2, gx2, gp2 = run(theirs, X, P, labels, dtype)
    assert torch.equal(v1, v2)
    assert torch.equal(gx1, gx2) and torch.equal(gp1, gp2)


def test_proxy_anchor_bf16_autocast():
    C = 10
    labels = m_per_class_labels([1, 2, 3], 4)
    X, P = make_batch(labels, C, seed=4)
    loss = ProxyAnchorLoss(C, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, gx, gp = run(loss, X, P, labels, torch.float32)
    ref = ref_proxy_anchor(X, labels, P)
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
    assert_close(value, ref, BF16_TOL)


# -------------------------------------------------------------------------------------------
# ProxyNCA++
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1 / 9, 0.5])
def test_proxy_nca_pp_matches_reference(dtype, temperature):
    C = 10
    labels = m_per_class_labels([1, 4, 8], 4)
    X, P = make_batch(labels, C, seed=1)
    loss = ProxyNCAPlusPlusLoss(C, 16, temperature=temperature).to(dtype)
    value, gx, gp = run(loss, X, P, labels, dtype)
    ref = ref_proxy_nca_pp(X, labels, P, temperature)
    rgx, rgp = ref_grads(ref, X, P)
    assert_close(value, ref, dtype)
    assert_close(gx, rgx, dtype)
    assert_close(gp, rgp, dtype)


def test_proxy_nca_pp_official_scaled_form():
    """The official code: both sides normalised then scaled by s = sqrt(1/T), D = squared
    Euclidean, cross-entropy of softmax(-D) over all proxies."""
    C, T = 10, 1 / 9
    labels = m_per_class_labels([0, 1, 2], 4)
    X, P = make_batch(labels, C, seed=2)
    s = math.sqrt(1 / T)
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        d = [torch.sum((s * unit(X[i]) - s * unit(P[c])) ** 2) for c in range(C)]
        total = total - torch.log(torch.exp(-d[y]) / sum(torch.exp(-dc) for dc in d))
    loss = ProxyNCAPlusPlusLoss(C, 16, temperature=T).double()
    value, _, _ = run(loss, X, P, labels, torch.float64)
    assert_close(value, total / len(labels), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES)
def test_proxy_nca_pp_equals_pml_proxy_nca(dtype):
    C, T = 10, 1 / 9
    labels = m_per_class_labels([3, 6, 9], 4)
    X, P = make_batch(labels, C, seed=5)
    ours = ProxyNCAPlusPlusLoss(C, 16, temperature=T).to(dtype)
    theirs = pml_losses.ProxyNCALoss(C, 16, softmax_scale=1 / T).to(dtype)
    v1, gx1, gp1 = run(ours, X, P, labels, dtype)
    v2, gx2, gp2 = run(theirs, X, P, labels, dtype)
    assert_close(v1, v2, dtype)
    assert_close(gx1, gx2, dtype)
    assert_close(gp1, gp2, dtype)


def test_proxy_nca_pp_bf16_autocast():
    C = 10
    labels = m_per_class_labels([1, 2, 3], 4)
    X, P = make_batch(labels, C, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, gx, gp = run(ProxyNCAPlusPlusLoss(C, 16), X, P, labels, torch.float32)
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
    assert_close(value, ref_proxy_nca_pp(X, labels, P, 1 / 9), BF16_TOL)


def test_proxy_nca_pp_small_temperature_stays_finite():
    """At T=0.01 a positive probability can underflow; log_softmax keeps the sample."""
    C = 10
    labels = m_per_class_labels([0, 1, 2], 4)
    X, P = make_batch(labels, C, seed=7)
    value, _, _ = run(ProxyNCAPlusPlusLoss(C, 16, temperature=0.01), X, P, labels, torch.float32)
    ref = ref_proxy_nca_pp(X, labels, P, 0.01)
    assert torch.isfinite(value)
    assert_close(value, ref, dict(rtol=1e-4, atol=1e-3))


# -------------------------------------------------------------------------------------------
# Edge cases shared by our losses
# -------------------------------------------------------------------------------------------
def _our_losses(C):
    return {
        "proxy_anchor": ProxyAnchorLoss(C, 16),
        "proxy_nca_pp": ProxyNCAPlusPlusLoss(C, 16),
        "proxy_isa": ProxyISALoss(C, 16, memory_size=64),
        "proxy_synthesis": ProxySynthesisLoss(ProxyAnchorLoss(C, 16), generator=0),
    }


@pytest.mark.parametrize("name", ["proxy_anchor", "proxy_nca_pp", "proxy_isa", "proxy_synthesis"])
@pytest.mark.parametrize("bad", [[0, 1, 10, 2], [-1, 0, 1, 1], [0, 0, 57, 3]])
def test_out_of_range_labels_raise_clear_error(name, bad):
    C = 10
    loss = _our_losses(C)[name]
    with pytest.raises(ValueError) as info:
        loss(torch.randn(len(bad), 16), torch.tensor(bad))
    msg = str(info.value)
    assert f"[{min(bad)}, {max(bad)}]" in msg and str(C) in msg


def test_float_labels_raise_clear_error():
    with pytest.raises(ValueError, match="integer"):
        ProxyAnchorLoss(10, 16)(torch.randn(4, 16), torch.tensor([0.0, 1.0, 1.0, 2.0]))


@pytest.mark.parametrize(
    "labels",
    [[4, 4, 4, 4],  # one class in the batch
     [3, 3, 7, 7],  # most classes absent
     [0, 9],  # a batch of 2
     [5]],  # a batch of 1
    ids=["one-class", "absent-classes", "batch-of-2", "batch-of-1"],
)
def test_edge_batches_match_references(labels):
    C = 10
    labels = torch.tensor(labels)
    X, P = make_batch(labels, C, seed=8)
    pa, gx, gp = run(ProxyAnchorLoss(C, 16).double(), X, P, labels, torch.float64)
    ref = ref_proxy_anchor(X, labels, P)
    assert_close(pa, ref, torch.float64)
    assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
    isa, _, _ = run(ProxyISALoss(C, 16, memory_size=8).double(), X, P, labels, torch.float64)
    assert_close(isa, ref, torch.float64)
    nca, _, _ = run(ProxyNCAPlusPlusLoss(C, 16).double(), X, P, labels, torch.float64)
    assert_close(nca, ref_proxy_nca_pp(X, labels, P, 1 / 9), torch.float64)


# -------------------------------------------------------------------------------------------
# SoftTriple's center regulariser
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_centers_regularizer_equals_pml(dtype):
    C, K, D = 6, 4, 8
    w = torch.randn(C * K, D, dtype=dtype, generator=torch.Generator().manual_seed(0))
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    ours = SparseCentersRegularizer(K)(w1)
    theirs = pml_regularizers.SparseCentersRegularizer(C, K)(w2)
    ours.backward()
    theirs.backward()
    assert_close(ours, theirs, dtype)
    assert_close(w1.grad, w2.grad, dtype)


def test_sparse_centers_regularizer_reference():
    C, K, D = 3, 3, 5
    w = torch.randn(C * K, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    total = 0.0
    for c in range(C):
        for a in range(K):
            for b in range(a + 1, K):
                s = torch.dot(unit(w[c * K + a]), unit(w[c * K + b]))
                total = total + torch.sqrt(2.0 + 1e-300 - 2.0 * s)
    assert_close(SparseCentersRegularizer(K)(w), total / (C * K * (K - 1)), torch.float64)


class _ClampWithSubgradientOne(torch.autograd.Function):
    """torch.clamp(x, max=m) as PyTorch differentiated it before 2026: gradient 1 at the bound
    (pytorch/pytorch#184574)."""

    @staticmethod
    def forward(ctx, x, bound):
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(max=bound)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return torch.where(x <= ctx.bound, grad, torch.zeros_like(grad)), None


@pytest.mark.parametrize("clamp_subgradient_at_bound", [0, 1])
def test_sparse_centers_regulariser_survives_collapsed_centers(monkeypatch,
                                                               clamp_subgradient_at_bound):
    """Two same-class centers equal to the last bit (2 cos = 2 exactly, the square root's
    argument 0): the gradient is finite and the collapsed pair contributes none of it, whichever
    subgradient the installed torch gives clamp at its bound (1 before 2026, 0 since)."""
    C, K, D = 2, 3, 4
    w = torch.randn(C * K, D, generator=torch.Generator().manual_seed(2))
    # Class 0: centers 0 and 1 collapsed onto an axis, so that every way of normalising and
    # multiplying gives 2 cos = 2 exactly (the case that made NaN on torch 2.11).
    w[0] = w[1] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    if clamp_subgradient_at_bound:
        real_clamp = torch.clamp

        def clamp(t, min=None, max=None):
            if min is None and max is not None and t.requires_grad:
                return _ClampWithSubgradientOne.apply(t, max)
            return real_clamp(t, min=min, max=max)

        monkeypatch.setattr(torch, "clamp", clamp)
    w1 = w.clone().requires_grad_()
    SparseCentersRegularizer(K)(w1).backward()
    assert torch.isfinite(w1.grad).all()
    # Reference: the same sum without the collapsed pair (its derivative taken as 0), float64.
    w64 = w.double().requires_grad_()
    total = 0.0
    for c in range(C):
        for a in range(K):
            for b in range(a + 1, K):
                if (c, a, b) != (0, 0, 1):
                    s = torch.dot(unit(w64[c * K + a]), unit(w64[c * K + b]))
                    total = total + torch.sqrt(2.0 - 2.0 * s)
    (total / (C * K * (K - 1))).backward()
    assert_close(w1.grad.double(), w64.grad, torch.float32)


@pytest.mark.parametrize("collapsed", [False, True])
def test_mlrc_collapse_gradient_is_pml_under_the_clamp_of_2020(monkeypatch, collapsed):
    """collapse_gradient="mlrc" is pml's regulariser as MLRC ran it, under a torch.clamp with the
    subgradient 1 at its bound: the same gradient, finite or not entry for entry; at an exactly
    collapsed pair it is not finite (the centers turn NaN and MLRC scores the trial 0)."""
    C, K, D = 2, 3, 4
    w = torch.randn(C * K, D, generator=torch.Generator().manual_seed(2))
    if collapsed:
        w[0] = w[1] = torch.tensor([3.0, 0.0, 0.0, 0.0])
    real_clamp = torch.clamp

    def clamp(t, min=None, max=None):
        if min is None and max is not None and t.requires_grad:
            return _ClampWithSubgradientOne.apply(t, max)
        return real_clamp(t, min=min, max=max)

    ours, theirs = w.clone().requires_grad_(), w.clone().requires_grad_()
    SparseCentersRegularizer(K, collapse_gradient="mlrc")(ours).backward()
    monkeypatch.setattr(torch, "clamp", clamp)
    pml_regularizers.SparseCentersRegularizer(C, K)(theirs).backward()
    finite = torch.isfinite(ours.grad)
    assert torch.equal(finite, torch.isfinite(theirs.grad))
    assert bool(finite.all()) is not collapsed
    assert_close(ours.grad[finite], theirs.grad[finite], torch.float32)


def test_collapse_gradient_is_checked_and_set_on_every_regulariser():
    with pytest.raises(ValueError, match="expected one of mlrc, zero"):
        SparseCentersRegularizer(3, collapse_gradient="one")
    loss = build_loss("proxy_synthesis_soft_triple", 10, 16, reg_weight=0.2)
    # The registry builds MLRC's, as the harness's default (build_fold_modules applies the
    # study's); the class alone defaults to pml 2.9.0's under the pinned torch.
    assert [m.collapse_gradient for m in loss.modules()
            if isinstance(m, SparseCentersRegularizer)] == ["mlrc"]
    assert SparseCentersRegularizer(3).collapse_gradient == "zero"
    assert set_collapse_gradient(loss, "zero") == 1
    assert set_collapse_gradient(build_loss("proxy_anchor", 10, 16), "mlrc") == 0
    with pytest.raises(ValueError, match="collapse_gradient='one'"):
        set_collapse_gradient(loss, "one")


def test_soft_triple_reg_weight_adds_weighted_regulariser():
    C, D = 10, 16
    labels = m_per_class_labels([0, 1, 2], 4)
    X, _ = make_batch(labels, C)
    torch.manual_seed(0)
    with_reg = build_loss("soft_triple", C, D, reg_weight=0.7)
    without = build_loss("soft_triple", C, D, reg_weight=0.0)
    without.load_state_dict(with_reg.state_dict())
    x = X.detach().float()
    reg = SparseCentersRegularizer(10)(with_reg.fc.t())
    assert_close(with_reg(x, labels) - without(x, labels), 0.7 * reg, torch.float32)
