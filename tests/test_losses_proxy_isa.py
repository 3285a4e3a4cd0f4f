"""Proxy-ISA against a loop reference of the paper's formulas, state handling and edge cases."""

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

from losses import ProxyAnchorLoss, ProxyISALoss
from conftest import (
    BF16_TOL, TOL, assert_close, m_per_class_labels, make_batch, ref_proxy_anchor, run, unit,
)


class RefISA:
    """Proxy-ISA written from the formulas with Python loops and lists (float64)."""

    def __init__(self, C, alpha=32.0, delta=0.1, V=100.0, h=0.15, k=0.9, lambda_=0.1, tau=1.5,
                 memory_size=55000, memory_start_epoch=2, filter_start_epoch=3,
                 weight_negatives_before_filter=True):
        self.C, self.alpha, self.delta = C, alpha, delta
        self.V, self.h, self.k, self.lam, self.tau = V, h, k, lambda_, tau
        self.memory_size = memory_size
        self.mem_start, self.filt_start = memory_start_epoch, filter_start_epoch
        self.neg_before = weight_negatives_before_filter
        self.counts, self.E, self.S = [0] * C, [0.0] * C, [1.0] * C
        self.queue = []  # (feature, label), oldest first, at most memory_size
        self.epoch = 1
        self.seen = {"informative": 0, "outliers": 0, "neg_downweighted": 0, "sigma_not_1": 0}

    def class_values(self, c):
        E, S = self.E[c], self.S[c]
        v = 1.0 / (1.0 + math.log(1.0 + E))
        x = self.V - E - self.tau
        # 1 / (1 + e^x) underflows to 0 for large x (math.exp would overflow)
        ramp = 1.0 / (1.0 + math.exp(x)) if x < 700 else 0.0
        sigma = 1.0 + (1.0 + math.exp(-self.tau)) * (v - 1.0) * ramp
        eta = (1.0 + self.k * (1.0 - S)) * v + self.lam
        return S, S - eta, sigma, 1.0 / max(1.0, E)

    def __call__(self, X, labels, P, training=True):
        mem_on, filt_on = self.epoch >= self.mem_start, self.epoch >= self.filt_start
        ys = [int(y) for y in labels]
        B = len(ys)
        xs = [unit(X[i]).detach() for i in range(B)]
        ps = [unit(P[c]).detach() for c in range(self.C)]
        cos = [[float(torch.dot(xs[i], ps[c])) for c in range(self.C)] for i in range(B)]
        weights = [[1.0] * self.C for _ in range(B)]
        for i in range(B):
            for c in range(self.C):
                S, o, sigma, neg_scale = self.class_values(c)
                s = cos[i][c]
                if ys[i] == c and filt_on:
                    weights[i][c] = 1.0 + sigma if o <= s <= S else sigma
                    self.seen["informative"] += o <= s <= S
                    self.seen["sigma_not_1"] += sigma != 1.0
                elif ys[i] != c and (filt_on or self.neg_before) and s < o:
                    weights[i][c] = neg_scale
                    self.seen["neg_downweighted"] += neg_scale != 1.0
        z_pos = 0.0
        for c in sorted(set(ys)):
            members = [i for i in range(B) if ys[i] == c]
            z_pos += sum(weights[i][c] for i in members) / len(members)
        z_neg = 0.0
        for c in range(self.C):
            others = [i for i in range(B) if ys[i] != c]
            z_neg += sum(weights[i][c] for i in others) / len(others) if others else 1.0
        value = ref_proxy_anchor(X, labels, P, self.alpha, self.delta, weights, z_pos, z_neg)
        if training:
            self.update(xs, ys, ps, cos, filt_on, mem_on)
        return value, weights

    def update(self, xs, ys, ps, cos, filt_on, mem_on):
        kept = []
        for i, y in enumerate(ys):
            if filt_on and cos[i][y] < self.class_values(y)[1]:
                self.seen["outliers"] += 1
            else:
                kept.append(i)
        b = (self.V - 1.0) / self.V
        for i in kept:
            self.counts[ys[i]] += 1
        for c in {ys[i] for i in kept}:
            self.E[c] = (1.0 - b ** self.counts[c]) / (1.0 - b)
        if mem_on:
            for i in kept:
                self.queue.append((xs[i], ys[i]))
            self.queue = self.queue[-self.memory_size:]
            for c in set(ys):
                sims = [float(torch.dot(f, ps[c])) for f, lab in self.queue if lab == c]
                if sims:
                    self.S[c] = self.h * sum(sims) / len(sims)


