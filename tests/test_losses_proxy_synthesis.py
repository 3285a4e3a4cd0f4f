"""Proxy Synthesis: pairing, lambda, mu=0 identity, loop references of the enlarged loss."""

import copy
import io
import itertools

import numpy as np
import pytest
import scipy.stats
import torch
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import reducers as pml_reducers
from pytorch_metric_learning import regularizers as pml_regularizers

from losses import ProxyAnchorLoss, ProxyISALoss, ProxyNCALogSoftmaxLoss, ProxyNCAPlusPlusLoss
from losses import ProxySynthesisLoss
from losses import SparseCentersRegularizer
from losses.proxy_synthesis import different_class_partners, sample_beta
from conftest import (
    BF16_TOL, TOL, assert_close, m_per_class_labels, make_batch, ref_proxy_anchor, unit,
)

C, D = 10, 16

# Every supported base: (factory(num_classes), name of the class-weight parameter, centers/class)
BASES = {
    "pml_proxy_nca": (lambda c: pml_losses.ProxyNCALoss(c, D, softmax_scale=9.0), "proxies", 1),
    "proxy_nca_log_softmax": (lambda c: ProxyNCALogSoftmaxLoss(c, D, softmax_scale=9.0),
                              "proxies", 1),
    "proxy_nca_pp": (lambda c: ProxyNCAPlusPlusLoss(c, D), "proxies", 1),
    "pml_normalized_softmax": (lambda c: pml_losses.NormalizedSoftmaxLoss(c, D), "W", 1),
    "pml_cosface": (lambda c: pml_losses.CosFaceLoss(c, D), "W", 1),
    "pml_arcface": (lambda c: pml_losses.ArcFaceLoss(c, D), "W", 1),
    "pml_soft_triple": (lambda c: pml_losses.SoftTripleLoss(c, D, centers_per_class=3), "fc", 3),
    "pml_proxy_anchor": (lambda c: pml_losses.ProxyAnchorLoss(c, D), "proxies", 1),
    "proxy_anchor": (lambda c: ProxyAnchorLoss(c, D), "proxies", 1),
    "proxy_isa": (lambda c: ProxyISALoss(c, D, memory_size=32), "proxies", 1),
}


def class_rows(param, name, k):
    """The weights as a list over classes of lists over centers of (D,) vectors (test's own
    reading of each layout)."""
    if name == "proxies":
        return [[param[c]] for c in range(param.shape[0])]
    cols = param.shape[1] // k  # W / fc: (D, C*K), column c*K + j
    return [[param[:, c * k + j] for j in range(k)] for c in range(cols)]


def to_param(rows, name):
    flat = [v for centers in rows for v in centers]
    return torch.stack(flat) if name == "proxies" else torch.stack(flat, dim=1)


def synthesise(X, labels, rows, lam, partners, n):
    """Enlarged batch and weights from the paper's formulas, with loops."""
    ys = labels.tolist()
    xs = [unit(X[i]) for i in range(len(ys))]
    big_x = [X[i] for i in range(len(ys))]  # real rows as given (every base normalises them)
    big_rows = [list(r) for r in rows]
    for i in range(n):
        j = int(partners[i])
        big_x.append(unit(lam * xs[i] + (1 - lam) * xs[j]))
        big_rows.append([unit(lam * unit(a) + (1 - lam) * unit(b))
                         for a, b in zip(rows[ys[i]], rows[ys[j]])])
    big_labels = torch.tensor(ys + [len(rows) + i for i in range(n)])
    return torch.stack(big_x), big_labels, big_rows


# -------------------------------------------------------------------------------------------
# Pairing
# -------------------------------------------------------------------------------------------
def distinct_pairs(labels, partners):
    return set(zip(labels.tolist(), labels[partners].tolist()))


def most_distinct_pairs(labels):
    """Upper bound of distinct ordered (class, partner class) pairs: a class with n samples can
    pair with at most min(n, K - 1) other classes."""
    counts = [labels.tolist().count(c) for c in set(labels.tolist())]
    return sum(min(n, len(counts) - 1) for n in counts)


