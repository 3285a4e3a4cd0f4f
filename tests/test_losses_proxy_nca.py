"""ProxyNCA: the log-softmax form against a float64 loop reference, and pml's underflow that the
`proxy_nca` MLRC baseline keeps (docs/losses_proxy_nca.md)."""

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from losses import ProxyNCALogSoftmaxLoss, ProxySynthesisLoss, build_loss
from conftest import DTYPES, TOL, assert_close, m_per_class_labels, make_batch, unit

C, D = 10, 16


def ref_proxy_nca(X, labels, P, scale):
    """mean_i [ -log( exp(-s d_iy) / sum_c exp(-s d_ic) ) ], d = ||x^ - p^||^2, written out with
    a max shift per sample (float64 loops)."""
    total = 0.0
    for i, y in enumerate(labels.tolist()):
        x = unit(X[i])
        logits = [-scale * torch.sum((x - unit(P[c])) ** 2) for c in range(P.shape[0])]
        top = max(float(v.detach()) for v in logits)
        log_z = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total + (log_z - logits[y])
    return total / len(labels)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.01, 1.0, 10.0, 100.0])
def test_log_softmax_form_matches_reference(dtype, scale):
    labels = m_per_class_labels([0, 3, 7], 4)
    X, P = make_batch(labels, C, seed=3, near=0.5)
    loss = ProxyNCALogSoftmaxLoss(C, D, softmax_scale=scale).to(dtype)
    with torch.no_grad():
        loss.proxies.copy_(P.detach().to(dtype))
    x = X.detach().to(dtype).requires_grad_()
    value = loss(x, labels)
    value.backward()
    ref = ref_proxy_nca(X, labels, P, scale)
    rgx, rgp = torch.autograd.grad(ref, (X, P))
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4 * max(1, scale))
    assert_close(value, ref, tol)
    assert_close(x.grad, rgx, tol)
    assert_close(loss.proxies.grad, rgp, tol)


def test_equals_pml_where_pml_does_not_underflow():
    labels = m_per_class_labels([1, 2, 5], 4)
    X, P = make_batch(labels, C, seed=8, near=0.3)
    ours, theirs = ProxyNCALogSoftmaxLoss(C, D, softmax_scale=10.0), pml_losses.ProxyNCALoss(
        C, D, softmax_scale=10.0)
    with torch.no_grad():
        ours.proxies.copy_(P.detach())
        theirs.proxies.copy_(P.detach())
    x = X.detach().float()
    assert_close(ours(x, labels), theirs(x, labels), TOL[torch.float32])


def underflow_batch():
    """Samples 0-2 sit ON another class's proxy and opposite their own (d^2 = 0 vs ~4: positive
    probability ~exp(-400) underflows at scale 100); sample 3 sits near its own proxy."""
    P = torch.eye(C, D)
    labels = torch.tensor([0, 1, 2, 3])
    x = P[[5, 6, 7, 3]] - 0.999 * P[[0, 1, 2, 9]] * torch.tensor([[1.0], [1.0], [1.0], [0.01]])
    return x, labels, P


def test_pml_proxy_nca_drops_underflowing_samples_and_ours_does_not():
    """What the `proxy_nca` MLRC baseline keeps (pml 2.9.0 = MLRC's v0.9.92 nca_computation):
    at scale 100 the underflowing samples are dropped and the mean runs over the one left. The
    log-softmax form keeps all four."""
    x, labels, P = underflow_batch()
    pml_loss = pml_losses.ProxyNCALoss(C, D, softmax_scale=100.0)
    ours = ProxyNCALogSoftmaxLoss(C, D, softmax_scale=100.0)
    with torch.no_grad():
        pml_loss.proxies.copy_(P)
        ours.proxies.copy_(P)
    kept_only = ref_proxy_nca(x[3:].double(), labels[3:], P.double(), 100.0)
    assert math.isclose(float(pml_loss(x, labels)), float(kept_only), rel_tol=1e-4, abs_tol=1e-6)
    expected = ref_proxy_nca(x.double(), labels, P.double(), 100.0)
    assert float(expected) > 200 > 1 > float(kept_only)
    xr = x.clone().requires_grad_()
    value = ours(xr, labels)
    value.backward()
    assert math.isclose(float(value), float(expected), rel_tol=1e-5)
    assert torch.isfinite(xr.grad).all() and torch.isfinite(ours.proxies.grad).all()


def test_registry_keeps_pml_for_mlrc_and_log_softmax_for_proxy_synthesis():
    assert type(build_loss("proxy_nca", C, D)) is pml_losses.ProxyNCALoss
    assert type(build_loss("proxy_nca_log_softmax", C, D)) is ProxyNCALogSoftmaxLoss
    ps = build_loss("proxy_synthesis_proxy_nca", C, D)
    assert isinstance(ps, ProxySynthesisLoss) and type(ps.base_loss) is ProxyNCALogSoftmaxLoss


def test_samples_without_positive_reference_are_excluded_like_pml():
    """NCALoss use (embeddings as references): a singleton class has no positive."""
    from losses.proxy_nca_log_softmax import ProxyNCALogSoftmaxLoss as L
    loss = L(C, D, softmax_scale=1.0)
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 0, 1, 1, 2])
    out = loss.nca_computation(x, x, labels, labels, None)["loss"]
    assert out["indices"].tolist() == [0, 1, 2, 3] and torch.isfinite(out["losses"]).all()