def training_batches(C, steps, seed=0, dim=16):
    """Batches of 3 classes x 4 near their (drifting) proxies, with a few outliers."""
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(C, dim, generator=g, dtype=torch.float64)
    for step in range(steps):
        classes = torch.randperm(C, generator=g)[:3].tolist()
        labels = m_per_class_labels(classes, 4)
        P = P + 0.3 * torch.randn(C, dim, generator=g, dtype=torch.float64)  # proxies move
        X = P[labels] / P[labels].norm(dim=1, keepdim=True) * 3.0
        X = X + torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
        X[::5] = -X[::5]  # outliers: far from their own proxy
        yield X.clone().requires_grad_(), labels, P.clone().requires_grad_()


SETTINGS = {
    "official-defaults": dict(),
    "active": dict(V=10.0, h=1.0, k=0.4, lambda_=0.05, memory_size=20),
    "code-epochs-no-early-negatives": dict(V=10.0, h=0.8, memory_size=20, memory_start_epoch=3,
                                           filter_start_epoch=4,
                                           weight_negatives_before_filter=False),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_proxy_isa_matches_loop_reference_through_training(dtype, setting):
    C, steps_per_epoch, epochs = 8, 3, 5
    kwargs = SETTINGS[setting]
    loss = ProxyISALoss(C, 16, **{"memory_size": 55000, **kwargs}).to(dtype)
    ref = RefISA(C, **kwargs)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    batches = training_batches(C, steps_per_epoch * epochs)
    for epoch in range(1, epochs + 1):
        loss.set_epoch(epoch)
        ref.epoch = epoch
        for _ in range(steps_per_epoch):
            X, labels, P = next(batches)
            value, gx, gp = run(loss, X, P, labels, dtype)
            ref_value, _ = ref(X, labels, P)
            rgx, rgp = torch.autograd.grad(ref_value, (X, P))
            assert_close(value, ref_value, tol)
            assert_close(gx, rgx, tol)
            assert_close(gp, rgp, tol)
            assert loss.class_counts.tolist() == ref.counts
            assert_close(loss.effective_num, torch.tensor(ref.E, dtype=torch.float64), tol)
            assert_close(loss.similarity, torch.tensor(ref.S, dtype=torch.float64), tol)
            feats, labs = loss.memory()
            assert labs.tolist() == [lab for _, lab in ref.queue]
            if ref.queue:
                assert_close(feats, torch.stack([f for f, _ in ref.queue]), tol)
    # the data exercised every rule (these counts are the reference's, not the loss's)
    assert ref.seen["informative"] > 0 and ref.seen["outliers"] > 0
    assert ref.seen["neg_downweighted"] > 0
    if kwargs.get("V", 100.0) <= 10:  # sigma leaves 1 only once E_c nears V
        assert ref.seen["sigma_not_1"] > 0


def test_first_forward_equals_proxy_anchor_exactly():
    C = 10
    labels = m_per_class_labels([1, 5, 6], 4)
    X, P = make_batch(labels, C, seed=11)
    for dtype in (torch.float32, torch.float64):
        pa = run(ProxyAnchorLoss(C, 16).to(dtype), X, P, labels, dtype)
        isa = run(ProxyISALoss(C, 16).to(dtype), X, P, labels, dtype)
        for a, b in zip(pa, isa):
            assert torch.equal(a, b)


def test_first_forward_equals_proxy_anchor_bf16_autocast():
    C = 10
    labels = m_per_class_labels([1, 5, 6], 4)
    X, P = make_batch(labels, C, seed=12)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pa = run(ProxyAnchorLoss(C, 16), X, P, labels, torch.float32)
        isa = run(ProxyISALoss(C, 16), X, P, labels, torch.float32)
    for a, b in zip(pa, isa):
        assert_close(a, b, BF16_TOL)
    assert_close(isa[0], ref_proxy_anchor(X, labels, P), BF16_TOL)


def _train(loss, batches, epochs, steps_per_epoch, dtype=torch.float32):
    for epoch in epochs:
        loss.set_epoch(epoch)
        for _ in range(steps_per_epoch):
            X, labels, P = next(batches)
            run(loss, X, P, labels, dtype)


def test_state_dict_round_trip_mid_training():
    C = 8
    kwargs = dict(V=10.0, h=1.0, memory_size=20)
    trained = ProxyISALoss(C, 16, **kwargs)
    batches = training_batches(C, 20, seed=3)
    _train(trained, batches, epochs=[1, 2, 3, 4], steps_per_epoch=3)
    buffer = io.BytesIO()
    torch.save(trained.state_dict(), buffer)
    buffer.seek(0)
    fresh = ProxyISALoss(C, 16, **kwargs)
    fresh.load_state_dict(torch.load(buffer))
    assert fresh.memory_active and fresh.filter_active and int(fresh.epoch) == 4
    assert int(trained.queue_size) == 20  # the queue has wrapped
    for _ in range(2):  # identical next losses, gradients and states
        X, labels, P = next(batches)
        a, b = run(trained, X, P, labels, torch.float32), run(fresh, X, P, labels, torch.float32)
        for u, v in zip(a, b):
            assert torch.equal(u, v)
        for (name, u), (_, v) in zip(trained.state_dict().items(), fresh.state_dict().items()):
            assert torch.equal(u, v), name


def test_state_lives_in_buffers():
    names = dict(ProxyISALoss(4, 8, memory_size=5).named_buffers())
    for name in ["class_counts", "effective_num", "similarity", "queue_feats", "queue_labels",
                 "queue_ptr", "queue_size", "queue_class_sum", "queue_class_count", "epoch",
                 "memory_start_epoch", "filter_start_epoch"]:
        assert name in names


def test_ring_buffer_wraps():
    C, D, size = 30, 8, 10
    loss = ProxyISALoss(C, D, memory_size=size)
    loss.set_epoch(2)  # memory on, filter off: every sample is enqueued
    g = torch.Generator().manual_seed(0)
    expected = []  # (normalised feature, label), oldest first
    for n, first in [(4, 0), (4, 4), (4, 8), (13, 12), (3, 25)]:
        labels = torch.arange(first, first + n)
        x = torch.randn(n, D, generator=g)
        loss(x, labels)
        expected = (expected + list(zip(F.normalize(x, dim=1), labels.tolist())))[-size:]
        feats, labs = loss.memory()
        assert labs.tolist() == [lab for _, lab in expected]
        assert_close(feats, torch.stack([f for f, _ in expected]), torch.float32)
        # the per-class sums kept for S_c follow the evictions
        sums = torch.zeros(C, D, dtype=torch.float64)
        for f, lab in expected:
            sums[lab] += f.double()
        assert_close(loss.queue_class_sum, sums, torch.float32)
        assert loss.queue_class_count.tolist() == [
            sum(lab == c for _, lab in expected) for c in range(C)]
    assert int(loss.queue_ptr) == (4 + 4 + 4 + 13 + 3) % size
    assert int(loss.queue_size) == size


def test_weights_carry_no_gradient(monkeypatch):
    C = 8
    loss = ProxyISALoss(C, 16, V=10.0, h=1.0)
    seen = []
    original = loss.pair_weights

    def spy(cos, labels, pos_mask):
        out = original(cos, labels, pos_mask)
        seen.append(out)
        return out

    monkeypatch.setattr(loss, "pair_weights", spy)
    _train(loss, training_batches(C, 9, seed=5), epochs=[1, 2, 3], steps_per_epoch=3)
    assert seen and all(not w.pos.requires_grad and not w.neg.requires_grad for w in seen)
    assert not torch.equal(seen[-1].pos, torch.ones_like(seen[-1].pos))  # non-trivial weights
    for buffer in loss.buffers():
        assert not buffer.requires_grad


def test_eval_mode_changes_no_state():
    C = 8
    loss = ProxyISALoss(C, 16, memory_size=20)
    _train(loss, training_batches(C, 6, seed=6), epochs=[2, 3], steps_per_epoch=3)
    before = copy.deepcopy(dict(loss.named_buffers()))
    loss.eval()
    X, labels, P = next(training_batches(C, 1, seed=7))
    run(loss, X, P, labels, torch.float32)
    for name, value in loss.named_buffers():
        assert torch.equal(value, before[name]), name
    loss.train()
    run(loss, X, P, labels, torch.float32)
    assert not torch.equal(loss.class_counts, before["class_counts"])


def test_set_epoch_switches_memory_then_filter():
    loss = ProxyISALoss(4, 8, memory_start_epoch=2, filter_start_epoch=3)
    phases = []
    for epoch in [1, 2, 3, 7]:
        loss.set_epoch(epoch)
        phases.append((loss.memory_active, loss.filter_active))
    assert phases == [(False, False), (True, False), (True, True), (True, True)]


def test_memory_and_counts_only_after_start():
    C = 8
    loss = ProxyISALoss(C, 16, memory_size=50)
    _train(loss, training_batches(C, 3, seed=8), epochs=[1], steps_per_epoch=3)
    assert int(loss.queue_size) == 0 and int(loss.class_counts.sum()) == 36  # counted from batch 1
    assert torch.equal(loss.similarity, torch.ones(C, dtype=torch.float64))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="V"):
        ProxyISALoss(4, 8, V=1.0)
    with pytest.raises(ValueError, match="memory_size"):
        ProxyISALoss(4, 8, memory_size=0)
    from pytorch_metric_learning.distances import LpDistance
    with pytest.raises(AssertionError):
        ProxyISALoss(4, 8, distance=LpDistance())