def check_pairing(labels, partners):
    assert partners.shape == labels.shape and partners.dtype == torch.long
    assert (labels[partners] != labels).all(), "a same-class partner"
    assert len(distinct_pairs(labels, partners)) == most_distinct_pairs(labels)


@pytest.mark.parametrize("order", ["class-blocks", "interleaved", "shuffled"])
@pytest.mark.parametrize("seeded", [False, True])
def test_mlrc_batch_gets_32_distinct_class_pairs(order, seeded):
    """8 classes x 4 in any order: 32 distinct ordered (class, partner) pairs (the old pairing,
    class block to class block, gave 8), every sample a partner exactly once."""
    labels = m_per_class_labels([3, 17, 20, 41, 42, 55, 60, 73], 4)
    if order == "interleaved":
        labels = labels.reshape(8, 4).t().reshape(-1)
    elif order == "shuffled":
        labels = labels[torch.randperm(32, generator=torch.Generator().manual_seed(1))]
    partners = different_class_partners(labels, np.random.default_rng(0) if seeded else None)
    check_pairing(labels, partners)
    assert len(distinct_pairs(labels, partners)) == 32
    assert sorted(partners.tolist()) == list(range(32))


def random_layout(rng: np.random.Generator):
    """Labels of a random batch: 2-9 classes of 1-9 samples each (MLRC's pass-based sampler can
    put 5+ samples of a class, or fewer than 4, in one batch), in a random order."""
    num_classes = int(rng.integers(2, 10))
    classes = rng.choice(1000, num_classes, replace=False)
    labels = np.repeat(classes, rng.integers(1, 10, num_classes))
    return torch.as_tensor(rng.permutation(labels))


def test_pairing_properties_over_random_layouts_and_orders():
    rng = np.random.default_rng(123)
    for trial in range(400):
        labels = random_layout(rng)
        check_pairing(labels, different_class_partners(labels))
        check_pairing(labels, different_class_partners(labels, np.random.default_rng(trial)))


def test_majority_class_pairs_with_every_other_class():
    labels = torch.tensor([3, 3, 3, 3, 3, 3, 1, 5])
    partners = different_class_partners(labels)
    check_pairing(labels, partners)
    assert {b for a, b in distinct_pairs(labels, partners) if a == 3} == {1, 5}


def test_pairing_is_deterministic_given_the_rng_state():
    rng = np.random.default_rng(5)
    labels = random_layout(rng)
    state = copy.deepcopy(rng.bit_generator.state)
    first = [different_class_partners(labels, rng) for _ in range(5)]
    rng.bit_generator.state = state
    again = [different_class_partners(labels, rng) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert len({tuple(p.tolist()) for p in first}) > 1  # the rng does vary the class cycle


def test_no_pairs_without_two_classes():
    assert different_class_partners(torch.tensor([2, 2, 2])) is None
    assert different_class_partners(torch.tensor([2])) is None
    assert different_class_partners(torch.tensor([2, 2]), np.random.default_rng(0)) is None


def test_all_pairs_on_every_label_set_of_a_small_batch():
    """Exhaustive: every labelling of 6 samples with up to 4 classes, every order."""
    for labels in itertools.product(range(4), repeat=6):
        labels = torch.tensor(labels)
        partners = different_class_partners(labels)
        if len(set(labels.tolist())) < 2:
            assert partners is None
        else:
            check_pairing(labels, partners)


def test_synthetic_proxies_are_distinct_under_mlrc_batches():
    """The defect the pairing fixes: with class-to-class pairs the 32 synthetic proxies were 8
    distinct vectors under 4 labels each."""
    torch.manual_seed(0)
    base = pml_losses.NormalizedSoftmaxLoss(C + 30, D)
    loss = ProxySynthesisLoss(base, generator=0)
    labels = m_per_class_labels(list(range(0, 40, 5)), 4)
    loss(torch.randn(32, D), labels)
    rows = base.W.detach().t()
    lam, mates = loss.last_lambda, loss.last_partners
    syn = torch.nn.functional.normalize(lam * unit_rows(rows[labels]) +
                                        (1 - lam) * unit_rows(rows[labels[mates]]), dim=1)
    assert len({tuple(v.round(decimals=5).tolist()) for v in syn}) == 32


def unit_rows(m):
    return torch.nn.functional.normalize(m, dim=1)


# -------------------------------------------------------------------------------------------
# lambda
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_lambda_follows_beta_distribution(alpha):
    rng = np.random.default_rng(123)
    draws = [sample_beta(alpha, rng) for _ in range(3000)]
    assert all(0.0 <= d <= 1.0 for d in draws)
    assert scipy.stats.kstest(draws, scipy.stats.beta(alpha, alpha).cdf).pvalue > 1e-3


def test_lambdas_are_numpy_beta_draws_of_the_seeded_generator():
    """Per call: one permutation draw for the class cycle, then one Beta(alpha, alpha) draw."""
    labels = m_per_class_labels([1, 2, 3], 4)
    loss = ProxySynthesisLoss(ProxyAnchorLoss(C, D), alpha=0.7, generator=42)
    twin = np.random.default_rng(42)
    for _ in range(4):
        loss(torch.randn(12, D), labels)
        twin.permutation(3)
        assert loss.last_lambda == float(twin.beta(0.7, 0.7))


def _ps_value(seed, base=None, mu=1.0):
    torch.manual_seed(0)
    base = base if base is not None else ProxyAnchorLoss(C, D)
    loss = ProxySynthesisLoss(base, mu=mu, generator=seed)
    labels = m_per_class_labels([1, 2, 3], 4)
    X, _ = make_batch(labels, C, seed=1)
    return loss, loss(X.detach().float(), labels)


def test_same_seed_same_loss_different_seed_different_lambda():
    l1, v1 = _ps_value(7)
    l2, v2 = _ps_value(7)
    l3, v3 = _ps_value(8)
    assert torch.equal(v1, v2) and l1.last_lambda == l2.last_lambda
    assert l1.last_lambda != l3.last_lambda and not torch.equal(v1, v3)


def test_default_generator_follows_torch_manual_seed():
    _, v1 = _ps_value(None)
    _, v2 = _ps_value(None)
    assert torch.equal(v1, v2)


def test_generator_state_round_trips_through_weights_only_load():
    """A restored loss draws the same lambdas and pairs as the original would have."""
    loss, _ = _ps_value(3)
    buffer = io.BytesIO()
    torch.save(loss.state_dict(), buffer)
    labels = m_per_class_labels([1, 2, 3, 4, 5, 6, 7, 8], 4)
    xs = [torch.randn(32, D, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    expected = []
    for x in xs:
        value = loss(x, labels)
        expected.append((value, loss.last_lambda, loss.last_partners))
    buffer.seek(0)
    fresh = ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=99)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    for x, (value, lam, partners) in zip(xs, expected):
        assert torch.equal(fresh(x, labels), value)
        assert fresh.last_lambda == lam and torch.equal(fresh.last_partners, partners)


def test_old_torch_generator_state_is_a_clear_error():
    loss = ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=0)
    state = loss.state_dict()
    state["_extra_state"] = {"generator_state": torch.Generator().get_state()}
    with pytest.raises(ValueError, match="numpy generator state"):
        loss.load_state_dict(state)


def test_generator_argument_types():
    ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=np.random.default_rng(1))
    with pytest.raises(TypeError, match="numpy.random.Generator"):
        ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=torch.Generator())
    with pytest.raises(TypeError):
        ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=1.5)