def test_sop_scale_runs_vectorised():
    """11,318 classes, batch 180 (45 classes x 4), memory and filter on: a few steps."""
    C, D = 11318, 128
    loss = ProxyISALoss(C, D, memory_size=5000)
    loss.set_epoch(3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        labels = m_per_class_labels(torch.randperm(C, generator=g)[:45].tolist(), 4)
        x = torch.randn(180, D, generator=g, requires_grad=True)
        value = loss(x, labels)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(loss.proxies.grad).all()
    assert 0 < int(loss.queue_size) <= 540


def test_training_under_bf16_autocast_tracks_float32():
    C = 8
    kwargs = SETTINGS["active"]
    exact, mixed = ProxyISALoss(C, 16, **kwargs), ProxyISALoss(C, 16, **kwargs)
    batches = list(training_batches(C, 12, seed=9))
    for epoch in range(1, 5):
        exact.set_epoch(epoch)
        mixed.set_epoch(epoch)
        for X, labels, P in batches[(epoch - 1) * 3: epoch * 3]:
            v32, _, _ = run(exact, X, P, labels, torch.float32)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                v16, gx, gp = run(mixed, X, P, labels, torch.float32)
            assert torch.isfinite(gx).all() and torch.isfinite(gp).all()
            assert_close(v16, v32, dict(rtol=5e-2, atol=5e-2))
    assert mixed.queue_feats.dtype == torch.float32 and int(mixed.queue_size) > 0