# -------------------------------------------------------------------------------------------
# mu = 0 and other direct paths
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base_name", list(BASES))
def test_mu_zero_is_exactly_the_base_loss(base_name):
    factory, param, _ = BASES[base_name]
    torch.manual_seed(0)
    base = factory(C)
    twin = copy.deepcopy(base)  # stateful bases (Proxy-ISA) need their own copy
    labels = m_per_class_labels([0, 4, 9], 4)
    X, _ = make_batch(labels, C, seed=2)
    x1, x2 = X.detach().float().requires_grad_(), X.detach().float().requires_grad_()
    v1 = ProxySynthesisLoss(base, mu=0.0, generator=0)(x1, labels)
    v2 = twin(x2, labels)
    v1.backward()
    v2.backward()
    assert torch.equal(v1, v2)
    assert torch.equal(x1.grad, x2.grad)
    assert torch.equal(getattr(base, param).grad, getattr(twin, param).grad)


def test_eval_mode_and_single_class_batches_run_the_base():
    torch.manual_seed(0)
    base = ProxyAnchorLoss(C, D)
    loss = ProxySynthesisLoss(base, generator=0)
    x = torch.randn(12, D)
    labels = m_per_class_labels([1, 2, 3], 4)
    loss.eval()
    assert torch.equal(loss(x, labels), base(x, labels)) and loss.last_lambda is None
    loss.train()
    one_class = torch.full((6,), 4)
    with pytest.warns(RuntimeWarning, match="single class"):
        assert torch.equal(loss(x[:6], one_class), base(x[:6], one_class))
    assert loss.num_unsynthesised_batches == 1 and loss.last_lambda is None


def test_single_class_batches_warn_once_and_are_counted():
    loss = ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=0)
    with pytest.warns(RuntimeWarning) as record:
        for _ in range(3):
            loss(torch.randn(4, D), torch.full((4,), 2))
    assert len(record) == 1 and loss.num_unsynthesised_batches == 3
    loss(torch.randn(8, D), m_per_class_labels([1, 2], 4))
    assert loss.num_unsynthesised_batches == 3 and loss.last_lambda is not None


# -------------------------------------------------------------------------------------------
# pml keyword arguments of the wrapper
# -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{"distance": pml_distances.LpDistance()},
                                    {"reducer": pml_reducers.SumReducer()},
                                    {"distance": pml_distances.CosineSimilarity(),
                                     "reducer": pml_reducers.MeanReducer()}],
                         ids=["distance", "reducer", "both"])
def test_distance_and_reducer_are_refused_with_a_clear_error(kwargs):
    """They used to be accepted and silently ignored (same value with a SumReducer)."""
    with pytest.raises(ValueError) as info:
        ProxySynthesisLoss(ProxyAnchorLoss(C, D), **kwargs)
    msg = str(info.value)
    assert all(k in msg for k in kwargs) and "base loss" in msg and "ProxyAnchorLoss" in msg


def test_embedding_regularizer_is_honoured():
    torch.manual_seed(0)
    x, labels = torch.randn(12, D) * 3, m_per_class_labels([1, 2, 3], 4)
    base = ProxyAnchorLoss(C, D)
    plain = ProxySynthesisLoss(copy.deepcopy(base), generator=4)(x, labels)
    reg = pml_regularizers.LpRegularizer()
    with_reg = ProxySynthesisLoss(copy.deepcopy(base), generator=4, embedding_regularizer=reg,
                                  embedding_reg_weight=0.5)(x, labels)
    assert_close(with_reg - plain, 0.5 * reg(x).mean(), TOL[torch.float32])


# -------------------------------------------------------------------------------------------
# The enlarged loss against references
# -------------------------------------------------------------------------------------------
def ref_normalized_softmax(big_x, big_labels, big_rows, temperature):
    total = 0.0
    for i, y in enumerate(big_labels.tolist()):
        x = unit(big_x[i])
        logits = [torch.dot(x, unit(r[0])) / temperature for r in big_rows]
        total = total - logits[y] + torch.log(sum(torch.exp(v) for v in logits))
    return total / len(big_labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mu", [1.0, 0.5])
@pytest.mark.parametrize("base_name", ["normalized_softmax", "proxy_anchor"])
def test_enlarged_loss_matches_reference(dtype, mu, base_name):
    labels = m_per_class_labels([2, 3, 7], 4)
    X, P = make_batch(labels, C, seed=4)
    if base_name == "normalized_softmax":
        base, param = pml_losses.NormalizedSoftmaxLoss(C, D, temperature=0.1), "W"
        W = P.detach().t().clone().requires_grad_()
    else:
        base, param = ProxyAnchorLoss(C, D), "proxies"
        W = P
    loss = ProxySynthesisLoss(base.to(dtype), mu=mu, generator=11)
    with torch.no_grad():
        getattr(base, param).copy_(W.detach().to(dtype))
    x = X.detach().to(dtype).requires_grad_()
    value = loss(x, labels)
    value.backward()

    n = int(len(labels) * (1 + mu)) - len(labels)
    partners = loss.last_partners
    assert (labels[partners] != labels).all()
    rows = class_rows(W, param, 1)
    big_x, big_labels, big_rows = synthesise(X, labels, rows, loss.last_lambda, partners, n)
    if base_name == "normalized_softmax":
        ref = ref_normalized_softmax(big_x, big_labels, big_rows, 0.1)
    else:
        ref = ref_proxy_anchor(big_x, big_labels, torch.stack([r[0] for r in big_rows]))
    rgx, rgw = torch.autograd.grad(ref, (X, W))
    assert_close(value, ref, dtype)
    assert_close(x.grad, rgx, dtype)
    assert_close(getattr(base, param).grad, rgw, dtype)


@pytest.mark.parametrize("base_name", list(BASES))
def test_every_base_equals_the_base_run_on_the_synthesised_sets(base_name):
    """PS output == a fresh base with C + n classes whose weights and inputs were enlarged by
    the test's own loops (SoftTriple: each center of the two classes mixed)."""
    factory, param, k = BASES[base_name]
    torch.manual_seed(0)
    base = factory(C).double()
    loss = ProxySynthesisLoss(base, generator=5)
    labels = m_per_class_labels([0, 5, 6], 4)
    X, _ = make_batch(labels, C, seed=6)
    value = loss(X.detach(), labels)
    n = len(labels)
    rows = class_rows(getattr(base, param).detach(), param, k)
    big_x, big_labels, big_rows = synthesise(X.detach(), labels, rows, loss.last_lambda,
                                             loss.last_partners, n)
    big_base = factory(C + n).double()
    with torch.no_grad():
        getattr(big_base, param).copy_(to_param(big_rows, param))
    assert_close(value, big_base(big_x, big_labels), TOL[torch.float64])


def test_soft_triple_regulariser_sees_the_real_centers_only():
    torch.manual_seed(0)
    reg_base = pml_losses.SoftTripleLoss(C, D, centers_per_class=3,
                                         weight_regularizer=SparseCentersRegularizer(3),
                                         weight_reg_weight=0.5)
    plain_base = pml_losses.SoftTripleLoss(C, D, centers_per_class=3)
    plain_base.load_state_dict(reg_base.state_dict())
    labels = m_per_class_labels([1, 2, 3], 4)
    x = torch.randn(12, D)
    with_reg = ProxySynthesisLoss(reg_base, generator=1)(x, labels)
    without = ProxySynthesisLoss(plain_base, generator=1)(x, labels)
    expected_reg = 0.5 * SparseCentersRegularizer(3)(reg_base.fc.t())
    assert_close(with_reg - without, expected_reg, TOL[torch.float32])
    assert reg_base.weight_regularizer.__class__ is SparseCentersRegularizer  # restored


def test_bf16_autocast_close_to_float32():
    values = []
    for autocast in (False, True):
        torch.manual_seed(0)
        loss = ProxySynthesisLoss(ProxyAnchorLoss(C, D), generator=2)
        labels = m_per_class_labels([1, 2, 3], 4)
        x = torch.randn(12, D, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            value = loss(x, labels)
        value.backward()
        assert torch.isfinite(x.grad).all()
        values.append(value)
    assert_close(values[1], values[0], BF16_TOL)


# -------------------------------------------------------------------------------------------
# Base handling
# -------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pml SphereFace's numpy call
@pytest.mark.parametrize("make", [lambda: pml_losses.TripletMarginLoss(),
                                  lambda: pml_losses.SphereFaceLoss(C, D)],
                         ids=["triplet", "sphereface"])
def test_unsupported_base_is_a_clear_type_error(make):
    bad = make()
    with pytest.raises(TypeError) as info:
        ProxySynthesisLoss(bad)
    for name in ["ProxyNCALoss", "ProxyAnchorLoss", "NormalizedSoftmaxLoss", "SoftTripleLoss",
                 "ProxyISALoss", type(bad).__name__]:
        assert name in str(info.value)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ProxySynthesisLoss(ProxyAnchorLoss(C, D), mu=1.5)
    with pytest.raises(ValueError):
        ProxySynthesisLoss(ProxyAnchorLoss(C, D), alpha=0.0)


def test_base_attributes_restored_after_the_call():
    for base in (pml_losses.ProxyNCALoss(C, D), pml_losses.CosFaceLoss(C, D)):
        before = {k: v for k, v in vars(base).items() if isinstance(v, (int, float))}
        loss = ProxySynthesisLoss(base, generator=0)
        loss(torch.randn(12, D), m_per_class_labels([1, 2, 3], 4))
        after = {k: v for k, v in vars(base).items() if isinstance(v, (int, float))}
        assert before == after
        if isinstance(base, pml_losses.ProxyNCALoss):
            assert torch.equal(base.proxy_labels, torch.arange(C))
        name = "proxies" if isinstance(base, pml_losses.ProxyNCALoss) else "W"
        assert isinstance(getattr(base, name), torch.nn.Parameter)
        assert getattr(base, name).numel() == C * D


def test_set_epoch_reaches_proxy_isa_and_synthetics_never_touch_its_state():
    isa = ProxyISALoss(C, D, memory_size=100)
    loss = ProxySynthesisLoss(isa, generator=0)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for epoch in (1, 2, 3):
        loss.set_epoch(epoch)
        assert int(isa.epoch) == epoch
        for _ in range(3):
            labels = m_per_class_labels(torch.randperm(C, generator=g)[:3].tolist(), 4)
            value = loss(torch.randn(12, D, generator=g, requires_grad=True), labels)
            value.backward()
            seen += 12
    assert isa.class_counts.numel() == C and isa.num_classes == C
    assert 0 < int(isa.class_counts.sum()) <= seen
    _, queue_labels = isa.memory()
    assert int(queue_labels.max()) < C


@pytest.mark.filterwarnings("ignore:ProxySynthesisLoss. a training batch")
@pytest.mark.parametrize("labels", [[3, 3, 7, 7], [0, 9], [4, 4, 4, 4], [5]],
                         ids=["absent-classes", "batch-of-2", "one-class", "batch-of-1"])
@pytest.mark.parametrize("base_name", ["pml_normalized_softmax", "proxy_anchor", "proxy_isa"])
def test_edge_batches(labels, base_name):
    factory, param, _ = BASES[base_name]
    torch.manual_seed(0)
    base = factory(C)
    twin = copy.deepcopy(base)
    loss = ProxySynthesisLoss(base, generator=0)
    labels = torch.tensor(labels)
    x = torch.randn(len(labels), D, requires_grad=True)
    value = loss(x, labels)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(x.grad).all()
    assert torch.isfinite(getattr(base, param).grad).all()
    if len(set(labels.tolist())) < 2:  # no different-class pair: exactly the base loss
        assert loss.last_lambda is None and torch.equal(value, twin(x, labels))
        assert loss.num_unsynthesised_batches == 1
    else:
        assert (labels[loss.last_partners] != labels).all()
